"""Initial replication, resync, verify and scan mode, with real agent and process-server
processes. Wire bytes are counted by a TCP proxy between them (outside the code under test);
source and replica are compared with `cmp` and with SEEK_DATA maps (holes must stay holes).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.journal import TAG_REF, TAG_WRITE
from benchmarks.deploy import Deployment, Driver
from benchmarks.proxy import CountingProxy
from common.segment_log import SegmentLog

MiB = 1 << 20


def cmp(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """Allocated (offset, end) ranges of a file, from SEEK_DATA/SEEK_HOLE."""
    out = []
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    return out


def make_image(path: Path, size: int, seed: int, data_fraction: float = 0.5) -> int:
    """Random 1 MiB data runs and holes; returns the data bytes written."""
    rnd = random.Random(seed)
    written = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, MiB):
            if rnd.random() < data_fraction:
                f.seek(offset)
                f.write(rnd.randbytes(MiB))
                written += MiB
    return written


def wait_in_sync(dep: Deployment, agent: str, disk: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    row: dict = {}
    while time.monotonic() < deadline:
        row = next(r for r in dep.agent_status(agent)["disks"] if r["disk"] == disk)
        if row["state"] == "replicating" and row["acked_seq"] >= row["journaled_seq"]:
            dep.wait_applied(disk, row["journaled_seq"], timeout=timeout)
            return row
        time.sleep(0.1)
    raise TimeoutError(f"{disk} did not reach sync: {row}")


@pytest.fixture
def dep(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path / "d")
    d.init_pki()
    yield d
    d.stop_all()


def test_initial_sync_is_byte_identical_and_keeps_holes(dep: Deployment, tmp_path: Path) -> None:
    image = tmp_path / "src.img"
    make_image(image, 64 * MiB, seed=1)
    dep.add_agent("a1", {"d1": image})
    dep.start_ps()
    dep.start_agent("a1")
    wait_in_sync(dep, "a1", "d1")
    replica = dep.replica_path("d1")
    assert cmp(image, replica)
    source_data = data_ranges(image)
    for start, end in data_ranges(
        replica
    ):  # every allocated replica byte is allocated at the source
        assert any(s <= start and end <= e for s, e in source_data), (
            f"replica data at a source hole: {start}-{end}"
        )
    assert os.stat(replica).st_blocks <= os.stat(image).st_blocks * 1.05


def test_writes_during_initial_sync_are_kept(dep: Deployment, tmp_path: Path) -> None:
    image = tmp_path / "src.img"
    make_image(image, 64 * MiB, seed=2)
    spec = dep.add_agent("a1", {"d1": image})
    dep.start_ps()
    driver = Driver(dep, "a1")
    try:
        rnd = random.Random(3)
        for i in range(300):  # written while the initial sync runs
            offset = rnd.randrange(0, 64 * MiB - 65536)
            assert driver.call(
                op="write", disk="d1", offset=offset, length=rnd.choice([512, 4096, 65536]), seed=i
            )["ok"]
        assert driver.call(op="flush", disk="d1")["ok"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = driver.call(op="status")["status"]["disks"][0]
            if row["state"] == "replicating" and row["acked_seq"] >= row["journaled_seq"]:
                break
            time.sleep(0.1)
        assert row["state"] == "replicating", row
        dep.wait_applied("d1", row["journaled_seq"])
        assert cmp(spec.disks["d1"], dep.replica_path("d1"))
    finally:
        driver.quit()


def test_agent_killed_with_resync_references_and_writes_in_flight(
    dep: Deployment, tmp_path: Path
) -> None:
    """The initial sync journals references (read from the image when shipped) between the
    writes that go on meanwhile. SIGKILL of the agent while both are unacknowledged (checked
    in its journal after the kill), then a restart: the redo replays the writes and leaves
    the references alone (the image keeps every flushed byte), the references are read
    again, and the replica ends equal to the source (`cmp`)."""
    image = tmp_path / "src.img"
    make_image(image, 96 * MiB, seed=6, data_fraction=0.7)
    spec = dep.add_agent(
        "a1",
        {"d1": image},
        options={
            "bandwidth_limit": "8MiB",
            "max_batch_bytes": "256KiB",
            "window_bytes": "1MiB",
            "initial_copy": "journal",  # the references are what this test is about
        },
    )
    dep.start_ps()
    driver = Driver(dep, "a1")
    rnd = random.Random(7)
    try:
        deadline = time.monotonic() + 60
        while True:  # the sync has journaled references ahead of the (slow) link
            row = driver.call(op="status")["status"]["disks"][0]
            if (row.get("resync") or {}).get("sent_bytes", 0) >= 8 * MiB:
                break
            assert time.monotonic() < deadline, row
            time.sleep(0.05)
        for i in range(100):
            offset = rnd.randrange(0, 96 * MiB - 65536, 512)
            length = rnd.choice([512, 4096, 65536])
            assert driver.call(op="write", disk="d1", offset=offset, length=length, seed=i)["ok"]
        assert driver.call(op="flush", disk="d1")["ok"]
    finally:
        driver.kill()  # SIGKILL
    source = hashlib.sha256(image.read_bytes()).hexdigest()  # every write was flushed
    journal = SegmentLog.open(spec.state_dir / "disks" / "d1" / "journal")
    try:
        tags = [r.tag for r in journal.read_records(journal.first_seq, 1 << 40)]
    finally:
        journal.close()
    assert TAG_REF in tags and TAG_WRITE in tags, "references and writes must be in flight"
    dep.start_agent("a1")
    wait_in_sync(dep, "a1", "d1", timeout=180)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == source, "the redo changed the image"
    assert cmp(spec.disks["d1"], dep.replica_path("d1"))


def test_interrupted_initial_sync_resumes_without_resending(
    dep: Deployment, tmp_path: Path
) -> None:
    """SIGKILL of either side at random points; the sync completes and the wire carries the
    data about once: at most one batch per interruption more (plus protocol overhead)."""
    image = tmp_path / "src.img"
    data = make_image(image, 96 * MiB, seed=4, data_fraction=0.6)
    max_batch = 256 << 10
    dep.start_ps()
    with CountingProxy(dep.port) as proxy:
        dep.add_agent(
            "a1",
            {"d1": image},
            options={
                "process_server": f"127.0.0.1:{proxy.port}",
                "max_batch_bytes": max_batch,
                "window_bytes": "1MiB",
            },
        )
        rnd = random.Random(5)
        interruptions = 0
        dep.start_agent("a1")
        for _ in range(4):
            time.sleep(rnd.uniform(0.05, 0.4))
            if rnd.random() < 0.5:
                dep.kill_agent("a1")
                dep.start_agent("a1")
            else:
                dep.kill_ps()
                dep.start_ps()
            interruptions += 1
        wait_in_sync(dep, "a1", "d1")
        assert cmp(image, dep.replica_path("d1"))
        overhead = 0.03 * data + 2 * MiB  # digests, frames, TLS records, heartbeats
        assert proxy.total <= data + interruptions * max_batch + overhead, (proxy.total, data)


def test_resync_of_one_percent_sends_about_the_changed_bytes(
    dep: Deployment, tmp_path: Path
) -> None:
    image = tmp_path / "src.img"
    size = 128 * MiB
    make_image(image, size, seed=6, data_fraction=1.0)
    dep.start_ps()
    with CountingProxy(dep.port) as proxy:
        spec = dep.add_agent(
            "a1", {"d1": image}, options={"process_server": f"127.0.0.1:{proxy.port}"}
        )
        dep.start_agent("a1")
        wait_in_sync(dep, "a1", "d1")
        dep.stop_agent("a1")
        rnd = random.Random(7)
        blocks = rnd.sample(range(size // 4096), size // 4096 // 100)  # 1% of 4 KiB blocks
        with open(image, "r+b") as f:  # changed behind the agent's back
            for b in blocks:
                f.seek(b * 4096)
                f.write(rnd.randbytes(4096))
        changed = len(blocks) * 4096
        dep.start_agent("a1")
        wait_in_sync(dep, "a1", "d1")
        proxy.reset()
        out = dep.cli("agent.cli", "resync", "--config", str(spec.config), "d1")
        assert "compared by digests" in out.stdout
        assert out.stdout.rstrip().endswith("state replicating"), out.stdout  # it waited
        time.sleep(0.5)
        wait_in_sync(dep, "a1", "d1")
        assert cmp(image, dep.replica_path("d1"))
        assert proxy.total <= 1.1 * changed, f"{proxy.total} wire bytes for {changed} changed"


def test_verify_finds_nothing_then_exactly_the_planted_differences(
    dep: Deployment, tmp_path: Path
) -> None:
    image = tmp_path / "src.img"
    make_image(image, 64 * MiB, seed=8)
    spec = dep.add_agent("a1", {"d1": image})
    dep.start_ps()
    dep.start_agent("a1")
    wait_in_sync(dep, "a1", "d1")
    ok = dep.cli("agent.cli", "verify", "--config", str(spec.config), "d1", "--json", check=False)
    assert ok.returncode == 0 and json.loads(ok.stdout)["equal"] is True
    dep.stop_ps()
    planted = [(3 * MiB + 4096, 4096), (40 * MiB, 8192), (63 * MiB + 512, 4096 - 512)]
    with open(dep.replica_path("d1"), "r+b") as f:
        for offset, length in planted:
            f.seek(offset)
            f.write(b"\xa5" * length)
    dep.start_ps()
    deadline = time.monotonic() + 30
    while dep.agent_status("a1")["link"]["connected"] is not True and time.monotonic() < deadline:
        time.sleep(0.1)
    bad = dep.cli(
        "process_server.cli", "verify", "--config", str(dep.ps_config), "d1", "--json", check=False
    )
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["equal"] is False
    expected = [[3 * MiB + 4096, 4096], [40 * MiB, 8192], [63 * MiB, 4096]]  # at 4 KiB granularity
    assert report["differences"] == expected
    fix = dep.cli(
        "agent.cli", "verify", "--config", str(spec.config), "d1", "--repair", check=False
    )
    assert fix.returncode == 1 and "repair" in fix.stdout
    time.sleep(0.5)
    wait_in_sync(dep, "a1", "d1")
    assert cmp(image, dep.replica_path("d1"))
    again = dep.cli("agent.cli", "verify", "--config", str(spec.config), "d1", check=False)
    assert again.returncode == 0 and "EQUAL" in again.stdout


@pytest.mark.interop
def test_unclean_stop_reverifies_only_the_activity_log(dep: Deployment) -> None:
    if shutil.which("qemu-io") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have qemu-io")
        pytest.skip("qemu-io missing")
    size = 256 * MiB
    spec = dep.add_agent("a1", {"d1": size}, nbd=True)
    dep.start_ps()
    dep.start_agent("a1")
    wait_in_sync(dep, "a1", "d1")  # first protection: the initial comparison (holes only)
    uri = f"nbd+unix:///d1?socket={spec.nbd['d1']}"
    writes = ["-c", "write -P 0x5a 0 1M", "-c", "write -P 0x33 5M 64k", "-c", "write -P 0x44 6M 4k"]
    subprocess.run(["qemu-io", "-f", "raw", *writes, uri], check=True, capture_output=True)
    dep.kill_agent("a1")  # unclean: the activity log holds extents 0 and 1 (4 MiB each)
    dep.start_agent("a1")
    row = wait_in_sync(dep, "a1", "d1")
    assert (
        row["unclean_regions"] == [[0, 4 * MiB], [4 * MiB, 4 * MiB]] or row["unclean_regions"] == []
    )
    totals = row["resync_totals"]
    assert totals["total_bytes"] == 8 * MiB, totals  # only the activity-log extents were examined
    assert totals["hashed_bytes"] <= 2 * 8 * MiB, totals
    assert cmp(spec.disks["d1"], dep.replica_path("d1"))


def test_journal_overflow_then_resync_converges(dep: Deployment) -> None:
    spec = dep.add_agent("a1", {"d1": 64 * MiB}, options={"journal_quota": "4MiB"})
    driver = Driver(dep, "a1")  # no process server yet: the journal fills and overflows
    try:
        for i in range(40):
            assert driver.call(
                op="write",
                disk="d1",
                offset=i * 1024 * 1024 % (60 * MiB),
                length=512 * 1024,
                seed=i,
            )["ok"]
        row = driver.call(op="status")["status"]["disks"][0]
        assert row["state"] == "resync-required" and row["resync_reason"] == "journal-overflow", row
        assert row["journal_bytes"] <= 4 * MiB
        dep.start_ps()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = driver.call(op="status")["status"]["disks"][0]
            if row["state"] == "replicating" and row["acked_seq"] >= row["journaled_seq"]:
                break
            time.sleep(0.1)
        assert row["state"] == "replicating", row
        dep.wait_applied("d1", row["journaled_seq"])
        assert cmp(spec.disks["d1"], dep.replica_path("d1"))
    finally:
        driver.quit()


def test_lost_agent_state_is_detected_and_healed(dep: Deployment, tmp_path: Path) -> None:
    image = tmp_path / "src.img"
    make_image(image, 32 * MiB, seed=9)
    # Journaled, the first sync leaves the process server ahead of a fresh journal (a copy
    # in bulk would leave both at seq 0): the lost state is what must be detected here.
    spec = dep.add_agent("a1", {"d1": image}, options={"initial_copy": "journal"})
    dep.start_ps()
    dep.start_agent("a1")
    wait_in_sync(dep, "a1", "d1")
    driver_row = dep.agent_status("a1")["disks"][0]
    assert driver_row["journaled_seq"] > 0
    dep.stop_agent("a1")
    shutil.rmtree(spec.state_dir)  # the source host was rebuilt: journal and state are gone
    with open(image, "r+b") as f:
        f.seek(5 * MiB)
        f.write(os.urandom(3 * MiB))
    dep.start_agent("a1")
    wait_in_sync(dep, "a1", "d1")
    assert cmp(image, dep.replica_path("d1"))


def test_scan_mode_ships_what_another_program_wrote(dep: Deployment, tmp_path: Path) -> None:
    image = tmp_path / "scanned.img"
    make_image(image, 32 * MiB, seed=10)
    spec = dep.add_agent("a1", {"d1": image})
    text = spec.config.read_text() + 'mode = "scan"\nscan_interval = "1s"\n'
    spec.config.write_text(text)
    dep.start_ps()
    dep.start_agent("a1")
    wait_in_sync(dep, "a1", "d1")
    assert cmp(image, dep.replica_path("d1"))
    with open(image, "r+b") as f:  # another program writes the image
        f.seek(7 * MiB + 100)
        f.write(os.urandom(200_000))
    deadline = time.monotonic() + 30
    while not cmp(image, dep.replica_path("d1")):
        assert time.monotonic() < deadline, "scan did not ship the change"
        time.sleep(0.3)
    row = dep.agent_status("a1")["disks"][0]
    assert row["mode"] == "scan" and row["scans"] >= 1
