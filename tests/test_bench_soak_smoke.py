# CI smoke test of `tidemark-bench soak` (issue #9): a 45 s soak in a subprocess (real agent,
# process server, fault proxy, qemu-io and nbdcopy) must end with no divergence from the model
# of acknowledged writes, after at least one kill, one network fault, one test failover whose
# export matched the recorded point and one scheduled verify; nothing may be left running.
"""``tidemark-bench soak --duration 45`` runs end to end and finds no divergence."""

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
from tests.bench_helpers import assert_nothing_left, figure_named, require_tools

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("qemu-io", "nbdcopy")


def test_registered_and_parses_durations() -> None:
    assert SCENARIOS["soak"] == "benchmarks.soak"
    for text, seconds in (("45", 45.0), ("30s", 30.0), ("10m", 600.0), ("1h", 3600.0)):
        args = build_parser().parse_args(["soak", "--duration", text])
        assert args.scenario == "soak" and args.duration == seconds
    with pytest.raises(SystemExit):
        build_parser().parse_args(["soak", "--duration", "5s"])  # too short to mean anything


@pytest.mark.timeout(150)
def test_short_soak_finds_no_divergence(tmp_path: Path) -> None:
    require_tools(*TOOLS)
    private_tmp = Path(tempfile.mkdtemp(prefix="tms-smoke-", dir="/tmp"))
    try:
        _run(tmp_path, private_tmp)
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def _run(tmp_path: Path, private_tmp: Path) -> None:
    out = tmp_path / "soak.json"
    env = dict(os.environ, TMPDIR=str(private_tmp), PYTHONPATH=str(ROOT))
    env.pop("TIDEMARK_BENCH_SOAK_DEBUG_DIR", None)
    cmd = [sys.executable, "-m", "benchmarks.cli", "soak", "--duration", "45"]
    start = time.monotonic()
    proc = subprocess.run(
        [*cmd, "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=140
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}"
    assert elapsed < 90, f"soak --duration 45 took {elapsed:.1f}s\n{proc.stderr}"
    assert "divergences found" in proc.stdout  # the terminal table

    doc = json.loads(out.read_text())
    (result,) = doc["results"]
    assert result["scenario"] == "soak" and result["error"] is None, result.get("error")
    assert result["params"]["duration_s"] == 45
    details = result["details"]
    assert details["divergences"] == [] and details["errors"] == []
    assert figure_named(result, "divergences found")["value"] == 0
    assert figure_named(result, "bytes written (acknowledged data writes)")["value"] > 0
    kills = figure_named(result, "kills survived: agent (SIGKILL + restart)")["value"]
    kills += figure_named(result, "kills survived: process server (SIGKILL + restart)")["value"]
    assert kills >= 1
    assert figure_named(result, "network faults injected")["value"] >= 1
    verified = "points verified (test failover export == source at the point)"
    assert figure_named(result, verified)["value"] >= 1
    events = details["events"]
    assert any(e["event"] == "failover" and e.get("equal") is True for e in events), events
    assert any(e["event"] == "verify" and e.get("equal") is True for e in events), events
    assert events[-1]["event"] == "final verify" and events[-1]["equal"] is True
    assert details["ops"]["nbd-write"] >= 1 and details["ops"]["write"] >= 1
    assert_nothing_left(private_tmp, details["pids"])
