"""The segmented log under the journal and the cache: order, durability bookkeeping, torn tails,
corruption detection and segment release."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import common.segment_log as segment_log
from common.errors import IntegrityError
from common.segment_log import RECORD_HEADER, SEGMENT_HEADER, Cursor, SegmentLog
from tests.page_cache import resident_bytes


def _fill(log: SegmentLog, sizes: list[int]) -> list[bytes]:
    payloads = []
    for size in sizes:
        payload = os.urandom(size)
        seq = log.next_seq
        log.append(1, seq, seq, (payload,))
        payloads.append(payload)
    return payloads


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_append_read_roundtrip_across_segments(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path, segment_bytes=4096)
    payloads = _fill(log, [100, 3000, 5000, 1, 0, 2048] * 5)
    assert log.first_seq == 1 and log.last_seq == len(payloads)
    assert len(_segments(tmp_path)) > 3
    records = log.read_records(1, 1 << 30)
    assert [r.payload for r in records] == payloads
    assert [r.first_seq for r in records] == list(range(1, len(payloads) + 1))
    # reading from the middle returns the record holding that seq first
    assert log.read_records(17, 1 << 30)[0].payload == payloads[16]


def test_cursor_reads_equal_fresh_reads(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path, segment_bytes=8192)
    payloads = _fill(log, [i * 37 % 3000 for i in range(200)])
    cursor = Cursor()
    seq = 1
    got: list[bytes] = []
    while seq <= log.last_seq:
        batch = log.read_records(seq, 5000, cursor)
        assert batch, "a read below last_seq must return at least one record"
        got.extend(r.payload for r in batch)
        seq = batch[-1].last_seq + 1
    assert got == payloads


def test_reopen_keeps_everything_and_continues(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path, segment_bytes=4096)
    payloads = _fill(log, [1000] * 20)
    log.sync_blocking()
    log.close()
    log = SegmentLog.open(tmp_path, segment_bytes=4096)
    assert log.last_seq == 20 and log.truncated_bytes == 0
    payloads += _fill(log, [10])
    assert [r.payload for r in log.read_records(1, 1 << 30)] == payloads


@given(cut=st.integers(min_value=1, max_value=999), junk=st.binary(max_size=64))
@settings(max_examples=60, deadline=None)
def test_torn_tail_is_truncated(
    tmp_path_factory: pytest.TempPathFactory, cut: int, junk: bytes
) -> None:
    directory = tmp_path_factory.mktemp("torn")
    log = SegmentLog.open(directory)
    payloads = _fill(log, [500, 500, 700])
    log.close()
    last = _segments(directory)[-1]
    size = last.stat().st_size
    with open(last, "r+b") as f:  # tear the last record somewhere inside it, then add garbage
        f.truncate(size - min(cut, 700 + RECORD_HEADER.size - 1))
        f.seek(0, os.SEEK_END)
        f.write(junk)
    log = SegmentLog.open(directory)
    assert log.last_seq == 2, "the torn last record must be dropped, the others kept"
    assert [r.payload for r in log.read_records(1, 1 << 30)] == payloads[:2]
    assert log.truncated_bytes > 0
    log.append(1, 3, 3, (b"again",))  # the log stays appendable at the right seq
    assert log.read_records(3, 100)[0].payload == b"again"
    log.close()


def test_corruption_before_the_tail_raises_integrity_error(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path, segment_bytes=2048)
    _fill(log, [1500] * 6)
    log.close()
    first = _segments(tmp_path)[0]
    with open(first, "r+b") as f:
        f.seek(SEGMENT_HEADER.size + RECORD_HEADER.size + 10)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match=first.name):
        SegmentLog.open(tmp_path, segment_bytes=2048)


def test_corruption_found_by_readers(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path)
    _fill(log, [4000, 4000])
    path = _segments(tmp_path)[0]
    with open(path, "r+b") as f:
        f.seek(SEGMENT_HEADER.size + RECORD_HEADER.size + 5)
        f.write(b"\x00\x01\x02")
    with pytest.raises(IntegrityError):
        log.read_records(1, 1 << 30)


async def test_release_deletes_only_whole_acknowledged_segments(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path, segment_bytes=4096)
    _fill(log, [1500] * 12)
    before = _segments(tmp_path)
    freed = await log.release_through(5)
    after = _segments(tmp_path)
    assert freed > 0 and len(after) < len(before)
    assert log.first_seq <= 6, "a record not yet released must still be readable"
    assert log.read_records(6, 1 << 30)[0].first_seq == 6
    with pytest.raises(LookupError):
        log.read_records(1, 100)
    await log.release_through(12)
    assert log.first_seq == 13 == log.next_seq
    log.close()
    log = SegmentLog.open(tmp_path, segment_bytes=4096)
    assert log.next_seq == 13, "an emptied log must remember where seq numbering stands"


async def test_group_commit_shares_syncs(tmp_path: Path) -> None:
    import asyncio

    log = SegmentLog.open(tmp_path)
    _fill(log, [100])
    calls = 0
    real = log._sync_fds

    def counting(fds: list[int], dir_dirty: bool) -> None:
        nonlocal calls
        calls += 1
        real(fds, dir_dirty)

    log._sync_fds = counting  # type: ignore[method-assign]
    await asyncio.gather(*(log.sync() for _ in range(20)))
    assert calls == 1
    assert not log.dirty
    await log.sync()
    assert calls == 1, "nothing new was written: no second fdatasync"


def test_append_refuses_a_seq_gap(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path, base_seq=10)
    with pytest.raises(ValueError):
        log.append(1, 11, 11, (b"x",))
    log.append(1, 10, 12, (b"x",))
    assert log.next_seq == 13


async def test_a_cancelled_sync_never_lets_a_later_sync_return_early(tmp_path: Path) -> None:
    """A caller cancelled mid-fdatasync must not make the next caller believe it is durable."""
    import asyncio
    import time

    log = SegmentLog.open(tmp_path)
    _fill(log, [100])
    real = log._sync_fds
    finished: list[float] = []

    def slow(fds: list[int], dir_dirty: bool) -> None:
        time.sleep(0.2)
        real(fds, dir_dirty)
        finished.append(time.monotonic())

    log._sync_fds = slow  # type: ignore[method-assign]
    first = asyncio.ensure_future(log.sync())
    await asyncio.sleep(0.05)
    first.cancel()
    await log.sync()
    assert finished, "the second sync returned before any fdatasync completed"


async def test_a_failed_fdatasync_poisons_the_log(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path)
    _fill(log, [100])

    def failing(fds: list[int], dir_dirty: bool) -> None:
        raise OSError(5, "EIO")

    log._sync_fds = failing  # type: ignore[method-assign]
    with pytest.raises(OSError):
        await log.sync()
    with pytest.raises(OSError, match="earlier fdatasync failed"):
        await log.sync()  # never a false success after the kernel reported a lost write


def test_reopen_makes_what_it_found_durable(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path)
    _fill(log, [100])
    log.close()  # never synced: only in the page cache
    calls: list[int] = []
    real = os.fdatasync
    try:
        os.fdatasync = lambda fd: (calls.append(fd), real(fd))[1]  # type: ignore[assignment]
        SegmentLog.open(tmp_path).close()
    finally:
        os.fdatasync = real  # type: ignore[assignment]
    assert calls, "records found on open must be fdatasync'ed before they are reported durable"


def _inode(path: Path) -> int:
    return path.stat().st_ino


async def test_a_released_segment_file_is_reused_and_its_old_records_never_read(
    tmp_path: Path,
) -> None:
    """``recycle``: a released segment's file becomes the next segment (same inode), and what
    it held before, which lies past the new records with older seqs, is never read back: not
    by readers, not at reopen after a crash, not when it sits in a segment that is no longer
    the last (the next segment continues where the new records end)."""
    log = SegmentLog.open(tmp_path, segment_bytes=8192, recycle=2)
    payloads = _fill(log, [3000, 3000, 8000, 3000, 3000, 3000])  # segments 1..3 (14 KiB), 4..6
    old = {p.name: _inode(p) for p in _segments(tmp_path)}
    await log.release_through(3)
    assert sorted(tmp_path.glob(".recycle-*.tmp")), "released segments must be kept for reuse"
    # Eight 1000-byte records fill the reused 14 KiB file to 8 KiB; the ninth rolls on.
    payloads = payloads[3:] + _fill(log, [1000] * 9)
    segments = _segments(tmp_path)
    reused = [p for p in segments if _inode(p) in old.values() and p.name not in old]
    assert len(reused) == 1 and reused[0] != segments[-1], "a released file must be reused"
    assert reused[0].stat().st_size > 14000, "its old records must lie past the new ones"
    assert [r.payload for r in log.read_records(4, 1 << 30)] == payloads
    log.sync_blocking()
    again = SegmentLog.open(tmp_path, segment_bytes=8192, recycle=2)  # a crash: no close
    assert again.first_seq == 4 and again.last_seq == 15
    assert [r.payload for r in again.read_records(4, 1 << 30)] == payloads
    assert not list(tmp_path.glob(".recycle-*.tmp")), "kept files are dropped at open"
    log.close()  # the crashed process's descriptors (before anything new is appended)
    again.append(1, 16, 16, (b"on",))
    assert again.read_records(16, 10)[0].payload == b"on"
    again.close()
    clean = SegmentLog.open(tmp_path, segment_bytes=8192, recycle=2)  # after a clean stop
    assert clean.truncated_bytes == 0, "a clean stop leaves no old records to cut (no warning)"
    assert [r.payload for r in clean.read_records(4, 1 << 30)] == [*payloads, b"on"]
    clean.close()


async def test_a_kept_file_is_not_reused_before_its_new_name_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the release's directory fsync is still running, the kept file's old segment name
    is what a power loss would bring back: records appended meanwhile must not go into it
    (the log would not open again), so a roll then starts a new file."""
    gate = threading.Event()
    real_fsync_dir = segment_log.fsync_dir

    def slow_fsync_dir(path: Path) -> None:
        gate.wait(10)
        real_fsync_dir(path)

    log = SegmentLog.open(tmp_path, segment_bytes=8192, recycle=2)
    _fill(log, [3000] * 9)  # segments 1..3, 4..6, 7..9
    log.sync_blocking()
    before = {_inode(p) for p in _segments(tmp_path)}
    monkeypatch.setattr(segment_log, "fsync_dir", slow_fsync_dir)
    release = asyncio.ensure_future(log.release_through(3))
    await asyncio.sleep(0.05)
    assert not release.done() and list(tmp_path.glob(".recycle-*.tmp"))
    _fill(log, [3000] * 3)  # rolls into segment 10 while the fsync is pending
    fresh = [p for p in _segments(tmp_path) if _inode(p) not in before]
    assert len(fresh) == 1, "the roll must take a new file, not the kept one"
    gate.set()
    await release
    monkeypatch.setattr(segment_log, "fsync_dir", real_fsync_dir)
    _fill(log, [3000] * 3)  # the next roll, after the fsync: now the kept file is reused
    reused = [p for p in _segments(tmp_path) if _inode(p) in before and p.name >= fresh[0].name]
    assert reused, "after the directory fsync the kept file must be reused"
    log.sync_blocking()
    log.close()
    again = SegmentLog.open(tmp_path, segment_bytes=8192, recycle=2)
    assert again.first_seq == 4 and again.last_seq == 15
    again.close()


