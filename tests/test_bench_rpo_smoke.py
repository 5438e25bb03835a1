"""``tidemark-bench rpo --quick`` runs end to end in a subprocess (fio churn + sentinels through
the agent's NBD export, replica watched from outside), reports sane RPO figures and leaves
nothing behind; plus the pure helpers and plotting without matplotlib. fio missing skips only
outside CI; with CI set it fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks import plots
from benchmarks.cli import SCENARIOS, build_parser
from benchmarks.rpo import (
    QUICK_RATES,
    SLOT,
    parse_sentinel,
    percentiles,
    sentinel_block,
    throughput_from_json,
)
from tests.bench_helpers import assert_nothing_left, require_tools
from tests.bench_helpers import figure_named as _figure

ROOT = Path(__file__).resolve().parent.parent


def test_registered_and_parses() -> None:
    assert SCENARIOS["rpo"] == "benchmarks.rpo"
    args = build_parser().parse_args(["rpo", "--quick", "--rates", "10,50", "--plots", "x"])
    assert args.scenario == "rpo" and args.rates == "10,50" and args.plots == Path("x")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["rpo", "--rates", "0,abc"])


def test_sentinel_roundtrip_and_torn_block() -> None:
    block = sentinel_block(7, 42, 123)
    assert len(block) == SLOT
    assert parse_sentinel(block, 7) == 42
    assert parse_sentinel(block, 8) is None  # another run's sentinel
    assert parse_sentinel(block[:2048] + bytes(2048), 7) is None  # torn
    assert parse_sentinel(bytes(SLOT), 7) is None


def test_percentiles_nearest_rank() -> None:
    p = percentiles([float(x) for x in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"], p["max"], p["n"]) == (50, 90, 99, 100, 100)
    assert percentiles([])["p99"] is None
    assert percentiles([0.5])["p50"] == 0.5


def test_plots_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert plots.available() == plots.NOT_AVAILABLE
    out = plots.rpo_over_time({"10": [(0.0, 0.1)]}, tmp_path / "a.png")
    assert out == plots.NOT_AVAILABLE == "not available (pip install tidemark[plots])"
    assert plots.throughput_vs_block({"x": [(4096, 1.0)]}, tmp_path / "b.png") == out
    assert plots.rpo_vs_churn([], tmp_path / "c.png") == out
    assert list(tmp_path.iterdir()) == []


def test_throughput_from_nbd_json(tmp_path: Path) -> None:
    runs = {
        "rand4k-qd16": {"agent": {"mb_s": 38.9}, "nbdkit": {"mb_s": 153.0}},
        "seq1m-qd8": {"agent": {"mb_s": 89.4}, "nbdkit": {"mb_s": 1449.8}},
    }
    doc = {"results": [{"scenario": "nbd", "details": {"runs": runs}}]}
    path = tmp_path / "nbd.json"
    path.write_text(json.dumps(doc))
    series = throughput_from_json(path)
    assert len(series) == 2
    agent = next(v for k, v in series.items() if k.startswith("agent"))
    assert agent == [(4096, 38.9), (1 << 20, 89.4)]


@pytest.mark.timeout(120)
def test_quick_run_reports_rpo_and_cleans_up(tmp_path: Path) -> None:
    require_tools("fio")
    private_tmp = Path(tempfile.mkdtemp(prefix="tmr-smoke-", dir="/tmp"))
    try:
        _run_quick(tmp_path, private_tmp)
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def _run_quick(tmp_path: Path, private_tmp: Path) -> None:
    out = tmp_path / "rpo.json"
    plot_dir = tmp_path / "plots"
    env = dict(os.environ, TMPDIR=str(private_tmp), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "benchmarks.cli", "rpo", "--quick", "--json", str(out)]
    cmd += ["--plots", str(plot_dir)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert elapsed < 120, f"rpo --quick took {elapsed:.1f}s\n{proc.stderr}"

    doc = json.loads(out.read_text())
    assert doc["status"] in {"ok", "targets missed"}
    (result,) = doc["results"]
    assert result["scenario"] == "rpo" and result["error"] is None
    assert result["params"]["rates_mb_s"] == list(QUICK_RATES)
    assert result["params"]["seconds_per_rate"] == 5

    rates = result["details"]["rates"]
    assert [r["requested_mb_s"] for r in rates] == list(QUICK_RATES)
    for r in rates:
        # ~10 sentinels per second for 5 s, each acknowledged and seen in the replica file
        assert 25 <= r["sentinels"] <= 60 and r["sentinels_seen"] == r["sentinels"], r
        assert r["fio_writes"] > 0 and r["achieved_mb_s"] > 0
        assert r["achieved_mb_s"] <= 1.1 * r["requested_mb_s"]  # fio's --rate holds
        for kind in ("rpo_a_cache", "rpo_b_replica_file", "rpo_b_applied_seq"):
            p = r[kind]
            assert p["n"] == r["sentinels"], (kind, p)
            assert p["p50"] <= p["p90"] <= p["p99"] <= p["max"] < 60, (kind, p)
            assert p["min"] > -0.05, (kind, p)  # seen (almost) never before acknowledged
        assert r["rpo_a_cache_lower_bound"]["p50"] <= r["rpo_a_cache"]["p50"]
        assert len(r["timeline"]) == r["sentinels_acked"]
        assert r["drained"] is True
    assert _figure(result, "every sentinel acknowledged and seen in the replica")["value"]
    assert _figure(result, "every write replicated via the journal (no overflow/resync)")["value"]
    cmp_fig = next(f for f in result["figures"] if f["name"].startswith("replica == source"))
    assert cmp_fig["value"] is True and cmp_fig["critical"]
    assert all(v["equal"] for v in result["details"]["verify"])
    p99 = _figure(result, "RPO (b) replica file p99 at 50 MB/s")
    assert p99["target"] == "<= 1 s" and p99["passed"] in (True, False)
    best = next(f for f in result["figures"] if f["name"].startswith("highest churn"))
    assert best["passed"] is None  # 200 MB/s is not part of the quick form

    # Plots: three PNGs with matplotlib, a clear note without it.
    plot_fig = _figure(result, "plots")
    if plots.available() is None:
        pngs = sorted(p.name for p in plot_dir.iterdir())
        assert pngs == ["rpo-over-time.png", "rpo-vs-churn.png", "throughput-vs-block.png"]
        for png in plot_dir.iterdir():
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
        assert result["details"]["sweep"]["agent (replicating)"]
    else:
        assert plot_fig["value"] == plots.NOT_AVAILABLE

    # Nothing left behind: no files in the temp dir, no process still running.
    assert list(private_tmp.iterdir()) == []
    pids = result["details"]["pids"]
    assert {"agent", "ps"} <= set(pids)  # plus the sweep's nbdkit servers, if any
    assert_nothing_left(private_tmp, pids)
