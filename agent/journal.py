"""The agent's write journal: one durable, checksummed record per write, in seq order.

A thin layer over :class:`common.segment_log.SegmentLog` that encodes write and
zero (write-zeroes / trim) records. Rule: a record is appended *before* the
image is written, in the same event-loop step, so the journal is a write-ahead
log of the image and can be replayed onto it after an unclean stop.

Resync journals *references* (``TAG_REF``): a range whose bytes the image already holds.
The shipper reads them from the image when it builds the batch, so resync data is written
once (to the replica) instead of also into this journal. A reference read late may carry
bytes of newer writes; their own records follow it in seq order and are applied after it,
so the replica ends level, and no recovery point is taken before every reference is
acknowledged (``ProtectedDisk.finish_resync``). Redo after an unclean stop skips them.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.failpoints import failpoint
from common.segment_log import Cursor, Record, SegmentLog

TAG_WRITE = 1
TAG_ZERO = 2
TAG_REF = 3
_WRITE_HEAD = struct.Struct(">QQ")  # offset, write time ns
_ZERO_BODY = struct.Struct(">QQQB")  # offset, length, write time ns, may_trim
_REF_BODY = struct.Struct(">QQQ")  # offset, length, time ns
_REF_LENGTH = struct.Struct(">Q")  # a reference's length, at offset 8 of its body
FLAG_MAY_TRIM = 1
RECYCLE_SEGMENTS = 2  # released segment files kept for reuse (common/segment_log.py)


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journaled write: ``data`` is None for a zero extent (trim / write-zeroes) and for
    a reference (``ref``: the bytes are the image's, read when shipped)."""

    seq: int
    offset: int
    length: int
    time_ns: int
    data: bytes | memoryview | None
    may_trim: bool = False
    ref: bool = False

    @property
    def carries_data(self) -> bool:
        """Bytes travel for it (a write or a reference), not a zero extent."""
        return self.data is not None or self.ref


def decode_entry(record: Record) -> JournalEntry:
    """Decode a journal record (raises ValueError on an unknown tag or bad length)."""
    if record.tag == TAG_WRITE:
        offset, time_ns = _WRITE_HEAD.unpack_from(record.payload)
        data = memoryview(record.payload)[_WRITE_HEAD.size :]
        return JournalEntry(record.first_seq, offset, len(data), time_ns, data)
    if record.tag == TAG_ZERO and len(record.payload) == _ZERO_BODY.size:
        offset, length, time_ns, flags = _ZERO_BODY.unpack(record.payload)
        return JournalEntry(
            record.first_seq, offset, length, time_ns, None, bool(flags & FLAG_MAY_TRIM)
        )
    if record.tag == TAG_REF and len(record.payload) == _REF_BODY.size:
        offset, length, time_ns = _REF_BODY.unpack(record.payload)
        return JournalEntry(record.first_seq, offset, length, time_ns, None, ref=True)
    raise ValueError(f"journal record {record.first_seq}: unknown tag {record.tag}")


def _data_bytes(tag: int, payload: bytes | memoryview) -> int:
    """What a record counts toward a read's byte budget: the bytes it stands for (a
    reference's length, a write's data; a zero extent nothing but its record)."""
    if tag == TAG_REF and len(payload) == _REF_BODY.size:
        return int(_REF_LENGTH.unpack_from(payload, 8)[0])
    if tag == TAG_WRITE:
        return max(len(payload) - _WRITE_HEAD.size, 0)
    return len(payload)


