"""The whole cycle, with real processes and NBD clients nobody here wrote:

protect → writes → unplanned failover to an older point while the source holds writes that
never reached the process server → DR writes through the failover export (qemu-io, fio) →
reverse replication to a master target (SIGKILLed mid-stream once) → planned failback → the
source equals the DR disk byte for byte (``cmp``), the wire carried no more than 1.1 times what
differs, and forward protection resumes without a resync. A second disk fails back with the
agent's journal gone: the digest comparison gives the same result.

Data is random (``os.urandom`` files written with ``qemu-io -s``): compression cannot hide
an oversized stream.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.deploy import PYTHON, Deployment
from tests.test_failover import _require_tools, nbd_uri, ps, run, wait_replicating

pytestmark = pytest.mark.interop
SIZE = 64 << 20
MIB = 1 << 20


def write_random(dep: Deployment, uri: str, offset: int, length: int, name: str) -> None:
    data = dep.root / f"{name}.bin"
    data.write_bytes(os.urandom(length))
    run("qemu-io", "-f", "raw", "-c", f"write -s {data} {offset} {length}", uri)


def drain(dep: Deployment, agent: str, disk: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = next(r for r in dep.agent_status(agent)["disks"] if r["disk"] == disk)
        if row["acked_seq"] >= row["journaled_seq"] and row["state"] == "replicating":
            dep.wait_applied(disk, row["journaled_seq"], timeout)
            return
        time.sleep(0.05)
    raise TimeoutError(f"{disk} did not drain")


def failback_row(dep: Deployment, disk: str) -> dict | None:
    rows = [r for r in ps(dep, "status")["failbacks"] if r["disk"] == disk]
    return rows[0] if rows else None


def wait_reverse_drained(dep: Deployment, disk: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        row = failback_row(dep, disk)
        if row and row["applied_seq"] >= row["journal_last_seq"] > 0:
            return row
        time.sleep(0.05)
    raise TimeoutError(f"{disk}: reverse stream did not drain: {row}")


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    _require_tools()
    d = Deployment(tmp_path_factory.mktemp("fb"))
    d.init_pki()
    d.write_ps_config(failover_dir=str(d.root / "fx"), apply_sync_interval="10ms")
    d.add_agent("src01", {"fb1": SIZE, "fb2": SIZE}, nbd=True)
    d.cli(
        "process_server.cli", "pki", "issue", "--dir", str(d.pki), "--name", "mt01",
        "--out", str(d.root / "mt01.bundle"), "--role", "master-target",
    )  # fmt: skip
    d.start_ps()
    d.start_agent("src01")
    wait_replicating(d, "src01")
    yield d
    d.stop_all()


def _mt_config(dep: Deployment) -> Path:
    spec = dep.agents["src01"]
    config = dep.root / "mt.toml"
    config.write_text(
        "[master_target]\n"
        'name = "mt01"\n'
        f'state_dir = "{dep.root / "mt"}"\n'
        f'process_server = "127.0.0.1:{dep.port}"\n'
        f'credentials = "{dep.root / "mt01.bundle"}"\n'
        'reconnect_min = "50ms"\nreconnect_max = "500ms"\n'
        f'\n[[disk]]\nid = "fb1"\npath = "{spec.disks["fb1"]}"\n'
        f'agent_state_dir = "{spec.state_dir / "disks" / "fb1"}"\n'
        f'\n[[disk]]\nid = "fb2"\npath = "{spec.disks["fb2"]}"\n'
        f'agent_state_dir = "{spec.state_dir / "disks" / "fb2"}"\n'
    )
    return config


def test_failback_cycle_sends_only_what_differs_and_resumes_protection(dep: Deployment):
    spec = dep.agents["src01"]
    uris = {d: nbd_uri(d, spec.nbd[d]) for d in ("fb1", "fb2")}
    # Protected writes, a point, then writes the failover will roll back.
    for disk in ("fb1", "fb2"):
        write_random(dep, uris[disk], 0, 32 * MIB, f"{disk}-a")
        drain(dep, "src01", disk)
    points = {d: ps(dep, "points", "create", d, "--tag", "good")["id"] for d in ("fb1", "fb2")}
    for disk in ("fb1", "fb2"):
        write_random(dep, uris[disk], 16 * MIB, 8 * MIB, f"{disk}-b")
        drain(dep, "src01", disk)
    # The process server goes away; the source takes writes it will never see.
    dep.stop_ps()
    for disk in ("fb1", "fb2"):
        write_random(dep, uris[disk], 30 * MIB, 1 * MIB, f"{disk}-c")
    dep.stop_agent("src01")
    dep.start_ps()

    dr_bytes = 0
    for disk in ("fb1", "fb2"):
        sock = dep.root / f"dr-{disk}.sock"
        ps(dep, "failover", disk, "--point", points[disk], "--nbd", f"unix:{sock}")
        export = nbd_uri(disk, sock)
        write_random(dep, export, 40 * MIB, 2 * MIB, f"{disk}-dr")
        run(
            "fio", "--name=dr", "--ioengine=nbd", f"--uri={export}", "--rw=randwrite",
            "--bs=64k", "--size=2M", "--offset=48M", "--refill_buffers=1",
            "--verify=crc32c", "--verify_state_save=0", "--do_verify=1", timeout=120,
        )  # fmt: skip
        dr_bytes += 4 * MIB
        ps(dep, "failover", "commit", disk)
    # fb2: the agent's state is gone (a rebuilt host): the master target compares digests.
    shutil.rmtree(spec.state_dir / "disks" / "fb2")
    mt = dep._spawn(
        [PYTHON, "-m", "master_target.cli", "run", "--config", str(_mt_config(dep))], "mt.log"
    )
    try:
        # SIGKILL the master target mid-stream once: it resumes after what it holds.
        deadline = time.monotonic() + 60
        while not (failback_row(dep, "fb1") or {}).get("acked_seq"):
            assert time.monotonic() < deadline, "reverse stream never started"
            time.sleep(0.02)
        before_kill = failback_row(dep, "fb1")
        mt.send_signal(signal.SIGKILL)
        mt.wait()
        mt = dep._spawn(
            [PYTHON, "-m", "master_target.cli", "run", "--config", str(dep.root / "mt.toml")],
            "mt.log",
        )
        for disk in ("fb1", "fb2"):
            wait_reverse_drained(dep, disk)
        resumed = [
            int(line.split("resume_seq=")[1].split()[0])
            for line in (dep.root / "ps.log").read_text().splitlines()
            if "event=failback_registered" in line and "disk=fb1" in line
        ]
        assert resumed[0] == 1 and resumed[-1] > before_kill["acked_seq"], resumed
        reports = {d: ps(dep, "failback", d, "--planned") for d in ("fb1", "fb2")}
        assert mt.wait(timeout=30) == 0  # every disk failed back: the master target is done
    finally:
        if mt.poll() is None:
            mt.kill()
            mt.wait()
    for disk in ("fb1", "fb2"):
        run("cmp", str(spec.disks[disk]), str(dep.replica_path(disk)))
        assert reports[disk]["next_seq"] > 0
    # What differs: 4 MiB of DR writes + 8 MiB rolled back + 1 MiB the PS never saw.
    differs = dr_bytes // 2 + 8 * MIB + 1 * MIB
    fb1 = reports["fb1"]
    assert "journals" in fb1["delta_source"]
    assert fb1["delta_bytes"] == 9 * MIB and fb1["delta_ranges"] == 2, fb1
    assert differs <= fb1["raw_bytes"] and fb1["wire_bytes"] <= 1.1 * differs, fb1
    assert "digest" in reports["fb2"]["delta_source"]

    # Forward protection resumes from replica == source: no initial sync, no resync (fb1, whose
    # journal the master target reset), and new writes replicate.
    log_start = (dep.root / "agent-src01.log").stat().st_size
    dep.start_agent("src01")
    row = next(r for r in dep.agent_status("src01")["disks"] if r["disk"] == "fb1")
    assert row["state"] == "replicating", row
    write_random(dep, uris["fb1"], 60 * MIB, 1 * MIB, "fb1-d")
    drain(dep, "src01", "fb1")
    run("cmp", str(spec.disks["fb1"]), str(dep.replica_path("fb1")))
    agent_log = (dep.root / "agent-src01.log").read_text()[log_start:]
    fb1_lines = [line for line in agent_log.splitlines() if "disk=fb1" in line]
    assert not [line for line in fb1_lines if "rebased" in line or "resync" in line], fb1_lines
    drain(dep, "src01", "fb2", timeout=120)  # fb2 starts over: compared by digests, nothing sent
    run("cmp", str(spec.disks["fb2"]), str(dep.replica_path("fb2")))
    deadline = time.monotonic() + 30  # recovery points start again
    while not ps(dep, "points", "list", "fb1")["points"]:
        assert time.monotonic() < deadline, "no recovery point after failback"
        time.sleep(0.1)
