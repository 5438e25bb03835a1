"""``tidemark-bench nbd --quick --json FILE`` runs end to end (agent export vs nbdkit vs
qemu-nbd under fio), reports sane figures and leaves nothing behind. A missing tool skips
only outside CI; with CI set it fails."""

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
from benchmarks.metrics import ProcessSampler
from benchmarks.nbd_front import (
    QUICK_JOB_SECONDS,
    TARGETS,
    TOOLS,
    WORKLOADS,
    _cpu_figures,
    cpu_us_per_io,
    parse_fio,
)
from tests.bench_helpers import assert_nothing_left, figure_prefixed, require_tools
from tests.bench_helpers import figure_named as _figure

ROOT = Path(__file__).resolve().parent.parent


def test_registered_and_parses() -> None:
    assert SCENARIOS["nbd"] == "benchmarks.nbd_front"
    args = build_parser().parse_args(["nbd", "--quick"])
    assert args.scenario == "nbd" and args.quick


def test_parse_fio_skips_the_banner() -> None:
    doc = {
        "jobs": [
            {
                "error": 0,
                "usr_cpu": 12.5,
                "sys_cpu": 37.5,
                "write": {
                    "iops": 1000.0,
                    "bw_bytes": 4096000,
                    "io_bytes": 4096000,
                    "total_ios": 1000,
                    "runtime": 1000,
                    "clat_ns": {
                        "mean": 900.0,
                        "percentile": {"50.000000": 800, "99.000000": 5000, "99.900000": 9000},
                    },
                },
            }
        ]
    }
    out = parse_fio("fio: connected to NBD server\n" + json.dumps(doc))
    assert out["iops"] == 1000.0 and out["mb_s"] == pytest.approx(4.096)
    assert out["clat_p50_us"] == 0.8 and out["clat_p99_us"] == 5.0
    assert out["fio_cpu_seconds"] == 0.5  # 50% of one CPU over its 1 s runtime


def test_cpu_per_write_and_the_ceiling_it_allows() -> None:
    """2 cores, the agent's side + fio at 100 us of CPU per write: at most 20,000 writes/s
    with nothing idle, 0.4x nbdkit's 50,000 IOPS (whose side + fio cost 20 us a write)."""
    wl = WORKLOADS[0]
    runs = {
        "agent": {
            "ios": 10_000,
            "iops": 9_000.0,
            "fio_cpu_seconds": 0.2,
            "processes": {"agent": {"cpu_seconds": 0.5}, "ps": {"cpu_seconds": 0.3}},
        },
        "nbdkit": {
            "ios": 50_000,
            "iops": 50_000.0,
            "fio_cpu_seconds": 0.4,
            "processes": {"nbdkit": {"cpu_seconds": 0.6}},
        },
    }
    assert cpu_us_per_io(runs["agent"]) == pytest.approx(100.0)
    assert cpu_us_per_io(runs["nbdkit"]) == pytest.approx(20.0)
    per_write, ceiling = _cpu_figures(wl, runs, cores=2)
    assert (per_write.value, per_write.baseline, per_write.ratio) == (100.0, 20.0, 5.0)
    assert (ceiling.value, ceiling.baseline, ceiling.ratio) == (20_000, 50_000, 0.4)
    assert ceiling.target == "target needs 0.6x" and ceiling.passed is None
    # MB/s for the 1 MiB job: 20,000 writes/s of 1 MiB
    seq = WORKLOADS[1]
    runs["nbdkit"]["mb_s"] = 1_000.0
    assert _cpu_figures(seq, runs, cores=2)[1].value == pytest.approx(20_000 * 1.048576)
    # a process whose CPU time could not be read gives none (not fio's CPU alone)
    runs["agent"]["processes"]["ps"]["cpu_measured"] = False
    assert cpu_us_per_io(runs["agent"]) is None
    assert _cpu_figures(wl, runs, cores=2) == []
    runs["agent"]["processes"]["ps"]["cpu_measured"] = True
    assert cpu_us_per_io(runs["agent"]) == pytest.approx(100.0)
    # a run recorded before these were measured gives none
    del runs["agent"]["fio_cpu_seconds"]
    assert _cpu_figures(wl, runs, cores=2) == []