@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(0, 5000)),
            st.tuples(st.just("release"), st.integers(0, 100)),
            st.tuples(st.just("crash"), st.just(0)),
        ),
        max_size=60,
    )
)
@settings(max_examples=60, deadline=None)
def test_recycling_logs_read_back_what_was_appended(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, int]]
) -> None:
    """Random appends, releases and crashes (reopen without close, after a sync) of a log that
    reuses its released files: it always reads back exactly the records not released."""
    import asyncio

    directory = tmp_path_factory.mktemp("recycle")
    log = SegmentLog.open(directory, segment_bytes=6000, recycle=2)
    model: dict[int, bytes] = {}
    for kind, value in steps:
        if kind == "append":
            seq = log.next_seq
            model[seq] = _fill(log, [value])[0]
        elif kind == "release":
            through = log.first_seq - 1 + value
            asyncio.run(log.release_through(min(through, log.last_seq)))
        else:
            log.sync_blocking()
            log = SegmentLog.open(directory, segment_bytes=6000, recycle=2)
        live = {s: p for s, p in model.items() if s >= log.first_seq}
        got = log.read_records(log.first_seq, 1 << 30) if live else []
        assert {r.first_seq: bytes(r.payload) for r in got} == live
    log.close()


@pytest.mark.parametrize("recycle", [0, 2])
async def test_bytes_used_is_the_size_of_the_segments(tmp_path: Path, recycle: int) -> None:
    """``bytes_used`` (kept as segments are added and released) is the sum of the segments'
    sizes through rolls, releases, reuse of released files and a reopen; without reuse, the
    files' sizes on disk (a reused file keeps its old bytes past the log's end)."""
    log = SegmentLog.open(tmp_path, segment_bytes=16 << 10, recycle=recycle)

    def check(log: SegmentLog) -> None:
        assert log.bytes_used == sum(s.size for s in log._segments)
        if not recycle:
            assert log.bytes_used == sum(p.stat().st_size for p in tmp_path.glob("*.seg"))

    seq = 1
    for round_ in range(6):
        for _ in range(40):
            log.append(1, seq, seq, (bytes([round_]) * 1000,))
            seq += 1
            check(log)
        await log.sync()
        await log.release_through(seq - 1 - 25 * (round_ % 2))
        check(log)
    log.close()
    reopened = SegmentLog.open(tmp_path, segment_bytes=16 << 10, recycle=recycle)
    check(reopened)
    reopened.close()


