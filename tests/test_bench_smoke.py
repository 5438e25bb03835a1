"""``tidemark-bench --quick --json FILE`` runs end to end, reports sane figures, leaves nothing behind."""

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

from benchmarks.cli import SCENARIOS, build_parser, format_table, main
from benchmarks.metrics import Figure, ScenarioResult
from tests.bench_helpers import assert_nothing_left
from tests.bench_helpers import figure_prefixed as _figure

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_quick_run_reports_figures_and_cleans_up(tmp_path: Path) -> None:
    # A short private TMPDIR (unix socket paths must stay under 108 bytes): the run must
    # leave it empty.
    private_tmp = Path(tempfile.mkdtemp(prefix="tmb-smoke-", dir="/tmp"))
    try:
        _run_quick(tmp_path, private_tmp)
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def _run_quick(tmp_path: Path, private_tmp: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, TMPDIR=str(private_tmp), PYTHONPATH=str(ROOT))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cli", "replication", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert elapsed < 120, f"--quick took {elapsed:.1f}s"
    assert "replication" in proc.stdout and "MB/s" in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["status"] in {"ok", "targets missed"}
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["python"] and doc["machine"]["kernel"]
    assert "--quick" in doc["command"]
    assert doc["params"]["quick"] is True
    (result,) = [r for r in doc["results"] if r["scenario"] == "replication"]
    assert result["error"] is None
    assert result["params"]["seconds"] == 5 and result["params"]["disk_size"] == 1 << 30

    drained = _figure(result, "replication, until PS durable")
    assert drained["value"] > 0
    assert drained["baseline"] > 0
    assert drained["ratio"] is not None and 0 < drained["ratio"] < 10
    assert drained["target"] and drained["passed"] in (True, False)
    assert _figure(result, "replication, until applied")["value"] > 0
    assert _figure(result, "baseline: TLS copy")["value"] > 0
    for who in ("agent", "ps"):
        rss = _figure(result, f"{who} peak RSS")
        assert 10 < rss["value"] < 4096, rss
        assert _figure(result, f"{who} CPU")["value"] > 0
    assert _figure(result, "replica == source")["value"] is True
    assert _figure(result, "all writes acknowledged")["value"] is True
    assert result["details"]["baseline"]["tls_version"] == "TLSv1.3"

    # Nothing left behind: no files in the temp dir, no process still running.
    assert list(private_tmp.iterdir()) == []
    pids = result["details"]["pids"]
    assert set(pids) >= {"agent", "ps", "tls_client", "tls_server"}
    assert_nothing_left(private_tmp, pids)


def test_cli_usage_and_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert "replication" in SCENARIOS
    assert main(["--list"]) == 0
    assert "replication" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["no-such-scenario"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--disk-size", "12"])
    assert exc.value.code == 2
    args = build_parser().parse_args(["replication", "--seconds", "7", "--disk-size", "2GiB"])
    assert (args.scenario, args.seconds, args.disk_size) == ("replication", 7.0, 2 << 30)


def test_table_marks_correctness_failure() -> None:
    res = ScenarioResult("replication")
    res.figures.append(
        Figure("replication", "replica == source", False, target="yes", passed=False, critical=True)
    )
    res.figures.append(
        Figure(
            "replication",
            "x",
            1.0,
            "MB/s",
            baseline=2.0,
            ratio=0.5,
            target=">= 0.7x baseline",
            passed=False,
        )
    )
    assert res.failed and res.as_dict()["status"] == "FAILED"
    table = format_table([res])
    assert "FAILED" in table and "0.50x" in table
