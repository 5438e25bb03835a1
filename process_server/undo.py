"""The undo log of one replica: the old contents of every extent the applier overwrites.

One undo record per applied batch, keyed by the batch's seq range, stored as a raw (codec 0)
batch of the *old* extents so every piece can be read in place and checked by its XXH3-128.
The record for a batch is durable before the batch touches the replica, so after a crash the
history is whole: a batch whose undo record exists is re-applied without a second record.

A point ``P`` (a seq) is the replica with, for each byte, the oldest undo record after ``P``
that covers it; ``pieces_after(P)`` lists those records' pieces oldest first for an
``ExtentMap``. A batch whose old contents exceed ``record_max`` (a discard of a whole disk)
is recorded as a *cut*: history before it can no longer be rebuilt and ``valid_from`` moves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.digests import data_ranges, in_hole, is_zero
from common.durable import atomic_write_json, read_json
from common.failpoints import failpoint
from common.segment_log import RecordLocation, SealingMismatch, SegmentLog
from process_server.extent_map import ExtentMap
from protocol.batch import (
    CODEC_RAW,
    Batch,
    Extent,
    Limits,
    encode_batch_parts,
    read_batch_table,
    read_batch_table_in,
)

if TYPE_CHECKING:
    from common.at_rest import Sealer  # imports cryptography: only where logs are sealed

TAG_UNDO = 2
TAG_CUT = 3
HISTORY_FILE = "history.json"
RECORD_MAX = 256 << 20
PIECE_MAX = 8 << 20  # the longest data extent of an undo record
UNDO_LIMITS = Limits(
    max_frame_bytes=1 << 40, max_batch_raw_bytes=(1 << 32) - 1, max_extents=1 << 20
)


@dataclass(slots=True)  # never changed once made; not frozen: 4x cheaper to create
class UndoPiece:
    """One old extent kept in the undo log: where its bytes are (``data_pos`` -1: zeros).
    In a plain log ``data_pos`` is a file offset in ``path``; in a sealed one it is an offset
    in the plaintext of ``record``, which must be read whole and opened first."""

    path: Path
    data_pos: int
    disk_offset: int
    length: int
    digest: bytes
    seq: int  # last seq of the batch that overwrote it
    record: RecordLocation | None = None  # set when the log is sealed


class UndoLog:
    """Append, make durable, index and prune one replica's undo records."""

    def __init__(self, directory: Path, log: SegmentLog, valid_from: int, disk_id: str) -> None:
        self.directory = directory
        self.log = log
        self.valid_from = valid_from  # the oldest seq a point may have and still be restored
        self.disk_id = disk_id
        self.cuts = 0

    @classmethod
    def open(
        cls,
        directory: Path,
        disk_id: str,
        applied_seq: int,
        segment_bytes: int,
        sealer: Sealer | None = None,
    ) -> UndoLog:
        """Open or create; a new log starts after ``applied_seq``; ``sealer`` (bound to this
        disk) seals every record at rest. Raises IntegrityError (also when the log's sealing
        does not match ``sealer``)."""
        try:
            log = SegmentLog.open(
                directory,
                base_seq=applied_seq + 1,
                segment_bytes=segment_bytes,
                sealer=sealer,
                drop_synced=True,  # written once, read only to rebuild a point
            )
        except SealingMismatch as exc:
            raise SealingMismatch(
                f"{exc}. This is the undo log (recovery points): changing the at-rest setting "
                f"restarts their history; write out the points to keep "
                f"(failover --point ID --to FILE), stop the process server and remove "
                f"{directory} (docs/security.md)"
            ) from None
        history = directory / HISTORY_FILE
        if history.exists():
            valid_from = int(read_json(history)["valid_from"])
        else:
            valid_from = log.first_seq - 1
            atomic_write_json(history, {"valid_from": valid_from})
        return cls(directory, log, valid_from, disk_id)

    @property
    def last_seq(self) -> int:
        return self.log.last_seq

    @property
    def first_seq(self) -> int:
        return self.log.first_seq

    @property
    def bytes_used(self) -> int:
        return self.log.bytes_used

    def oldest_restorable(self) -> int:
        """The oldest point seq that the records held can still rebuild."""
        return max(self.valid_from, self.log.first_seq - 1)

    # ----------------------------------------------------------------- writing (applier thread)
    def record(
        self, batch: Batch, replica_fd: int, overlay: ExtentMap[Extent] | None = None
    ) -> RecordLocation | None:
        """Append the undo record of ``batch`` (not yet applied) to the page cache and return
        where it lies (None: recorded before a crash); the caller makes it durable with
        :meth:`sync_blocking` before writing the batch to the replica. ``overlay``: the
        extents of earlier batches of the same group, written after this record is made
        (the old contents of ``batch`` are theirs where they meet)."""
        header = batch.header
        if header.first_seq != self.log.next_seq:
            if header.last_seq < self.log.next_seq:
                return None  # recorded before a crash: the batch is being re-applied
            raise ValueError(
                f"undo of {header.first_seq}..{header.last_seq}, expected {self.log.next_seq}"
            )
        old = old_contents(replica_fd, batch.extents, RECORD_MAX, overlay)
        if old is None:
            location = self.log.append(TAG_CUT, header.first_seq, header.last_seq, ())
            self.valid_from = header.last_seq
            self.cuts += 1
            self.save_history()
            return location
        parts = encode_batch_parts(  # the old contents go to the log as they were read
            self.disk_id,
            header.first_seq,
            header.last_seq,
            old,
            newest_write_ns=header.newest_write_ns,
            codec=CODEC_RAW,
        )
        location = self.log.append(TAG_UNDO, header.first_seq, header.last_seq, parts)
        failpoint("undo.after_record")
        return location

    def save_history(self) -> None:
        atomic_write_json(self.directory / HISTORY_FILE, {"valid_from": self.valid_from})

    def sync_blocking(self) -> None:
        self.log.sync_blocking()

    # ----------------------------------------------------------------- reading
    def pieces_after(self, seq: int) -> list[tuple[int, int, UndoPiece]]:
        """Every old extent recorded for batches after ``seq``, oldest batch first:
        ``(start, end, piece)`` ready for ``ExtentMap.fill_many``. Raises LookupError when
        records after ``seq`` were pruned, ValueError when history was cut after ``seq``."""
        if seq < self.valid_from:
            raise ValueError(f"history before seq {self.valid_from} is gone (a cut)")
        return self.pieces_of(self.log.locate(seq + 1), seq)

    def pieces_of(
        self, locations: list[RecordLocation], after: int
    ) -> list[tuple[int, int, UndoPiece]]:
        out: list[tuple[int, int, UndoPiece]] = []
        fds: dict[Path, int] = {}
        try:
            for loc in locations:
                if loc.last_seq <= after:
                    continue
                if loc.tag == TAG_CUT:
                    raise ValueError(f"history was cut at seq {loc.last_seq}")
                fd = fds.get(loc.path)
                if fd is None:
                    fd = fds[loc.path] = os.open(loc.path, os.O_RDONLY)
                record: RecordLocation | None = None
                if self.log.sealer is not None:  # the table is inside the sealed payload
                    record = loc
                    # (GCM refuses a short read too)
                    plain = self.log.unseal(loc, os.pread(fd, loc.size, loc.payload_offset))
                    base = 0
                    _, rows, data_off = read_batch_table_in(plain, UNDO_LIMITS)
                else:
                    base = loc.payload_offset
                    _, rows, data_off = read_batch_table(
                        _file_reader(fd, base), loc.size, UNDO_LIMITS
                    )
                pos = base + data_off
                for offset, length, kind, digest in rows:
                    if kind == 0:
                        piece = UndoPiece(
                            loc.path, pos, offset, length, digest, loc.last_seq, record
                        )
                        out.append((offset, offset + length, piece))
                        pos += length
                    else:
                        out.append(
                            (
                                offset,
                                offset + length,
                                UndoPiece(loc.path, -1, offset, length, b"", loc.last_seq),
                            )
                        )
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    # ----------------------------------------------------------------- pruning
    async def release_through(self, seq: int) -> int:
        """Drop whole segments holding only records ``<= seq``; returns bytes freed."""
        return await self.log.release_through(seq)

    def close(self) -> None:
        self.log.close()


