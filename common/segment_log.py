"""An append-only, segmented, checksummed log of seq-numbered records.

Used twice: the agent's write journal (one record per write, keyed by its seq)
and the process server's batch cache (one record per batch, keyed by its seq
range). Rules it keeps:

- Every record is ``xxh3_64 | size | tag | first_seq | last_seq | payload``; the
  checksum covers everything after it. Records are gap-free in seq.
- On open, a torn or corrupt tail of the last segment is truncated; corruption
  anywhere else raises :class:`IntegrityError` naming the file and offset.
- Nothing is durable until :meth:`SegmentLog.sync` returns (group commit: every
  caller waiting at once shares one fdatasync per dirty segment).
- Segments are deleted only whole, only when every record in them is released.
- Optionally (``recycle``) a released segment file is kept (renamed ``.recycle-*.tmp``, at
  most ``recycle`` of them) and becomes the next segment: overwriting pages the page cache
  and the filesystem already hold costs far less than filling a new file (no block
  allocation, no metadata to commit at each fdatasync; on a VM, no fresh guest pages).
  What it held before lies past the new records, with older seqs: it ends the scan like a
  torn tail, and is cut off at open (in any segment, when the next one continues at the
  seq where its records end).
- Optionally (``sealer``, see common/at_rest.py) every payload is sealed on append and opened
  on read; the record header's tag and seqs are authenticated with it, a record that fails
  authentication raises :class:`IntegrityError`, and segments are marked sealed in their
  header so a log is never read with the wrong setting. Without a sealer the format and the
  behaviour are exactly those of a plain log.
- Optionally (``drop_synced``, for a log rarely read back: the undo log, the process
  server's cache) the pages of every record are dropped from the page cache once an
  fdatasync made them durable. Without this each of its bytes takes a page the page cache
  did not hold before (the undo log only grows; the cache swings by hundreds of MiB): memory
  that other data (the replica's pages) could use, and on a VM that hands free memory back
  to its host (free page reporting), the costliest write there is; pages freed a moment
  before cost far less to fill (docs/operations.md). A recycled file then saves the block
  allocation only.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from common.durable import fsync_dir
from common.errors import IntegrityError

if TYPE_CHECKING:
    from common.at_rest import Sealer

SEGMENT_MAGIC = b"TMSEGLOG"
SEGMENT_VERSION = 1
SEGMENT_HEADER = struct.Struct(">8sII")  # magic, version, flags (reserved before sealing)
SEGMENT_SEALED = 1  # flag: every payload in the segment is sealed
RECORD_HEADER = struct.Struct(">QIBQQ")  # checksum, payload size, tag, first_seq, last_seq
_READ_CHUNK = 1 << 20
_IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one pwritev takes (1024 on Linux)
PAGE = os.sysconf("SC_PAGESIZE")
_SEAL_AAD = struct.Struct(">BQQ")  # tag, first_seq, last_seq: authenticated with a sealed payload


@dataclass(frozen=True, slots=True)
class Record:
    """One record as read back from the log."""

    tag: int
    first_seq: int
    last_seq: int
    payload: bytes | memoryview  # may be a view into a larger read buffer


@dataclass(frozen=True, slots=True)
class RecordLocation:
    """Where one record's payload lies in a segment file (see :meth:`SegmentLog.locate`)."""

    path: Path
    payload_offset: int
    size: int
    tag: int
    first_seq: int
    last_seq: int


@dataclass(slots=True)
class _Segment:
    first_seq: int
    path: Path
    fd: int
    size: int
    last_seq: int  # first_seq - 1 while empty
    dirty: bool = False
    reused: bool = False  # a kept file: its old records lie past ``size``
    dropped: int = 0  # pages before this offset were dropped from the page cache (drop_synced)


@dataclass(slots=True)
class Cursor:
    """Where a sequential reader stopped, so the next read does not rescan."""

    segment_first: int = -1
    offset: int = 0
    next_seq: int = 0


@dataclass(slots=True)
class _ScanResult:
    records_end: int
    last_seq: int
    error: str | None = None
    record_count: int = 0
    flags: int = 0
    first_record_seq: int | None = field(default=None)


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.seg"


