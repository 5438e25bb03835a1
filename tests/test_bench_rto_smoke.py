"""``tidemark-bench rto --quick`` runs end to end in a subprocess (failovers of each mode on a
1 GiB and a 4 GiB disk checked with qemu-io / qemu-img, ``--to FILE`` against ``cp``,
replication with the undo log on and off), reports sane figures and leaves nothing behind;
plus the pure helpers. fio or qemu missing skips only outside CI; with CI set it fails."""

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

from benchmarks.cli import SCENARIOS, build_parser
from benchmarks.metrics import GIB, MIB
from benchmarks.rto import MODES, QUICK_REPL_BYTES, DiskPlan, failover_args, summarize_failovers
from tests.bench_helpers import assert_nothing_left, figure_prefixed, require_tools
from tests.bench_helpers import figure_named as _figure

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("fio", "qemu-io", "qemu-img")


def test_registered_and_parses() -> None:
    assert SCENARIOS["rto"] == "benchmarks.rto"
    args = build_parser().parse_args(["rto", "--quick", "--json", "x.json"])
    assert args.scenario == "rto" and args.quick and args.json == Path("x.json")


def test_failover_arguments_per_mode() -> None:
    plan = DiskPlan("d1", 16 * GIB, 2 * GIB, GIB, 4, seed=1, point_id="manual-x")
    got = {mode: failover_args(mode, plan) for mode in MODES}
    assert got == {
        "test@point": ["failover", "d1", "--point", "manual-x", "--test"],
        "test@latest-processed": ["failover", "d1", "--point", "latest-processed", "--test"],
        "unplanned@point": ["failover", "d1", "--point", "manual-x"],
        "planned@latest": ["failover", "d1", "--point", "latest", "--planned"],
    }


def test_compare_ranges_cover_the_writes_after_the_point() -> None:
    plan = DiskPlan("d1", 16 * GIB, 2 * GIB, GIB, 16, seed=7)
    ranges = plan.ranges()
    assert ranges[0] == (0, 3 * GIB)  # every write after the point but the marker MiBs
    assert (8 * GIB, MIB) in ranges and (16 * GIB - MIB, MIB) in ranges
    assert 3 <= len(ranges) <= 1 + 2 + 16 and all(o >= 3 * GIB for o, _ in ranges[1:])
    assert all(o + n <= plan.size and o % MIB == 0 for o, n in ranges)
    assert ranges == plan.ranges()  # seeded: the same ranges for every failover


def test_summary_keeps_worst_and_median() -> None:
    rows = [
        {"mode": "test@point", "size": GIB, "end_to_end_s": t, "server_total_s": t / 10}
        | {"cli_wall_s": t, "client_alone_s": 0.005}
        for t in (0.2, 0.9, 0.3)
    ]
    s = summarize_failovers(rows)[("test@point", GIB)]
    assert (s["n"], s["e2e_max"], s["e2e_median"], s["server_max"]) == (3, 0.9, 0.3, 0.09)


