"""Stage stamps (``common/stage_trace.py``) and their analysis (``benchmarks/stage_trace.py``):
off unless asked for, one line per stamp, latencies between stages computed exactly from
known stamps, the pipeline's rules checked (an ACK or an apply before the cache was durable
is reported), and garbage refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import stage_trace as analysis
from common import stage_trace

MS = 1_000_000


@pytest.fixture(autouse=True)
def _off() -> None:
    stage_trace.disable()
    yield
    stage_trace.disable()


def test_off_unless_the_environment_names_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(stage_trace.ENV, raising=False)
    assert stage_trace.enable("agent") is None
    stage_trace.stamp("built", 1, 4096)  # a no-op
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_directory_leaves_the_service_untraced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(stage_trace.ENV, str(tmp_path / "file" / "sub"))  # under a file
    assert stage_trace.enable("agent") is None
    stage_trace.stamp("built", 1)  # a no-op, no error
    assert "stage_trace_off" in caplog.text


def test_each_stamp_is_a_line_as_soon_as_it_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(stage_trace.ENV, str(tmp_path / "t"))
    path = stage_trace.enable("ps")
    assert path is not None and path.parent == tmp_path / "t" and path.name.startswith("ps-")
    stage_trace.stamp("received", 7)
    stage_trace.stamp("cached", 7, 3)
    lines = path.read_text().splitlines()  # read before any close: line-buffered
    assert [line.split()[1:] for line in lines] == [["received", "7", "0"], ["cached", "7", "3"]]
    first, second = (int(line.split()[0]) for line in lines)
    assert 0 < first <= second
    assert analysis.load(tmp_path / "t")["cached"][0][1:] == (7, 3)


def _write(directory: Path, name: str, stamps: list[tuple[float, str, int, int]]) -> None:
    directory.mkdir(exist_ok=True)
    with open(directory / name, "w") as f:
        for ms, stage, seq, value in stamps:
            f.write(f"{int(ms * MS)} {stage} {seq} {value}\n")


def test_latencies_and_busy_time_from_known_stamps(tmp_path: Path) -> None:
    # Two batches (seqs 4 and 8). The cache is made durable up to 8 at once; one ACK covers
    # both; the applier takes them as one group.
    _write(
        tmp_path,
        "agent-1.trace",
        [
            (0, "built", 4, 1),
            (1, "sent", 4, 0),
            (2, "built", 8, 1),
            (3, "sent", 8, 0),
            (20, "acked", 8, 0),
            (0, "digests_asked", 0, 0),
            (30, "digests_got", 0, 0),
        ],
    )
    _write(
        tmp_path,
        "ps-2.trace",
        [
            (5, "received", 4, 0),
            (6, "cached", 4, 0),
            (7, "received", 8, 0),
            (8, "cached", 8, 0),
            (18, "durable", 8, 0),
            (19, "apply_started", 0, 2),
            (29, "applied", 8, 0),
        ],
    )
    result = analysis.analyse(analysis.load(tmp_path))
    assert result["batches"] == 2 and result["violations"] == []
    legs = result["legs"]
    assert legs["built -> sent"]["mean_ms"] == 1.0
    assert legs["sent -> received"]["mean_ms"] == 4.0  # 4 and 4
    assert legs["cached -> durable"]["mean_ms"] == 11.0  # 12 and 10
    assert legs["durable -> acked"]["mean_ms"] == 2.0
    assert legs["cached -> applied"]["mean_ms"] == 22.0  # 23 and 21
    assert legs["built -> applied"]["max_ms"] == 29.0
    assert result["applier"] == {"groups": 1, "busy_s": 0.01, "span_s": 0.01, "busy_fraction": 1.0}
    assert result["digest_requests"]["mean_ms"] == 30.0
    assert "2 batches" in analysis.render(result)


def test_an_ack_or_an_apply_before_the_cache_was_durable_is_reported(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "x.trace",
        [
            (1, "built", 5, 0),
            (2, "cached", 5, 0),
            (3, "acked", 5, 0),
            (4, "applied", 5, 0),
            (9, "durable", 5, 0),
            (10, "built", 6, 0),
            (11, "cached", 6, 0),
            (12, "durable", 6, 0),
            (13, "acked", 6, 0),
        ],
    )
    result = analysis.analyse(analysis.load(tmp_path))
    assert result["violations"] == [
        "seq 5: acked before the cache was durable",
        "seq 5: applied before the cache was durable",
    ]
    assert analysis.main([str(tmp_path)]) == 1


def test_bad_input_is_refused_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path, "ok.trace", [(1, "built", 1, 0)])
    (tmp_path / "bad.trace").write_text("12 built\n")
    with pytest.raises(ValueError, match=r"bad.trace:1: expected"):
        analysis.load(tmp_path)
    assert analysis.main([str(tmp_path)]) == 1
    assert "bad.trace:1" in capsys.readouterr().err
    assert analysis.main([str(tmp_path / "missing")]) == 1
    assert "no such directory" in capsys.readouterr().err


@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40), max_size=8))
def test_any_text_parses_or_is_refused_with_value_error(lines: list[str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "g.trace").write_text("\n".join(lines))
        try:
            stages = analysis.load(Path(tmp))
        except ValueError:
            return
        analysis.render(analysis.analyse(stages))  # whatever parsed can be analysed


def test_a_group_that_never_finished_is_not_counted_as_busy() -> None:
    # starts at 0, 10 (that group failed: no `applied` before the next start) and 20
    started = [(0, 0, 1), (10, 1, 1), (20, 1, 1)]
    applied = [(5, 1, 0), (25, 2, 0)]
    assert analysis._applier_busy(started, applied) == (10, 2, 25)
