"""The end of a journal overflow is durable only with the bitmap that holds the overflow's
writes: begin_resync saves the bitmap before the state says ``overflowed = False`` (after
which a restart trusts the saved bitmap instead of marking the whole disk), and the switch
to the bitmap counts only once its state is saved."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from agent.dirty_bitmap import DirtyBitmap
from agent.disk import ProtectedDisk
from common.errors import DiskError

MiB = 1 << 20


def _kill(disk: ProtectedDisk) -> None:
    """SIGKILL: nothing flushed or recorded as clean; only the descriptors go."""
    disk.journal.close()
    assert disk.activity_log is not None
    disk.activity_log.close()
    os.close(disk.image_fd)


async def test_an_overflow_write_stays_marked_across_a_kill_after_the_resync_began(
    tmp_path: Path,
) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(400 * 4 * MiB)  # sparse

    async def open_() -> ProtectedDisk:
        return await ProtectedDisk.open(
            "d0", image, tmp_path / "state", journal_quota=MiB, activity_extents=128
        )

    disk = await open_()
    assert disk.bitmap is not None
    disk.bitmap.clear(0, disk.size)
    await disk.finish_resync()  # the initial comparison is done: nothing is marked
    while not disk.overflowed:  # the journal fills (the process server is away)
        await disk.write(300 * 4 * MiB, os.urandom(256 << 10))
    await disk.flush()
    await disk.write(0, b"O" * 4096)  # O: an overflow write, in the bitmap (memory) only
    for extent in range(1, 140):  # more overflow writes evict O's extent from the activity log
        await disk.write(extent * 4 * MiB, b"y" * 4096)
    assert disk.activity_log is not None and 0 not in disk.activity_log._active
    assert not DirtyBitmap.load(tmp_path / "state" / "dirty.bitmap").is_dirty(0)
    await disk.acknowledge(disk.journaled_seq)  # the journal drains
    await disk.begin_resync()  # the resync starts: the overflow is over
    assert not disk.overflowed
    _kill(disk)  # before the resync's first checkpoint

    again = await open_()
    try:
        assert again.resync_required and again.bitmap is not None
        assert again.bitmap.is_dirty(0), "O's mark was lost: it would never reach the replica"
    finally:
        await again.close()


async def test_an_overflow_whose_state_cannot_be_saved_keeps_refusing_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    disk = await ProtectedDisk.open("d0", image, tmp_path / "state", journal_quota=MiB)
    try:
        real_save = disk._save_state

        def full(state: dict[str, Any] | None = None) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(disk, "_save_state", full)
        with pytest.raises(DiskError):
            for i in range(8):
                await disk.write(i * (256 << 10), os.urandom(256 << 10))
        assert not disk.overflowed, "the switch to the bitmap is not durable"
        big = b"n" * (512 << 10)  # more than the journal has room for
        with pytest.raises(DiskError):  # nor is the next one acknowledged bitmap-only
            await disk.write(6 * MiB, big)
        assert image.read_bytes()[6 * MiB : 6 * MiB + len(big)] == bytes(len(big))
        monkeypatch.setattr(disk, "_save_state", real_save)
        await disk.write(6 * MiB, big)  # the state directory has room again
        assert disk.overflowed and disk.state == "resync-required"
    finally:
        monkeypatch.undo()
        await disk.close()
