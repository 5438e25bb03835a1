"""The agent's write path: journal-then-image, range checks, flush, overflow to the dirty
bitmap, and redo of the journal after an unclean stop. The image is checked with plain file
reads, independently of the code under test."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.disk import ProtectedDisk
from agent.journal import TAG_WRITE
from common.errors import DiskError
from tests.page_cache import resident_bytes

SIZE = 1 << 20


def _image(tmp: Path, size: int = SIZE) -> Path:
    path = tmp / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


async def _open(tmp: Path, **kw: int) -> ProtectedDisk:
    return await ProtectedDisk.open("d0", tmp / "disk.img", tmp / "state", **kw)


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero", "trim", "flush"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 64 << 10),
        st.integers(0, 255),
    ),
    max_size=40,
)


@given(ops=ops)
@settings(max_examples=40, deadline=None)
async def test_random_ops_match_a_model_and_the_journal_replays_them(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int, int]]
) -> None:
    tmp = tmp_path_factory.mktemp("ops")
    image = _image(tmp)
    disk = await _open(tmp)
    model = bytearray(SIZE)
    replay = bytearray(SIZE)
    for op, offset, length, byte in ops:
        length = min(length, SIZE - offset)
        if op == "write":
            await disk.write(offset, bytes([byte]) * length)
            model[offset : offset + length] = bytes([byte]) * length
        elif op in ("zero", "trim"):
            await (disk.trim(offset, length) if op == "trim" else disk.write_zeroes(offset, length))
            model[offset : offset + length] = bytes(length)
        else:
            await disk.flush()
    assert await disk.read(0, SIZE) == bytes(model)
    for entry in disk.journal.read(1, 1 << 30):  # the journal alone rebuilds the disk
        data = bytes(entry.data) if entry.data is not None else bytes(entry.length)
        replay[entry.offset : entry.offset + entry.length] = data
    assert replay == model
    await disk.close()
    assert image.read_bytes() == bytes(model)


async def test_range_and_mode_errors_carry_nbd_errnos(tmp_path: Path) -> None:
    _image(tmp_path)
    disk = await _open(tmp_path)
    with pytest.raises(DiskError) as e:
        await disk.write(SIZE - 1, b"ab")
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(DiskError) as e:
        await disk.read(SIZE, 1)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(DiskError) as e:
        await disk.write(0, b"")
    assert e.value.errno == errno.EINVAL
    disk.read_only = True
    with pytest.raises(DiskError) as e:
        await disk.write(0, b"x")
    assert e.value.errno == errno.EROFS
    assert disk.journaled_seq == 0, "a refused write must not be journaled"
    await disk.close()


def _write_nowait(disk: ProtectedDisk, offset: int, data: bytes) -> int | None:
    """One plain write the NBD front's way: admitted, then written in the same loop step."""
    if not disk.admit_nowait(offset, len(data)):
        return None
    (result,) = disk.write_admitted([(offset, data)])
    assert isinstance(result, int), result
    return result


async def test_admitted_writes_are_done_now_or_declined_when_they_would_wait(
    tmp_path: Path,
) -> None:
    """The NBD front's path: journaled and written in the same loop step when nothing has to
    be waited for; declined (nothing journaled, nothing written) while a point holds the gate
    or before the activity log has persisted the extent; the errors of ``write``."""
    image = _image(tmp_path)
    disk = await _open(tmp_path)
    assert _write_nowait(disk, 0, b"\1" * 4096) is None  # extent 0 not yet in the activity log
    assert disk.journaled_seq == 0
    with open(image, "rb") as f:
        assert f.read(4096) == bytes(4096), "a declined write reached the image"
    await disk.write(0, b"\2" * 4096)  # activates extent 0 (persisted first)
    assert _write_nowait(disk, 8192, b"\3" * 4096) == 2
    with open(image, "rb") as f:
        assert f.read(12288) == b"\2" * 4096 + bytes(4096) + b"\3" * 4096
    held = await disk.hold()
    assert held == 2
    assert _write_nowait(disk, 4096, b"\4" * 4096) is None, "a point holds the gate"
    disk.release()
    assert _write_nowait(disk, 4096, b"\4" * 4096) == 3
    with pytest.raises(DiskError) as e:
        disk.admit_nowait(SIZE - 1, 2)
    assert e.value.errno == errno.ENOSPC
    disk.read_only = True
    with pytest.raises(DiskError) as e:
        disk.admit_nowait(0, 1)
    assert e.value.errno == errno.EROFS
    assert disk.journaled_seq == 3
    entries = disk.journal.read(1, 1 << 20)
    assert [(e.seq, e.offset) for e in entries] == [(1, 0), (2, 8192), (3, 4096)]
    await disk.close()