def test_a_process_whose_cpu_cannot_be_read_is_not_measured() -> None:
    """ProcessSampler on a pid that is gone: no CPU time at either end, reported as not
    measured (its 0 CPU-s is no measurement)."""
    proc = subprocess.Popen(["true"])
    sampler = ProcessSampler({"gone": proc.pid})
    proc.wait()
    stats = sampler.start().stop()["gone"]
    assert not stats.cpu_measured and stats.as_dict()["cpu_measured"] is False
    alive = ProcessSampler({"me": os.getpid()}).start()
    sum(range(200_000))
    mine = alive.stop()["me"]
    assert mine.cpu_measured and mine.as_dict()["cpu_measured"] is True


@pytest.mark.timeout(320)
def test_quick_run_reports_figures_and_cleans_up(tmp_path: Path) -> None:
    require_tools(*TOOLS)
    private_tmp = Path(tempfile.mkdtemp(prefix="tmn-smoke-", dir="/tmp"))
    try:
        _run_quick(tmp_path, private_tmp)
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def _run_quick(tmp_path: Path, private_tmp: Path) -> None:
    out = tmp_path / "nbd.json"
    env = dict(os.environ, TMPDIR=str(private_tmp), PYTHONPATH=str(ROOT))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cli", "nbd", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard only: how long --quick takes is a benchmark figure
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    print(f"nbd --quick took {elapsed:.1f} s")

    doc = json.loads(out.read_text())
    assert doc["status"] in {"ok", "targets missed"}
    (result,) = doc["results"]
    assert result["scenario"] == "nbd" and result["error"] is None
    assert (
        result["params"]["job_seconds"] == QUICK_JOB_SECONDS
        and result["params"]["image_size"] == 1 << 30
    )

    runs = result["details"]["runs"]
    for wl in WORKLOADS:
        for target in TARGETS:
            r = runs[wl.key][target]
            assert r["error"] == 0 and r["ios"] > 0, (wl.key, target, r)
            assert 0.8 * QUICK_JOB_SECONDS * 1000 <= r["runtime_ms"] <= 30_000, r
            assert r["iops"] > 0 and r["mb_s"] > 0
            # MB/s and IOPS agree with the block size (fio's own two figures)
            assert r["mb_s"] == pytest.approx(r["iops"] * wl.bs / 1e6, rel=0.05)
            assert 0 < r["clat_p50_us"] <= r["clat_p99_us"] < 10_000_000
            assert f"--iodepth={wl.iodepth}" in r["command"]
            assert f"--size={1 << 30}" in r["command"]
        vs_kit = _figure(result, f"{wl.label}: agent vs nbdkit")
        assert vs_kit["baseline"] > 0 and 0 < vs_kit["ratio"] < 100
        assert vs_kit["target"] and vs_kit["passed"] in (True, False)
        assert _figure(result, f"{wl.label}: agent vs qemu-nbd")["ratio"] > 0
        for target in TARGETS:  # every server's CPU and fio's, for the CPU per write
            r = runs[wl.key][target]
            assert r["fio_cpu_seconds"] > 0 and r["processes"], (wl.key, target)
            assert all(p["cpu_seconds"] > 0 for p in r["processes"].values()), r["processes"]
        per_write = figure_prefixed(result, f"{wl.label}: CPU per write")
        assert per_write["value"] > 0 and per_write["baseline"] > 0
        ceiling = figure_prefixed(result, f"{wl.label}: agent's ceiling at that CPU")
        assert ceiling["value"] > 0 and ceiling["ratio"] > 0
    mem = result["details"]["memory"]
    assert mem["error"] == 0 and mem["bytes"] >= 32 << 20
    rss = [f for f in result["figures"] if f["name"].endswith("agent peak RSS")]
    assert len(rss) == 1 and 10 < rss[0]["value"] < 4096
    assert _figure(result, "replica == source (4 disks)")["value"] is True
    assert all(v["equal"] for v in result["details"]["verify"].values())
    assert _figure(result, "every write replicated via the journal (no overflow/resync)")["value"]

    # Nothing left behind: no files in the temp dir, no process still running.
    assert list(private_tmp.iterdir()) == []
    pids = result["details"]["pids"]
    assert {"agent", "ps"} <= set(pids) and len(pids) == 2 + 2 * len(WORKLOADS)
    assert_nothing_left(private_tmp, pids)
