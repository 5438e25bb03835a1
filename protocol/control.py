"""Control exchanges carried in ``Control`` frames: recovery-point markers, consistency
barriers and the freeze of a planned failover. Pure code.

Each body is a JSON object; ``decode_control`` checks every field (types, ranges, names)
and raises ProtocolError(BAD_MESSAGE) on anything else, so handlers get typed values.

Exchanges (agent "A", process server "P"):
- ``point-mark`` A→P: a recovery point of a disk at ``seq`` (sent once the process server
  acknowledged ``seq``); P records it and answers ``point-recorded``.
- ``point-request`` P→A: take a point of ``disks`` now (manual or group). A holds writes on
  those disks and answers ``point-held`` with each disk's seq; P answers ``point-release``
  (``commit`` true: the point exists; false: dropped). A releases writes after at most
  ``hold_timeout`` whatever happens.
- ``freeze`` P→A: stop accepting writes on ``disk`` and drain; A answers ``frozen`` with the
  final seq. ``unfreeze`` P→A undoes it.
- ``bulk-begin`` A→P: an initial sync's copy of ``disk`` starts on this connection
  (``agent/bulk_copy.py``): P stops applying the disk's batches and answers ``bulk-state``.
  ``bulk-sync`` A→P: P waits until the ``BulkData`` up to ``through`` are written, makes the
  replica durable and answers ``bulk-state``; with ``end`` it also ends the copy (applying
  resumes). P also sends ``bulk-state`` unasked (request 0) as pieces are written.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from protocol.batch import validate_disk_id
from protocol.errors import ErrorCode, ProtocolError
from protocol.frames import Control

POINT_KINDS = ("crash-consistent", "app-consistent", "manual")
_POINT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_GROUP_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_TAG = 256
MAX_DISKS = 256
_U64_MAX = 2**64 - 1


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, message)


def _uint(body: dict[str, Any], key: str, maximum: int = _U64_MAX) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise _bad(f"{key} {value!r} out of range")
    return value


def _text(body: dict[str, Any], key: str, pattern: re.Pattern[str] | None = None) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_TAG:
        raise _bad(f"{key} must be a string of at most {MAX_TAG} characters")
    if value and pattern is not None and pattern.fullmatch(value) is None:
        raise _bad(f"invalid {key} {value!r}")
    if any(ord(c) < 32 for c in value):
        raise _bad(f"{key} holds control characters")
    return value


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if not isinstance(value, bool):
        raise _bad(f"{key} must be true or false")
    return value


def _kind(body: dict[str, Any]) -> str:
    kind = body.get("kind")
    if kind not in POINT_KINDS:
        raise _bad(f"unknown point kind {kind!r}")
    return str(kind)


def _seconds(body: dict[str, Any], key: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise _bad(f"{key} must be a number of seconds in (0, 3600]")
    return float(value)


@dataclass(frozen=True, slots=True)
class PointMark:
    NAME: ClassVar[str] = "point-mark"
    point_id: str
    disk: str
    seq: int
    time_ns: int
    kind: str
    tag: str = ""
    group: str = ""
    hold_ms: float = 0.0

    @classmethod
    def parse(cls, b: dict[str, Any]) -> PointMark:
        hold = b.get("hold_ms", 0.0)
        if isinstance(hold, bool) or not isinstance(hold, int | float) or not 0 <= hold < 1e9:
            raise _bad("hold_ms out of range")
        return cls(
            _text(b, "point_id", _POINT_ID_RE) or _missing("point_id"),
            validate_disk_id(b.get("disk")),  # type: ignore[arg-type]
            _uint(b, "seq"),
            _uint(b, "time_ns"),
            _kind(b),
            _text(b, "tag"),
            _text(b, "group", _GROUP_RE),
            float(hold),
        )


@dataclass(frozen=True, slots=True)
class PointRecorded:
    NAME: ClassVar[str] = "point-recorded"
    point_id: str
    disk: str

    @classmethod
    def parse(cls, b: dict[str, Any]) -> PointRecorded:
        return cls(
            _text(b, "point_id", _POINT_ID_RE) or _missing("point_id"),
            validate_disk_id(b.get("disk")),  # type: ignore[arg-type]
        )


@dataclass(frozen=True, slots=True)
class PointRequest:
    NAME: ClassVar[str] = "point-request"
    point_id: str
    disks: tuple[str, ...]
    kind: str
    tag: str = ""
    group: str = ""
    hold_timeout: float = 5.0

    @classmethod
    def parse(cls, b: dict[str, Any]) -> PointRequest:
        disks = b.get("disks")
        if not isinstance(disks, list) or not 0 < len(disks) <= MAX_DISKS:
            raise _bad(f"disks must be a list of 1..{MAX_DISKS} disk ids")
        return cls(
            _text(b, "point_id", _POINT_ID_RE) or _missing("point_id"),
            tuple(validate_disk_id(d) for d in disks),
            _kind(b),
            _text(b, "tag"),
            _text(b, "group", _GROUP_RE),
            _seconds(b, "hold_timeout"),
        )


@dataclass(frozen=True, slots=True)
class PointHeld:
    NAME: ClassVar[str] = "point-held"
    ok: bool
    seqs: dict[str, int] = field(default_factory=dict)
    error: str = ""

    @classmethod
    def parse(cls, b: dict[str, Any]) -> PointHeld:
        seqs = b.get("seqs", {})
        if not isinstance(seqs, dict) or len(seqs) > MAX_DISKS:
            raise _bad(f"seqs must be an object of at most {MAX_DISKS} disks")
        checked = {validate_disk_id(d): _uint(seqs, d) for d in seqs}
        return cls(_bool(b, "ok"), checked, _text(b, "error"))


@dataclass(frozen=True, slots=True)
class PointRelease:
    """``time_ns``: the point's time, the same for every member of a group."""

    NAME: ClassVar[str] = "point-release"
    point_id: str
    commit: bool
    time_ns: int = 0

    @classmethod
    def parse(cls, b: dict[str, Any]) -> PointRelease:
        return cls(
            _text(b, "point_id", _POINT_ID_RE) or _missing("point_id"),
            _bool(b, "commit"),
            _uint(b, "time_ns"),
        )