def _record_checksum(
    header_tail: bytes | memoryview, payload_parts: Sequence[bytes | bytearray | memoryview]
) -> int:
    h = xxhash.xxh3_64(header_tail)
    for part in payload_parts:
        h.update(part)
    return h.intdigest()


def _pwrite_buffers(fd: int, buffers: list[bytes | bytearray | memoryview], offset: int) -> None:
    """Write ``buffers`` back to back at ``offset``: ``pwritev`` of at most ``_IOV_MAX`` at
    a time (a batch's pieces may be thousands), a short write finished piecewise."""
    written = 0
    for start in range(0, len(buffers), _IOV_MAX):
        group = buffers[start : start + _IOV_MAX]
        want = sum(len(b) for b in group)
        done = os.pwritev(fd, group, offset + written)
        if done < want:
            flat = b"".join(group)
            while done < want:
                done += os.pwrite(fd, flat[done:], offset + written + done)
        written += want


class SegmentLog:
    """A durable log in one directory. Not thread-safe: use it from one event loop."""

    def __init__(
        self,
        directory: Path,
        segments: list[_Segment],
        next_seq: int,
        segment_bytes: int,
        sealer: Sealer | None = None,
        recycle: int = 0,
        drop_synced: bool = False,
    ) -> None:
        self.directory = directory
        self.recycle = recycle
        self.drop_synced = drop_synced
        self._pool: list[tuple[Path, int]] = []  # released segment files kept for reuse
        self.sealer = sealer
        self._flags = SEGMENT_SEALED if sealer is not None else 0
        self._segments = segments
        self._firsts = [s.first_seq for s in segments]
        self.next_seq = next_seq
        self.segment_bytes = segment_bytes
        self._written = 0
        self._synced = 0
        self._dir_dirty = False
        self._lock = asyncio.Lock()
        self._sync_task: asyncio.Future[None] | None = None
        self._failed: OSError | None = None
        self.truncated_bytes = 0
        self._sealed_bytes = sum(s.size for s in segments[:-1])  # all but the last segment

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        base_seq: int = 1,
        segment_bytes: int = 64 << 20,
        sealer: Sealer | None = None,
        recycle: int = 0,
        drop_synced: bool = False,
    ) -> SegmentLog:
        """Open (creating if needed) the log in ``directory``; ``base_seq`` is the first seq of an
        empty new log; ``sealer`` seals payloads (None: plain records); ``recycle``: released
        segment files kept for reuse (0: deleted); ``drop_synced``: drop durable records from
        the page cache (module comment). Raises IntegrityError
        when the log is corrupt outside its tail, or holds records sealed while no sealer is
        given (or plain ones while one is)."""
        flags = SEGMENT_SEALED if sealer is not None else 0
        directory.mkdir(parents=True, exist_ok=True)
        names = sorted(p for p in directory.iterdir() if p.suffix == ".seg")
        for stale in directory.glob(".*.tmp"):
            stale.unlink()
        segments: list[_Segment] = []
        truncated = 0
        for index, path in enumerate(names):
            try:
                first = int(path.stem)
            except ValueError as exc:
                raise IntegrityError(f"{path}: not a segment name") from exc
            fd = os.open(path, os.O_RDWR)
            size = os.fstat(fd).st_size
            scan = _scan_segment(fd, path, first, size)
            is_last = index == len(names) - 1
            rest_empty = all(_is_empty_segment(p) for p in names[index + 1 :])
            stale_tail = (
                scan.error is not None
                and not is_last
                and scan.record_count > 0
                and names[index + 1].name == _segment_name(scan.last_seq + 1)
            )  # a recycled file's old contents past the records the next segment continues
            if stale_tail:
                os.ftruncate(fd, scan.records_end)
                os.fsync(fd)
                size = scan.records_end
                scan.error = None
            if scan.error is not None:
                if not (is_last or rest_empty):
                    os.close(fd)
                    raise IntegrityError(scan.error)
                truncated += size - scan.records_end
                os.ftruncate(fd, scan.records_end)
                if scan.records_end < SEGMENT_HEADER.size:
                    _write_segment_header(fd, flags)
                    scan.records_end = SEGMENT_HEADER.size
                    scan.flags = flags
                os.fsync(fd)
                size = scan.records_end
            if scan.flags != flags:
                if scan.record_count or scan.flags & ~SEGMENT_SEALED:
                    os.close(fd)
                    raise SealingMismatch(_flags_mismatch(path, scan.flags, flags))
                _write_segment_header(fd, flags)  # empty: takes the current setting
            if segments and first != segments[-1].last_seq + 1:
                if size == SEGMENT_HEADER.size and is_last:
                    # Torn roll: an empty new segment whose predecessor lost its tail.
                    os.close(fd)
                    path.unlink()
                    fsync_dir(directory)
                    break
                os.close(fd)
                raise IntegrityError(
                    f"{path}: starts at seq {first}, expected {segments[-1].last_seq + 1}"
                )
            segments.append(_Segment(first, path, fd, size, scan.last_seq))
            if scan.error is not None and not is_last:
                # Everything after a torn segment is empty: drop those names.
                for extra in names[index + 1 :]:
                    extra.unlink()
                fsync_dir(directory)
                break
        if not segments:
            segments.append(_create_segment(directory, base_seq, flags))
        # What a previous process left in the page cache is made durable before anyone is
        # told it is there (a process server reports its cache as durable at registration).
        for seg in segments:
            os.fdatasync(seg.fd)
            seg.dirty = False
        fsync_dir(directory)
        log = cls(
            directory,
            segments,
            segments[-1].last_seq + 1,
            segment_bytes,
            sealer,
            recycle,
            drop_synced,
        )
        log.truncated_bytes = truncated
        return log

    # ----------------------------------------------------------------- state
    @property
    def last_seq(self) -> int:
        """The newest seq in the log (first_seq - 1 when it holds nothing)."""
        return self.next_seq - 1

    @property
    def first_seq(self) -> int:
        """The oldest seq still held (== next_seq when empty)."""
        for seg in self._segments:
            if seg.last_seq >= seg.first_seq:
                return seg.first_seq
        return self.next_seq

    @property
    def bytes_used(self) -> int:
        """Bytes of every segment file (asked for on every write: only the last segment
        grows, so the sum of the others is kept as segments are added and released)."""
        segments = self._segments
        return self._sealed_bytes + segments[-1].size if segments else 0

    @property
    def dirty(self) -> bool:
        return self._synced < self._written

    # ----------------------------------------------------------------- writing
    def record_size(self, payload_len: int) -> int:
        overhead = self.sealer.overhead if self.sealer is not None else 0
        return RECORD_HEADER.size + overhead + payload_len

    def append(
        self,
        tag: int,
        first_seq: int,
        last_seq: int,
        parts: Sequence[bytes | bytearray | memoryview],
    ) -> RecordLocation:
        """Append one record (to the page cache; durable after :meth:`sync`); returns where
        its payload lies.

        Raises ValueError if ``first_seq`` is not the next seq, OSError on I/O failure
        (in which case the log is rolled back to its previous end)."""
        return self.append_many(((tag, first_seq, last_seq, parts),))[0]

    def append_many(
        self, records: Sequence[tuple[int, int, int, Sequence[bytes | bytearray | memoryview]]]
    ) -> list[RecordLocation]:
        """Append ``(tag, first_seq, last_seq, parts)`` records, in order, with one write into
        one segment (the NBD front journals the writes of one event-loop step together: one
        system call instead of one per write). All or none: on OSError the log is rolled back
        to its previous end. Raises ValueError, as :meth:`append`, before writing anything."""
        seq = self.next_seq
        framed: list[tuple[bytes, Sequence[bytes | bytearray | memoryview], int]] = []
        for tag, first_seq, last_seq, parts in records:
            if first_seq != seq or last_seq < first_seq:
                raise ValueError(f"append of seq {first_seq}..{last_seq}, expected {seq}")
            seq = last_seq + 1
            if self.sealer is not None:
                joined = parts[0] if len(parts) == 1 else b"".join(parts)
                parts = (self.sealer.seal(joined, _SEAL_AAD.pack(tag, first_seq, last_seq)),)
            size = sum(len(p) for p in parts)
            tail = RECORD_HEADER.pack(0, size, tag, first_seq, last_seq)[8:]
            checksum = _record_checksum(tail, parts)
            framed.append(
                (RECORD_HEADER.pack(checksum, size, tag, first_seq, last_seq), parts, size)
            )
        if not framed:
            return []
        seg = self._segments[-1]
        if seg.size >= self.segment_bytes and seg.last_seq >= seg.first_seq:
            seg = self._roll()
        buffers: list[bytes | bytearray | memoryview] = []
        for header, parts, _ in framed:
            buffers.append(header)
            buffers.extend(parts)
        offset = seg.size
        try:
            _pwrite_buffers(seg.fd, buffers, offset)
        except OSError:
            os.ftruncate(seg.fd, offset)
            raise
        locations = []
        pos = offset
        for (_, _, size), (tag, first_seq, last_seq, _) in zip(framed, records, strict=True):
            locations.append(
                RecordLocation(seg.path, pos + RECORD_HEADER.size, size, tag, first_seq, last_seq)
            )
            pos += RECORD_HEADER.size + size
        seg.size = pos
        seg.last_seq = seq - 1
        seg.dirty = True
        self.next_seq = seq
        self._written += len(framed)
        return locations

    def _roll(self) -> _Segment:
        if self._pool:
            seg = self._reuse(*self._pool.pop(0))
        else:
            seg = _create_segment(self.directory, self.next_seq, self._flags)
        if self._segments:
            self._sealed_bytes += self._segments[-1].size  # no longer the one that grows
        self._segments.append(seg)
        self._firsts.append(seg.first_seq)
        self._dir_dirty = True
        return seg

    def _reuse(self, old: Path, fd: int) -> _Segment:
        """A kept segment file becomes the next segment: renamed, its header rewritten; what it
        held before stays past the end this log writes to (module comment)."""
        path = self.directory / _segment_name(self.next_seq)
        try:
            os.rename(old, path)
            _write_segment_header(fd, self._flags)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                old.unlink()
            return _create_segment(self.directory, self.next_seq, self._flags)
        return _Segment(
            self.next_seq, path, fd, SEGMENT_HEADER.size, self.next_seq - 1, dirty=True, reused=True
        )

    async def sync(self) -> None:
        """Make every appended record durable (group commit). Raises OSError.

        The fdatasync runs in one task that callers only await (shielded): a caller that is
        cancelled never leaves a sync half done, and a later caller never mistakes a sync in
        flight for a finished one. After a failed fdatasync the log refuses further use
        (its pages may be lost: the kernel reports such an error once)."""
        target = self._written
        while True:
            if self._failed is not None:
                raise OSError(f"{self.directory}: an earlier fdatasync failed: {self._failed}")
            if self._synced >= target and not self._dir_dirty:
                return
            task = self._sync_task
            if task is None:
                task = self._sync_task = asyncio.ensure_future(self._sync_once())
            await asyncio.shield(task)

    async def _sync_once(self) -> None:
        generation = self._written
        segments = [s for s in self._segments if s.dirty]
        for seg in segments:
            seg.dirty = False  # appends during the sync mark them again
        dir_dirty, self._dir_dirty = self._dir_dirty, False
        drops = self._drops(segments)  # sizes taken now: later appends are not durable yet
        try:
            await asyncio.to_thread(
                self._sync_then_drop, [s.fd for s in segments], dir_dirty, drops
            )
        except OSError as exc:
            self._failed = exc
            for seg in segments:
                seg.dirty = True
            self._dir_dirty = self._dir_dirty or dir_dirty
            raise
        finally:
            self._sync_task = None
        self._synced = max(self._synced, generation)
        self._note_dropped(drops)

    def sync_blocking(self) -> None:
        generation = self._written
        segments = [s for s in self._segments if s.dirty]
        drops = self._drops(segments)
        self._sync_then_drop([s.fd for s in segments], self._dir_dirty, drops)
        for s in self._segments:
            s.dirty = False
        self._dir_dirty = False
        self._synced = generation
        self._note_dropped(drops)

    def _drops(self, segments: list[_Segment]) -> list[tuple[_Segment, int]]:
        """``(segment, end)`` of the records to drop from the page cache once synced."""
        if not self.drop_synced:
            return []
        return [(s, s.size) for s in segments if s.size > s.dropped]

    def _sync_fds(self, fds: list[int], dir_dirty: bool) -> None:
        for fd in fds:
            os.fdatasync(fd)
        if dir_dirty:
            fsync_dir(self.directory)

    def _sync_then_drop(
        self, fds: list[int], dir_dirty: bool, drops: list[tuple[_Segment, int]]
    ) -> None:
        self._sync_fds(fds, dir_dirty)
        for seg, end in drops:  # clean now: dropped, not written back (a partial last page stays)
            with contextlib.suppress(OSError):  # only a hint: the records are durable either way
                os.posix_fadvise(seg.fd, seg.dropped, end - seg.dropped, os.POSIX_FADV_DONTNEED)

    @staticmethod
    def _note_dropped(drops: list[tuple[_Segment, int]]) -> None:
        for seg, end in drops:
            seg.dropped = max(seg.dropped, end & ~(PAGE - 1))  # the next drop retries the page

    async def release_through(self, seq: int) -> int:
        """Delete whole segments whose records are all ``<= seq``; returns bytes freed."""
        async with self._lock:
            while self._sync_task is not None:  # never close an fd a sync thread is using
                with contextlib.suppress(OSError):
                    await asyncio.shield(self._sync_task)
            freed = 0
            active = self._segments[-1]
            if active.last_seq >= active.first_seq and active.last_seq <= seq:
                self._roll()
            removed = False
            kept: list[tuple[Path, int]] = []
            while len(self._segments) > 1 and self._segments[0].last_seq <= seq:
                seg = self._segments.pop(0)  # never the last one
                self._firsts.pop(0)
                self._sealed_bytes -= seg.size
                keeping = self._keep(seg, len(kept))
                if keeping is None:
                    os.close(seg.fd)
                    seg.path.unlink()
                else:
                    kept.append(keeping)
                freed += seg.size
                removed = True
            if removed:
                try:
                    await asyncio.to_thread(fsync_dir, self.directory)
                except BaseException:
                    for _, fd in kept:  # their names may not be durable: never reuse them
                        os.close(fd)  # (the next open deletes leftover .recycle files)
                    raise
            # Only now may appends overwrite a kept file: until its new name is durable, a
            # power loss brings back its old segment name, and new records under it would
            # make the log unreadable.
            self._pool.extend(kept)
            return freed

    def _keep(self, seg: _Segment, pending: int) -> tuple[Path, int] | None:
        """Rename a released segment's file for reuse (``recycle``); None: delete it instead.
        ``pending``: files kept by this release so far, not yet in the pool."""
        if len(self._pool) + pending >= self.recycle or seg.size < self.segment_bytes // 2:
            return None
        kept = self.directory / f".recycle-{seg.first_seq}.tmp"
        try:
            os.rename(seg.path, kept)
        except OSError:
            return None
        return kept, seg.fd

    def close(self) -> None:
        for seg in self._segments:
            if seg.reused:  # its old records are not left behind (no truncation at next open)
                with contextlib.suppress(OSError):
                    os.ftruncate(seg.fd, seg.size)
            os.close(seg.fd)
        self._segments = []
        self._sealed_bytes = 0
        for path, fd in self._pool:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
        self._pool = []
        self._firsts = []

    # ----------------------------------------------------------------- reading
    def skip_past(self, cursor: Cursor, location: RecordLocation) -> None:
        """Place ``cursor`` just after the record at ``location`` (a reader that had that
        record in memory and did not read it here); a released record resets the cursor,
        so the next read finds its place again."""
        for seg in reversed(self._segments):
            if seg.path == location.path:
                cursor.segment_first = seg.first_seq
                cursor.offset = location.payload_offset + location.size
                cursor.next_seq = location.last_seq + 1
                return
        cursor.segment_first = -1

    def read_records(
        self,
        from_seq: int,
        max_bytes: int,
        cursor: Cursor | None = None,
        max_records: int = 1 << 30,
        cost: Callable[[int, bytes | memoryview], int] | None = None,
    ) -> list[Record]:
        """Records from the one holding ``from_seq`` on, up to about ``max_bytes`` of payload
        (at least one record if any); ``cost(tag, payload)``, when given, is what a record
        counts toward ``max_bytes`` instead of its payload's size (a journal reference
        stands for bytes it does not hold). Raises LookupError if ``from_seq`` was
        released, IntegrityError on a bad checksum."""
        if from_seq >= self.next_seq:
            return []
        if from_seq < self.first_seq:
            raise LookupError(f"seq {from_seq} was released (log starts at {self.first_seq})")
        cur = cursor if cursor is not None else Cursor()
        if cur.next_seq != from_seq or cur.segment_first not in self._firsts:
            index = bisect.bisect_right(self._firsts, from_seq) - 1
            cur.segment_first = self._firsts[index]
            cur.offset = SEGMENT_HEADER.size
            cur.next_seq = cur.segment_first
        out: list[Record] = []
        taken = 0
        while len(out) < max_records and taken < max_bytes and cur.next_seq < self.next_seq:
            index = bisect.bisect_left(self._firsts, cur.segment_first)
            seg = self._segments[index]
            if cur.offset >= seg.size:
                if index + 1 >= len(self._segments):
                    break
                cur.segment_first = self._segments[index + 1].first_seq
                cur.offset = SEGMENT_HEADER.size
                continue
            chunk = os.pread(
                seg.fd,
                min(
                    max(_READ_CHUNK, max_bytes - taken + RECORD_HEADER.size), seg.size - cur.offset
                ),
                cur.offset,
            )
            view = memoryview(chunk)
            pos = 0
            full = False
            while pos + RECORD_HEADER.size <= len(chunk):
                checksum, size, tag, first, last = RECORD_HEADER.unpack_from(chunk, pos)
                wanted = last >= from_seq
                over = cost is None and taken + size > max_bytes  # (a cost: once it is read)
                if wanted and out and (over or len(out) >= max_records):
                    full = True
                    break
                end = pos + RECORD_HEADER.size + size
                payload: bytes | memoryview
                if end <= len(chunk):
                    payload = view[pos + RECORD_HEADER.size : end]  # no copy
                else:
                    payload = chunk[pos + RECORD_HEADER.size :] + os.pread(
                        seg.fd, end - len(chunk), cur.offset + len(chunk)
                    )
                tail = chunk[pos + 8 : pos + RECORD_HEADER.size]
                if len(payload) != size or _record_checksum(tail, (payload,)) != checksum:
                    raise IntegrityError(
                        f"{seg.path}: bad record checksum at offset {cur.offset + pos}"
                    )
                if wanted and self.sealer is not None:
                    payload = self._open_sealed(
                        seg.path, cur.offset + pos, tag, first, last, payload
                    )
                weight = size if cost is None or not wanted else cost(tag, payload)
                if wanted and out and taken + weight > max_bytes:
                    full = True
                    break
                pos = end
                if wanted:
                    out.append(Record(tag, first, last, payload))
                    taken += weight
                cur.next_seq = last + 1
                if end >= len(chunk):
                    break
            cur.offset += pos
            if full:
                break
        return out

    def unseal(self, loc: RecordLocation, payload: bytes | memoryview) -> bytes | memoryview:
        """The plaintext of the payload read at ``loc`` (as it is when the log is not sealed).
        Raises IntegrityError (naming the file and offset) when it fails authentication."""
        if self.sealer is None:
            return payload
        return self._open_sealed(
            loc.path, loc.payload_offset, loc.tag, loc.first_seq, loc.last_seq, payload
        )

    def _open_sealed(
        self, path: Path, offset: int, tag: int, first: int, last: int, payload: bytes | memoryview
    ) -> bytes:
        assert self.sealer is not None
        try:
            return self.sealer.open(payload, _SEAL_AAD.pack(tag, first, last))
        except IntegrityError as exc:
            raise IntegrityError(f"{path}: record at offset {offset}: {exc}") from None

    def locate(self, from_seq: int) -> list[RecordLocation]:
        """Where the records from the one holding ``from_seq`` on lie, reading only their
        headers (payload checksums are not verified: a reader of a location checks what it
        reads by its own digests). Raises LookupError if ``from_seq`` was released."""
        if from_seq >= self.next_seq:
            return []
        if from_seq < self.first_seq:
            raise LookupError(f"seq {from_seq} was released (log starts at {self.first_seq})")
        out: list[RecordLocation] = []
        index = bisect.bisect_right(self._firsts, from_seq) - 1
        for seg in self._segments[index:]:
            offset = SEGMENT_HEADER.size
            while offset + RECORD_HEADER.size <= seg.size:
                _, size, tag, first, last = RECORD_HEADER.unpack(
                    os.pread(seg.fd, RECORD_HEADER.size, offset)
                )
                if last >= from_seq:
                    out.append(
                        RecordLocation(
                            seg.path, offset + RECORD_HEADER.size, size, tag, first, last
                        )
                    )
                offset += RECORD_HEADER.size + size
        return out


