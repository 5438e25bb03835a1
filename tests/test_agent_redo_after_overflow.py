"""Redo after an unclean stop never replays a journal record older than the end of the last
journal overflow: a write made during the overflow went to the image and the dirty bitmap
only, so replaying an older record over it would lose it on the source and the replica."""

from __future__ import annotations

import os
from pathlib import Path

from agent.disk import ProtectedDisk


async def _open(tmp: Path) -> ProtectedDisk:
    return await ProtectedDisk.open(
        "d0", tmp / "disk.img", tmp / "state", journal_quota=1 << 20, segment_bytes=128 << 10
    )


def _kill(disk: ProtectedDisk) -> None:
    """SIGKILL: nothing flushed or recorded as clean; only the descriptors go."""
    disk.journal.close()
    assert disk.activity_log is not None
    disk.activity_log.close()
    os.close(disk.image_fd)


async def test_redo_does_not_replay_a_record_older_than_an_overflow_write(
    tmp_path: Path,
) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    disk = await _open(tmp_path)
    for i in range(12):  # filler, acknowledged by the process server later
        await disk.write((4 << 20) + i * (64 << 10), os.urandom(64 << 10))
    filler_last = disk.journaled_seq
    await disk.write(0, b"A" * 4096)  # A: journaled, not yet acknowledged
    while not disk.overflowed:
        await disk.write(5 << 20, os.urandom(64 << 10))
    await disk.write(0, b"O" * 4096, fua=True)  # O: image + bitmap only, acknowledged
    assert image.read_bytes()[:4096] == b"O" * 4096
    await disk.acknowledge(filler_last)  # the journal drains below half its quota
    assert disk.resync_ready() and disk.journal.first_seq <= filler_last + 1
    await disk.begin_resync()  # overflow over: writes are journaled again
    after = await disk.write(8192, b"N" * 4096)  # a journaled write after the overflow
    await disk.journal.sync()
    _kill(disk)

    again = await _open(tmp_path)
    try:
        data = image.read_bytes()
        assert data[:4096] == b"O" * 4096, "redo replayed A over the acknowledged O"
        assert data[8192 : 8192 + 4096] == b"N" * 4096
        assert again.redo_records >= 1, "records after the overflow are still redone"
        assert again.journal.first_seq <= after <= again.journaled_seq
        assert again.resync_required and again.bitmap is not None
        assert again.bitmap.is_dirty(0), "A's range must be compared by the resync"
    finally:
        await again.close()


async def test_a_rebase_forgets_the_redo_floor(tmp_path: Path) -> None:
    """Seq numbering restarts after a rebase: the old floor must not suppress the redo of the
    new journal's records."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    disk = await _open(tmp_path)
    while not disk.overflowed:
        await disk.write(5 << 20, os.urandom(64 << 10))
    await disk.acknowledge(disk.journaled_seq)
    await disk.begin_resync()
    await disk.rebase_journal(1, "test")  # numbering restarts below the floor
    await disk.write(0, b"R" * 4096)
    await disk.journal.sync()
    _kill(disk)
    with open(image, "r+b") as f:  # the image write was lost (host crash)
        f.write(bytes(4096))
    again = await _open(tmp_path)
    try:
        assert again.redo_records == 1
        assert image.read_bytes()[:4096] == b"R" * 4096
    finally:
        await again.close()