def old_contents(
    fd: int, extents: tuple[Extent, ...], limit: int, overlay: ExtentMap[Extent] | None = None
) -> list[Extent] | None:
    """The contents under ``extents`` before they are written: data extents, or zero extents
    where all-zero or a hole. Where ``overlay`` maps a byte, it comes from that extent (a
    batch of the same group, not yet written to the replica); elsewhere from the replica.
    None when the data exceeds ``limit`` bytes."""
    out: list[Extent] = []
    budget = limit
    for extent in extents:
        start, end = extent.offset, extent.offset + extent.length
        if overlay is None or not len(overlay):
            pieces: Iterable[tuple[int, int, Extent | None]] = ((start, end, None),)
        else:
            pieces = overlay.lookup(start, end)
        for piece_start, piece_end, owner in pieces:
            if owner is None:
                left = _replica_contents(fd, piece_start, piece_end, budget, out)
            else:
                left = _overlay_contents(owner, piece_start, piece_end, budget, out)
            if left is None:
                return None
            budget = left
    return _merge_zero(out)


def _replica_contents(fd: int, start: int, end: int, budget: int, out: list[Extent]) -> int | None:
    """Append the replica's ``[start, end)`` to ``out``; the budget left, None when spent."""
    # A short range is read whole unless it lies in a hole (an initial sync fills a replica
    # of holes: nothing to read); a long one (a trim) only where it holds data.
    if end - start > 1 << 20:
        spans = data_ranges(fd, start, end)
    else:
        spans = [] if in_hole(fd, start, end) else [(start, end)]
    for data_start, data_end in spans:
        if data_start > start:
            out.append(Extent(start, data_start - start, None))
        pos = data_start
        while pos < data_end:
            n = min(data_end - pos, PIECE_MAX)
            data = os.pread(fd, n, pos)
            if len(data) < n:
                data += bytes(n - len(data))
            left = _add_piece(out, pos, data, budget)
            if left is None:
                return None
            budget = left
            pos += n
        start = data_end
    if start < end:
        out.append(Extent(start, end - start, None))
    return budget