def _create_segment(directory: Path, first_seq: int, flags: int = 0) -> _Segment:
    path = directory / _segment_name(first_seq)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_segment_header(fd, flags)
    except OSError:
        os.close(fd)
        raise
    return _Segment(first_seq, path, fd, SEGMENT_HEADER.size, first_seq - 1, dirty=True)


def _write_segment_header(fd: int, flags: int = 0) -> None:
    os.pwrite(fd, SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, flags), 0)


class SealingMismatch(IntegrityError):
    """A log written with the other at-rest setting (sealed vs plain) than the one asked for."""


def _flags_mismatch(path: Path, found: int, wanted: int) -> str:
    if found & ~SEGMENT_SEALED:
        return f"{path}: unknown segment flags {found:#x}"
    if found & SEGMENT_SEALED:
        return f"{path}: holds sealed (encrypted) records but no at-rest key is configured"
    return f"{path}: holds plain records but an at-rest key is configured (drain it first)"


def _is_empty_segment(path: Path) -> bool:
    """No record at all, or (a recycled file) none that starts at the segment's first seq."""
    try:
        with open(path, "rb") as f:
            head = f.read(SEGMENT_HEADER.size + RECORD_HEADER.size)
    except FileNotFoundError:
        return True
    if len(head) <= SEGMENT_HEADER.size:
        return True
    if len(head) < SEGMENT_HEADER.size + RECORD_HEADER.size:
        return False  # a torn first record: not known to be empty
    first = RECORD_HEADER.unpack_from(head, SEGMENT_HEADER.size)[3]
    try:
        return first != int(path.stem)
    except ValueError:
        return False


