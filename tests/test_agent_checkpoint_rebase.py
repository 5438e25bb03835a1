"""A resync checkpoint that a journal rebase overtakes: the rebase deletes the journal (and
with it the records the pending clears stand for) and marks the whole disk; the checkpoint,
resuming after its journal sync, must not clear the fresh marks."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.disk import ProtectedDisk

MiB = 1 << 20


async def test_a_rebase_during_a_checkpoint_keeps_the_whole_disk_marked(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    disk = await ProtectedDisk.open("d0", image, tmp_path / "state")
    try:
        disk.journal_ref(0, MiB)  # the resync journaled [0, 16 MiB)'s differences
        disk.resynced(0, 16 * MiB)  # its bits may go at the next checkpoint
        syncing, resume = asyncio.Event(), asyncio.Event()
        real_sync = disk.journal.sync

        async def slow_sync() -> None:  # a busy disk: the fdatasync takes a while
            syncing.set()
            await resume.wait()
            await real_sync()

        disk.journal.sync = slow_sync  # type: ignore[method-assign]
        checkpoint = asyncio.create_task(disk.checkpoint_resync())
        await syncing.wait()
        # The link dropped and came back; the process server's seq forces a rebase.
        await disk.rebase_journal(disk.journaled_seq + 100, "test reconnection")
        resume.set()
        await checkpoint
        assert disk.bitmap is not None
        assert disk.bitmap.is_dirty(0), "the rebase's marks were cleared by an old checkpoint"
        assert disk.bitmap.dirty_bytes == disk.size
    finally:
        await disk.close()
