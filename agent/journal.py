"""The agent's write journal: one durable, checksummed record per write, in seq order.

A thin layer over :class:`common.segment_log.SegmentLog` that encodes write and
zero (write-zeroes / trim) records. Rule: a record is appended *before* the
image is written, in the same event-loop step, so the journal is a write-ahead
log of the image and can be replayed onto it after an unclean stop.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from common.segment_log import Cursor, Record, SegmentLog

TAG_WRITE = 1
TAG_ZERO = 2
_WRITE_HEAD = struct.Struct(">QQ")  # offset, write time ns
_ZERO_BODY = struct.Struct(">QQQB")  # offset, length, write time ns, may_trim
FLAG_MAY_TRIM = 1


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journaled write: ``data`` is None for a zero extent (trim / write-zeroes)."""

    seq: int
    offset: int
    length: int
    time_ns: int
    data: bytes | memoryview | None
    may_trim: bool = False


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
    raise ValueError(f"journal record {record.first_seq}: unknown tag {record.tag}")


class Journal:
    """The write journal of one disk."""

    def __init__(
        self, directory: Path, *, quota: int, segment_bytes: int = 64 << 20, base_seq: int = 1
    ) -> None:
        self.log = SegmentLog.open(directory, base_seq=base_seq, segment_bytes=segment_bytes)
        self.quota = quota

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

    def append_write(self, offset: int, data: bytes | memoryview, time_ns: int) -> int:
        seq = self.log.next_seq
        self.log.append(TAG_WRITE, seq, seq, (_WRITE_HEAD.pack(offset, time_ns), data))
        return seq

    def append_zero(self, offset: int, length: int, time_ns: int, *, may_trim: bool) -> int:
        seq = self.log.next_seq
        body = _ZERO_BODY.pack(offset, length, time_ns, FLAG_MAY_TRIM if may_trim else 0)
        self.log.append(TAG_ZERO, seq, seq, (body,))
        return seq

    def read(
        self, from_seq: int, max_bytes: int, cursor: Cursor | None = None
    ) -> list[JournalEntry]:
        """Entries from ``from_seq`` on, about ``max_bytes`` of payload (raises LookupError
        if already released, IntegrityError on corruption)."""
        return [decode_entry(r) for r in self.log.read_records(from_seq, max_bytes, cursor)]

    async def sync(self) -> None:
        await self.log.sync()

    async def release_through(self, seq: int) -> int:
        return await self.log.release_through(seq)

    def close(self) -> None:
        self.log.close()
