"""``python -m benchmarks.nbd_profile`` (a diagnostic, docs/benchmarks.md): its counts agree
with sources outside it, and stopping the process server stops its CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.nbd_front import TOOLS
from benchmarks.nbd_profile import main, profile, render
from tests.bench_helpers import require_tools


@pytest.mark.timeout(240)
def test_profile_counts_every_write_and_the_stopped_server_uses_no_cpu(tmp_path: Path) -> None:
    require_tools(*TOOLS)
    on = profile(tmp_path / "on", seconds=1, disk_gib=1, iodepth=4)
    off = profile(tmp_path / "off", seconds=1, disk_gib=1, iodepth=4, stop_ps=True)
    for result in (on, off):
        fio = result["fio"]
        assert fio["ios"] > 100
        # fio counts completed writes; the agent journaled each (its seq, from its status)
        # and at most the few in flight when fio stopped counting.
        assert fio["ios"] <= result["journaled_writes"] <= fio["ios"] + 4
        assert result["agent"]["cpu_seconds"] > 0 and result["agent"]["us_per_io"] > 0
        assert 0 < result["agent_loop_thread"]["ran_seconds"] <= result["wall_seconds"] + 0.5
        assert sum(result["machine_pct"].values()) == pytest.approx(100, abs=1)
        assert "IOPS" in render(result)
    assert on["ps"]["cpu_seconds"] > 0.05  # it received, cached and applied the writes
    assert off["ps"]["cpu_seconds"] < 0.05  # SIGSTOPped for the job
    assert off["drain"]["ps_cpu_seconds"] > 0.05  # then caught up with the journal


def test_cli_rejects_a_bad_block_size_before_deploying(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--bs", "4 potatoes", "--seconds", "1", "--tmpdir", str(tmp_path)])
    assert exc.value.code == 2 and "--bs" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was started