@pytest.mark.parametrize("blocking", [True, False])
async def test_drop_synced_leaves_durable_records_out_of_the_page_cache(
    tmp_path: Path, blocking: bool
) -> None:
    """A ``drop_synced`` log (the undo log) keeps none of its durable records in the page
    cache, beyond the partial page at each segment's end; records not yet synced stay (they
    are dirty: dropping would only write them back early); a plain log keeps all of them;
    everything reads back whole from the disk."""
    page = segment_log.PAGE
    dropping = SegmentLog.open(tmp_path / "drop", segment_bytes=1 << 20, drop_synced=True)
    keeping = SegmentLog.open(tmp_path / "keep", segment_bytes=1 << 20)
    written: dict[SegmentLog, list[bytes]] = {dropping: [], keeping: []}

    async def sync(log: SegmentLog) -> None:
        if blocking:
            log.sync_blocking()
        else:
            await log.sync()

    for log in (dropping, keeping):
        for _ in range(2):  # the second round drops the page the first left partial
            written[log] += _fill(log, [50_000 + i for i in range(30)])
            await sync(log)
    segments = _segments(tmp_path / "drop")
    assert len(segments) >= 3
    for path in segments:
        assert resident_bytes(path) <= page, path
    kept = _segments(tmp_path / "keep")
    assert sum(resident_bytes(p) for p in kept) >= sum(p.stat().st_size for p in kept) - page
    written[dropping] += _fill(dropping, [300_000])  # appended, not synced: still cached
    assert resident_bytes(_segments(tmp_path / "drop")[-1]) >= 300_000 - page
    for log, payloads in written.items():
        assert [bytes(r.payload) for r in log.read_records(1, 1 << 30)] == payloads
        log.close()


