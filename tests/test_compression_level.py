"""The shipper's compression level (agent/compression_level.py): it starts at the configured
level, steps down one zstd level per batch only while the encoder is what the link waits
for, steps back up when the link waits or nothing is behind (for a copy, which always has
something behind: after ``patience`` batches in a row with no signal), never leaves the
configured range and never lands on 0 (which in the configuration means "off")."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.compression_level import AdaptiveLevel, level_ladder

zstd_levels = st.integers(-5, 19).filter(bool)


def test_ladder_skips_zero_and_spans_fast_to_configured() -> None:
    assert level_ladder(1, -5) == [-5, -4, -3, -2, -1, 1]
    assert level_ladder(3, 1) == [1, 2, 3]
    assert level_ladder(0, -5) == [0]  # compression off stays off
    assert level_ladder(-2, -2) == [-2]
    assert level_ladder(1, 3) == [1]  # a fast level above the level: the level alone


def test_an_encoder_bound_link_steps_down_then_back_up() -> None:
    adaptive = AdaptiveLevel(3, -2)
    assert adaptive.level == 3 and not adaptive.fixed
    seen = [adaptive.after_batch(link_bound=False, encoder_bound=True) for _ in range(6)]
    assert seen == [2, 1, -1, -2, -2, -2]
    assert adaptive.after_batch(link_bound=True, encoder_bound=True) == -1  # the link wins
    assert adaptive.after_batch(link_bound=False, encoder_bound=False) == 1  # nothing behind
    assert [adaptive.after_batch(link_bound=True, encoder_bound=False) for _ in range(3)] == [
        2,
        3,
        3,
    ]


def test_off_and_fixed_never_move() -> None:
    for level, fast in ((0, -5), (5, 5)):
        adaptive = AdaptiveLevel(level, fast)
        assert adaptive.fixed
        for link_bound in (True, False):
            for encoder_bound in (True, False):
                assert adaptive.after_batch(link_bound=link_bound, encoder_bound=encoder_bound) == (
                    0 if level == 0 else 5
                )


def test_a_patient_level_steps_up_only_after_that_many_quiet_batches() -> None:
    """The copy's use: the readers behind step down at once; batches with no signal step
    up only ``patience`` in a row; a full window steps up at once and restarts the count."""
    adaptive = AdaptiveLevel(1, -5, patience=3)
    assert [adaptive.after_batch(link_bound=False, encoder_bound=True) for _ in range(3)] == [
        -1,
        -2,
        -3,
    ]
    quiet = [adaptive.after_batch(link_bound=False, encoder_bound=False) for _ in range(7)]
    assert quiet == [-3, -3, -2, -2, -2, -1, -1]
    assert adaptive.after_batch(link_bound=True, encoder_bound=False) == 1
    # A step down restarts the count too: two quiet, one down, two quiet: no step up.
    signals = [(False, False), (False, False), (False, True), (False, False), (False, False)]
    seen = [adaptive.after_batch(link_bound=a, encoder_bound=b) for a, b in signals]
    assert seen == [1, 1, -1, -1, -1]
    assert adaptive.after_batch(link_bound=False, encoder_bound=False) == 1  # the third


signal_lists = st.lists(st.tuples(st.booleans(), st.booleans()), max_size=60)


@given(level=zstd_levels, fast=zstd_levels, patience=st.integers(1, 5), signals=signal_lists)
def test_levels_stay_in_range_and_move_one_rung_at_a_time(
    level: int, fast: int, patience: int, signals: list[tuple[bool, bool]]
) -> None:
    _check_against_the_rules(level, fast, patience, signals)


@given(
    level=st.integers(1, 4),
    fast=st.integers(-5, -1),
    patience=st.integers(1, 4),
    signals=signal_lists,
)
def test_a_ladder_of_several_rungs_moves_by_the_rules(
    level: int, fast: int, patience: int, signals: list[tuple[bool, bool]]
) -> None:
    """Levels drawn apart often give a ladder of one rung, where every step is 0: here
    there is always room to move."""
    _check_against_the_rules(level, fast, patience, signals)


def _check_against_the_rules(
    level: int, fast: int, patience: int, signals: list[tuple[bool, bool]]
) -> None:
    ladder = level_ladder(level, fast)
    adaptive = AdaptiveLevel(level, fast, patience=patience)
    previous = adaptive.level
    assert previous == level
    quiet = 0  # the model's own count of batches with no signal
    for link_bound, encoder_bound in signals:
        current = adaptive.after_batch(link_bound=link_bound, encoder_bound=encoder_bound)
        assert current != 0 and min(fast, level) <= current <= level
        step = ladder.index(current) - ladder.index(previous)
        quiet = quiet + 1 if not (link_bound or encoder_bound) else 0
        if link_bound or (not encoder_bound and quiet == patience):
            assert step == (1 if previous != level else 0)
            quiet = 0
        elif encoder_bound:
            assert step == (-1 if previous != ladder[0] else 0)
        else:
            assert step == 0
        previous = current
