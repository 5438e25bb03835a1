"""Scan mode: another program writes the image and the agent only journals what its resync
read. After an unclean stop those records are older than the image: open() must never replay
them onto it (it would revert the writer's newer data, or punch holes for zero records); their
ranges are compared against the replica again instead."""

from __future__ import annotations

import os
from pathlib import Path

from agent.disk import ProtectedDisk


async def test_an_unclean_scan_mode_disk_is_not_redone(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    disk = await ProtectedDisk.open("d0", image, tmp_path / "state", scan_only=True)
    assert disk.scan_only and disk.bitmap is not None
    disk.bitmap.clear(0, disk.size)
    await disk.finish_resync()  # the initial comparison is done: nothing is marked
    assert disk.bitmap is None
    with open(image, "r+b") as f:  # the VM writes v1
        f.write(b"v1" * 2048)
    disk.journal_bytes(0, disk.read_image(0, 4096))  # the resync journals what it read
    disk.journal_zero(65536, 4096)  # ...and a zero chunk
    with open(image, "r+b") as f:  # the VM writes v2 (the agent is not in its path)
        f.write(b"v2" * 2048)
        f.seek(65536)
        f.write(b"D" * 4096)
    await disk.journal.sync()
    disk.journal.close()  # SIGKILL before the process server acknowledged
    assert disk.activity_log is not None
    disk.activity_log.close()
    os.close(disk.image_fd)

    again = await ProtectedDisk.open("d0", image, tmp_path / "state", scan_only=True)
    try:
        data = image.read_bytes()
        assert again.redo_records == 0
        assert data[:4096] == b"v2" * 2048, "the writer's newer data was reverted"
        assert data[65536 : 65536 + 4096] == b"D" * 4096, "a zero record punched the writer's data"
        assert again.bitmap is not None
        assert again.bitmap.is_dirty(0) and again.bitmap.is_dirty(1)
        assert again.pending_bytes == 4096, "the records are still shipped"
    finally:
        await again.close()
