"""ExtentMap keeps "first writer wins" for every byte, checked against a byte-per-byte model."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from process_server.extent_map import ExtentMap

SIZE = 256
ranges = st.tuples(st.integers(0, SIZE - 1), st.integers(1, 64)).map(
    lambda t: (t[0], min(SIZE, t[0] + t[1]))
)


def _model(fills: list[tuple[int, int]]) -> list[int | None]:
    owner: list[int | None] = [None] * SIZE
    for value, (start, end) in enumerate(fills):
        for i in range(start, end):
            if owner[i] is None:
                owner[i] = value
    return owner


def _flatten(pieces) -> list[int | None]:
    out: list[int | None] = []
    for start, end, value in pieces:
        out.extend([value] * (end - start))
    return out


def _assert_like(m: ExtentMap[int], model: list[int | None], probe: tuple[int, int]) -> None:
    """``m`` maps every byte as ``model`` does, whole and over ``probe``, in pieces that are
    non-empty, ordered and disjoint, and counts its covered bytes right."""
    assert _flatten(m.lookup(0, SIZE)) == model
    start, end = probe
    assert _flatten(m.lookup(start, end)) == model[start:end]
    assert m.covered_bytes == sum(v is not None for v in model)
    pieces = list(m.items())
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(pieces))
    assert all(a[0] < a[1] for a in pieces)


@given(st.lists(ranges, max_size=30), st.booleans(), ranges)
@settings(max_examples=300, deadline=None)
def test_first_writer_wins_like_the_model(fills, bulk, probe):
    m: ExtentMap[int] = ExtentMap()
    items = [(s, e, i) for i, (s, e) in enumerate(fills)]
    if bulk:
        m.fill_many(items)
    else:
        for s, e, v in items:
            m.fill(s, e, v)
    _assert_like(m, _model(fills), probe)


def test_lookup_of_an_empty_map_is_one_gap():
    assert list(ExtentMap().lookup(10, 20)) == [(10, 20, None)]


@given(st.lists(st.tuples(st.booleans(), ranges), max_size=30), ranges)
@settings(max_examples=300, deadline=None)
def test_assign_makes_the_last_writer_win_like_the_model(ops, probe):
    """``assign`` overrides whatever is mapped (``fill`` still fills only gaps), mixed."""
    m: ExtentMap[int] = ExtentMap()
    model: list[int | None] = [None] * SIZE
    for value, (last_wins, (start, end)) in enumerate(ops):
        if last_wins:
            m.assign(start, end, value)
        else:
            m.fill(start, end, value)
        for i in range(start, end):
            if last_wins or model[i] is None:
                model[i] = value
    _assert_like(m, model, probe)