@dataclass(frozen=True, slots=True)
class Freeze:
    NAME: ClassVar[str] = "freeze"
    disk: str
    drain_timeout: float = 60.0

    @classmethod
    def parse(cls, b: dict[str, Any]) -> Freeze:
        return cls(
            validate_disk_id(b.get("disk")),  # type: ignore[arg-type]
            _seconds(b, "drain_timeout"),
        )


@dataclass(frozen=True, slots=True)
class Frozen:
    NAME: ClassVar[str] = "frozen"
    disk: str
    ok: bool
    seq: int = 0
    error: str = ""

    @classmethod
    def parse(cls, b: dict[str, Any]) -> Frozen:
        return cls(
            validate_disk_id(b.get("disk")),  # type: ignore[arg-type]
            _bool(b, "ok"),
            _uint(b, "seq"),
            _text(b, "error"),
        )


@dataclass(frozen=True, slots=True)
class Unfreeze:
    NAME: ClassVar[str] = "unfreeze"
    disk: str

    @classmethod
    def parse(cls, b: dict[str, Any]) -> Unfreeze:
        return cls(validate_disk_id(b.get("disk")))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class BulkBegin:
    NAME: ClassVar[str] = "bulk-begin"
    disk: str

    @classmethod
    def parse(cls, b: dict[str, Any]) -> BulkBegin:
        return cls(validate_disk_id(b.get("disk")))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class BulkSync:
    NAME: ClassVar[str] = "bulk-sync"
    disk: str
    through: int
    end: bool = False

    @classmethod
    def parse(cls, b: dict[str, Any]) -> BulkSync:
        return cls(
            validate_disk_id(b.get("disk")),  # type: ignore[arg-type]
            _uint(b, "through"),
            _bool(b, "end"),
        )


@dataclass(frozen=True, slots=True)
class BulkState:
    """``active``: the copy goes on (pieces are written); ``written``: every piece up to it is
    in the replica; ``synced``: ... and durable; ``error``: why the copy is not (or no
    longer) active."""

    NAME: ClassVar[str] = "bulk-state"
    disk: str
    active: bool
    written: int = 0
    synced: int = 0
    error: str = ""

    @classmethod
    def parse(cls, b: dict[str, Any]) -> BulkState:
        return cls(
            validate_disk_id(b.get("disk")),  # type: ignore[arg-type]
            _bool(b, "active"),
            _uint(b, "written"),
            _uint(b, "synced"),
            _text(b, "error"),
        )


MAX_RANGES = 2048  # per failback-ranges message (send several)
MAX_DIGEST_HEX = 48 << 10


