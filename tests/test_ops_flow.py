"""Flow control, alerts, metrics and logs against real processes: a real agent (its NBD export
written by qemu-io) replicating to a real process server over TLS.

- The bandwidth limit holds the link to its rate; a SIGHUP with the limit lifted takes effect
  at once and the log says which changed keys were applied and which need a restart.
- With the process server gone, the disk's RPO passes its target and the agent's journal
  overflows to the dirty bitmap: both are alerts in status, metrics and logs; once the server
  is back both clear by themselves, and the replica equals the source (nothing lost).
- Both Prometheus endpoints serve per-disk metrics; every log line is one structured event
  and no key material is ever logged.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.deploy import Deployment, free_port


def _qemu_io() -> str:
    path = shutil.which("qemu-io")
    if path is None:
        import os

        if os.environ.get("CI"):
            pytest.fail("CI must have qemu-io (apt-get install qemu-utils)")
        pytest.skip("qemu-io missing (apt-get install qemu-utils)")
    return path


def write(uri: str, *commands: str) -> None:
    args = [_qemu_io(), "-f", "raw", uri]
    for c in commands:
        args += ["-c", c]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "error" not in out.stdout.lower(), out.stdout + out.stderr


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise TimeoutError(f"{what} within {timeout}s (last: {last!r})")


def drained(dep: Deployment, agent: str) -> bool:
    row = dep.agent_status(agent)["disks"][0]
    return bool(row["acked_seq"] >= row["journaled_seq"] and row["state"] == "replicating")


def test_bandwidth_limit_and_sighup_reload(tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "d")
    dep.init_pki()
    ps_port, agent_port = free_port(), free_port()
    dep.write_ps_config(metrics_listen=f"127.0.0.1:{ps_port}")
    disk = "bwdisk"
    options = {
        "bandwidth_limit": "512KiB",
        "compression_level": 0,  # the limit counts wire bytes: keep them equal to the data
        # Small batches: a batch goes out whole once the bucket allows it, so the bytes out in
        # 1.5 s are the rate's plus at most one batch (recovery points also cut batches).
        "max_batch_bytes": "256KiB",
        "metrics_listen": f"127.0.0.1:{agent_port}",
    }
    spec = dep.add_agent("bw01", {disk: 16 << 20}, nbd=True, options=options)
    uri = f"nbd+unix:///{disk}?socket={spec.nbd[disk]}"
    with dep:
        dep.start_ps()
        proc = dep.start_agent("bw01")
        wait_for("link up", lambda: dep.agent_status("bw01")["link"]["connected"])
        write(
            uri, *(f"write -P {i + 1} {i << 20} 1M" for i in range(8))
        )  # 8 MiB: 16 s at 512 KiB/s
        time.sleep(1.5)
        row = dep.agent_status("bw01")["disks"][0]
        assert row["lag_bytes"] > 4 << 20, f"the limit did not hold the link back: {row}"
        metrics = scrape(agent_port)
        assert metrics[("tidemark_bandwidth_limit_bytes_per_second", ())] == 512 << 10
        assert metrics[("tidemark_bandwidth_throttled_seconds_total", ())] > 0.5
        sent = metrics[("tidemark_sent_wire_bytes_total", ())]
        assert sent < 3 << 20, f"{sent} bytes went out in 1.5 s at 512 KiB/s"
        # lift the limit at runtime; journal_quota needs a restart and must be reported so
        text = spec.config.read_text().replace('bandwidth_limit = "512KiB"\n', "")
        spec.config.write_text(text.replace("[agent]\n", '[agent]\njournal_quota = "2GiB"\n'))
        started = time.monotonic()
        proc.send_signal(1)  # SIGHUP
        wait_for("drain after the limit is lifted", lambda: drained(dep, "bw01"), timeout=30)
        assert time.monotonic() - started < 6
        dep.wait_applied(disk, dep.agent_status("bw01")["disks"][0]["journaled_seq"])
        assert dep.replica_path(disk).read_bytes() == spec.disks[disk].read_bytes()
        status = dep.agent_status("bw01")
        assert status["bandwidth"]["limit_bytes_per_s"] == 0
        ps_metrics = scrape(ps_port)
        labels = (("agent", "bw01"), ("disk", disk))
        assert ps_metrics[("tidemark_disk_received_bytes_total", labels)] >= 8 << 20
        assert ps_metrics[("tidemark_disk_received_batches_total", labels)] >= 1
        assert ps_metrics[("tidemark_disk_applied_seq", labels)] >= 8
        assert ps_metrics[("tidemark_disk_cache_quota_bytes", labels)] == 16 << 30
        assert ps_metrics[("tidemark_sessions", ())] == 1
    log = (dep.root / "agent-bw01.log").read_text()
    assert "event=reloaded applied=bandwidth_limit not_applied=journal_quota" in log
    _check_logs(dep)


def _check_logs(dep: Deployment) -> None:
    """One structured line per event; no key material anywhere."""
    secrets = []
    for bundle in dep.root.glob("*.bundle"):
        text = bundle.read_text(errors="replace")
        for block in re.findall(r"PRIVATE KEY-----\n(.*?)\n-----END", text, re.S):
            secrets += [line for line in block.splitlines() if len(line) > 20]
    assert secrets, "the test found no key to look for"
    line_format = re.compile(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ \S"
    )
    for log in dep.root.glob("*.log"):
        for line in log.read_text().splitlines():
            assert line_format.match(line), f"{log.name}: not one event per line: {line!r}"
            assert "PRIVATE KEY" not in line and not any(s in line for s in secrets)
            if " tidemark.ops " in line or " tidemark.alerts " in line:
                assert " event=" in line, f"{log.name}: unstructured: {line!r}"


def test_rpo_breach_and_journal_overflow_alert_and_recover(tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "d")
    dep.init_pki()
    agent_port = free_port()
    disk = "ovdisk"
    options = {
        "journal_quota": "1MiB",
        "journal_segment": "256KiB",
        "rpo_target": "1s",
        "metrics_listen": f"127.0.0.1:{agent_port}",
    }
    spec = dep.add_agent("ov01", {disk: 8 << 20}, nbd=True, options=options)
    uri = f"nbd+unix:///{disk}?socket={spec.nbd[disk]}"
    labels = (("agent", "ov01"), ("disk", disk))
    with dep:
        dep.start_ps()
        dep.start_agent("ov01")
        wait_for("link up", lambda: dep.agent_status("ov01")["link"]["connected"])
        dep.kill_ps()
        write(uri, "write -P 7 0 64k", "flush")

        def alert(kind: str) -> dict[str, Any] | None:
            return next((a for a in dep.agent_status("ov01")["alerts"] if a["kind"] == kind), None)

        breach = wait_for("an RPO alert", lambda: alert("rpo_breach"), timeout=15)
        assert breach["disk"] == disk and breach["threshold"] == 1.0
        row = dep.agent_status("ov01")["disks"][0]
        assert row["rpo_breached"] is True and row["rpo_target_seconds"] == 1.0
        assert scrape(agent_port)[("tidemark_disk_rpo_breached", labels)] == 1.0
        # past the journal quota: the disk switches to the dirty bitmap, with an alert
        write(uri, *(f"write -P {i + 10} {(i + 1) << 20} 1M" for i in range(3)), "flush")
        overflow = wait_for("a journal overflow alert", lambda: alert("journal_overflow"))
        assert overflow["severity"] == "critical"
        metrics = scrape(agent_port)
        assert metrics[("tidemark_disk_state", (*labels, ("state", "resync-required")))] == 1.0
        assert metrics[("tidemark_disk_resyncs_total", labels)] >= 1
        # the process server comes back: the resync runs by itself and every alert clears
        dep.start_ps()
        wait_for("alerts cleared", lambda: dep.agent_status("ov01")["alerts"] == [], timeout=60)
        wait_for("drained", lambda: drained(dep, "ov01"))
        dep.wait_applied(disk, dep.agent_status("ov01")["disks"][0]["journaled_seq"])
        assert dep.replica_path(disk).read_bytes() == spec.disks[disk].read_bytes()
        assert scrape(agent_port)[("tidemark_disk_rpo_breaches_total", labels)] >= 1
    log = (dep.root / "agent-ov01.log").read_text()
    for event in (
        "event=alert_raised kind=rpo_breach severity=",
        f"event=alert_raised kind=journal_overflow severity=critical disk={disk}",
        f"event=alert_cleared kind=journal_overflow severity=critical disk={disk}",
        "event=alert_cleared kind=rpo_breach",
    ):
        assert event in log, event
    _check_logs(dep)