async def test_admitted_writes_are_journaled_together_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes admitted together take one journal write (one system call) and are then written
    into the image in order: overlapping ones end as the last says, the journal holds one
    record per write with consecutive seqs, and after an unclean stop (the image rewritten
    behind the disk's back) the redo replays exactly those records."""
    image = _image(tmp_path)
    disk = await _open(tmp_path)
    await disk.write(0, b"\0" * 4096)  # activates extent 0
    writes = [(4096, b"\1" * 8192), (8192, b"\2" * 4096), (0, b"\3" * 512), (20480, b"\4" * 100)]
    assert all(disk.admit_nowait(offset, len(data)) for offset, data in writes)
    journal_writes = []
    real_pwritev = os.pwritev

    def pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        journal_writes.append(len(buffers))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    assert disk.write_admitted(writes) == [2, 3, 4, 5]
    monkeypatch.undo()
    assert journal_writes == [3 * 4], "one journal write: record head, write head, data x 4"
    expected = bytearray(b"\0" * 4096 + bytes(20480))
    for offset, data in writes:
        expected[offset : offset + len(data)] = data
    with open(image, "rb") as f:
        assert f.read(len(expected)) == bytes(expected)
    entries = disk.journal.read(2, 1 << 20)
    assert [(e.seq, e.offset, bytes(e.data or b"")) for e in entries] == [
        (seq, offset, data) for seq, (offset, data) in enumerate(writes, 2)
    ]
    await disk.journal.sync()
    # An unclean stop: the image lost the group's writes (zeroed behind the disk's back), the
    # journal kept them. Reopened, the redo puts them back.
    with open(image, "r+b") as f:
        f.write(bytes(len(expected)))
    disk.journal.close()
    reopened = await _open(tmp_path)
    assert reopened.redo_records == 5
    with open(image, "rb") as f:
        assert f.read(len(expected)) == bytes(expected)
    await reopened.close()


async def test_trim_punches_holes(tmp_path: Path) -> None:
    image = _image(tmp_path, 8 << 20)
    disk = await ProtectedDisk.open("d0", image, tmp_path / "state")
    await disk.write(0, os.urandom(8 << 20))
    await disk.flush()
    allocated = os.stat(image).st_blocks
    await disk.trim(0, 4 << 20)
    await disk.flush()
    assert os.stat(image).st_blocks < allocated - (3 << 20) // 512
    assert await disk.read(0, 4 << 20) == bytes(4 << 20)
    await disk.close()


async def test_journal_is_redone_onto_the_image_after_an_unclean_stop(tmp_path: Path) -> None:
    """A write that reached the journal but not the image (killed between the two) is redone."""
    image = _image(tmp_path)
    disk = await _open(tmp_path)
    await disk.write(0, b"A" * 4096)
    seq = disk.journal.next_seq
    disk.journal.log.append(
        TAG_WRITE, seq, seq, (b"\x00" * 8 + b"\x00" * 8, b"B" * 4096)
    )  # journal only
    disk.journal.log.sync_blocking()
    # simulate SIGKILL: no close(), state stays "unclean"
    disk.journal.close()
    reopened = await _open(tmp_path)
    assert reopened.redo_records == 2
    assert image.read_bytes()[:4096] == b"B" * 4096
    await reopened.close()
    again = await _open(tmp_path)
    assert again.redo_records == 0, "a clean stop needs no redo"
    await again.close()


async def test_journal_overflow_switches_to_a_persisted_dirty_bitmap(tmp_path: Path) -> None:
    _image(tmp_path, 4 << 20)
    disk = await ProtectedDisk.open(
        "d0", tmp_path / "disk.img", tmp_path / "state", journal_quota=1 << 20
    )
    for i in range(8):
        await disk.write(i * 256 << 10, os.urandom(256 << 10))
    assert disk.state == "resync-required"
    status = disk.status(0)
    assert status["resync_reason"] == "journal-overflow" and status["dirty_bytes"] > 0
    assert disk.journal.bytes_used <= 1 << 20, "the journal must never pass its quota"
    journaled = disk.journaled_seq
    await disk.write(0, b"z" * 100)
    assert disk.journaled_seq == journaled, "after overflow, writes go to the bitmap only"
    assert (tmp_path / "disk.img").read_bytes()[:100] == b"z" * 100
    await disk.close()
    reopened = await ProtectedDisk.open(
        "d0", tmp_path / "disk.img", tmp_path / "state", journal_quota=1 << 20
    )
    assert reopened.state == "resync-required"
    assert reopened.bitmap is not None and reopened.bitmap.is_dirty(0)
    await reopened.close()


async def test_a_resync_clear_never_wipes_a_write_made_during_an_overflow(tmp_path: Path) -> None:
    """A range compared by the resync (its clear pending until the next checkpoint), then the
    journal overflows and a write lands in that range, marked in the bitmap only: the
    checkpoint must leave the range dirty, or the write would never reach the replica."""
    _image(tmp_path, 64 << 20)
    disk = await ProtectedDisk.open(
        "d0", tmp_path / "disk.img", tmp_path / "state", journal_quota=1 << 20
    )
    for i in range(4):  # overflow once, then resume as a resync would
        await disk.write((32 << 20) + i * (512 << 10), os.urandom(512 << 10))
    assert disk.overflowed and disk.bitmap is not None
    await disk.rebase_journal(disk.journaled_seq + 1, "test")  # empty journal, all marked
    await disk.begin_resync()
    assert not disk.overflowed
    disk.bitmap.clear(0, 64 << 20)
    disk.bitmap.mark(0, 16 << 20)
    disk.resynced(0, 16 << 20)  # X compared: its bits may go at the next checkpoint
    for i in range(4):  # writes elsewhere overflow the journal again
        await disk.write((32 << 20) + i * (512 << 10), os.urandom(512 << 10))
    assert disk.overflowed
    await disk.write(4096, b"W" * 4096)  # W lands in X: in the bitmap only
    disk.resynced(16 << 20, 4096)  # while overflowed: not taken
    await disk.checkpoint_resync()
    chunk = 4096 // disk.bitmap.granularity
    assert disk.bitmap.is_dirty(chunk), "the overflow write's mark was wiped"
    await disk.close()


async def test_an_image_with_data_needs_an_initial_resync(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(SIZE))
    disk = await _open(tmp_path)
    assert disk.state == "initial-sync" and disk.status(0)["resync_reason"] == "initial"
    await disk.close()


async def test_a_resized_image_is_refused(tmp_path: Path) -> None:
    image = _image(tmp_path)
    disk = await _open(tmp_path)
    await disk.close()
    os.truncate(image, 2 * SIZE)
    with pytest.raises(DiskError, match="size changed"):
        await _open(tmp_path)


async def test_lag_and_rpo_track_unacknowledged_writes(tmp_path: Path) -> None:
    _image(tmp_path)
    disk = await _open(tmp_path)
    s1 = await disk.write(0, b"x" * 1000)
    await disk.write(4096, b"y" * 500)
    assert disk.pending_bytes == 1500
    assert disk.rpo_seconds(disk.oldest_pending_ns + 2_000_000_000) == pytest.approx(2.0)
    await disk.acknowledge(s1)
    assert disk.pending_bytes == 500
    await disk.acknowledge(disk.journaled_seq)
    assert disk.pending_bytes == 0 and disk.rpo_seconds(10**19) == 0.0
    await disk.close()


async def test_a_write_that_overflows_during_finish_resync_keeps_the_disk_marked(
    tmp_path: Path,
) -> None:
    _image(tmp_path, 8 << 20)
    disk = await ProtectedDisk.open(
        "d0", tmp_path / "disk.img", tmp_path / "state", journal_quota=1 << 20
    )
    await disk.finish_resync()  # the initial comparison of a fresh disk
    disk.mark_dirty([(0, 65536)], "operator")
    disk.resynced(0, 65536)
    for i in range(8):  # overflow the journal while the resync finishes
        await disk.write(i * (256 << 10), os.urandom(256 << 10))
    assert disk.overflowed
    await disk.finish_resync()
    assert disk.state == "resync-required", "an overflow during the finish must not be forgotten"
    await disk.write(0, b"still writable")
    await disk.close()
    again = await ProtectedDisk.open(
        "d0", tmp_path / "disk.img", tmp_path / "state", journal_quota=1 << 20
    )
    assert again.state == "resync-required"
    await again.close()


async def test_a_huge_trim_keeps_the_activity_log_loadable(tmp_path: Path) -> None:
    image = _image(tmp_path, 8 << 30)  # sparse: nothing is written
    disk = await ProtectedDisk.open("d0", image, tmp_path / "state", activity_extents=128)
    await disk.trim(0, (4 << 30) - 4096)
    assert disk.activity_log is not None
    hot = disk.activity_log.load()
    assert 0 < len(hot) <= 128 and max(hot) == ((4 << 30) - 4097) // (4 << 20)
    await disk.close()


async def test_write_seq_follows_writes_not_resync_records(tmp_path: Path) -> None:
    """Resync's digest requests wait for ``write_seq``: every write, zero-write and trim
    moves it, resync's own records (journal_bytes / journal_zero) do not, and a reopened
    disk counts whatever its journal holds as writes."""
    _image(tmp_path)
    disk = await _open(tmp_path)
    try:
        assert disk.write_seq == disk.journaled_seq
        seq = await disk.write(0, b"a" * 4096)
        assert disk.write_seq == seq == disk.journaled_seq
        resync_seq = disk.journal_bytes(8192, b"b" * 4096)
        disk.journal_zero(65536, 4096)
        assert resync_seq > seq and disk.journaled_seq > disk.write_seq == seq
        zero_seq = await disk.write_zeroes(0, 4096)
        assert disk.write_seq == zero_seq == disk.journaled_seq
        await disk.close()
        disk = await _open(tmp_path)
        assert disk.write_seq == disk.journaled_seq == zero_seq
    finally:
        await disk.close()


async def test_a_reference_is_not_redone_and_its_seq_survives_an_unclean_stop(
    tmp_path: Path,
) -> None:
    """A reference (resync data the image holds) has no bytes in the journal: the redo after
    an unclean stop must leave the image's bytes alone (a zero extent would wipe them), and
    the reopened disk still knows the newest reference (no point before it is acknowledged)."""
    image = _image(tmp_path)
    data = os.urandom(65536)
    with open(image, "r+b") as f:
        f.seek(131072)
        f.write(data)
    disk = await _open(tmp_path)
    written = await disk.write(0, b"w" * 4096)
    ref = disk.journal_ref(131072, 65536)
    assert ref == written + 1 == disk.last_ref_seq
    assert disk.pending_bytes == 4096 + 65536, "a reference's bytes are still to travel"
    entry = disk.journal.read(ref, 1 << 20)[0]
    assert entry.ref and entry.data is None and entry.carries_data
    await disk.journal.sync()
    disk.journal.close()  # SIGKILL: no close(), the state stays unclean
    reopened = await _open(tmp_path)
    try:
        assert reopened.redo_records == 1, "only the write is redone"
        assert reopened.last_ref_seq == ref
        assert reopened.pending_bytes == 4096 + 65536
        assert image.read_bytes()[131072 : 131072 + 65536] == data
        from_file = reopened.journal.read(ref, 1 << 20)[0]  # decoded from the segment file
        assert (from_file.seq, from_file.offset, from_file.length) == (ref, 131072, 65536)
        assert from_file.ref and from_file.data is None
    finally:
        await reopened.close()


async def test_no_point_before_the_last_reference_is_acknowledged(tmp_path: Path) -> None:
    """A reference is read from the image when it is shipped, possibly with newer bytes: the
    resync finishes (state ``replicating``, points allowed) only once the process server
    acknowledged the newest one."""
    _image(tmp_path)
    disk = await _open(tmp_path)
    try:
        assert disk.state == "initial-sync"
        disk.resynced(0, SIZE)
        ref = disk.journal_ref(0, 65536)
        finishing = asyncio.ensure_future(disk.finish_resync())
        await asyncio.sleep(0.2)
        assert not finishing.done() and disk.state == "initial-sync"
        await disk.acknowledge(ref - 1)
        await asyncio.sleep(0.1)
        assert not finishing.done() and disk.state == "initial-sync"
        await disk.acknowledge(ref)
        async with asyncio.timeout(5):
            await finishing
        assert disk.state != "initial-sync" and not disk.resync_required
    finally:
        await disk.close()


def test_a_journal_read_from_the_file_counts_what_references_stand_for(tmp_path: Path) -> None:
    """Read back from the segment file (after a restart: no in-memory tail), a batch's worth
    of journal entries is bounded by the bytes they stand for (a reference's length, a
    write's data), not by their record sizes, and reads that follow each other with one
    cursor return every entry once, in order."""
    from agent.journal import Journal
    from common.segment_log import Cursor

    journal = Journal(tmp_path / "j", quota=1 << 30)
    journal.append_write(0, b"w" * 4096, 1)
    for i in range(200):
        journal.append_ref((i + 1) << 20, 1 << 20, 2)
    journal.append_zero(0, 4096, 3, may_trim=True)
    journal.log.sync_blocking()
    journal.close()
    journal = Journal(tmp_path / "j", quota=1 << 30)
    try:
        first = journal.read(1, 4 << 20)
        assert [e.seq for e in first] == [1, 2, 3, 4], "4 KiB + three 1 MiB references fit in 4 MiB"
        cursor, seq, seen = Cursor(), 1, []
        while seq <= journal.last_seq:
            entries = journal.read(seq, 4 << 20, cursor)
            assert sum(e.length for e in entries if e.carries_data) <= 4 << 20 or len(entries) == 1
            seen += [e.seq for e in entries]
            seq = entries[-1].seq + 1
        assert seen == list(range(1, 203))
    finally:
        journal.close()


async def test_aligned_writes_into_holes_of_the_image_bypass_the_page_cache(
    tmp_path: Path,
) -> None:
    """Whole 4 KiB blocks, >= 64 KiB, into a hole of the image go with O_DIRECT (none of
    their pages stay cached: ``fincore``); overwrites of data and unaligned writes go through
    the page cache; the image and the journal hold every write either way."""
    image = _image(tmp_path, 8 << 20)
    disk = await ProtectedDisk.open("d0", image, tmp_path / "state")
    model = bytearray(8 << 20)
    writes = [
        (1 << 20, os.urandom(1 << 20)),  # into a hole: direct
        (1 << 20, os.urandom(1 << 20)),  # over data: buffered
        ((4 << 20) + 512, os.urandom(64 << 10)),  # unaligned: buffered
        (6 << 20, os.urandom(2 << 20)),  # into a hole, longer than the agent's buffer
    ]
    for offset, data in writes:
        await disk.write(offset, data)
        model[offset : offset + len(data)] = data
    await disk.flush()
    # only the overwrite and the unaligned write are cached (checked before anything reads)
    assert resident_bytes(image) <= (1 << 20) + (72 << 10)
    assert await disk.read(0, 8 << 20) == bytes(model)
    replay = bytearray(8 << 20)
    for entry in disk.journal.read(1, 1 << 30):
        replay[entry.offset : entry.offset + entry.length] = bytes(entry.data or b"")
    assert replay == model
    await disk.close()
    assert image.read_bytes() == bytes(model)


async def test_an_image_write_failing_in_a_group_fails_only_that_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One image write of a group fails (EIO): that write gets the error, the others their
    seqs; all were journaled first, so a redo can still put the failed one in place."""
    _image(tmp_path)
    disk = await _open(tmp_path)
    await disk.write(0, b"\0" * 4096)  # activates extent 0
    writes = [(4096, b"a" * 4096), (8192, b"b" * 4096), (12288, b"c" * 4096)]
    assert all(disk.admit_nowait(offset, len(data)) for offset, data in writes)
    real = disk._apply_to_image

    def failing(offset: int, length: int, data: bytes | None, may_trim: bool) -> None:
        if offset == 8192:
            raise OSError(errno.EIO, "Input/output error")
        real(offset, length, data, may_trim)

    monkeypatch.setattr(disk, "_apply_to_image", failing)
    results = disk.write_admitted(writes)
    monkeypatch.undo()
    assert results[0] == 2 and results[2] == 4
    assert isinstance(results[1], DiskError) and results[1].errno == errno.EIO
    assert [e.offset for e in disk.journal.read(2, 1 << 20)] == [4096, 8192, 12288]
    await disk.close()
