"""A disk as it was at a recovery point, read from the moving replica and its undo log, with an
optional writable copy-on-write overlay: what a failover exports.

Reads (for each byte): the overlay if the byte was written since failover, else the oldest
undo record after the point that covers it, else the replica. The applier keeps running under
a test failover: before it overwrites replica bytes it adds their undo pieces to every open
view (under ``lock``), and a view read holds the same lock across its lookup and its replica
read, so a view never sees a byte newer than its point.

Overlay writes are journaled (an ``agent.journal.Journal`` in the failover directory; durable
on FLUSH/FUA) before they land in the sparse overlay file; reopening replays the journal.
Those journaled writes are what failback sends home.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import xxhash

from agent.journal import Journal, decode_entry
from common.aio import to_thread_outliving_cancel
from common.durable import pwrite_all, zero_range
from common.errors import DiskError, IntegrityError
from common.segment_log import Cursor, RecordLocation
from process_server.extent_map import ExtentMap
from process_server.undo import UndoPiece

OVERLAY_FILE = "overlay.img"
OPENED_CACHE_BYTES = 64 << 20  # plaintext of sealed undo records a view keeps at hand
JOURNAL_DIR = "journal"


class PointView:
    """Read-only view of ``replica_fd`` at ``seq``; ``add`` is called by the applier."""

    def __init__(
        self,
        replica_fd: int,
        size: int,
        seq: int,
        lock: threading.Lock,
        unseal: Callable[[RecordLocation, bytes], bytes | memoryview] | None = None,
    ) -> None:
        self.replica_fd = replica_fd
        self.size = size
        self.seq = seq
        self.lock = lock
        self.map: ExtentMap[UndoPiece] = ExtentMap()
        self._fds: dict[Path, int] = {}
        self._verified: set[tuple[Path, int]] = set()
        self._unseal = unseal  # the undo log's, when it is sealed at rest
        self._opened: collections.OrderedDict[RecordLocation, bytes | memoryview] = (
            collections.OrderedDict()
        )  # recently opened sealed records, least recently used first
        self._opened_bytes = 0
        self.closed = False
        self.broken: str | None = None  # why the point can no longer be rebuilt (reads: EIO)

    def set_broken(self, reason: str) -> None:
        """The history this view needs is gone (a cut): every read fails from now on (the
        caller holds ``lock``)."""
        self.broken = reason
        self.map = ExtentMap()

    def add(self, pieces: list[tuple[int, int, UndoPiece]]) -> None:
        """Pieces of undo records after ``seq``, oldest first (caller holds ``lock``)."""
        self.map.fill_many(pieces)
        for _, _, piece in pieces:
            if piece.data_pos >= 0 and piece.path not in self._fds:
                self._fds[piece.path] = os.open(piece.path, os.O_RDONLY)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` as at the point. Raises IntegrityError when an undo
        piece fails its digest, OSError."""
        if offset < 0 or offset + length > self.size:
            raise DiskError(22, "read beyond the end of the disk")
        with self.lock:
            return self.read_locked(offset, length)

    def check_whole(self) -> None:
        """Raises DiskError (EIO) when the view is broken (the caller holds ``lock``)."""
        if self.broken:
            raise DiskError(errno.EIO, f"the recovery point is gone: {self.broken}")

    def read_locked(self, offset: int, length: int) -> bytes:
        """:meth:`read` for a caller that holds ``lock``."""
        self.check_whole()
        parts = [self.piece_bytes(s, e, p) for s, e, p in self.map.lookup(offset, offset + length)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def piece_bytes(self, start: int, end: int, piece: UndoPiece | None) -> bytes:
        """The point's bytes ``[start, end)`` of one piece of ``map.lookup`` (the caller holds
        ``lock``): the replica's where no undo piece lies, else the piece's. Raises DiskError
        (EIO) when the view is broken."""
        if self.broken:
            raise DiskError(errno.EIO, f"the recovery point is gone: {self.broken}")
        if piece is None:
            data = os.pread(self.replica_fd, end - start, start)
            if len(data) < end - start:
                data += bytes(end - start - len(data))
            return data
        if piece.data_pos < 0:
            return bytes(end - start)
        return self._undo_bytes(piece, start, end)

    def _undo_bytes(self, piece: UndoPiece, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of an undo piece; the whole piece is checked against its
        digest at its first read (a plain log's later reads take only the bytes asked)."""
        begin = start - piece.disk_offset
        if piece.record is not None:
            whole = self._opened_record(piece)[piece.data_pos : piece.data_pos + piece.length]
            self._check(piece, piece.record.payload_offset + piece.data_pos, whole)
            return bytes(whole[begin : begin + end - start])
        fd = self._fds[piece.path]
        if (piece.path, piece.data_pos) in self._verified:
            return os.pread(fd, end - start, piece.data_pos + begin)
        whole = os.pread(fd, piece.length, piece.data_pos)
        self._check(piece, piece.data_pos, whole)
        return whole[begin : begin + end - start]

    def _check(self, piece: UndoPiece, position: int, whole: bytes | memoryview) -> None:
        key = (piece.path, position)
        if key in self._verified:
            return
        if len(whole) != piece.length or xxhash.xxh3_128_digest(whole) != piece.digest:
            raise IntegrityError(
                f"{piece.path}: undo extent at disk offset {piece.disk_offset} fails its digest"
            )
        self._verified.add(key)

    def _opened_record(self, piece: UndoPiece) -> bytes | memoryview:
        """The plaintext of a sealed piece's record: read whole and opened (AES-GCM
        authenticates all of it, a short read included), then kept among the recently opened
        ones."""
        record = piece.record
        assert record is not None and self._unseal is not None
        plain = self._opened.get(record)
        if plain is not None:
            self._opened.move_to_end(record)
            return plain
        plain = self._unseal(
            record, os.pread(self._fds[piece.path], record.size, record.payload_offset)
        )
        self._opened[record] = plain
        self._opened_bytes += len(plain)
        while self._opened_bytes > OPENED_CACHE_BYTES and len(self._opened) > 1:
            _, dropped = self._opened.popitem(last=False)
            self._opened_bytes -= len(dropped)
        return plain

    def close(self) -> None:
        self.closed = True
        self._opened.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class OverlayDisk:
    """The writable disk a failover exports: a ``PointView`` under a journaled overlay.
    Duck-types what ``agent.nbd_server.NbdExport`` needs of a disk."""

    def __init__(
        self,
        disk_id: str,
        view: PointView,
        directory: Path,
        *,
        read_only: bool = False,
        direct_fd: int | None = None,
    ) -> None:
        """``direct_fd``: a committed failover writes straight into the replica (no overlay)."""
        self.disk_id = disk_id
        self.view = view
        self.size = view.size
        self.read_only = read_only
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if direct_fd is not None:
            self._fd = os.dup(direct_fd)
        else:
            self._fd = os.open(directory / OVERLAY_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(self._fd, self.size)
        self.direct = direct_fd is not None
        self.on_written: Callable[[int, int], None] | None = None  # after each write
        self.journal = Journal(directory / JOURNAL_DIR, quota=1 << 62)
        self.written: ExtentMap[bool] = ExtentMap()
        self.writes = 0
        self.written_bytes = 0
        # While a commit merges (``merge``), reads and writes of the export wait: a write
        # landing in the overlay after its range was merged would be lost with the overlay.
        self._open_gate = asyncio.Event()
        self._open_gate.set()
        self._busy = 0  # export reads and writes under way
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._replay()

    def _replay(self) -> None:
        """Rebuild the overlay and its map from the journal (the overlay file is not synced)."""
        cursor = Cursor()
        seq = self.journal.log.first_seq
        while seq <= self.journal.log.last_seq:
            records = self.journal.log.read_records(seq, 16 << 20, cursor)
            if not records:
                break
            for record in records:
                entry = decode_entry(record)
                if entry.data is None:
                    zero_range(self._fd, entry.offset, entry.length, punch=True)
                else:
                    pwrite_all(self._fd, entry.data, entry.offset)
                self.written.fill(entry.offset, entry.offset + entry.length, True)
                seq = record.last_seq + 1

    # ----------------------------------------------------------------- the disk interface
    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """One export request: waits while a merge runs, and is waited for by the merge."""
        while not self._open_gate.is_set():
            await self._open_gate.wait()
        self._busy += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy:
                self._quiet.set()

    async def read(self, offset: int, length: int) -> bytes:
        async with self._turn():
            if length > 1 << 20:
                return await asyncio.to_thread(self.read_sync, offset, length)
            return self.read_sync(offset, length)

    def read_sync(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        for start, end, mine in self.written.lookup(offset, offset + length):
            if mine:
                parts.append(os.pread(self._fd, end - start, start))
            else:
                parts.append(self.view.read(start, end - start))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _check(self, offset: int, length: int) -> None:
        if self.read_only:
            raise DiskError(1, "the failover export is read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(28, "write beyond the end of the disk")

    async def write(
        self,
        offset: int,
        data: bytes | memoryview,
        *,
        fua: bool = False,
        also: Sequence[tuple[int, int]] = (),
    ) -> None:
        """``also`` (writes about to follow) is a hint for the agent's activity log: unused."""
        async with self._turn():
            self._check(offset, len(data))  # in the turn: read-only may be set while it waits
            self.journal.append_write(offset, data, time.time_ns())
            pwrite_all(self._fd, data, offset)
            self._mark(offset, len(data))
        if fua:
            await self.flush()

    def admit_nowait(self, offset: int, length: int) -> bool:
        """The NBD export's synchronous write path (agent/nbd_server.py): not taken here, every
        write goes through :meth:`write` and its turn (a merge may hold the gate)."""
        return False

    def write_admitted(
        self, writes: Sequence[tuple[int, bytes | memoryview]], *, owned: bool = False
    ) -> list[object]:
        raise RuntimeError("the failover overlay admits no write without its turn")

    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool = False, may_trim: bool = True
    ) -> None:
        async with self._turn():
            self._check(offset, length)
            self.journal.append_zero(offset, length, time.time_ns(), may_trim=may_trim)
            zero_range(self._fd, offset, length, punch=True)
            self._mark(offset, length)
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.write_zeroes(offset, length, fua=fua, may_trim=True)

    async def flush(self) -> None:
        await self.journal.sync()

    def _mark(self, offset: int, length: int) -> None:
        if self.on_written is not None:
            self.on_written(offset, length)
        self.written.fill(offset, offset + length, True)
        self.writes += 1
        self.written_bytes += length

    async def merge(self, replica_fd: int, sync: Callable[[], None]) -> None:
        """:meth:`merge_into` in a worker thread, with the export's reads and writes held
        for its length (those under way finish first)."""
        self._open_gate.clear()
        try:
            while self._busy:
                await self._quiet.wait()
            await to_thread_outliving_cancel(self.merge_into, replica_fd, sync)
        finally:
            self._open_gate.set()  # (cancelled: only once the thread is done merging)

    def merge_into(self, replica_fd: int, sync: Callable[[], None]) -> None:
        """Commit: write the point (the view's undo pieces) and then the overlay into the
        replica, ``sync`` it (``ReplicaDisk.sync_replica_blocking``: a failure is
        permanent), and from then on work on the replica directly. Idempotent, so a commit a
        crash interrupted is simply done again."""
        if self.direct:
            return
        view = self.view
        with view.lock:
            for start, end, _ in list(view.map.items()):
                pos = start
                while pos < end:
                    n = min(8 << 20, end - pos)
                    pwrite_all(replica_fd, view.read_locked(pos, n), pos)
                    pos += n
            for start, end, _ in self.written.items():
                pos = start
                while pos < end:
                    n = min(8 << 20, end - pos)
                    pwrite_all(replica_fd, os.pread(self._fd, n, pos), pos)
                    pos += n
            sync()
            view.map = ExtentMap()
            old, self._fd = self._fd, os.dup(replica_fd)
            self.written = ExtentMap()
            self.direct = True
        os.close(old)
        with contextlib.suppress(FileNotFoundError):
            (self.directory / OVERLAY_FILE).unlink()

    def close(self) -> None:
        self.journal.close()
        os.close(self._fd)


__all__ = ["OverlayDisk", "PointView"]