def _overlay_contents(
    owner: Extent, start: int, end: int, budget: int, out: list[Extent]
) -> int | None:
    """Append ``[start, end)`` as ``owner`` (an extent not yet written) will leave it, in
    pieces of at most PIECE_MAX (a view reads and checks a whole piece at a time)."""
    if owner.data is None:
        out.append(Extent(start, end - start, None))
        return budget
    whole = memoryview(owner.data)
    for pos in range(start, end, PIECE_MAX):
        n = min(end - pos, PIECE_MAX)
        left = _add_piece(out, pos, whole[pos - owner.offset : pos - owner.offset + n], budget)
        if left is None:
            return None
        budget = left
    return budget


def _add_piece(out: list[Extent], pos: int, data: bytes | memoryview, budget: int) -> int | None:
    """Append ``data`` at ``pos`` as a zero extent when all zero (adjacent ones merge later),
    else as data charged to ``budget``; the budget left, None when spent."""
    if is_zero(data):
        out.append(Extent(pos, len(data), None))
        return budget
    budget -= len(data)
    if budget < 0:
        return None
    out.append(Extent(pos, len(data), data))
    return budget


def _file_reader(fd: int, base: int) -> Callable[[int, int], bytes]:
    """``read(offset, length)`` of a plain record's payload, which starts at ``base``."""
    return lambda offset, length: os.pread(fd, length, base + offset)


def _merge_zero(extents: list[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for e in extents:
        prev = merged[-1] if merged else None
        if (
            prev is not None
            and e.data is None
            and prev.data is None
            and prev.offset + prev.length == e.offset
            and prev.length + e.length < (1 << 32)
        ):
            merged[-1] = Extent(prev.offset, prev.length + e.length, None)
        else:
            merged.append(e)
    return [piece for e in merged for piece in _split(e)]


def _split(e: Extent) -> list[Extent]:
    if e.data is not None or e.length < (1 << 32):
        return [e]
    out, offset, left = [], e.offset, e.length
    while left:
        n = min(left, (1 << 32) - 1)
        out.append(Extent(offset, n, None))
        offset += n
        left -= n
    return out


__all__ = ["TAG_CUT", "TAG_UNDO", "UndoLog", "UndoPiece", "old_contents"]