def _scan_segment(fd: int, path: Path, first_seq: int, size: int) -> _ScanResult:
    """Validate every record of one segment; report where valid data ends."""
    if size < SEGMENT_HEADER.size:
        return _ScanResult(0, first_seq - 1, f"{path}: short segment header")
    magic, version, flags = SEGMENT_HEADER.unpack(os.pread(fd, SEGMENT_HEADER.size, 0))
    if magic != SEGMENT_MAGIC or version != SEGMENT_VERSION:
        return _ScanResult(0, first_seq - 1, f"{path}: bad segment header")
    offset = SEGMENT_HEADER.size
    expected = first_seq
    result = _ScanResult(offset, first_seq - 1, flags=flags)
    while offset < size:
        head = os.pread(fd, RECORD_HEADER.size, offset)
        if len(head) < RECORD_HEADER.size:
            result.error = f"{path}: torn record header at offset {offset}"
            return result
        checksum, rsize, _tag, first, last = RECORD_HEADER.unpack(head)
        if first != expected or last < first or offset + RECORD_HEADER.size + rsize > size:
            result.error = f"{path}: bad or torn record at offset {offset}"
            return result
        h = xxhash.xxh3_64(head[8:])
        pos = offset + RECORD_HEADER.size
        remaining = rsize
        while remaining:
            piece = os.pread(fd, min(remaining, _READ_CHUNK), pos)
            if not piece:
                break
            h.update(piece)
            pos += len(piece)
            remaining -= len(piece)
        if remaining or h.intdigest() != checksum:
            result.error = f"{path}: bad record checksum at offset {offset}"
            return result
        offset = pos
        expected = last + 1
        result.records_end = offset
        result.last_seq = last
        result.record_count += 1
    return result