def test_a_record_of_more_pieces_than_one_writev_takes_reads_back_whole(tmp_path: Path) -> None:
    """An undo record is appended as the pieces of its batch: more than ``IOV_MAX`` of them
    are written in several ``pwritev`` calls, one after another, and read back as one."""
    pieces = [bytes([i % 251]) * (1 + i % 7) for i in range(2500)]
    log = SegmentLog.open(tmp_path, base_seq=1)
    log.append(1, 1, 1, pieces)
    log.append(1, 2, 2, [b"after"])
    log.sync_blocking()
    log.close()
    reopened = SegmentLog.open(tmp_path, base_seq=1)
    records = reopened.read_records(1, 1 << 30, Cursor())
    assert [bytes(r.payload) for r in records] == [b"".join(pieces), b"after"]
    reopened.close()


@given(
    groups=st.lists(
        st.lists(
            st.tuples(st.integers(0, 3), st.lists(st.binary(max_size=300), max_size=3)),
            min_size=1,
            max_size=6,
        ),
        max_size=12,
    ),
    sealed=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_append_many_is_appending_one_by_one(
    tmp_path_factory: pytest.TempPathFactory,
    groups: list[list[tuple[int, list[bytes]]]],
    sealed: bool,
) -> None:
    """Records appended in groups (one write each) read back, and reopen, exactly as the same
    records appended one at a time: payloads, tags and seqs, across segment rolls (a group
    goes whole into one segment), plain or sealed."""
    from common.at_rest import Keyring, Sealer, new_key_file

    root = tmp_path_factory.mktemp("many")
    sealer = None
    if sealed:
        new_key_file(root / "key")
        sealer = Sealer(Keyring.load(root / "key"))
    grouped = SegmentLog.open(root / "grouped", segment_bytes=512, sealer=sealer)
    single = SegmentLog.open(root / "single", segment_bytes=512, sealer=sealer)
    for group in groups:
        first = grouped.next_seq
        records = [(tag, seq, seq, parts) for seq, (tag, parts) in enumerate(group, first)]
        locations = grouped.append_many(records)
        assert [(loc.first_seq, loc.tag) for loc in locations] == [(r[1], r[0]) for r in records]
        for tag, seq, _, parts in records:
            single.append(tag, seq, seq, parts)
    grouped.sync_blocking()
    grouped.close()
    reopened = SegmentLog.open(root / "grouped", segment_bytes=512, sealer=sealer)

    def _records(log: SegmentLog) -> list[tuple[int, int, bytes]]:
        return [(r.tag, r.first_seq, bytes(r.payload)) for r in log.read_records(1, 1 << 30)]

    expected = [
        (tag, seq, b"".join(parts))
        for seq, (tag, parts) in enumerate((rec for group in groups for rec in group), 1)
    ]
    assert _records(single) == expected
    assert _records(reopened) == expected
    assert reopened.next_seq == len(expected) + 1
    reopened.close()
    single.close()


def test_append_many_is_all_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group whose write fails leaves nothing behind: the log ends where it ended, and the
    next append takes the group's first seq. A group with a seq gap is refused unwritten."""
    log = SegmentLog.open(tmp_path)
    log.append(1, 1, 1, (b"before",))
    size = log.bytes_used

    real_pwritev = os.pwritev

    def failing_pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        real_pwritev(fd, buffers, offset)  # the bytes land, and yet the write fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwritev", failing_pwritev)
    with pytest.raises(OSError):
        log.append_many([(1, 2, 2, (b"a",)), (1, 3, 3, (b"b",))])
    monkeypatch.undo()
    assert log.next_seq == 2 and log.bytes_used == size
    assert os.path.getsize(_segments(tmp_path)[-1]) == size, "the failed group's bytes stayed"
    with pytest.raises(ValueError):
        log.append_many([(1, 2, 2, (b"a",)), (1, 4, 4, (b"gap",))])
    assert log.next_seq == 2 and log.bytes_used == size
    log.append_many([(1, 2, 2, (b"a",)), (1, 3, 3, (b"b",))])
    log.sync_blocking()
    assert [bytes(r.payload) for r in log.read_records(1, 1 << 30)] == [b"before", b"a", b"b"]
    assert os.path.getsize(_segments(tmp_path)[-1]) == log.bytes_used
    log.close()


async def test_a_segment_holding_a_group_is_kept_until_its_last_record_is_released(
    tmp_path: Path,
) -> None:
    """A group goes whole into one segment, which then holds seqs up to the group's last:
    releasing through an earlier seq keeps it (and the group's later records readable)."""
    log = SegmentLog.open(tmp_path, segment_bytes=256)
    log.append_many([(1, seq, seq, (bytes([seq]) * 200,)) for seq in (1, 2, 3)])
    log.append(1, 4, 4, (b"next segment",))
    assert len(_segments(tmp_path)) == 2
    await log.release_through(2)
    assert len(_segments(tmp_path)) == 2
    assert [r.first_seq for r in log.read_records(3, 1 << 30)] == [3, 4]
    await log.release_through(3)
    assert len(_segments(tmp_path)) == 1
    log.close()
