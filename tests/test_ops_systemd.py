"""systemd integration against real things: the unit files pass `systemd-analyze verify` (and its
offline security review); a real process server and a real agent speak the notify protocol to a
real ``$NOTIFY_SOCKET`` datagram socket (READY, STATUS, WATCHDOG, RELOADING, STOPPING, sent by the
main pid, checked with SCM_CREDENTIALS); SIGTERM under write load ends the agent with exit 0
within its bound, the journal committed (a clean stop), and the replica then equals the source."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.deploy import Deployment

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "packaging" / "systemd"
SCRIPTS = Path(sys.executable).parent


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have {tool} (apt-get install {package})")
        pytest.skip(f"{tool} missing (apt-get install {package})")
    return path


# ----------------------------------------------------------------- unit files


@pytest.mark.parametrize("unit", ["tidemark-agent", "tidemark-ps", "tidemark-mt"])
def test_unit_files_verify(unit: str, tmp_path: Path) -> None:
    analyze = _require("systemd-analyze", "systemd")
    text = (UNITS / f"{unit}.service").read_text()
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "StateDirectory=tidemark/",
    ):
        assert directive in text, f"{unit}: {directive} missing"
    if unit != "tidemark-ps":
        assert "ReadWritePaths=" in text  # the disks
    # verify wants the ExecStart binary to exist: point it at this checkout's console script
    copy = tmp_path / f"{unit}.service"
    copy.write_text(text.replace(f"/usr/bin/{unit}", str(SCRIPTS / unit)))
    out = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    sec = subprocess.run(
        [analyze, "security", "--offline=yes", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", sec.stdout)
    assert score is not None, sec.stdout + sec.stderr
    assert float(score.group(1)) <= 3.0, sec.stdout  # "OK" on systemd's scale


# ----------------------------------------------------------------- the notify protocol


class NotifySocket:
    """A supervisor's end of ``$NOTIFY_SOCKET``: datagrams with the sender's credentials."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.messages: list[tuple[int, dict[str, str]]] = []

    def receive(self, until: str, timeout: float = 20, pid: int | None = None) -> dict[str, str]:
        """Collect messages until one has the field ``until`` (``"READY"``...), from ``pid``
        when given; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                break
            sender = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = struct.unpack("iII", payload[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append((sender, fields))
            if until in fields and pid in (None, sender):
                return fields
        raise TimeoutError(f"no {until} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    monkeypatch.setenv("WATCHDOG_USEC", "300000")  # a ping every 150 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def test_process_server_notify_protocol(tmp_path: Path, notify: NotifySocket) -> None:
    dep = Deployment(tmp_path / "d")
    dep.init_pki()
    with dep:
        proc = dep.start_ps()
        ready = notify.receive("READY")
        assert ready["READY"] == "1" and "agent sessions" in ready["STATUS"]
        assert ready["MAINPID"] == str(proc.pid)
        pings = 0
        deadline = time.monotonic() + 10
        while pings < 3 and time.monotonic() < deadline:
            notify.receive("WATCHDOG")
            pings += 1
        assert pings == 3
        dep.write_ps_config(rpo_target="10s", cache_quota="1GiB")  # one live, one not
        proc.send_signal(signal.SIGHUP)
        assert notify.receive("RELOADING")["RELOADING"] == "1"
        assert notify.receive("READY")["READY"] == "1"  # reload done
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stopping = notify.receive("STOPPING")
        assert "stopping" in stopping["STATUS"]
        assert proc.wait(30) == 0
        assert time.monotonic() - started < 10
    assert {pid for pid, _ in notify.messages} == {proc.pid}  # NotifyAccess=main holds
    log = (dep.root / "ps.log").read_text()
    assert "event=reloaded applied=rpo_target not_applied=cache_quota" in log
    assert "event=service_stopped role=process-server" in log


def test_agent_sigterm_under_load_exits_clean(tmp_path: Path, notify: NotifySocket) -> None:
    qemu_io = _require("qemu-io", "qemu-utils")
    dep = Deployment(tmp_path / "d")
    dep.init_pki()
    disk, size = "sigdisk", 32 << 20
    spec = dep.add_agent("sig01", {disk: size}, nbd=True, options={"stop_timeout": "20s"})
    uri = f"nbd+unix:///{disk}?socket={spec.nbd[disk]}"
    with dep:
        dep.start_ps()
        proc = dep.start_agent("sig01")
        ready = notify.receive("READY", pid=proc.pid)
        assert "link" in ready["STATUS"] and ready["MAINPID"] == str(proc.pid)
        # a writer that keeps writing 256 KiB blocks until the export goes away
        cmds: list[str] = []
        for i in range(400):
            cmds += ["-c", f"write -P {i % 251} {(i * 256 << 10) % size} 256k"]
        writer = subprocess.Popen(
            [qemu_io, "-f", "raw", uri, *cmds],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert notify.receive("STOPPING", pid=proc.pid)["STOPPING"] == "1"
        assert proc.wait(30) == 0
        elapsed = time.monotonic() - started
        output, _ = writer.communicate(timeout=30)
        assert elapsed < 20, f"SIGTERM took {elapsed:.1f}s"
        assert "wrote" in output  # the load was running when SIGTERM came
        state = json.loads((spec.state_dir / "disks" / disk / "state.json").read_text())
        assert state["clean"] is True  # journal committed: no redo, no re-verify on restart
        dep.start_agent("sig01")
        status = dep.agent_status("sig01")
        row = status["disks"][0]
        assert row["resync_reason"] != "unclean-stop" and row["unclean_regions"] == []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = dep.agent_status("sig01")["disks"][0]
            if row["acked_seq"] >= row["journaled_seq"] and row["state"] == "replicating":
                break
            time.sleep(0.1)
        dep.wait_applied(disk, row["journaled_seq"])
        assert dep.replica_path(disk).read_bytes() == spec.disks[disk].read_bytes()
    log = (dep.root / "agent-sig01.log").read_text()
    assert re.search(r"event=service_stopped role=agent seconds=[0-9.]+ exit=0", log)
