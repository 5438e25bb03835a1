"""``tidemark-bench failback --quick`` runs end to end in a subprocess (256 MiB disk: protect,
point, 1 % divergence made of rolled-back, unreplicated and DR writes, unplanned failover and
commit, rsync of the two images, then the timed failback through a master target), reports
sane figures in under 40 s and leaves nothing behind; plus the pure helpers. fio, rsync, cmp
or cp missing skips only outside CI; with CI set it fails."""

from __future__ import annotations

import itertools
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
from benchmarks.failback import (
    BLOCK,
    QUICK_SIZE,
    TOOLS,
    _delta_from_log,
    divergent_blocks,
    make_image,
    make_plan,
)
from benchmarks.metrics import GIB, MIB
from tests.bench_helpers import assert_nothing_left, figure_named, figure_prefixed, require_tools

ROOT = Path(__file__).resolve().parent.parent


def test_registered_and_parses() -> None:
    assert SCENARIOS["failback"] == "benchmarks.failback"
    args = build_parser().parse_args(["failback", "--quick", "--json", "x.json"])
    assert args.scenario == "failback" and args.quick and args.json == Path("x.json")


@pytest.mark.parametrize("size", [QUICK_SIZE, 4 * GIB])
def test_plan_is_one_percent_in_disjoint_regions(size: int) -> None:
    plan = make_plan(size)
    assert plan.fill == size // 4
    one_percent = size // 100
    assert one_percent - BLOCK <= plan.divergent_bytes <= one_percent + BLOCK
    spans = sorted((r.offset, r.offset + r.length) for r in plan.regions)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # disjoint
    assert all(r.nbytes <= r.length and r.blocks > 0 for r in plan.regions)
    # what must travel back is data: the source's writes and half the DR writes lie in the fill
    for r in (plan.after_point, plan.unreplicated, plan.dr_data):
        assert r.offset + r.length <= plan.fill
    assert plan.dr_holes.offset >= plan.fill
    with pytest.raises(ValueError):
        make_plan(10 * MIB)


def test_divergent_blocks_counts_4k_blocks_and_skips_common_holes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, 64 * MIB, 8 * MIB, seed=1)
    shutil.copyfile(a, b)
    assert divergent_blocks(a, b) == 0
    with open(b, "r+b") as f:
        f.seek(4096 + 10)
        f.write(b"x")  # one block in the data
        f.seek(40 * MIB)
        f.write(os.urandom(3 * 4096))  # three in a hole of a
    assert divergent_blocks(a, b) == 4


def test_delta_parsed_from_the_process_server_log(tmp_path: Path) -> None:
    log = tmp_path / "ps.log"
    log.write_text(
        'x disk=fb0 event=failback_delta how="journals: rolled back + fenced + the agent\'s" '
        "ranges=19 bytes=1310720 seconds=0.004\n"
    )
    assert _delta_from_log(log) == {
        "how": "journals: rolled back + fenced + the agent's",
        "ranges": 19,
        "bytes": 1310720,
        "seconds": 0.004,
    }
    assert _delta_from_log(tmp_path / "missing.log") == {}


@pytest.mark.timeout(120)
def test_quick_run_reports_failback_and_cleans_up(tmp_path: Path) -> None:
    require_tools(*TOOLS)
    private_tmp = Path(tempfile.mkdtemp(prefix="tmf-smoke-", dir="/tmp"))
    try:
        _run_quick(tmp_path, private_tmp)
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def _run_quick(tmp_path: Path, private_tmp: Path) -> None:
    out = tmp_path / "failback.json"
    env = dict(os.environ, TMPDIR=str(private_tmp), PYTHONPATH=str(ROOT))
    env.pop("TIDEMARK_BENCH_PYSPY", None)
    cmd = [sys.executable, "-m", "benchmarks.cli", "failback", "--quick", "--json", str(out)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert elapsed < 40, f"failback --quick took {elapsed:.1f}s\n{proc.stderr}"

    doc = json.loads(out.read_text())
    assert doc["status"] in {"ok", "targets missed"}
    (result,) = doc["results"]
    assert result["scenario"] == "failback" and result["error"] is None
    params = result["params"]
    assert params["disk_size"] == QUICK_SIZE and params["fill_bytes"] == QUICK_SIZE // 4
    details = result["details"]

    # The divergence, measured outside tidemark, is what was written (random data, 64 KiB).
    base = details["baseline"]
    assert base["divergent_bytes"] == params["planned_divergent_bytes"]
    writes = details["prepare"]["writes"]
    assert set(writes) == {"after_point", "unreplicated", "dr_data", "dr_holes"}
    rs = base["rsync"]
    assert rs["equal"] is True and rs["seconds"] > 0 and "--no-whole-file" in rs["command"]
    assert rs["stats"]["literal_bytes"] >= base["divergent_bytes"]

    fb = details["failback"]
    rep = fb["report"]
    assert fb["equal"] is True and fb["master_target_exit"] == 0
    assert "journals" in rep["delta_source"]
    # rolled back + unreplicated come from the delta; the DR writes from the failover journal
    region_bytes = {r["name"]: r["bytes"] for r in params["regions"]}
    assert rep["delta_bytes"] == sum(
        n for name, n in region_bytes.items() if not name.startswith("DR")
    )
    assert base["divergent_bytes"] <= rep["raw_bytes"] <= fb["wire_bytes"]
    phases = fb["phases"]
    parts = ("mt_launch_to_registered_s", "registered_to_drained_s", "planned_command_s")
    assert sum(phases[k] for k in parts) == pytest.approx(fb["seconds"], abs=0.01)
    assert 0 < fb["seconds"] < 20
    assert set(rep["timings"]) >= {"drain_ms", "verify_ms", "swap_ms", "total_ms"}
    assert fb["delta"]["bytes"] == rep["delta_bytes"]

    head = figure_prefixed(result, "failback, 0.25 GiB")
    assert head["value"] == fb["seconds"] and head["baseline"] == rs["seconds"]
    assert head["ratio"] == pytest.approx(head["value"] / head["baseline"])
    assert head["passed"] in (True, False) and head["target"] == "<= 0.33x rsync"
    wire = figure_prefixed(result, "failback wire bytes")
    assert wire["passed"] is True and 1 <= wire["ratio"] <= 1.1, wire
    equal = figure_prefixed(result, "source == DR replica after failback")
    assert equal["passed"] is True and equal["critical"]
    resumed = figure_named(result, "agent resumes: replicating, no resync")
    assert resumed["passed"] is True and details["resume"]["state"] == "replicating"

    # Nothing left behind: no files in the temp dir, no process still running.
    assert list(private_tmp.iterdir()) == []
    pids = details["pids"]
    assert {"ps", "agent", "ps-2", "master_target", "agent-2"} <= set(pids)
    assert_nothing_left(private_tmp, pids)
