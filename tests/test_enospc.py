# Disk full (ENOSPC) on the process server's state directory (its batch cache, replicas and state
# files) and on the agent's journal directory, for real: each is a small tmpfs mounted for the
# test (we run as root in CI; where mounting is impossible the tests say so and skip), filled
# with a ballast file, then given its space back. Where a real filesystem cannot be had, the
# same properties are checked by injecting ENOSPC at the narrowest I/O boundaries (the segment
# log's pwritev/pwrite; the journal append and state-file write of a protected disk), which
# always run.
# Rule kept: writers get success, a clean DiskError(ENOSPC) or backpressure, never a crash;
# nothing acknowledged is lost (every write acknowledged after a flush is in the source image,
# and after recovery in the replica, compared byte for byte by sha256 with the test's model);
# and replication resumes by itself once space returns.
"""ENOSPC on the cache, the state directory and the journal: clean errors, no loss, recovery."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.deploy import Deployment, Driver
from benchmarks.driver import pattern
from common.admin import admin_request
from common.segment_log import SegmentLog

DISK = "full-d"
AGENT = "full01"
SIZE = 8 << 20
BLOCK = 256 << 10
TIMEOUT = 40.0


# --------------------------------------------------------------------------- small filesystems


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the duration; skips when mounting is not
    possible here (not root, no CAP_SYS_ADMIN, no mount(8))."""
    path.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("ENOSPC on a real filesystem needs mount(8); not installed here")
    proc = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a {size} tmpfs at {path} ({proc.stderr.strip() or proc.returncode}): "
            "the real-filesystem ENOSPC tests need root or CAP_SYS_ADMIN; "
            "test_segment_log_rolls_back_an_append_that_hits_enospc still covers the I/O boundary"
        )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Ballast:
    """Fills a filesystem to a chosen amount of free space, and gives it back."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "ballast"

    def fill(self, leave: int = 0) -> int:
        """Fill until ENOSPC, then free ``leave`` bytes; returns the ballast size."""
        chunk = bytes(1 << 20)
        with open(self.path, "ab") as f:
            fd = f.fileno()
            for size in (1 << 20, 64 << 10, 4096, 512, 1):
                while True:
                    try:
                        os.write(fd, chunk[:size])
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
            total = os.fstat(fd).st_size
            if leave:
                os.ftruncate(fd, max(0, total - leave))
            return os.fstat(fd).st_size

    def free(self) -> int:
        return os.statvfs(self.path.parent).f_bavail * os.statvfs(self.path.parent).f_frsize

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- deployment helpers


class Rig:
    """One process server and one agent (a driver process) with a model of the disk."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.driver: Driver | None = None
        self.model = bytearray(SIZE)
        self.seed = 0
        self.acked = bytearray(SIZE)  # the model as of the last successful flush

    def start_driver(self) -> None:
        self.driver = Driver(self.dep, AGENT)

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.driver is not None
        return self.driver.call(**cmd)

    def write(self, block: int) -> dict[str, Any]:
        self.seed += 1
        reply = self.call(op="write", disk=DISK, offset=block * BLOCK, length=BLOCK, seed=self.seed)
        if reply["ok"]:
            self.model[block * BLOCK : (block + 1) * BLOCK] = pattern(self.seed, BLOCK)
        return reply

    def flush(self) -> dict[str, Any]:
        reply = self.call(op="flush", disk=DISK)
        if reply["ok"]:
            self.acked[:] = self.model
        return reply

    def status(self) -> dict[str, Any]:
        return dict(self.call(op="status")["status"]["disks"][0])

    def ps_row(self) -> dict[str, Any]:
        status = asyncio.run(
            admin_request(self.dep.ps_state / "admin.sock", {"cmd": "status"}, timeout=10)
        )
        return next(dict(r) for r in status["disks"] if r["disk"] == DISK)

    def source(self) -> bytes:
        return self.dep.agents[AGENT].disks[DISK].read_bytes()

    def replica(self) -> bytes:
        return self.dep.replica_path(DISK).read_bytes()

    def settle(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Drain, wait until applied; replica == source == model (sha256)."""
        assert self.flush()["ok"]
        started = time.monotonic()
        assert self.call(op="drain", timeout=timeout)["drained"], self.status()
        journaled = self.status()["journaled_seq"]
        while (row := self.ps_row())["applied_seq"] < journaled:
            assert time.monotonic() - started < timeout, row
            time.sleep(0.05)
        want = hashlib.sha256(self.model).hexdigest()
        assert hashlib.sha256(self.source()).hexdigest() == want, "source differs from model"
        assert hashlib.sha256(self.replica()).hexdigest() == want, "replica differs from source"
        return row

    def quit(self) -> None:
        if self.driver is not None:
            self.driver.quit()
            self.driver = None


def ps_alive(dep: Deployment) -> bool:
    return dep.ps_proc is not None and dep.ps_proc.poll() is None


def log_since(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


# --------------------------------------------------------------------------- process server


def test_full_process_server_state_directory(tmp_path: Path) -> None:
    """The cache cannot take another batch: nothing is acknowledged that is not stored, the
    agent keeps its journal and retries, and replication resumes when space returns."""
    dep = Deployment(tmp_path / "dep")
    rig = Rig(dep)
    with tmpfs(dep.ps_state, "40m") as state, dep:
        dep.init_pki()
        dep.write_ps_config(cache_quota="16MiB", cache_segment="1MiB")
        dep.add_agent(AGENT, {DISK: SIZE}, options={"reconnect_max": "300ms"})
        dep.start_ps()
        rig.start_driver()
        try:
            for block in range(4):
                assert rig.write(block)["ok"]
            rig.settle()
            ballast = Ballast(state)
            ballast.fill()
            log_offset = (dep.root / "ps.log").stat().st_size
            acked_before = rig.ps_row()["acked_seq"]
            # Writers are not stopped by a full process server: the journal absorbs.
            for block in range(4, 20):
                assert rig.write(block)["ok"]
            assert rig.flush()["ok"]
            time.sleep(1.5)
            row = rig.ps_row()
            assert ps_alive(dep), "the process server died on ENOSPC"
            assert "No space left on device" in log_since(dep.root / "ps.log", log_offset)
            assert row["acked_seq"] >= acked_before
            agent = rig.status()
            assert agent["acked_seq"] == row["acked_seq"] < agent["journaled_seq"], (agent, row)
            assert hashlib.sha256(rig.source()).digest() == hashlib.sha256(rig.acked).digest()
            ballast.remove()
            rig.settle()
            assert ps_alive(dep)
        finally:
            rig.quit()
            dep.stop_all()


def test_process_server_applier_resumes_after_enospc(tmp_path: Path) -> None:
    """The cache takes the batch but the replica cannot (the applier hits ENOSPC): once space
    returns, applying resumes without a restart."""
    dep = Deployment(tmp_path / "dep")
    rig = Rig(dep)
    with tmpfs(dep.ps_state, "40m") as state, dep:
        dep.init_pki()
        dep.write_ps_config(cache_quota="16MiB", cache_segment="4MiB")
        dep.add_agent(AGENT, {DISK: SIZE}, options={"reconnect_max": "300ms"})
        dep.start_ps()
        rig.start_driver()
        try:
            rig.settle()
            log_offset = (dep.root / "ps.log").stat().st_size
            ballast = Ballast(state)
            # Room for the cache record of one block, not for the replica's pages as well.
            ballast.fill(leave=BLOCK + (32 << 10))
            assert rig.write(SIZE // BLOCK - 1)["ok"]
            assert rig.flush()["ok"]
            deadline = time.monotonic() + 10
            while "applier_stopped" not in log_since(dep.root / "ps.log", log_offset):
                if time.monotonic() > deadline:
                    pytest.fail(
                        "could not provoke ENOSPC in the applier: "
                        + log_since(dep.root / "ps.log", log_offset)[-2000:]
                    )
                time.sleep(0.05)
            ballast.remove()
            row = rig.settle(timeout=20)
            assert row["error"] is None and row["state"] == "replicating", row
        finally:
            rig.quit()
            dep.stop_all()


# --------------------------------------------------------------------------- agent journal


@pytest.mark.parametrize(
    "leave",
    [
        pytest.param((2 << 20) + (128 << 10), id="room-for-state"),
        # No room at all: the activity log's ENOSPC reaches the writer as ENOSPC (was EIO).
        pytest.param(0, id="none"),
    ],
)
def test_full_agent_journal_directory(tmp_path: Path, leave: int) -> None:
    """The journal's filesystem fills while the process server is away: every write still
    gets success or a clean DiskError(ENOSPC), the agent stays up, the disk degrades to its
    dirty bitmap, and once space returns a resync makes the replica equal to the source.
    ``leave``: free bytes after the ballast (8 records and a half, or nothing at all)."""
    dep = Deployment(tmp_path / "dep")
    rig = Rig(dep)
    with dep:
        dep.init_pki()
        spec = dep.add_agent(AGENT, {DISK: SIZE}, options={"reconnect_max": "300ms"})
        with tmpfs(spec.state_dir, "8m") as state:
            dep.start_ps()
            rig.start_driver()
            try:
                for block in range(4):
                    assert rig.write(block)["ok"]
                rig.settle()
                dep.stop_ps()  # nothing drains the journal now
                ballast = Ballast(state)
                ballast.fill(leave=leave)
                errors: list[dict[str, Any]] = []
                for i in range(24):  # 6 MiB of writes into 2 MiB of space
                    reply = rig.write(i % (SIZE // BLOCK))
                    if not reply["ok"]:
                        errors.append(reply)
                    if i % 4 == 3:
                        reply = rig.flush()
                        if not reply["ok"]:
                            errors.append(reply)
                assert rig.driver is not None and rig.driver.proc.poll() is None, (
                    "the agent died on ENOSPC"
                )
                assert all("errno" in reply for reply in errors), errors  # DiskError only
                status = rig.status()
                assert status["state"] == "resync-required", status
                assert status["journaled_seq"] < rig.seed, status  # some went to the bitmap
                # Everything a writer was told is written is in the source image.
                image = rig.source()
                assert hashlib.sha256(image).digest() == hashlib.sha256(rig.model).digest()
                ballast.remove()
                dep.start_ps()
                row = rig.settle(timeout=60)
                assert rig.status()["state"] == "replicating"
                assert row["error"] is None
                # A full disk is reported as such, not as an I/O error.
                assert [r for r in errors if r["errno"] != errno.ENOSPC] == [], errors
            finally:
                rig.quit()
                dep.stop_all()


async def test_journal_enospc_without_room_for_the_state_file_is_a_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.disk as disk_module
    from agent.disk import ProtectedDisk
    from common.errors import DiskError

    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    disk = await ProtectedDisk.open("d", image, tmp_path / "state")
    try:
        assert await disk.write(0, b"x" * 4096) > 0

        def full(*args: object, **kw: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(disk.journal.log, "append", full)  # the journal device is full...
        monkeypatch.setattr(disk_module, "atomic_write_json", full)  # ...for every file on it
        try:
            await disk.write(4096, b"y" * 4096)  # success (bitmap) or a clean ENOSPC, no OSError
        except DiskError as exc:
            assert exc.errno == errno.ENOSPC
    finally:
        monkeypatch.undo()
        await disk.close()


# --------------------------------------------------------------------------- the I/O boundary


def test_segment_log_rolls_back_an_append_that_hits_enospc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC injected into the log's own writes (a short pwritev, then a failing pwrite): the
    record is not there, earlier ones are intact, the next append works once space returns,
    and a reopen finds exactly what was appended successfully."""
    log = SegmentLog.open(tmp_path / "log", segment_bytes=1 << 20)
    payloads = [os.urandom(5000 + i) for i in range(5)]
    for i, p in enumerate(payloads[:3]):
        log.append(1, i + 1, i + 1, (p,))
    real_pwritev, real_pwrite = os.pwritev, os.pwrite
    full = {"on": True}

    def short_pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        if full["on"]:
            head = b"".join(bytes(b) for b in buffers)[:100]
            return real_pwrite(fd, head, offset)  # a short write: the device filled up
        return real_pwritev(fd, buffers, offset)

    def failing_pwrite(fd: int, data: bytes, offset: int) -> int:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    size_before = log.bytes_used
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    with pytest.raises(OSError) as info:
        log.append(1, 4, 4, (payloads[3],))
    assert info.value.errno == errno.ENOSPC
    assert log.last_seq == 3 and log.bytes_used == size_before
    segment = next((tmp_path / "log").glob("*.seg"))
    assert segment.stat().st_size == size_before, "the torn record was left in the file"
    full["on"] = False
    log.append(1, 4, 4, (payloads[4],))
    assert [bytes(r.payload) for r in log.read_records(1, 1 << 30)] == [
        *payloads[:3],
        payloads[4],
    ]
    log.close()
    reopened = SegmentLog.open(tmp_path / "log", segment_bytes=1 << 20)
    assert reopened.truncated_bytes == 0 and reopened.last_seq == 4
    got = [hashlib.sha256(r.payload).digest() for r in reopened.read_records(1, 1 << 30)]
    assert got == [hashlib.sha256(p).digest() for p in [*payloads[:3], payloads[4]]]
    reopened.close()
