"""finish_resync saves the state that ends the resync in a thread; a journal overflow while
that save is under way saves its own state and bitmap in the loop. The older snapshot must
not be the last word on disk, nor may the overflow's bitmap be deleted: after a SIGKILL the
overflow write would otherwise be lost (no resync, and a redo of older records over it)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

from agent.dirty_bitmap import DirtyBitmap
from agent.disk import ProtectedDisk

MiB = 1 << 20


async def test_an_overflow_during_the_final_state_save_survives_a_kill(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)

    async def open_() -> ProtectedDisk:
        return await ProtectedDisk.open("d0", image, tmp_path / "state", journal_quota=MiB)

    disk = await open_()
    assert disk.bitmap is not None
    disk.bitmap.clear(0, disk.size)
    await disk.finish_resync()  # the initial comparison is done
    disk.mark_dirty([(0, 65536)], "operator")
    disk.resynced(0, 65536)

    real_save = disk._save_state
    started, release = threading.Event(), threading.Event()

    def slow_save(state: dict[str, Any] | None = None) -> None:
        if threading.current_thread() is threading.main_thread():
            real_save(state)
            return
        snapshot = dict(disk._state if state is None else state)  # serialized first...
        started.set()
        release.wait(5)  # ...the fsync takes a while...
        real_save(snapshot)  # ...then the file is replaced

    disk._save_state = slow_save  # type: ignore[method-assign]
    finishing = asyncio.create_task(disk.finish_resync())
    await asyncio.to_thread(started.wait, 5)
    while not disk.overflowed:  # the journal overflows meanwhile
        await disk.write(4 * MiB, os.urandom(256 << 10))
    await disk.write(2 * MiB, b"O" * 4096, fua=True)  # O: image + bitmap only
    release.set()
    await finishing
    disk._save_state = real_save  # type: ignore[method-assign]
    assert disk.overflowed and disk.state == "resync-required"
    assert DirtyBitmap.load(tmp_path / "state" / "dirty.bitmap").is_dirty(2 * MiB // 65536)

    disk.journal.close()  # SIGKILL
    assert disk.activity_log is not None
    disk.activity_log.close()
    os.close(disk.image_fd)
    again = await open_()
    try:
        assert again.resync_required and again.bitmap is not None
        assert again.bitmap.is_dirty(2 * MiB // 65536)
        assert image.read_bytes()[2 * MiB : 2 * MiB + 4096] == b"O" * 4096
    finally:
        await again.close()