def _ranges(b: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    raw = b.get("ranges")
    if not isinstance(raw, list) or len(raw) > MAX_RANGES:
        raise _bad(f"ranges must be a list of at most {MAX_RANGES} [offset, length] pairs")
    out = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 2:
            raise _bad("a range is [offset, length]")
        offset, length = item
        for v in (offset, length):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _U64_MAX:
                raise _bad(f"range value {v!r} out of range")
        if length == 0:
            raise _bad("empty range")
        out.append((offset, length))
    return tuple(out)


def _hex(b: dict[str, Any], key: str) -> bytes:
    value = b.get(key)
    if not isinstance(value, str) or len(value) > MAX_DIGEST_HEX or len(value) % 32:
        raise _bad(f"{key} must be hex XXH3-128 digests")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise _bad(f"{key} is not hex") from None


def _chunk(b: dict[str, Any]) -> int:
    chunk = _uint(b, "chunk", 1 << 30)
    if chunk < 4096 or chunk % 4096:
        raise _bad("chunk must be a multiple of 4096")
    return chunk


@dataclass(frozen=True, slots=True)
class FailbackRanges:
    """Master target → process server, before registering a disk for failback: what the source
    wrote that the failover point may not hold (from the agent's journal and bitmap).
    ``full_compare``: the source's state is gone, compare by digests; ``alternate``: the target
    is a new disk, send everything."""

    NAME: ClassVar[str] = "failback-ranges"
    disk: str
    ranges: tuple[tuple[int, int], ...] = ()
    full_compare: bool = False
    alternate: bool = False
    last: bool = True

    @classmethod
    def parse(cls, b: dict[str, Any]) -> FailbackRanges:
        return cls(
            validate_disk_id(b.get("disk")),  # type: ignore[arg-type]
            _ranges(b),
            _bool(b, "full_compare"),
            _bool(b, "alternate"),
            _bool(b, "last"),
        )


@dataclass(frozen=True, slots=True)
class FailbackDigests:
    """Digests of the source disk's chunks from ``offset`` on (master target → process server),
    for the digest fallback and for the final verification of a planned failback."""

    NAME: ClassVar[str] = "failback-digests"
    disk: str
    offset: int
    chunk: int
    digests: str
    last: bool = True

    @classmethod
    def parse(cls, b: dict[str, Any]) -> FailbackDigests:
        digests = _hex(b, "digests")
        return cls(
            validate_disk_id(b.get("disk")),  # type: ignore[arg-type]
            _uint(b, "offset"),
            _chunk(b),
            digests.hex(),
            _bool(b, "last"),
        )


@dataclass(frozen=True, slots=True)
class FailbackVerify:
    """Process server → master target: send the source's digests with this chunk size."""

    NAME: ClassVar[str] = "failback-verify"
    disk: str
    chunk: int

    @classmethod
    def parse(cls, b: dict[str, Any]) -> FailbackVerify:
        return cls(validate_disk_id(b.get("disk")), _chunk(b))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class FailbackDone:
    """Process server → master target: the source equals the DR disk; the agent's journal
    restarts at ``next_seq`` and forward protection resumes."""

    NAME: ClassVar[str] = "failback-done"
    disk: str
    next_seq: int

    @classmethod
    def parse(cls, b: dict[str, Any]) -> FailbackDone:
        return cls(validate_disk_id(b.get("disk")), _uint(b, "next_seq"))  # type: ignore[arg-type]


def _missing(key: str) -> str:
    raise _bad(f"{key} is missing")


ControlBody = (
    PointMark
    | PointRecorded
    | PointRequest
    | PointHeld
    | PointRelease
    | Freeze
    | Frozen
    | Unfreeze
    | FailbackRanges
    | FailbackDigests
    | FailbackVerify
    | FailbackDone
    | BulkBegin
    | BulkSync
    | BulkState
)
_TYPES: dict[str, Any] = {
    cls.NAME: cls
    for cls in (
        PointMark,
        PointRecorded,
        PointRequest,
        PointHeld,
        PointRelease,
        Freeze,
        Frozen,
        Unfreeze,
        FailbackRanges,
        FailbackDigests,
        FailbackVerify,
        FailbackDone,
        BulkBegin,
        BulkSync,
        BulkState,
    )
}


def encode_control(body: ControlBody, request_id: int = 0) -> Control:
    """The ``Control`` frame carrying ``body`` (validated as the receiver will)."""
    data = asdict(body)
    if "disks" in data:
        data["disks"] = list(data["disks"])
    if "ranges" in data:
        data["ranges"] = [list(r) for r in data["ranges"]]
    text = json.dumps(data, separators=(",", ":"))
    decode_control(Control(body.NAME, request_id, text))  # what we send, we could receive
    return Control(body.NAME, request_id, text)


def decode_control(msg: Control) -> ControlBody:
    """Typed body of a ``Control`` frame. Raises ProtocolError(BAD_MESSAGE / UNKNOWN_TYPE)."""
    cls = _TYPES.get(msg.name)
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown control {msg.name!r}")
    try:
        body = json.loads(msg.body)
    except (ValueError, RecursionError):
        raise _bad(f"control {msg.name}: body is not JSON") from None
    if not isinstance(body, dict):
        raise _bad(f"control {msg.name}: body is not an object")
    try:
        return cls.parse(body)  # type: ignore[no-any-return]
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise _bad(f"control {msg.name}: {exc}") from None


__all__ = [
    "POINT_KINDS",
    "BulkBegin",
    "BulkState",
    "BulkSync",
    "ControlBody",
    "FailbackDigests",
    "FailbackDone",
    "FailbackRanges",
    "FailbackVerify",
    "Freeze",
    "Frozen",
    "PointHeld",
    "PointMark",
    "PointRecorded",
    "PointRelease",
    "PointRequest",
    "Unfreeze",
    "decode_control",
    "encode_control",
]
