"""Replication frames: messages, framing, and the h11-style connection state machine.

Frame = 24-byte header, then the payload::

    magic "TDMK" | version u8 | type u8 | flags u16 | length u32 | payload xxh3_64 u64
    | header xxh32 u32 (of the 20 bytes before it)

Rule: sans-I/O and hostile input. Bytes go in through ``receive_data``, typed messages
come out of ``next_message``/``next_event``, ``send``/``encode_message`` return bytes.
A header is fully checked (magic, checksum, version, flags, length limit) before a byte of
its payload is buffered; every byte of a frame is covered by a checksum; buffering never
exceeds one header + ``max_frame_bytes`` + one ``receive_data`` chunk. Every failure is a
``ProtocolError`` carrying its wire code, after which the decoder/connection stays failed.
No sockets, no asyncio, no clock.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeAlias

import xxhash

from protocol.batch import DEFAULT_LIMITS, BatchHeader, Limits, peek_batch_header
from protocol.batch import validate_disk_id as _validate_disk_id
from protocol.errors import ErrorCode, ProtocolError

Buffer: TypeAlias = bytes | bytearray | memoryview  # what frames are read from and sent as

__all__ = [
    "BULK_CODECS",
    "BULK_MAX",
    "EOF",
    "EOF_EVENT",
    "HEADER",
    "MAGIC",
    "MAX_DIGEST_REQUESTS",
    "MAX_DISKS_PER_CONNECTION",
    "MAX_ERROR_MESSAGE_BYTES",
    "MAX_REPORTS",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "ROLES",
    "Ack",
    "BatchMsg",
    "Buffer",
    "BulkData",
    "ConnState",
    "Connection",
    "Control",
    "DigestReply",
    "DigestRequest",
    "DiskReport",
    "ErrorMsg",
    "FrameDecoder",
    "Heartbeat",
    "Hello",
    "HelloOk",
    "Message",
    "MsgType",
    "NeedData",
    "Register",
    "Registered",
    "VerifyRequest",
    "VerifyResult",
    "encode_message",
    "encode_message_parts",
]

MAGIC = b"TDMK"
PROTOCOL_VERSION = 1
HEADER = struct.Struct(">4sBBHIQI")
_HEADER_BODY = struct.Struct(">4sBBHIQ")  # the 20 bytes the header xxh32 covers
_HEADER_CHECK = struct.Struct(">I")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

_U16_MAX = 2**16 - 1
_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1

ROLES = frozenset({"agent", "master-target", "process-server"})
MAX_REPORTS = 4096
MAX_ERROR_MESSAGE_BYTES = 4096
MAX_DISKS_PER_CONNECTION = 4096
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_STATE_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")


class MsgType(enum.IntEnum):
    HELLO = 1
    HELLO_OK = 2
    REGISTER = 3
    REGISTERED = 4
    BATCH = 5
    ACK = 6
    HEARTBEAT = 7
    ERROR = 8
    DIGEST_REQUEST = 9
    DIGEST_REPLY = 10
    VERIFY_REQUEST = 11
    VERIFY_RESULT = 12
    CONTROL = 13
    BULK = 14


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, message)


def _check_uint(name: str, value: int, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise _bad(f"{name} {value!r} out of range")


def _check_name(value: str) -> None:
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise _bad(f"invalid name {value!r}")


def _pack_str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _U16.pack(len(raw)) + raw


class _Reader:
    """Cursor over one payload; every read is bounds-checked (BAD_MESSAGE)."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise _bad("truncated message")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u16(self) -> int:
        value: int = _U16.unpack(self._take(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack(self._take(4))[0]
        return value

    def u64(self) -> int:
        value: int = _U64.unpack(self._take(8))[0]
        return value

    def str(self) -> str:
        raw = self._take(self.u16())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("string is not UTF-8") from None

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise _bad(f"{len(self._data) - self._pos} trailing bytes in message")


# --- messages -----------------------------------------------------------------------------
# Each message validates itself on construction (so decoding validates too), knows its
# wire type, and encodes/decodes its own payload.


@dataclass(frozen=True, slots=True)
class Hello:
    TYPE: ClassVar[MsgType] = MsgType.HELLO
    name: str
    role: str

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.role not in ROLES:
            raise _bad(f"unknown role {self.role!r}")

    def _encode(self) -> bytes:
        return _pack_str(self.name) + _pack_str(self.role)

    @classmethod
    def _decode(cls, r: _Reader, limits: Limits) -> Hello:
        return cls(r.str(), r.str())


@dataclass(frozen=True, slots=True)
class HelloOk:
    TYPE: ClassVar[MsgType] = MsgType.HELLO_OK
    name: str
    max_frame: int
    max_batch: int

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_uint("max_frame", self.max_frame, _U32_MAX)
        _check_uint("max_batch", self.max_batch, _U32_MAX)

    def _encode(self) -> bytes:
        return _pack_str(self.name) + _U32.pack(self.max_frame) + _U32.pack(self.max_batch)

    @classmethod
    def _decode(cls, r: _Reader, limits: Limits) -> HelloOk:
        return cls(r.str(), r.u32(), r.u32())


@dataclass(frozen=True, slots=True)
class Register:
    TYPE: ClassVar[MsgType] = MsgType.REGISTER
    disk_id: str
    size: int
    journaled_seq: int

    def __post_init__(self) -> None:
        _validate_disk_id(self.disk_id)
        _check_uint("size", self.size, _U64_MAX)
        _check_uint("journaled_seq", self.journaled_seq, _U64_MAX)

    def _encode(self) -> bytes:
        return _pack_str(self.disk_id) + _U64.pack(self.size) + _U64.pack(self.journaled_seq)

    @classmethod
    def _decode(cls, r: _Reader, limits: Limits) -> Register:
        msg = cls(r.str(), r.u64(), r.u64())
        if msg.size > limits.max_disk_size:
            raise ProtocolError(
                ErrorCode.LIMIT, f"disk size {msg.size} exceeds {limits.max_disk_size}"
            )
        return msg


@dataclass(frozen=True, slots=True)
class Registered:
    TYPE: ClassVar[MsgType] = MsgType.REGISTERED
    disk_id: str
    cached_seq: int
    applied_seq: int

    def __post_init__(self) -> None:
        _validate_disk_id(self.disk_id)
        _check_uint("cached_seq", self.cached_seq, _U64_MAX)
        _check_uint("applied_seq", self.applied_seq, _U64_MAX)

    def _encode(self) -> bytes:
        return _pack_str(self.disk_id) + _U64.pack(self.cached_seq) + _U64.pack(self.applied_seq)

    @classmethod
    def _decode(cls, r: _Reader, limits: Limits) -> Registered:
        return cls(r.str(), r.u64(), r.u64())


@dataclass(frozen=True, slots=True)
class BatchMsg:
    """A batch frame: ``data`` is exactly the encoded batch, ``header`` its peeked header.

    Build with ``BatchMsg.from_data(data)``, which checks the batch structure and limits
    (not the data digests: that is ``decode_batch``'s job), or, to send a batch without
    joining it, ``BatchMsg.from_parts(encode_batch_parts(...))``.
    """

    TYPE: ClassVar[MsgType] = MsgType.BATCH
    data: bytes | bytearray  # a received batch keeps the buffer it was received into
    header: BatchHeader
    parts: tuple[bytes | memoryview, ...] = ()  # when set: the batch in pieces, ``data`` b""

    @classmethod
    def from_data(cls, data: bytes | bytearray, limits: Limits = DEFAULT_LIMITS) -> BatchMsg:
        """Raises ProtocolError (whatever ``peek_batch_header`` raises)."""
        return cls(data, peek_batch_header(data, limits))

    @classmethod
    def from_parts(
        cls, parts: Sequence[bytes | memoryview], limits: Limits = DEFAULT_LIMITS
    ) -> BatchMsg:
        """A batch to send as ``encode_batch_parts`` gave it: ``parts[0]`` the header and the
        extent table, the rest the data section. Raises ProtocolError as ``from_data``."""
        if not parts:
            raise _bad("a batch of no parts")
        data_size = sum(len(p) for p in parts[1:])
        return cls(b"", peek_batch_header(parts[0], limits, data_size=data_size), tuple(parts))

    @property
    def disk_id(self) -> str:
        return self.header.disk_id

    @property
    def size(self) -> int:
        """The encoded batch's size in bytes."""
        return sum(len(p) for p in self.payload_parts())

    def _encode(self) -> bytes:
        return b"".join(self.payload_parts())

    def payload_parts(self) -> tuple[Buffer, ...]:
        return self.parts or (self.data,)

    @classmethod
    def _decode_payload(cls, payload: bytes | bytearray, limits: Limits) -> BatchMsg:
        return cls.from_data(payload, limits)


BULK_MAX = 4 << 20  # raw bytes of one BulkData
BULK_RAW, BULK_ZSTD, BULK_ZERO = 0, 1, 2
BULK_CODECS = (BULK_RAW, BULK_ZSTD, BULK_ZERO)
_BULK = struct.Struct(">QQIBQ")  # bulk_id, offset, length, codec, xxh3_64 of the raw bytes


@dataclass(frozen=True, slots=True)
class BulkData:
    """One piece of an initial sync's copy (``agent/bulk_copy.py``): ``length`` bytes of the
    source at ``offset``, raw, zstd-compressed or zeros (no data), and the XXH3-64 of the raw
    bytes (checked by the receiver after decompressing). ``bulk_id`` numbers a connection's
    pieces from 1, in the order they are sent."""

    TYPE: ClassVar[MsgType] = MsgType.BULK
    disk_id: str
    bulk_id: int
    offset: int
    length: int
    codec: int
    digest: int
    data: bytes | bytearray | memoryview = b""

    def __post_init__(self) -> None:
        _validate_disk_id(self.disk_id)
        _check_uint("bulk_id", self.bulk_id, _U64_MAX)
        _check_uint("offset", self.offset, _U64_MAX - BULK_MAX)
        if not 0 < self.length <= BULK_MAX:
            raise _bad(f"bulk length {self.length} outside 1..{BULK_MAX}")
        _check_uint("digest", self.digest, _U64_MAX)
        n = len(self.data)
        if self.codec == BULK_RAW:
            ok = n == self.length
        elif self.codec == BULK_ZSTD:
            ok = 0 < n < self.length
        elif self.codec == BULK_ZERO:
            ok = n == 0
        else:
            raise _bad(f"unknown bulk codec {self.codec}")
        if not ok:
            raise _bad(f"bulk codec {self.codec} with {n} bytes for {self.length}")

    def payload_parts(self) -> tuple[Buffer, ...]:
        head = _pack_str(self.disk_id) + _BULK.pack(
            self.bulk_id, self.offset, self.length, self.codec, self.digest
        )
        return (head, self.data) if self.data else (head,)

    def _encode(self) -> bytes:
        return b"".join(self.payload_parts())

    @classmethod
    def _decode_payload(cls, payload: bytes | bytearray) -> BulkData:
        """The data stays a view of ``payload`` (received in place: not copied)."""
        view = memoryview(payload)
        if len(view) < 2:
            raise _bad("truncated message")
        n = _U16.unpack_from(view)[0]
        end = 2 + n + _BULK.size
        if len(view) < end:
            raise _bad("truncated message")
        try:
            disk_id = bytes(view[2 : 2 + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("string is not UTF-8") from None
        bulk_id, offset, length, codec, digest = _BULK.unpack_from(view, 2 + n)
        return cls(disk_id, bulk_id, offset, length, codec, digest, view[end:])


@dataclass(frozen=True, slots=True)
class Ack:
    TYPE: ClassVar[MsgType] = MsgType.ACK
    disk_id: str
    durable_seq: int

    def __post_init__(self) -> None:
        _validate_disk_id(self.disk_id)
        _check_uint("durable_seq", self.durable_seq, _U64_MAX)

    def _encode(self) -> bytes:
        return _pack_str(self.disk_id) + _U64.pack(self.durable_seq)

    @classmethod
    def _decode(cls, r: _Reader, limits: Limits) -> Ack:
        return cls(r.str(), r.u64())


_REPORT_NUMS = struct.Struct(">QQQQ")


@dataclass(frozen=True, slots=True)
class DiskReport:
    """One disk's watermarks inside a ``Heartbeat`` (not a message on its own)."""

    disk_id: str
    state: str
    journaled_seq: int
    acked_seq: int
    pending_bytes: int
    oldest_pending_ns: int

    def __post_init__(self) -> None:
        _validate_disk_id(self.disk_id)
        if not isinstance(self.state, str) or _STATE_RE.fullmatch(self.state) is None:
            raise _bad(f"invalid disk state {self.state!r}")
        for name in ("journaled_seq", "acked_seq", "pending_bytes", "oldest_pending_ns"):
            _check_uint(name, getattr(self, name), _U64_MAX)

    def _encode(self) -> bytes:
        return (
            _pack_str(self.disk_id)
            + _pack_str(self.state)
            + _REPORT_NUMS.pack(
                self.journaled_seq, self.acked_seq, self.pending_bytes, self.oldest_pending_ns
            )
        )

    @classmethod
    def _decode(cls, r: _Reader) -> DiskReport:
        return cls(r.str(), r.str(), r.u64(), r.u64(), r.u64(), r.u64())


@dataclass(frozen=True, slots=True)
class Heartbeat:
    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    counter: int
    reports: tuple[DiskReport, ...] = ()

    def __post_init__(self) -> None:
        _check_uint("counter", self.counter, _U64_MAX)
        if not isinstance(self.reports, tuple):
            object.__setattr__(self, "reports", tuple(self.reports))
        if len(self.reports) > MAX_REPORTS:
            raise ProtocolError(
                ErrorCode.LIMIT, f"{len(self.reports)} disk reports exceed {MAX_REPORTS}"
            )
        for report in self.reports:
            if not isinstance(report, DiskReport):
                raise _bad(f"not a DiskReport: {report!r}")

    def _encode(self) -> bytes:
        parts = [_U64.pack(self.counter), _U16.pack(len(self.reports))]
        parts.extend(report._encode() for report in self.reports)
        return b"".join(parts)

    @classmethod
    def _decode(cls, r: _Reader, limits: Limits) -> Heartbeat:
        counter = r.u64()
        n = r.u16()
        if n > MAX_REPORTS:
            raise ProtocolError(ErrorCode.LIMIT, f"{n} disk reports exceed {MAX_REPORTS}")
        return cls(counter, tuple(DiskReport._decode(r) for _ in range(n)))


@dataclass(frozen=True, slots=True)
class ErrorMsg:
    """The peer's last word: ``code`` is an ``ErrorCode`` value (unknown codes pass through)."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: int
    message: str

    def __post_init__(self) -> None:
        _check_uint("error code", self.code, _U16_MAX)
        if not isinstance(self.message, str):
            raise _bad("error message is not a string")
        if len(self.message.encode("utf-8")) > MAX_ERROR_MESSAGE_BYTES:
            raise _bad(f"error message longer than {MAX_ERROR_MESSAGE_BYTES} bytes")

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorMsg:
        """ERROR for ``exc``: its code if a ProtocolError, else INTERNAL; message truncated."""
        if isinstance(exc, ProtocolError):
            code, text = exc.code, exc.message
        else:
            code, text = ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
        raw = text.encode("utf-8")[:MAX_ERROR_MESSAGE_BYTES]
        return cls(int(code), raw.decode("utf-8", errors="ignore"))

    def _encode(self) -> bytes:
        return _U16.pack(self.code) + _pack_str(self.message)

    @classmethod
    def _decode(cls, r: _Reader, limits: Limits) -> ErrorMsg:
        return cls(r.u16(), r.str())


# --- resync and verify ----------------------------------------------------------------------
MAX_DIGESTS = 65536  # per DigestRequest / DigestReply
DIGEST_SIZE = 16  # XXH3-128
DIGEST_WIDTHS = (8, 16)  # 8: the first 8 bytes of the XXH3-128 (fine-grained level of a resync)
MIN_CHUNK = 512
MAX_CHUNK = 16 << 20
MAX_SELECT_BYTES = 8192
MAX_REPORT_BYTES = 1 << 20
# Outstanding DigestRequests per session: the process server closes a session that sends more
# (it bounds the replies buffered for a slow reader); an agent keeps within it.
MAX_DIGEST_REQUESTS = 8
_DIGEST_REQ = struct.Struct(
    ">IQQIQBIH"
)  # request_id, offset, length, chunk, min_seq, width, unit, len(select)
_DIGEST_REP = struct.Struct(
    ">IQIQBI"
)  # request_id, offset, chunk_size, applied_seq, width, n_digests


def _check_chunking(offset: int, length: int, chunk_size: int) -> None:
    _check_uint("offset", offset, _U64_MAX)
    _check_uint("length", length, _U64_MAX)
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_size % MIN_CHUNK:
        raise _bad(f"chunk size {chunk_size} must be a multiple of {MIN_CHUNK} up to {MAX_CHUNK}")
    if length == 0 or -(-length // chunk_size) > MAX_DIGESTS:
        raise ProtocolError(
            ErrorCode.LIMIT, f"{length} bytes in chunks of {chunk_size}: too many digests"
        )


def selected_ranges(offset: int, length: int, unit: int, select: bytes) -> list[tuple[int, int]]:
    """The ``(offset, length)`` units of a range that a selection mask picks (all when empty)."""
    if not select:
        return [(offset, length)]
    end = offset + length
    out = []
    for i in range(-(-length // unit)):
        if select[i >> 3] & (1 << (i & 7)):
            start = offset + i * unit
            out.append((start, min(unit, end - start)))
    return out


@dataclass(frozen=True, slots=True)
class DigestRequest:
    """Agent asks for digests of replica chunks once ``applied_seq >= min_seq``.

    ``select`` (optional) is a bitmask over units of ``select_unit`` bytes from ``offset``:
    only chunks inside selected units are digested, in order. ``width`` is 16 (the full
    XXH3-128) or 8 (its first 8 bytes)."""

    TYPE: ClassVar[MsgType] = MsgType.DIGEST_REQUEST
    disk_id: str
    request_id: int
    offset: int
    length: int
    chunk_size: int
    min_seq: int
    width: int = DIGEST_SIZE
    select_unit: int = 0
    select: bytes = b""

    def __post_init__(self) -> None:
        _validate_disk_id(self.disk_id)
        _check_uint("request_id", self.request_id, _U32_MAX)
        _check_chunking(self.offset, self.length, self.chunk_size)
        _check_uint("min_seq", self.min_seq, _U64_MAX)
        if self.width not in DIGEST_WIDTHS:
            raise _bad(f"digest width {self.width} must be 8 or 16")
        if not isinstance(self.select, bytes) or len(self.select) > MAX_SELECT_BYTES:
            raise ProtocolError(ErrorCode.LIMIT, "selection mask too large")
        if self.select:
            unit = self.select_unit
            if unit < self.chunk_size or unit % self.chunk_size or unit > MAX_CHUNK:
                raise _bad(f"selection unit {unit} must be a multiple of the chunk size")
            units = (self.length + unit - 1) // unit
            if len(self.select) != (units + 7) // 8:
                raise _bad("selection mask length does not match the range")
        elif self.select_unit:
            raise _bad("selection unit without a mask")

    def _encode(self) -> bytes:
        head = _DIGEST_REQ.pack(
            self.request_id,
            self.offset,
            self.length,
            self.chunk_size,
            self.min_seq,
            self.width,
            self.select_unit,
            len(self.select),
        )
        return _pack_str(self.disk_id) + head + self.select

    @classmethod
    def _decode(cls, r: _Reader, limits: Limits) -> DigestRequest:
        disk_id = r.str()
        request_id, offset, length, chunk, min_seq, width, unit, n = _DIGEST_REQ.unpack(
            r._take(_DIGEST_REQ.size)
        )
        if n > MAX_SELECT_BYTES:
            raise ProtocolError(ErrorCode.LIMIT, "selection mask too large")
        return cls(disk_id, request_id, offset, length, chunk, min_seq, width, unit, r._take(n))


@dataclass(frozen=True, slots=True)
class DigestReply:
    """Digests (``width`` bytes each) of the requested chunks, in order."""

    TYPE: ClassVar[MsgType] = MsgType.DIGEST_REPLY
    disk_id: str
    request_id: int
    offset: int
    chunk_size: int
    applied_seq: int
    digests: bytes
    width: int = DIGEST_SIZE

    def __post_init__(self) -> None:
        _validate_disk_id(self.disk_id)
        _check_uint("request_id", self.request_id, _U32_MAX)
        _check_uint("applied_seq", self.applied_seq, _U64_MAX)
        if self.width not in DIGEST_WIDTHS:
            raise _bad(f"digest width {self.width} must be 8 or 16")
        if not isinstance(self.digests, bytes) or len(self.digests) % self.width:
            raise _bad("digests must be a whole number of digests")
        if len(self.digests) // self.width > MAX_DIGESTS:
            raise ProtocolError(ErrorCode.LIMIT, "too many digests in one reply")
        _check_chunking(self.offset, self.chunk_size, self.chunk_size)

    def _encode(self) -> bytes:
        n = len(self.digests) // self.width
        head = _DIGEST_REP.pack(
            self.request_id, self.offset, self.chunk_size, self.applied_seq, self.width, n
        )
        return _pack_str(self.disk_id) + head + self.digests

    @classmethod
    def _decode(cls, r: _Reader, limits: Limits) -> DigestReply:
        disk_id = r.str()
        request_id, offset, chunk, applied, width, n = _DIGEST_REP.unpack(r._take(_DIGEST_REP.size))
        if n > MAX_DIGESTS or width not in DIGEST_WIDTHS:
            raise ProtocolError(ErrorCode.LIMIT, f"{n} digests of width {width} in one reply")
        return cls(disk_id, request_id, offset, chunk, applied, r._take(n * width), width)

    def split(self) -> list[bytes]:
        w = self.width
        return [self.digests[i : i + w] for i in range(0, len(self.digests), w)]


@dataclass(frozen=True, slots=True)
class VerifyRequest:
    """Process server asks the agent to verify a disk (``tidemark-ps verify``)."""

    TYPE: ClassVar[MsgType] = MsgType.VERIFY_REQUEST
    disk_id: str
    request_id: int
    repair: bool

    def __post_init__(self) -> None:
        _validate_disk_id(self.disk_id)
        _check_uint("request_id", self.request_id, _U32_MAX)
        if not isinstance(self.repair, bool):
            raise _bad("repair must be a bool")

    def _encode(self) -> bytes:
        return _pack_str(self.disk_id) + _U32.pack(self.request_id) + bytes([int(self.repair)])

    @classmethod
    def _decode(cls, r: _Reader, limits: Limits) -> VerifyRequest:
        disk_id, request_id, flag = r.str(), r.u32(), r._take(1)[0]
        if flag > 1:
            raise _bad("repair flag must be 0 or 1")
        return cls(disk_id, request_id, bool(flag))


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The agent's verify report (a JSON object as UTF-8 text)."""

    TYPE: ClassVar[MsgType] = MsgType.VERIFY_RESULT
    disk_id: str
    request_id: int
    report: str

    def __post_init__(self) -> None:
        _validate_disk_id(self.disk_id)
        _check_uint("request_id", self.request_id, _U32_MAX)
        if not isinstance(self.report, str) or len(self.report.encode()) > MAX_REPORT_BYTES:
            raise ProtocolError(ErrorCode.LIMIT, "verify report too large")

    def _encode(self) -> bytes:
        raw = self.report.encode()
        return _pack_str(self.disk_id) + _U32.pack(self.request_id) + _U32.pack(len(raw)) + raw

    @classmethod
    def _decode(cls, r: _Reader, limits: Limits) -> VerifyResult:
        disk_id, request_id, n = r.str(), r.u32(), r.u32()
        if n > MAX_REPORT_BYTES:
            raise ProtocolError(ErrorCode.LIMIT, "verify report too large")
        try:
            return cls(disk_id, request_id, r._take(n).decode())
        except UnicodeDecodeError:
            raise _bad("verify report is not UTF-8") from None


MAX_CONTROL_BODY = 64 << 10
_CONTROL_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")


@dataclass(frozen=True, slots=True)
class Control:
    """A control exchange (recovery points, barriers, freezes): ``name`` says which, ``body``
    is a JSON object as UTF-8 text, decoded and checked by ``protocol.control``."""

    TYPE: ClassVar[MsgType] = MsgType.CONTROL
    name: str
    request_id: int
    body: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or _CONTROL_NAME_RE.fullmatch(self.name) is None:
            raise _bad(f"invalid control name {self.name!r}")
        _check_uint("request_id", self.request_id, _U32_MAX)
        if not isinstance(self.body, str) or len(self.body.encode()) > MAX_CONTROL_BODY:
            raise ProtocolError(ErrorCode.LIMIT, "control body too large")

    def _encode(self) -> bytes:
        raw = self.body.encode()
        return _pack_str(self.name) + _U32.pack(self.request_id) + _U32.pack(len(raw)) + raw

    @classmethod
    def _decode(cls, r: _Reader, limits: Limits) -> Control:
        name, request_id, n = r.str(), r.u32(), r.u32()
        if n > MAX_CONTROL_BODY:
            raise ProtocolError(ErrorCode.LIMIT, "control body too large")
        try:
            return cls(name, request_id, r._take(n).decode())
        except UnicodeDecodeError:
            raise _bad("control body is not UTF-8") from None


Message: TypeAlias = (
    Hello
    | HelloOk
    | Register
    | Registered
    | BatchMsg
    | Ack
    | Heartbeat
    | ErrorMsg
    | DigestRequest
    | DigestReply
    | VerifyRequest
    | VerifyResult
    | Control
    | BulkData
)

_MESSAGE_TYPES = (
    Hello,
    HelloOk,
    Register,
    Registered,
    BatchMsg,
    Ack,
    Heartbeat,
    ErrorMsg,
    DigestRequest,
    DigestReply,
    VerifyRequest,
    VerifyResult,
    Control,
    BulkData,
)
_SMALL_DECODERS: dict[int, Callable[[_Reader, Limits], Message]] = {
    int(cls.TYPE): cls._decode
    for cls in (
        Hello,
        HelloOk,
        Register,
        Registered,
        Ack,
        Heartbeat,
        ErrorMsg,
        DigestRequest,
        DigestReply,
        VerifyRequest,
        VerifyResult,
        Control,
    )
}


def encode_message(msg: Message) -> bytes:
    """Return the whole frame (header + payload) for ``msg``.

    Raises ProtocolError(BAD_MESSAGE) if ``msg`` is not a message or does not fit a frame.
    """
    return b"".join(encode_message_parts(msg))


def encode_message_parts(msg: Message) -> list[Buffer]:
    """The frame for ``msg`` as pieces: its header, then its payload (a batch's in the pieces
    it was built from), so a large payload is written to the transport without being copied
    into one buffer with its header."""
    if not isinstance(msg, _MESSAGE_TYPES):
        raise _bad(f"not a message: {msg!r}")
    parts: tuple[Buffer, ...]
    parts = msg.payload_parts() if isinstance(msg, BatchMsg | BulkData) else (msg._encode(),)
    length = sum(len(p) for p in parts)
    if length > _U32_MAX:
        raise _bad(f"payload of {length} bytes does not fit a frame")
    if len(parts) == 1:
        payload_sum = xxhash.xxh3_64_intdigest(parts[0])
    else:
        hasher = xxhash.xxh3_64()
        for part in parts:
            hasher.update(part)
        payload_sum = hasher.intdigest()
    head = _HEADER_BODY.pack(MAGIC, PROTOCOL_VERSION, msg.TYPE, 0, length, payload_sum)
    return [head + _HEADER_CHECK.pack(xxhash.xxh32_intdigest(head)), *parts]


def _decode_payload(msg_type: int, payload: bytes | bytearray, limits: Limits) -> Message:
    if msg_type == MsgType.BATCH:
        return BatchMsg._decode_payload(payload, limits)
    if msg_type == MsgType.BULK:
        return BulkData._decode_payload(payload)
    decoder = _SMALL_DECODERS.get(msg_type)
    if decoder is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {msg_type}")
    reader = _Reader(bytes(payload))  # (no copy of bytes; a large non-batch payload is rare)
    msg = decoder(reader, limits)
    reader.finish()
    return msg


# --- decoding frames ---------------------------------------------------------------------


class NeedData:
    """Sentinel: feed more bytes with ``receive_data`` before asking again."""

    __slots__ = ()
    _instance: ClassVar[NeedData | None] = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


class EOF:
    """Sentinel: the peer closed cleanly at a frame boundary."""

    __slots__ = ()
    _instance: ClassVar[EOF | None] = None

    def __new__(cls) -> EOF:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "EOF_EVENT"


NEED_DATA = NeedData()
EOF_EVENT = EOF()


class FrameDecoder:
    """Bytes in, messages out (``next_message``).

    Bytes come in one of two ways: ``receive_data(data)``, or, with no copy of a large
    payload (``asyncio.BufferedProtocol`` style), ``get_buffer()`` then
    ``buffer_updated(nbytes)`` for the bytes written into it. Once a frame's header has
    been checked, a payload of DIRECT_MIN to DIRECT_MAX bytes gets a buffer of its own,
    which ``get_buffer`` hands out until it is full: the transport writes the payload in
    place and the message keeps that buffer. So memory follows the bytes received, plus at
    most DIRECT_MAX for a frame announced and not yet sent (a larger one is buffered as it
    comes, like any bytes given to ``receive_data``).

    Call ``next_message`` until it returns ``NEED_DATA`` before feeding more; feeding a
    decoder that already holds a whole maximum-size frame raises ProtocolError(INTERNAL),
    so the buffer stays within one header + ``max_frame_bytes`` + one chunk. After a
    ProtocolError the decoder is failed and re-raises it.
    """

    __slots__ = (
        "_buf",
        "_eof",
        "_error",
        "_filled",
        "_limits",
        "_payload",
        "_pending",
        "_scratch",
    )

    DIRECT_MIN = 64 << 10  # payloads this large are received into their own buffer...
    DIRECT_MAX = 8 << 20  # ...up to this size (a batch: 4 MiB of data at most by default)
    SCRATCH = 64 << 10  # get_buffer's size between such payloads

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._eof = False
        self._error: ProtocolError | None = None
        self._pending: tuple[int, int, int] | None = None  # checked header: type, len, xxh3
        self._payload: bytearray | None = None  # the pending frame's own payload buffer
        self._filled = 0  # bytes of _payload received
        self._scratch: bytearray | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buf) + self._filled

    @property
    def backlog(self) -> int:
        """Bytes received and not yet consumed, beyond a large payload being received in
        place (which is bounded by its frame's length): what a reader pauses on."""
        return len(self._buf)

    def receive_data(self, data: Buffer) -> None:
        """Buffer ``data``; ``b""`` means EOF. Raises ProtocolError(INTERNAL) on misuse."""
        self._check_feed()
        if self._eof:
            if data:
                self._error = ProtocolError(ErrorCode.INTERNAL, "data received after EOF")
                raise self._error
            return
        if not data:
            self._eof = True
            return
        view = memoryview(data)
        if self._payload is not None:  # the rest of a large payload, then what follows
            n = min(len(view), len(self._payload) - self._filled)
            self._payload[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
        self._buf += view

    def get_buffer(self) -> memoryview:
        """Where the next bytes received should be written; report them with
        :meth:`buffer_updated`. Raises ProtocolError as :meth:`receive_data` does."""
        self._check_feed()
        if self._payload is not None and self._filled < len(self._payload):
            return memoryview(self._payload)[self._filled :]
        if self._scratch is None:
            self._scratch = bytearray(self.SCRATCH)
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> bool:
        """``nbytes`` were written at the start of the last :meth:`get_buffer`'s buffer.
        False while a large payload is still short of its length: ``next_message`` would
        only say ``NEED_DATA``, so a reader need not be woken for it (a 4 MiB piece
        arrives in dozens of reads)."""
        payload = self._payload
        if payload is not None and self._filled < len(payload):
            self._filled += nbytes
            return self._filled >= len(payload)
        if nbytes:
            assert self._scratch is not None
            self._buf += memoryview(self._scratch)[:nbytes]
        return True

    def _check_feed(self) -> None:
        if self._error is not None:
            raise self._error
        if self.buffered > HEADER.size + self._limits.max_frame_bytes:
            self._error = ProtocolError(
                ErrorCode.INTERNAL, "receive_data called without draining next_message"
            )
            raise self._error

    def next_message(self) -> Message | NeedData | EOF:
        """The next message, ``NEED_DATA`` or ``EOF_EVENT``.

        Raises ProtocolError: BAD_MAGIC, BAD_CHECKSUM, BAD_VERSION, BAD_MESSAGE (flags,
        truncated frame, bad payload), FRAME_TOO_LARGE, UNKNOWN_TYPE or LIMIT. A batch is
        only peeked here; its data digests are checked by ``decode_batch``.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next(self) -> Message | NeedData | EOF:
        buf = self._buf
        if self._pending is None:
            if len(buf) < HEADER.size:
                if self._eof:
                    if buf:
                        raise _bad("truncated frame")
                    return EOF_EVENT
                return NEED_DATA
            magic, version, msg_type, flags, length, payload_sum, header_sum = HEADER.unpack_from(
                buf
            )
            if magic != MAGIC:
                raise ProtocolError(ErrorCode.BAD_MAGIC, f"bad frame magic {magic!r}")
            with memoryview(buf) as view, view[: _HEADER_BODY.size] as body:
                computed = xxhash.xxh32_intdigest(body)
            if computed != header_sum:
                raise ProtocolError(ErrorCode.BAD_CHECKSUM, "frame header checksum mismatch")
            if version != PROTOCOL_VERSION:
                raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {version}")
            if flags != 0:
                raise _bad(f"unknown frame flags {flags:#x}")
            if length > self._limits.max_frame_bytes:
                raise ProtocolError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame of {length} bytes exceeds {self._limits.max_frame_bytes}",
                )
            self._pending = (msg_type, length, payload_sum)
            if self.DIRECT_MIN <= length <= self.DIRECT_MAX and len(buf) < HEADER.size + length:
                # the rest goes straight into the payload's own buffer
                payload = self._payload = bytearray(length)
                with memoryview(buf) as view, view[HEADER.size :] as have:
                    self._filled = len(have)
                    payload[: self._filled] = have
                del buf[:]
        msg_type, length, payload_sum = self._pending
        if self._payload is not None:
            if self._filled < length:
                if self._eof:
                    raise _bad("truncated frame")
                return NEED_DATA
            payload_buffer: bytes | bytearray = self._payload
            self._payload, self._filled = None, 0
        else:
            end = HEADER.size + length
            if len(buf) < end:
                if self._eof:
                    raise _bad("truncated frame")
                return NEED_DATA
            with memoryview(buf) as view, view[HEADER.size : end] as body:
                payload_buffer = bytes(body)
            del buf[:end]
        self._pending = None
        if xxhash.xxh3_64_intdigest(payload_buffer) != payload_sum:
            raise ProtocolError(ErrorCode.BAD_CHECKSUM, "frame payload checksum mismatch")
        return _decode_payload(msg_type, payload_buffer, self._limits)


# --- connection state machine -------------------------------------------------------------


class ConnState(enum.Enum):
    START = "start"
    HELLO_SENT = "hello-sent"
    HELLO_RECEIVED = "hello-received"
    READY = "ready"
    # A master target's connection (failback): the roles of the data flow are swapped, the
    # process server sends batches and the master target acknowledges them.
    HELLO_SENT_REVERSE = "hello-sent-reverse"
    HELLO_RECEIVED_REVERSE = "hello-received-reverse"
    READY_REVERSE = "ready-reverse"
    CLOSED = "closed"
    ERROR = "error"


Side: TypeAlias = Literal["client-send", "client-recv", "server-send", "server-recv"]
_S = ConnState


def _build_transitions() -> dict[tuple[ConnState, Side, type], ConnState]:
    table: dict[tuple[ConnState, Side, type], ConnState] = {
        (_S.START, "client-send", Hello): _S.HELLO_SENT,
        (_S.HELLO_SENT, "client-recv", HelloOk): _S.READY,
        (_S.START, "server-recv", Hello): _S.HELLO_RECEIVED,
        (_S.HELLO_RECEIVED, "server-send", HelloOk): _S.READY,
    }
    upstream: tuple[type, ...] = (
        Register,
        BatchMsg,
        Heartbeat,
        DigestRequest,
        VerifyResult,
        Control,
        BulkData,
    )
    downstream: tuple[type, ...] = (
        Registered,
        Ack,
        Heartbeat,
        DigestReply,
        VerifyRequest,
        Control,
    )
    for msg_cls in upstream:
        table[(_S.READY, "client-send", msg_cls)] = _S.READY
        table[(_S.READY, "server-recv", msg_cls)] = _S.READY
    for msg_cls in downstream:
        table[(_S.READY, "server-send", msg_cls)] = _S.READY
        table[(_S.READY, "client-recv", msg_cls)] = _S.READY
    table[(_S.HELLO_SENT_REVERSE, "client-recv", HelloOk)] = _S.READY_REVERSE
    table[(_S.HELLO_RECEIVED_REVERSE, "server-send", HelloOk)] = _S.READY_REVERSE
    for msg_cls in (Register, Ack, Heartbeat, Control):
        table[(_S.READY_REVERSE, "client-send", msg_cls)] = _S.READY_REVERSE
        table[(_S.READY_REVERSE, "server-recv", msg_cls)] = _S.READY_REVERSE
    for msg_cls in (Registered, BatchMsg, Heartbeat, Control):
        table[(_S.READY_REVERSE, "server-send", msg_cls)] = _S.READY_REVERSE
        table[(_S.READY_REVERSE, "client-recv", msg_cls)] = _S.READY_REVERSE
    sides: tuple[Side, ...] = ("client-send", "client-recv", "server-send", "server-recv")
    for state in (
        _S.START,
        _S.HELLO_SENT,
        _S.HELLO_RECEIVED,
        _S.READY,
        _S.HELLO_SENT_REVERSE,
        _S.HELLO_RECEIVED_REVERSE,
        _S.READY_REVERSE,
    ):
        for side in sides:
            table[(state, side, ErrorMsg)] = _S.CLOSED
    return table


_TRANSITIONS = _build_transitions()
_PER_DISK = (
    BatchMsg,
    BulkData,
    Ack,
    DigestRequest,
    DigestReply,
    VerifyRequest,
    VerifyResult,
)


class Connection:
    """One side of a replication connection (h11 style).

    ``send`` checks a message is legal for our side now and returns its frame bytes;
    ``receive_data`` buffers; ``next_event`` returns the next legal received message,
    ``NEED_DATA`` or ``EOF_EVENT`` (clean EOF closes the connection). Beyond the table,
    a ``Registered`` must answer a ``Register`` of the same disk, and ``BatchMsg``/``Ack``
    are legal only for disks registered on this connection (the client has received,
    the server has sent, ``Registered``). Any ProtocolError moves ``state`` to ERROR and
    every later call raises ProtocolError(UNEXPECTED).
    """

    def __init__(
        self, our_role: Literal["client", "server"], limits: Limits = DEFAULT_LIMITS
    ) -> None:
        if our_role not in ("client", "server"):
            raise ValueError(f"our_role must be 'client' or 'server', not {our_role!r}")
        self.our_role = our_role
        self.limits = limits
        self.state = ConnState.START
        self._decoder = FrameDecoder(limits)
        self._registering: set[str] = set()
        self._registered: set[str] = set()
        self._send_side: Side = "client-send" if our_role == "client" else "server-send"
        self._recv_side: Side = "client-recv" if our_role == "client" else "server-recv"

    @property
    def registered(self) -> frozenset[str]:
        """Disks registered on this connection."""
        return frozenset(self._registered)

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self.state = ConnState.ERROR
        return exc

    def _check_alive(self) -> None:
        if self.state is ConnState.ERROR:
            raise ProtocolError(ErrorCode.UNEXPECTED, "connection already failed")

    def _apply(self, side: Side, msg: Message) -> None:
        """Check ``msg`` against the table and the disk rules; move state. Raises UNEXPECTED."""
        new_state = _TRANSITIONS.get((self.state, side, type(msg)))
        if isinstance(msg, Hello) and msg.role == "master-target" and new_state is not None:
            new_state = (
                _S.HELLO_SENT_REVERSE if new_state is _S.HELLO_SENT else _S.HELLO_RECEIVED_REVERSE
            )
        if new_state is None:
            raise ProtocolError(
                ErrorCode.UNEXPECTED,
                f"{type(msg).__name__} not allowed ({side}) in state {self.state.name}",
            )
        if isinstance(msg, Register):
            if (
                msg.disk_id not in self._registering
                and len(self._registering) + len(self._registered) >= MAX_DISKS_PER_CONNECTION
            ):
                raise ProtocolError(ErrorCode.LIMIT, f"more than {MAX_DISKS_PER_CONNECTION} disks")
            self._registering.add(msg.disk_id)
        elif isinstance(msg, Registered):
            if msg.disk_id not in self._registering:
                raise ProtocolError(
                    ErrorCode.UNEXPECTED, f"Registered for unrequested disk {msg.disk_id!r}"
                )
            self._registering.discard(msg.disk_id)
            self._registered.add(msg.disk_id)
        elif isinstance(msg, _PER_DISK) and msg.disk_id not in self._registered:
            raise ProtocolError(
                ErrorCode.UNEXPECTED,
                f"{type(msg).__name__} for unregistered disk {msg.disk_id!r}",
            )
        self.state = new_state

    def send(self, msg: Message) -> bytes:
        """Frame bytes for ``msg``. Raises ProtocolError(UNEXPECTED) if illegal now."""
        return b"".join(self.send_parts(msg))

    def send_parts(self, msg: Message) -> list[Buffer]:
        """As :meth:`send`, as ``(header, payload)`` (no copy of a large payload)."""
        self._check_alive()
        try:
            parts = encode_message_parts(msg)
            self._apply(self._send_side, msg)
        except ProtocolError as exc:
            raise self._fail(exc) from None
        return parts

    def receive_data(self, data: Buffer) -> None:
        """Buffer bytes from the peer (``b""`` = EOF). Raises ProtocolError on misuse."""
        self._check_alive()
        try:
            self._decoder.receive_data(data)
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (see ``FrameDecoder.get_buffer``); report them
        with :meth:`buffer_updated`. Raises ProtocolError on misuse."""
        self._check_alive()
        try:
            return self._decoder.get_buffer()
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def buffer_updated(self, nbytes: int) -> bool:
        """See ``FrameDecoder.buffer_updated``: False when no message can be complete yet."""
        return self._decoder.buffer_updated(nbytes)

    @property
    def backlog(self) -> int:
        """Received bytes waiting to be parsed (``FrameDecoder.backlog``)."""
        return self._decoder.backlog

    def next_event(self) -> Message | NeedData | EOF:
        """Next legal message from the peer, ``NEED_DATA`` or ``EOF_EVENT``.

        Raises ProtocolError: any frame error, or UNEXPECTED for an illegal message.
        """
        self._check_alive()
        try:
            event = self._decoder.next_message()
            if isinstance(event, EOF):
                self.state = ConnState.CLOSED
            elif not isinstance(event, NeedData):
                self._apply(self._recv_side, event)
        except ProtocolError as exc:
            raise self._fail(exc) from None
        return event
