"""``python -m benchmarks.sync_timeline`` (a diagnostic, docs/benchmarks.md): its samples
describe a real initial sync consistently, the replica it times equals the source
(compared here with a digest of both files, outside the code under test), and with
``--trace`` every batch is stamped at every stage by both services, in the pipeline's order."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest

from benchmarks.sync_timeline import COLUMNS, _option, main, render, timeline
from tests.bench_helpers import require_tools


def _digest(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


@pytest.mark.timeout(300)
def test_timeline_of_a_real_initial_sync(tmp_path: Path) -> None:
    require_tools("ss")  # the wire bytes (benchmarks/tcp_bytes.py)
    # The journal's path (the stages stamped are a batch's): a copy in bulk has none.
    result = timeline(
        tmp_path / "t",
        size_gib=1,
        interval=0.05,
        options={"compression_level": 0, "initial_copy": "journal"},
        trace=True,
    )
    samples = result["samples"]
    assert samples and all(set(row) == set(COLUMNS) for row in samples)
    for row in samples:  # each stage is behind the one before it
        assert row["acked"] <= row["journaled"] and row["applied"] <= row["cached"]
    for a, b in itertools.pairwise(samples):  # and nothing goes backwards
        for column in ("t", "journaled", "acked", "cached", "applied", "dev_written_mib"):
            assert b[column] >= a[column], (column, a, b)
    last = samples[-1]
    assert last["state"] == "replicating"
    assert last["acked"] == last["journaled"] and last["applied"] >= last["journaled"]
    # half of 1 GiB is data, in 1 MiB references at most: at least 512 records journaled
    assert last["journaled"] >= (result["data_bytes"] >> 20) == 512
    # raw batches (compression_level 0): the wire carried at least the data
    assert result["wire_bytes"] >= result["data_bytes"]
    assert _digest(result["replica"]) == _digest(result["source"])
    assert "applied" in render(result)
    # The stage stamps of both services: every batch at every stage, in the pipeline's order
    # (nothing acknowledged or applied before the cache held it durably).
    trace = result["trace"]
    assert trace["violations"] == []
    assert last["journaled"] // 4 <= trace["batches"] <= last["journaled"]  # 4 MiB batches
    assert all(leg["n"] == trace["batches"] for leg in trace["legs"].values())
    assert trace["legs"]["built -> applied"]["mean_ms"] > 0
    assert 0 < trace["applier"]["busy_fraction"] <= 1
    assert trace["digest_requests"]["n"] >= 64  # 1 GiB in 16 MiB ranges, each asked once
    assert "rule violations: 0" in render(result)


def test_options_parse_as_toml_values() -> None:
    assert _option("compression_level=0") == ("compression_level", 0)
    assert _option("window_batches=32") == ("window_batches", 32)
    assert _option("name=plain") == ("name", "plain")


def test_cli_rejects_a_bad_option_before_deploying(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--option", "no-equals-sign", "--tmpdir", str(tmp_path)])
    assert exc.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err