@pytest.mark.timeout(150)
def test_quick_run_reports_rto_and_cleans_up(tmp_path: Path) -> None:
    require_tools(*TOOLS)
    private_tmp = Path(tempfile.mkdtemp(prefix="tmo-smoke-", dir="/tmp"))
    try:
        _run_quick(tmp_path, private_tmp)
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def _run_quick(tmp_path: Path, private_tmp: Path) -> None:
    out = tmp_path / "rto.json"
    env = dict(os.environ, TMPDIR=str(private_tmp), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "benchmarks.cli", "rto", "--quick", "--json", str(out)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=140)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert elapsed < 140, f"rto --quick took {elapsed:.1f}s\n{proc.stderr}"

    doc = json.loads(out.read_text())
    assert doc["status"] in {"ok", "targets missed"}
    (result,) = doc["results"]
    assert result["scenario"] == "rto" and result["error"] is None
    assert result["params"]["disk_sizes"] == [GIB, 4 * GIB]
    assert result["params"]["replication_bytes_per_pass"] == QUICK_REPL_BYTES

    rows = result["details"]["rto"]["failovers"]
    assert sorted({(r["mode"], r["size"]) for r in rows}) == sorted(
        (m, s) for m in MODES for s in (GIB, 4 * GIB)
    )
    for r in rows:
        t = r["timings_ms"]
        assert 0 < t["total"] < 60_000 and {"resolve_point", "open_view", "start_export"} <= set(t)
        assert r["server_total_s"] <= r["cli_wall_s"] <= r["end_to_end_s"] < 60, r
        assert r["read_attempts"] >= 1 and r["client_alone_s"] > 0
        assert r["compare"]["equal"], r["compare"]
        point = r["point"]
        if r["mode"].endswith("@point"):
            assert point["id"].startswith("manual-") and point["tag"] == "rto"
        else:
            assert point["id"] == r["mode"].split("@", 1)[1]
        if r["mode"] == "planned@latest":
            assert "freeze_and_drain" in t
    summary = result["details"]["rto_summary"]
    assert len(summary) == 2 * len(MODES) and all(row["n"] == 1 for row in summary)
    rto = _figure(result, "RTO test@point, 1 GiB disk: launch -> first 4 KiB read (worst)")
    assert rto["unit"] == "ms" and rto["target"] == "<= 1000 ms" and rto["passed"] in (True, False)
    scale = figure_prefixed(result, "RTO test@point: 4 GiB vs 1 GiB disk")
    assert scale["baseline"] > 0 and scale["ratio"] > 0
    for name in (
        "the export at the point differs from the latest source",
        "replication resumes after cleanup (replica == source)",
        "--to FILE image == the source at the point (1 GiB disk)",
        "--to FILE image == the source at the point (4 GiB disk)",
        "replication runs: replica == source, no overflow",
    ):
        fig = _figure(result, name)
        assert fig["value"] is True and fig["critical"], fig
    assert figure_prefixed(result, "every export == its reference")["value"] is True

    to_file = figure_prefixed(result, "--to FILE at the point, fsynced (1 GiB disk")
    assert to_file["value"] > 0 and to_file["baseline"] > 0
    assert to_file["target"] == ">= 0.7x cp + sync"
    cached = figure_prefixed(result, "--to FILE vs cp --sparse=always alone")
    assert cached["value"] == to_file["value"] and cached["baseline"] >= to_file["baseline"]
    assert cached["passed"] is None  # reported, not judged
    runs = result["details"]["rto"]["to_file"][0]
    assert runs["to_file"][0]["data_bytes"] == runs["to_file"][0]["image_data_bytes"] > 0

    undo = result["details"]["undo"]
    for label, on in (("off", False), ("on", True)):
        assert undo[label]["undo"] is on and undo[label]["verify"]["equal"]
        for name, frac in (("fresh", 0.0), ("overwrite", 1.0)):
            p = undo[label]["passes"][name]
            assert p["bytes"] == QUICK_REPL_BYTES and p["overwritten_fraction"] == frac
            assert p["applied_mb_s"] > 0 and not p["overflow"]
    assert not undo["off"]["passes"]["overwrite"]["undo_bytes"]
    # The undo log's size at the end depends on retention pruning (every 5 s, up to the
    # oldest point); what it wrote shows in the process server's storage writes.
    off_w, on_w = (undo[k]["passes"]["overwrite"]["ps_storage_write_bytes"] for k in ("off", "on"))
    assert on_w > off_w + QUICK_REPL_BYTES // 4, (off_w, on_w)
    for name in ("fresh", "overwrite"):
        fig = _figure(result, f"replication, undo log on vs off, {name} pass: until applied")
        assert fig["ratio"] > 0 and fig["target"] == ">= 0.7x undo off"

    # Nothing left behind: no files in the temp dir, no process still running.
    assert list(private_tmp.iterdir()) == []
    pids = result["details"]["pids"]
    assert {"ps", "agent", "ps_undo_off", "writer_undo_off", "ps_undo_on", "writer_undo_on"} <= set(
        pids
    )
    assert_nothing_left(private_tmp, pids)
