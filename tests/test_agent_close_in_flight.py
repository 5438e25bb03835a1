"""close() waits for writes in flight: a write still activating its activity-log extents when
the disk is closed must finish into an open journal and image (and be durable in the clean
stop), not run into closed descriptors; writes arriving after close() began are refused."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from agent.disk import ProtectedDisk
from common.errors import DiskError


async def test_close_lets_a_write_in_flight_finish(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    disk = await ProtectedDisk.open("d0", image, tmp_path / "state")
    al = disk.activity_log
    assert al is not None
    real_activate = al.activate
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_activate(*args: object, **kwargs: object) -> None:
        entered.set()
        await release.wait()  # the activity log's fdatasync takes a while
        await real_activate(*args, **kwargs)  # type: ignore[arg-type]

    al.activate = slow_activate  # type: ignore[method-assign]
    writing = asyncio.create_task(disk.write(0, b"W" * 4096))
    await entered.wait()
    closing = asyncio.create_task(disk.close())
    await asyncio.sleep(0.05)
    with pytest.raises(DiskError) as late:
        await disk.write(8192, b"L" * 4096)
    assert late.value.errno == errno.ESHUTDOWN
    assert not closing.done(), "close() must wait for the write in flight"
    release.set()
    seq = await writing
    await closing
    assert seq > 0
    assert image.read_bytes()[:4096] == b"W" * 4096
    again = await ProtectedDisk.open("d0", image, tmp_path / "state")
    try:
        assert again.redo_records == 0, "the stop was clean"
        assert again.journaled_seq == seq
    finally:
        await again.close()
