"""A failed fdatasync of the image is permanent: the kernel reports a writeback error once and
the pages it stood for may be lost, so a later FLUSH must not succeed and acknowledge them.
Further flushes and writes of the disk fail with EIO until a restart."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest

from agent.disk import ProtectedDisk
from common.durable import GroupCommit
from common.errors import DiskError


async def test_a_failed_group_commit_fails_every_later_commit() -> None:
    calls: list[int] = []

    def sync() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "writeback error (reported once by the kernel)")

    commit = GroupCommit(sync)
    commit.mark()
    with pytest.raises(OSError):
        await commit.commit()
    with pytest.raises(OSError) as later:
        await commit.commit()  # the kernel's next fdatasync would return 0
    assert later.value.errno == errno.EIO and len(calls) == 1
    commit.mark()
    with pytest.raises(OSError):
        await commit.commit()
    assert commit.failed is not None


async def _cancel_while_syncing(commit: GroupCommit, started: threading.Event) -> None:
    """A commit asked for, its caller cancelled once the sync's thread has started."""
    commit.mark()
    task = asyncio.create_task(commit.commit())
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_sync_after_a_cancelled_failing_one_waits_for_it_and_fails() -> None:
    """A caller cancelled during a sync lets go of the commit's lock while its thread still
    syncs. A sync asked for meanwhile must not run beside it: the kernel reports the error
    to one fdatasync only, and the other would return 0 for pages that may be lost."""
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def sync() -> None:
        calls.append(1)
        if len(calls) == 1:
            started.set()
            release.wait(5)
            raise OSError(errno.EIO, "writeback error (reported once by the kernel)")

    commit = GroupCommit(sync)
    await _cancel_while_syncing(commit, started)
    commit.mark()
    second = asyncio.create_task(commit.commit())
    await asyncio.sleep(0.05)  # its thread waits for the first one's
    release.set()
    with pytest.raises(OSError) as failed:
        await asyncio.wait_for(second, 5)
    assert failed.value.errno == errno.EIO and len(calls) == 1
    with pytest.raises(OSError):
        await asyncio.to_thread(commit.sync_now)  # a worker thread's sync fails the same way
    assert len(calls) == 1


async def test_a_failure_is_kept_when_its_caller_was_cancelled() -> None:
    started, release = threading.Event(), threading.Event()

    def sync() -> None:
        started.set()
        release.wait(5)
        raise OSError(errno.EIO, "writeback error")

    commit = GroupCommit(sync)
    await _cancel_while_syncing(commit, started)
    release.set()
    for _ in range(100):  # the thread finishes on its own
        if commit.failed is not None:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(OSError):
        await commit.commit()


async def test_after_a_failed_image_sync_flushes_and_writes_fail(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    disk = await ProtectedDisk.open("d0", image, tmp_path / "state")
    real_sync = disk._image_commit._sync
    failures = [OSError(errno.EIO, "writeback error")]

    def sync_once_failing() -> None:
        if failures:
            raise failures.pop()
        real_sync()

    disk._image_commit._sync = sync_once_failing
    await disk.write(0, b"W" * 4096)
    with pytest.raises(DiskError):
        await disk.flush()
    with pytest.raises(DiskError) as again:
        await disk.flush()  # must not acknowledge W
    assert again.value.errno == errno.EIO
    with pytest.raises(DiskError) as write:
        await disk.write(8192, b"x" * 4096)
    assert write.value.errno == errno.EIO
    with pytest.raises(DiskError):
        await disk.write_zeroes(8192, 4096)
    assert await disk.read(0, 4096) == b"W" * 4096  # reads still work
    with pytest.raises(DiskError):
        await disk.close()  # not a clean stop: the restart redoes the journal
    disk.journal.close()
    assert disk.activity_log is not None
    disk.activity_log.close()
    os.close(disk.image_fd)
    reopened = await ProtectedDisk.open("d0", image, tmp_path / "state")
    try:
        assert reopened.redo_records == 1
        assert await reopened.read(0, 4096) == b"W" * 4096
    finally:
        await reopened.close()
