"""Batch codec and write coalescer: the unit the agent ships and the process server caches.

Layout (big-endian; see docs/architecture.md)::

    header:  magic "TBAT" | version u8 | codec u8 | disk_id (u8 len + bytes) | first_seq u64
             | last_seq u64 | newest_write_ns u64 | n_extents u32 | raw_bytes u32
             | compressed_bytes u32
    extents: n x (offset u64 | length u32 | kind u8 (0 data, 1 zero) | xxh3_128 16 bytes)
    data:    the data extents' bytes in table order, raw (codec 0) or one zstd frame (codec 1)

Rule: the input is hostile. Every structural field and every ``Limits`` bound is checked
before a byte is decompressed, decompression is bounded by ``raw_bytes``, and every data
extent's XXH3-128 is verified. Anything wrong raises ``ProtocolError``, nothing else.
Pure code: no I/O, no clock.
"""

from __future__ import annotations

import re
import struct
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import xxhash
import zstandard

from protocol.errors import ErrorCode, ProtocolError

__all__ = [
    "BATCH_MAGIC",
    "BATCH_VERSION",
    "CODEC_RAW",
    "CODEC_ZSTD",
    "DEFAULT_LIMITS",
    "Batch",
    "BatchHeader",
    "Coalescer",
    "Extent",
    "Limits",
    "decode_batch",
    "encode_batch",
    "encode_batch_parts",
    "peek_batch_header",
    "read_batch_table",
    "validate_disk_id",
    "zstd_compressor",
    "zstd_decompressor",
]

BATCH_MAGIC = b"TBAT"
BATCH_VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
_CODECS = frozenset({CODEC_RAW, CODEC_ZSTD})

KIND_DATA = 0
KIND_ZERO = 1

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1

_PREFIX = struct.Struct(">4sBBB")  # magic, version, codec, disk_id length
_FIELDS = struct.Struct(">QQQIII")  # first, last, newest_write_ns, n_extents, raw, compressed
_EXTENT = struct.Struct(">QIB16s")  # offset, length, kind, xxh3_128 digest
_ZERO_DIGEST = bytes(16)

_DISK_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Limits:
    """Receiver-side bounds; every one is checked before memory is committed."""

    max_frame_bytes: int = 48 * 2**20  # whole frame payload
    max_batch_raw_bytes: int = 32 * 2**20  # uncompressed data bytes in a batch
    max_extents: int = 65536
    max_disk_size: int = 2**50


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Extent:
    """``(offset, length)`` on a disk; ``data is None`` is a zero extent (no bytes on the wire)."""

    offset: int
    length: int
    data: bytes | memoryview | None  # a memoryview: a slice of a larger buffer, never copied


@dataclass(frozen=True, slots=True)
class BatchHeader:
    disk_id: str
    first_seq: int
    last_seq: int
    newest_write_ns: int
    n_extents: int
    raw_bytes: int
    compressed_bytes: int
    codec: int


@dataclass(frozen=True, slots=True)
class Batch:
    header: BatchHeader
    extents: tuple[Extent, ...]


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, message)


def validate_disk_id(disk_id: str) -> str:
    """Return ``disk_id`` if it is ``[a-z0-9][a-z0-9._-]{0,63}`` without "..".

    Raises ProtocolError(BAD_MESSAGE) otherwise.
    """
    if not isinstance(disk_id, str) or _DISK_ID_RE.fullmatch(disk_id) is None or ".." in disk_id:
        raise _bad(f"invalid disk id {disk_id!r}")
    return disk_id


# zstd contexts are not thread-safe; encode/decode may run in worker threads concurrently.
_local = threading.local()


def zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's context for ``level``. One per thread, whatever the level: the agent's
    level moves with its link (agent/compression_level.py), and a context kept per level
    and thread would hold a workspace for each (measured: +36 MiB of agent RSS)."""
    held: tuple[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if held is None or held[0] != level:
        held = _local.cctx = (level, zstandard.ZstdCompressor(level=level, write_content_size=True))
    return held[1]


def zstd_decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def encode_batch(
    disk_id: str,
    first_seq: int,
    last_seq: int,
    extents: Sequence[Extent],
    *,
    newest_write_ns: int,
    codec: int = CODEC_ZSTD,
    level: int = 1,
) -> bytes:
    """Encode one batch, as one buffer (see :func:`encode_batch_parts`)."""
    return b"".join(
        encode_batch_parts(
            disk_id,
            first_seq,
            last_seq,
            extents,
            newest_write_ns=newest_write_ns,
            codec=codec,
            level=level,
        )
    )


def encode_batch_parts(
    disk_id: str,
    first_seq: int,
    last_seq: int,
    extents: Sequence[Extent],
    *,
    newest_write_ns: int,
    codec: int = CODEC_ZSTD,
    level: int = 1,
) -> list[bytes | memoryview]:
    """Encode one batch as its pieces, in order: the header with the extent table, then the
    data section (raw: the extents' own buffers, not copied; zstd: one compressed buffer).
    Joined, they are the batch; a writer that takes pieces (``writev``, a transport's
    ``writelines``) never copies the data. ``extents`` must be sorted by offset and
    non-overlapping.

    A batch with no data bytes has an empty data section whatever the codec.
    Raises ProtocolError(BAD_MESSAGE) on invalid input (bad id, seqs, extents, codec,
    or a field that does not fit its wire width).
    """
    validate_disk_id(disk_id)
    if not 1 <= first_seq <= last_seq <= _U64_MAX:
        raise _bad(f"bad seq range [{first_seq}, {last_seq}]")
    if not 0 <= newest_write_ns <= _U64_MAX:
        raise _bad("newest_write_ns out of range")
    if codec not in _CODECS:
        raise _bad(f"unknown codec {codec}")
    if len(extents) > _U32_MAX:
        raise _bad("too many extents")
    table = bytearray()
    pieces: list[bytes | memoryview] = []
    raw = 0
    prev_end = 0
    for ext in extents:
        offset, length, data = ext.offset, ext.length, ext.data
        if offset < prev_end or offset < 0:
            raise _bad(f"extent at {offset} overlaps or is out of order")
        if not 0 < length <= _U32_MAX or offset + length > _U64_MAX:
            raise _bad(f"bad extent length {length} at {offset}")
        prev_end = offset + length
        if data is None:
            table += _EXTENT.pack(offset, length, KIND_ZERO, _ZERO_DIGEST)
        else:
            if len(data) != length:
                raise _bad(f"extent at {offset}: {len(data)} data bytes for length {length}")
            table += _EXTENT.pack(offset, length, KIND_DATA, xxhash.xxh3_128_digest(data))
            pieces.append(data)
            raw += length
    if raw > _U32_MAX:
        raise _bad(f"{raw} raw bytes do not fit a batch")
    if raw and codec == CODEC_ZSTD:
        pieces = [zstd_compressor(level).compress(b"".join(pieces))]
    body_size = sum(map(len, pieces))
    if body_size > _U32_MAX:
        raise _bad("compressed data does not fit a batch")
    id_bytes = disk_id.encode("ascii")
    head = b"".join(
        (
            _PREFIX.pack(BATCH_MAGIC, BATCH_VERSION, codec, len(id_bytes)),
            id_bytes,
            _FIELDS.pack(first_seq, last_seq, newest_write_ns, len(extents), raw, body_size),
            table,
        )
    )
    return [head, *pieces]


def _parse(
    data: bytes | bytearray | memoryview, limits: Limits, data_size: int | None = None
) -> tuple[BatchHeader, list[tuple[int, int, int, bytes]], int]:
    """Parse and check everything but the data section: (header, table rows, data offset).
    ``data_size`` given: ``data`` stops where the data section (of that size) starts."""
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    total = len(mv) if data_size is None else len(mv) + data_size
    if total > limits.max_frame_bytes:
        raise ProtocolError(ErrorCode.LIMIT, f"batch of {total} bytes exceeds the frame limit")
    if total < _PREFIX.size:
        raise _bad("truncated batch header")
    magic, version, codec, id_len = _PREFIX.unpack_from(mv, 0)
    if magic != BATCH_MAGIC:
        raise ProtocolError(ErrorCode.BAD_MAGIC, "not a batch (bad magic)")
    if version != BATCH_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"batch version {version} not supported")
    if codec not in _CODECS:
        raise _bad(f"unknown batch codec {codec}")
    pos = _PREFIX.size
    if total < pos + id_len + _FIELDS.size:
        raise _bad("truncated batch header")
    try:
        disk_id = bytes(mv[pos : pos + id_len]).decode("ascii")
    except UnicodeDecodeError:
        raise _bad("disk id is not ASCII") from None
    validate_disk_id(disk_id)
    pos += id_len
    first, last, newest, n_ext, raw, comp = _FIELDS.unpack_from(mv, pos)
    pos += _FIELDS.size
    if not 1 <= first <= last:
        raise _bad(f"bad seq range [{first}, {last}]")
    if n_ext > limits.max_extents:
        raise ProtocolError(ErrorCode.LIMIT, f"{n_ext} extents exceed {limits.max_extents}")
    if raw > limits.max_batch_raw_bytes:
        raise ProtocolError(ErrorCode.LIMIT, f"{raw} raw bytes exceed {limits.max_batch_raw_bytes}")
    if codec == CODEC_RAW and comp != raw:
        raise _bad(f"raw batch with compressed_bytes {comp} != raw_bytes {raw}")
    if raw == 0 and comp != 0:
        raise _bad("batch without data carries a data section")
    if raw != 0 and comp == 0:
        raise _bad("batch with data has an empty data section")
    table_end = pos + n_ext * _EXTENT.size
    if total != table_end + comp:
        raise _bad(f"batch is {total} bytes, its header implies {table_end + comp}")
    rows = list(_EXTENT.iter_unpack(mv[pos:table_end]))
    max_disk = limits.max_disk_size
    prev_end = 0
    data_sum = 0
    for offset, length, kind, digest in rows:
        if length == 0:
            raise _bad(f"empty extent at {offset}")
        if offset < prev_end:
            raise _bad(f"extent at {offset} overlaps or is out of order")
        prev_end = offset + length
        if prev_end > max_disk:
            raise ProtocolError(
                ErrorCode.LIMIT, f"extent [{offset}, {prev_end}) beyond disk limit {max_disk}"
            )
        if kind == KIND_DATA:
            data_sum += length
        elif kind == KIND_ZERO:
            if digest != _ZERO_DIGEST:
                raise _bad(f"zero extent at {offset} has a digest")
        else:
            raise _bad(f"unknown extent kind {kind}")
    if data_sum != raw:
        raise _bad(f"data extents hold {data_sum} bytes, header says {raw}")
    header = BatchHeader(disk_id, first, last, newest, n_ext, raw, comp, codec)
    return header, rows, table_end


def peek_batch_header(
    data: bytes | bytearray | memoryview,
    limits: Limits = DEFAULT_LIMITS,
    *,
    data_size: int | None = None,
) -> BatchHeader:
    """Check header, extent table and every limit without decompressing; return the header.
    ``data_size`` given: ``data`` is the batch up to its data section, which has that size.

    Raises ProtocolError (BAD_MAGIC, BAD_VERSION, BAD_MESSAGE, LIMIT).
    """
    return _parse(data, limits, data_size)[0]


def read_batch_table(
    read: Callable[[int, int], bytes], total: int, limits: Limits = DEFAULT_LIMITS
) -> tuple[BatchHeader, list[tuple[int, int, int, bytes]], int]:
    """Parse a stored batch's header and extent table without reading its data section:
    ``read(offset, length)`` returns bytes of the batch, ``total`` is its size. Returns
    (header, rows ``(offset, length, kind, xxh3_128)``, offset of the data section).
    Used to index raw (codec 0) batches kept on disk, whose data is then read piecewise.

    Raises ProtocolError as :func:`peek_batch_header` does.
    """
    head = read(0, min(total, _PREFIX.size + 255 + _FIELDS.size))
    if len(head) < _PREFIX.size:
        raise _bad("truncated batch header")
    id_len = head[_PREFIX.size - 1]
    fields_end = _PREFIX.size + id_len + _FIELDS.size
    if len(head) < fields_end:
        raise _bad("truncated batch header")
    n_ext = _FIELDS.unpack_from(head, _PREFIX.size + id_len)[3]
    if n_ext > limits.max_extents:
        raise ProtocolError(ErrorCode.LIMIT, f"{n_ext} extents exceed {limits.max_extents}")
    comp = _FIELDS.unpack_from(head, _PREFIX.size + id_len)[5]
    table = read(fields_end, n_ext * _EXTENT.size)

    stub = head[:fields_end] + table
    if len(stub) != fields_end + n_ext * _EXTENT.size or total != len(stub) + comp:
        raise _bad(f"stored batch is {total} bytes, its header implies {len(stub) + comp}")
    header, rows, data_off = _parse(stub, limits, data_size=comp)
    return header, rows, data_off


def read_batch_table_in(
    data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> tuple[BatchHeader, list[tuple[int, int, int, bytes]], int]:
    """:func:`read_batch_table` of a stored batch already in memory (``data``, whole)."""
    return read_batch_table(lambda o, n: bytes(data[o : o + n]), len(data), limits)


def decode_batch(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Batch:
    """Fully decode and verify a batch (bounded decompression, XXH3-128 per data extent).

    Raises ProtocolError (BAD_MAGIC, BAD_VERSION, BAD_MESSAGE, LIMIT, DIGEST).
    """
    header, rows, data_off = _parse(data, limits)
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    section = mv[data_off:]
    raw = header.raw_bytes
    body: bytes | memoryview
    if header.codec == CODEC_RAW or raw == 0:
        body = section
    else:
        # Content size must be declared and equal raw_bytes: python-zstandard sizes its
        # output buffer from the frame header, so this is what bounds the memory.
        try:
            declared = zstandard.frame_content_size(section)
        except zstandard.ZstdError as exc:
            raise _bad(f"bad zstd frame header: {exc}") from None
        if declared != raw:
            raise _bad(f"zstd frame declares {declared} bytes, header says {raw}")
        try:
            body = zstd_decompressor().decompress(
                section, max_output_size=raw, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise _bad(f"zstd decompression failed: {exc}") from None
        if len(body) != raw:
            raise _bad(f"decompressed {len(body)} bytes, header says {raw}")
    extents: list[Extent] = []
    pos = 0
    digest128 = xxhash.xxh3_128_digest
    for offset, length, kind, digest in rows:
        if kind == KIND_ZERO:
            extents.append(Extent(offset, length, None))
            continue
        chunk = body[pos : pos + length]
        pos += length
        if digest128(chunk) != digest:
            raise ProtocolError(ErrorCode.DIGEST, f"extent at {offset} fails its XXH3-128")
        extents.append(Extent(offset, length, bytes(chunk)))
    return Batch(header, tuple(extents))


class Coalescer:
    """Merges write records into final extent contents; later records win.

    Held as parallel sorted lists of disjoint pieces (start, end, data view or None).
    Inserting is a bisect plus a local splice; pieces are zero-copy memoryview slices
    joined once in ``extents()``. Adjacent same-kind pieces are counted as merge
    boundaries as they form, so ``n_extents`` is O(1).
    Raises ProtocolError(BAD_MESSAGE) for a negative offset or length.
    """

    __slots__ = ("_boundaries", "_data", "_ends", "_raw", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._data: list[memoryview | None] = []
        self._raw = 0
        self._boundaries = 0  # adjacent pairs that extents() merges

    def add_data(self, offset: int, data: bytes) -> None:
        if offset < 0:
            raise _bad(f"negative offset {offset}")
        if not data:
            return
        view = memoryview(data if isinstance(data, bytes) else bytes(data))
        self._put(offset, offset + len(view), view)

    def add_zero(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise _bad(f"bad zero extent ({offset}, {length})")
        if length:
            self._put(offset, offset + length, None)

    def _count(self, lo: int, hi: int) -> int:
        """Merge boundaries among pieces lo..hi-1 (indices clipped)."""
        lo = max(lo, 0)
        hi = min(hi, len(self._starts))
        starts, ends, data = self._starts, self._ends, self._data
        n = 0
        for k in range(lo, hi - 1):
            if ends[k] == starts[k + 1] and (data[k] is None) == (data[k + 1] is None):
                n += 1
        return n

    def _put(self, start: int, end: int, piece: memoryview | None) -> None:
        starts, ends, data = self._starts, self._ends, self._data
        i = bisect_right(ends, start)  # first piece ending after start
        j = bisect_left(starts, end, lo=i)  # first piece starting at or after end
        self._boundaries -= self._count(i - 1, j + 1)
        new_s = [start]
        new_e = [end]
        new_d = [piece]
        raw = 0 if piece is None else end - start
        for k in range(i, j):
            old = data[k]
            if old is not None:
                raw -= ends[k] - starts[k]
        if i < j:
            if starts[i] < start:  # keep the head of the first overlapped piece
                old = data[i]
                new_s.insert(0, starts[i])
                new_e.insert(0, start)
                new_d.insert(0, None if old is None else old[: start - starts[i]])
                raw += 0 if old is None else start - starts[i]
            if ends[j - 1] > end:  # keep the tail of the last overlapped piece
                old = data[j - 1]
                new_s.append(end)
                new_e.append(ends[j - 1])
                new_d.append(None if old is None else old[end - starts[j - 1] :])
                raw += 0 if old is None else ends[j - 1] - end
        starts[i:j] = new_s
        ends[i:j] = new_e
        data[i:j] = new_d
        self._raw += raw
        self._boundaries += self._count(i - 1, i + len(new_s) + 1)

    def extents(self) -> list[Extent]:
        """Sorted, non-overlapping extents; adjacent data (and adjacent zero) pieces merged."""
        out: list[Extent] = []
        starts, ends, data = self._starts, self._ends, self._data
        n = len(starts)
        k = 0
        while k < n:
            first = k
            is_zero = data[k] is None
            while k + 1 < n and ends[k] == starts[k + 1] and (data[k + 1] is None) == is_zero:
                k += 1
            offset, end = starts[first], ends[k]
            if is_zero:
                out.append(Extent(offset, end - offset, None))
            else:
                joined = b"".join(data[first : k + 1])  # type: ignore[arg-type]
                out.append(Extent(offset, end - offset, joined))
            k += 1
        return out

    @property
    def raw_bytes(self) -> int:
        """Data bytes currently held (after overwrites)."""
        return self._raw

    @property
    def n_extents(self) -> int:
        """``len(self.extents())``, in O(1)."""
        return len(self._starts) - self._boundaries