class Journal:
    """The write journal of one disk."""

    def __init__(
        self,
        directory: Path,
        *,
        quota: int,
        segment_bytes: int = 64 << 20,
        base_seq: int = 1,
        tail_bytes: int = 32 << 20,
    ) -> None:
        self.log = SegmentLog.open(
            directory, base_seq=base_seq, segment_bytes=segment_bytes, recycle=RECYCLE_SEGMENTS
        )
        self.quota = quota
        # The newest records, kept in memory (bounded) so the shipper need not read them
        # back from the file. The file stays the truth: after a restart, or for records
        # older than the tail, reads go to it.
        self._tail: collections.deque[JournalEntry] = collections.deque()
        self._tail_bytes = 0
        self._tail_limit = tail_bytes

    @property
    def tail_limit(self) -> int:
        """Bytes of recent payloads kept in memory for the shipper (a fixed bound)."""
        return self._tail_limit

    @property
    def next_seq(self) -> int:
        return self.log.next_seq

    @property
    def last_seq(self) -> int:
        return self.log.last_seq

    @property
    def first_seq(self) -> int:
        return self.log.first_seq

    @property
    def bytes_used(self) -> int:
        return self.log.bytes_used

    def fits(self, payload_len: int) -> bool:
        """Would a record with this payload stay within the quota?"""
        return self.log.bytes_used + self.log.record_size(payload_len) + 64 <= self.quota

    def append_write(
        self, offset: int, data: bytes | memoryview, time_ns: int, *, owned: bool = False
    ) -> int:
        return self.append_writes(((offset, data),), time_ns, owned=owned)

    def append_writes(
        self,
        writes: Sequence[tuple[int, bytes | memoryview]],
        time_ns: int,
        *,
        owned: bool = False,
    ) -> int:
        """Journal several writes ``(offset, data)`` with one system call, one record each
        with consecutive seqs (the NBD front's writes of one event-loop step); returns the
        last seq. ``owned``: the caller hands its buffers over (nothing changes them later),
        so they are kept for the shipper as they are, not copied. All or none: raises OSError
        with nothing journaled."""
        first = self.log.next_seq
        head = _WRITE_HEAD.pack
        self.log.append_many(
            [
                (TAG_WRITE, seq, seq, (head(offset, time_ns), data))
                for seq, (offset, data) in enumerate(writes, first)
            ]
        )
        failpoint("journal.after_append")
        for seq, (offset, data) in enumerate(writes, first):
            if not (
                owned or isinstance(data, bytes) or isinstance(getattr(data, "obj", None), bytes)
            ):
                data = bytes(data)  # a caller's mutable buffer must not change what is shipped
            self._remember(JournalEntry(seq, offset, len(data), time_ns, data), len(data))
        return first + len(writes) - 1

    def append_zero(self, offset: int, length: int, time_ns: int, *, may_trim: bool) -> int:
        seq = self.log.next_seq
        body = _ZERO_BODY.pack(offset, length, time_ns, FLAG_MAY_TRIM if may_trim else 0)
        self.log.append(TAG_ZERO, seq, seq, (body,))
        self._remember(JournalEntry(seq, offset, length, time_ns, None, may_trim), 64)
        return seq

    def append_ref(self, offset: int, length: int, time_ns: int) -> int:
        """A reference: ``[offset, offset+length)`` of the image, read when shipped."""
        seq = self.log.next_seq
        self.log.append(TAG_REF, seq, seq, (_REF_BODY.pack(offset, length, time_ns),))
        self._remember(JournalEntry(seq, offset, length, time_ns, None, ref=True), 64)
        return seq

    def _remember(self, entry: JournalEntry, cost: int) -> None:
        tail = self._tail
        if tail and tail[-1].seq + 1 != entry.seq:
            tail.clear()
            self._tail_bytes = 0
        tail.append(entry)
        self._tail_bytes += cost
        while self._tail_bytes > self._tail_limit and len(tail) > 1:
            old = tail.popleft()
            self._tail_bytes -= old.length if old.data is not None else 64

    def read(
        self, from_seq: int, max_bytes: int, cursor: Cursor | None = None
    ) -> list[JournalEntry]:
        """Entries from ``from_seq`` on, about ``max_bytes`` of payload, at least one if any
        (raises LookupError if already released, IntegrityError on corruption)."""
        tail = self._tail
        if tail and tail[0].seq <= from_seq <= tail[-1].seq:
            out: list[JournalEntry] = []
            taken = 0
            for i in range(from_seq - tail[0].seq, len(tail)):
                entry = tail[i]
                size = entry.length if entry.carries_data else 0
                if out and taken + size > max_bytes:
                    break
                out.append(entry)
                taken += size
            return out
        records = self.log.read_records(from_seq, max_bytes, cursor, cost=_data_bytes)
        return [decode_entry(r) for r in records]

    async def sync(self) -> None:
        failpoint("journal.before_sync")
        await self.log.sync()
        failpoint("journal.after_sync")

    async def release_through(self, seq: int) -> int:
        tail = self._tail
        while tail and tail[0].seq <= seq:
            old = tail.popleft()
            self._tail_bytes -= old.length if old.data is not None else 64
        return await self.log.release_through(seq)

    def close(self) -> None:
        self.log.close()
