"""NBD wire format, server side, sans-I/O: the fixed-newstyle handshake and transmission requests.

The rule this module keeps: it decides everything about bytes and nothing about I/O. The
handshake is a state machine fed bytes (``receive_data``) that yields typed events
(``next_event``) and the bytes to send (``data_to_send``); the transmission side is a header
parser (``parse_request``) and reply encoders. Any input is hostile: whatever the bytes, the only
exception raised is :class:`NbdProtocolError`, which says whether to drop the connection or to
answer with an NBD errno. No asyncio, no sockets, no clock. Reference: NBD ``doc/proto.md``.
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from common.errors import TidemarkError

# --- magics -------------------------------------------------------------------------------------
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# --- handshake flags (server, 16 bits) and client flags (32 bits) --------------------------------
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1

# --- transmission flags (16 bits) ----------------------------------------------------------------
FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_ROTATIONAL: Final = 1 << 4
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_SEND_DF: Final = 1 << 7
FLAG_CAN_MULTI_CONN: Final = 1 << 8
FLAG_SEND_RESIZE: Final = 1 << 9
FLAG_SEND_CACHE: Final = 1 << 10
FLAG_SEND_FAST_ZERO: Final = 1 << 11

# --- options -------------------------------------------------------------------------------------
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_PEEK_EXPORT: Final = 4
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10
OPT_EXTENDED_HEADERS: Final = 11

# --- option replies ------------------------------------------------------------------------------
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
_REP_ERR: Final = 1 << 31
REP_ERR_UNSUP: Final = _REP_ERR + 1
REP_ERR_POLICY: Final = _REP_ERR + 2
REP_ERR_INVALID: Final = _REP_ERR + 3
REP_ERR_PLATFORM: Final = _REP_ERR + 4
REP_ERR_TLS_REQD: Final = _REP_ERR + 5
REP_ERR_UNKNOWN: Final = _REP_ERR + 6
REP_ERR_SHUTDOWN: Final = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD: Final = _REP_ERR + 8
REP_ERR_TOO_BIG: Final = _REP_ERR + 9

# --- NBD_REP_INFO types --------------------------------------------------------------------------
INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# --- commands and command flags ------------------------------------------------------------------
CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7

CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

# --- structured replies --------------------------------------------------------------------------
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_ERROR: Final = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) + 2

# --- NBD error numbers (the wire values, not the host's errno) ------------------------------------
NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108

# --- limits --------------------------------------------------------------------------------------
MAX_STRING: Final = 4096  # the spec's limit on export names and other strings
MAX_PAYLOAD: Final = 32 * 2**20  # largest READ/WRITE we accept (advertised as the max block size)
PREFERRED_BLOCK_SIZE: Final = 4096
MAX_OPTION_LENGTH: Final = MAX_STRING + 4096  # an option's data: a name plus info/query lists
MAX_OPTIONS: Final = 32  # options a client may send before GO / EXPORT_NAME
EXPORT_NAME_PAD: Final = 124  # zero bytes after NBD_OPT_EXPORT_NAME's reply, unless NO_ZEROES

REQUEST_SIZE: Final = 28
SIMPLE_REPLY_SIZE: Final = 16

_GREETING = struct.Struct(">QQH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_INFO = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_HEADER = struct.Struct(">IHHQI")
_OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")  # chunk header + the data's offset
_ERROR_PAYLOAD = struct.Struct(">IH")

_ERRNO_TO_NBD: Final[dict[int, int]] = {
    _errno.EPERM: NBD_EPERM,
    _errno.EROFS: NBD_EPERM,
    _errno.EACCES: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.ENOMEM: NBD_ENOMEM,
    _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC,
    _errno.EDQUOT: NBD_ENOSPC,
    _errno.EFBIG: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.ENOTSUP: NBD_ENOTSUP,
    _errno.EOPNOTSUPP: NBD_ENOTSUP,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}

_ERROR_TEXT: Final[dict[int, str]] = {
    NBD_EPERM: "Operation not permitted",
    NBD_EIO: "Input/output error",
    NBD_ENOMEM: "Cannot allocate memory",
    NBD_EINVAL: "Invalid argument",
    NBD_ENOSPC: "No space left on device",
    NBD_EOVERFLOW: "Value too large",
    NBD_ENOTSUP: "Operation not supported",
    NBD_ESHUTDOWN: "Server is shutting down",
}


def nbd_errno(py_errno: int) -> int:
    """Map a host (Python) errno to the NBD wire error; anything unlisted becomes EIO."""
    return _ERRNO_TO_NBD.get(py_errno, NBD_EIO)


class NbdProtocolError(TidemarkError):
    """The peer broke the protocol.

    ``errno is None`` means drop the connection (nothing sensible can be answered). Otherwise
    the request gets an error reply carrying ``errno`` (an NBD wire value) for ``handle``, after
    the shell discarded ``discard`` payload bytes (a rejected WRITE's data), and the connection
    stays usable. ``command`` says whether the reply must be structured (READ).
    """

    def __init__(
        self,
        message: str,
        *,
        errno: int | None = None,
        handle: int = 0,
        command: int = -1,
        discard: int = 0,
    ) -> None:
        super().__init__(message)
        self.errno = errno
        self.handle = handle
        self.command = command
        self.discard = discard

    @property
    def drop(self) -> bool:
        """True when the only answer is closing the connection."""
        return self.errno is None


# --- handshake -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake advertises about the one export a server offers."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    max_payload: int = MAX_PAYLOAD

    @property
    def transmission_flags(self) -> int:
        """The flags sent in NBD_INFO_EXPORT / the EXPORT_NAME reply: only what is true."""
        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN
        if self.read_only:
            flags |= FLAG_READ_ONLY
        else:
            flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
        return flags


class NeedData:
    """Returned by ``next_event`` when more bytes are needed (see ``bytes_wanted``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class OptionReplied:
    """An option was answered; ``reply`` is the final reply type sent (REP_ACK or an error)."""

    option: int
    reply: int


@dataclass(frozen=True, slots=True)
class Ready:
    """GO or EXPORT_NAME succeeded: the transmission phase starts after the bytes to send."""

    export_name: str
    size: int
    transmission_flags: int
    structured_replies: bool


@dataclass(frozen=True, slots=True)
class Aborted:
    """The client sent NBD_OPT_ABORT (answered with REP_ACK); close after sending."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The client closed the connection cleanly between two messages."""


HandshakeEvent = OptionReplied | Ready | Aborted | Closed


class _State(Enum):
    CLIENT_FLAGS = auto()
    OPTION_HEADER = auto()
    OPTION_DATA = auto()
    DONE = auto()
    ERROR = auto()


class _In(Enum):
    FLAGS = auto()
    HEADER = auto()
    OPTION = auto()  # an option handled, haggling goes on
    ENTER = auto()  # GO / EXPORT_NAME succeeded
    ABORT = auto()
    EOF = auto()


_TRANSITIONS: Final[dict[tuple[_State, _In], _State]] = {
    (_State.CLIENT_FLAGS, _In.FLAGS): _State.OPTION_HEADER,
    (_State.CLIENT_FLAGS, _In.EOF): _State.DONE,
    (_State.OPTION_HEADER, _In.HEADER): _State.OPTION_DATA,
    (_State.OPTION_HEADER, _In.EOF): _State.DONE,
    (_State.OPTION_DATA, _In.OPTION): _State.OPTION_HEADER,
    (_State.OPTION_DATA, _In.ENTER): _State.DONE,
    (_State.OPTION_DATA, _In.ABORT): _State.DONE,
}


class ServerHandshake:
    """Server side of the fixed-newstyle handshake for one export.

    The export answers to ``export.name`` and to the default (empty) name. ``data_to_send()``
    starts with the server greeting. Feed bytes with ``receive_data`` (``b""`` is EOF), then
    call ``next_event`` until it returns ``NEED_DATA``; after ``Ready`` the bytes past the
    handshake are in ``trailing_data``.

    Raises :class:`NbdProtocolError` (always ``drop``) on bad magic, unknown client flags, an
    option longer than ``max_option_length``, more than ``max_options`` options, an unknown
    name in EXPORT_NAME, or EOF in the middle of a message.
    """

    def __init__(
        self,
        export: ExportInfo,
        *,
        max_options: int = MAX_OPTIONS,
        max_option_length: int = MAX_OPTION_LENGTH,
    ) -> None:
        self._export = export
        self._names = {b"", export.name.encode()}
        self._max_options = max_options
        self._max_option_length = max_option_length
        self._state = _State.CLIENT_FLAGS
        self._buf = bytearray()
        self._eof = False
        self._out = bytearray(
            _GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        )
        self._fixed = False
        self._no_zeroes = False
        self._structured = False
        self._options = 0
        self._option = 0
        self._option_length = 0

    # -- feeding and draining --

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; ``b""`` means the client closed its side."""
        if data:
            if self._eof:
                raise NbdProtocolError("data after EOF")
            self._buf += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        """Bytes to write to the client now (the greeting first, then option replies)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes the next message needs (0 once the handshake is over)."""
        if self._state is _State.CLIENT_FLAGS:
            need = 4
        elif self._state is _State.OPTION_HEADER:
            need = _OPTION_HEADER.size
        elif self._state is _State.OPTION_DATA:
            need = self._option_length
        else:
            return 0
        return max(need - len(self._buf), 1 if need else 0)

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the end of the handshake (only meaningful after ``Ready``)."""
        return bytes(self._buf) if self._state is _State.DONE else b""

    @property
    def structured_replies(self) -> bool:
        return self._structured

    # -- the state machine --

    def _move(self, event: _In) -> None:
        try:
            self._state = _TRANSITIONS[(self._state, event)]
        except KeyError:
            bad = self._state
            self._state = _State.ERROR
            raise NbdProtocolError(
                f"unexpected {event.name} in handshake state {bad.name}"
            ) from None

    def _fail(self, message: str) -> NbdProtocolError:
        self._state = _State.ERROR
        return NbdProtocolError(message)

    def next_event(self) -> HandshakeEvent | NeedData:
        """The next event, or ``NEED_DATA``. Raises NbdProtocolError (drop)."""
        if self._state is _State.ERROR:
            raise NbdProtocolError("handshake already failed")
        if self._state is _State.DONE:
            return NEED_DATA
        if self._state is _State.CLIENT_FLAGS:
            if len(self._buf) < 4:
                return self._need_or_eof()
            (flags,) = _U32.unpack_from(self._buf)
            del self._buf[:4]
            if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                raise self._fail(f"unknown client flags 0x{flags:08x}")
            self._fixed = bool(flags & FLAG_C_FIXED_NEWSTYLE)
            self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
            self._move(_In.FLAGS)
        if self._state is _State.OPTION_HEADER:
            if len(self._buf) < _OPTION_HEADER.size:
                return self._need_or_eof()
            magic, option, length = _OPTION_HEADER.unpack_from(self._buf)
            del self._buf[: _OPTION_HEADER.size]
            if magic != IHAVEOPT:
                raise self._fail(f"bad option magic 0x{magic:016x}")
            self._options += 1
            if self._options > self._max_options:
                raise self._fail(f"more than {self._max_options} options")
            if length > self._max_option_length:
                raise self._fail(f"option {option} data of {length} bytes is too long")
            if not self._fixed and option != OPT_EXPORT_NAME:
                raise self._fail(f"option {option} from a client without fixed newstyle")
            self._option, self._option_length = option, length
            self._move(_In.HEADER)
        # _State.OPTION_DATA
        length = self._option_length
        if len(self._buf) < length:
            if self._eof:
                raise self._fail("EOF inside an option")
            return NEED_DATA
        data = bytes(self._buf[:length])
        del self._buf[:length]
        return self._handle_option(self._option, data)

    def _need_or_eof(self) -> NeedData | Closed:
        if not self._eof:
            return NEED_DATA
        if self._buf:
            raise self._fail("EOF inside a handshake message")
        self._move(_In.EOF)
        return Closed()

    # -- options --

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    def _error(self, option: int, reply: int, message: str) -> OptionReplied:
        self._reply(option, reply, message.encode())
        self._move(_In.OPTION)
        return OptionReplied(option, reply)

    def _ack(self, option: int) -> OptionReplied:
        self._reply(option, REP_ACK)
        self._move(_In.OPTION)
        return OptionReplied(option, REP_ACK)

    def _ready(self) -> Ready:
        self._move(_In.ENTER)
        e = self._export
        return Ready(e.name, e.size, e.transmission_flags, self._structured)

    def _handle_option(self, option: int, data: bytes) -> HandshakeEvent:
        if option == OPT_EXPORT_NAME:
            if data not in self._names:
                raise self._fail("NBD_OPT_EXPORT_NAME for an unknown export")
            self._out += _EXPORT_INFO.pack(self._export.size, self._export.transmission_flags)
            if not self._no_zeroes:
                self._out += bytes(EXPORT_NAME_PAD)
            return self._ready()
        if option == OPT_ABORT:
            self._reply(option, REP_ACK)
            self._move(_In.ABORT)
            return Aborted()
        if option == OPT_LIST:
            if data:
                return self._error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            name = self._export.name.encode()
            self._reply(option, REP_SERVER, _U32.pack(len(name)) + name)
            return self._ack(option)
        if option in (OPT_INFO, OPT_GO):
            return self._info_or_go(option, data)
        if option == OPT_STRUCTURED_REPLY:
            if data:
                return self._error(
                    option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data"
                )
            self._structured = True
            return self._ack(option)
        if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            return self._meta_context(option, data)
        return self._error(option, REP_ERR_UNSUP, f"option {option} is not supported")

    def _info_or_go(self, option: int, data: bytes) -> HandshakeEvent:
        if len(data) < 6:
            return self._error(option, REP_ERR_INVALID, "option data too short")
        (name_len,) = _U32.unpack_from(data)
        if name_len > MAX_STRING or 4 + name_len + 2 > len(data):
            return self._error(option, REP_ERR_INVALID, "bad export name length")
        name = data[4 : 4 + name_len]
        (n_info,) = _U16.unpack_from(data, 4 + name_len)
        if 4 + name_len + 2 + 2 * n_info != len(data):
            return self._error(option, REP_ERR_INVALID, "bad information request count")
        if name not in self._names:
            return self._error(option, REP_ERR_UNKNOWN, "no such export")
        wanted = {_U16.unpack_from(data, 6 + name_len + 2 * i)[0] for i in range(n_info)}
        e = self._export
        self._reply(option, REP_INFO, _INFO_EXPORT.pack(INFO_EXPORT, e.size, e.transmission_flags))
        if INFO_NAME in wanted:
            self._reply(option, REP_INFO, _U16.pack(INFO_NAME) + e.name.encode())
        if INFO_DESCRIPTION in wanted and e.description:
            desc = e.description.encode()[:MAX_STRING]
            self._reply(option, REP_INFO, _U16.pack(INFO_DESCRIPTION) + desc)
        if INFO_BLOCK_SIZE in wanted:
            block = _INFO_BLOCK_SIZE.pack(INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK_SIZE, e.max_payload)
            self._reply(option, REP_INFO, block)
        if option == OPT_INFO:
            return self._ack(option)
        self._reply(option, REP_ACK)
        return self._ready()

    def _meta_context(self, option: int, data: bytes) -> OptionReplied:
        # We offer no metadata context (no base:allocation): a well-formed query gets zero
        # contexts and an ACK, so clients fall back to "everything is data".
        if not self._structured:
            return self._error(option, REP_ERR_INVALID, "negotiate structured replies first")
        if len(data) < 8:
            return self._error(option, REP_ERR_INVALID, "option data too short")
        (name_len,) = _U32.unpack_from(data)
        pos = 4 + name_len
        if name_len > MAX_STRING or pos + 4 > len(data):
            return self._error(option, REP_ERR_INVALID, "bad export name length")
        name = data[4:pos]
        (n_queries,) = _U32.unpack_from(data, pos)
        pos += 4
        for _ in range(n_queries):
            if pos + 4 > len(data):
                return self._error(option, REP_ERR_INVALID, "truncated query list")
            (q_len,) = _U32.unpack_from(data, pos)
            pos += 4 + q_len
            if pos > len(data):
                return self._error(option, REP_ERR_INVALID, "truncated query")
        if pos != len(data):
            return self._error(option, REP_ERR_INVALID, "trailing bytes after the queries")
        if name not in self._names:
            return self._error(option, REP_ERR_UNKNOWN, "no such export")
        return self._ack(option)


# --- transmission --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One validated transmission request (a WRITE's payload follows it on the wire)."""

    command: int
    flags: int
    handle: int
    offset: int
    length: int

    @property
    def fua(self) -> bool:
        return bool(self.flags & CMD_FLAG_FUA)

    @property
    def no_hole(self) -> bool:
        return bool(self.flags & CMD_FLAG_NO_HOLE)


_SUPPORTED_COMMANDS: Final = frozenset(
    {CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES}
)
_ALLOWED_FLAGS: Final[dict[int, int]] = {
    CMD_READ: CMD_FLAG_FUA,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
}


def parse_request(
    header: bytes, *, size: int, read_only: bool, max_payload: int = MAX_PAYLOAD
) -> Request:
    """Parse and validate one 28-byte request header against an export of ``size`` bytes.

    Raises NbdProtocolError: ``drop`` for a wrong length or magic, or a WRITE announcing more
    than ``max_payload`` bytes (its payload cannot be skipped without reading it); otherwise an
    errno for an unknown command or flag (EINVAL), length 0 or a READ over ``max_payload``
    (EINVAL), a change to a read-only export (EPERM), a range past the end (ENOSPC for WRITE
    and WRITE_ZEROES, EINVAL otherwise), with ``discard`` set to a rejected WRITE's length.
    DISC is returned as a Request whatever its other fields.
    """
    if len(header) != REQUEST_SIZE:
        raise NbdProtocolError(f"request header of {len(header)} bytes")
    magic, flags, command, handle, offset, length = _REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise NbdProtocolError(f"bad request magic 0x{magic:08x}")
    if command == CMD_WRITE and length > max_payload:
        raise NbdProtocolError(f"write of {length} bytes exceeds the {max_payload}-byte maximum")
    request = Request(command, flags, handle, offset, length)
    if command == CMD_DISC:
        return request
    discard = length if command == CMD_WRITE else 0
    error: int
    if command not in _SUPPORTED_COMMANDS:
        error, why = NBD_EINVAL, f"unsupported command {command}"
    elif flags & ~_ALLOWED_FLAGS[command]:
        error, why = NBD_EINVAL, f"unsupported flags 0x{flags:04x} for command {command}"
    elif command == CMD_FLUSH:
        if offset == 0 and length == 0:
            return request
        error, why = NBD_EINVAL, "flush with a nonzero offset or length"
    elif length == 0:
        error, why = NBD_EINVAL, "zero-length request"
    elif command == CMD_READ and length > max_payload:
        error, why = NBD_EINVAL, f"read of {length} bytes exceeds the {max_payload}-byte maximum"
    elif command != CMD_READ and read_only:
        error, why = NBD_EPERM, "export is read-only"
    elif offset + length > size:
        past_end = NBD_ENOSPC if command in (CMD_WRITE, CMD_WRITE_ZEROES) else NBD_EINVAL
        error, why = past_end, f"range {offset}+{length} is past the end ({size})"
    else:
        return request
    raise NbdProtocolError(why, errno=error, handle=handle, command=command, discard=discard)


def queued_write_ranges(
    buffer: bytes | bytearray | memoryview, size: int, limit: int = 64
) -> list[tuple[int, int]]:
    """``(offset, length)`` of the WRITE requests queued whole or in part in ``buffer`` (a
    pipelining client's requests received but not yet read), at most ``limit``, only those
    within ``[0, size)``. A hint for what is about to be written (the agent activates their
    activity-log extents together); it stops at the first thing that is not a request header
    and never raises, whatever the bytes."""
    view = memoryview(buffer)
    out: list[tuple[int, int]] = []
    pos = 0
    while pos + REQUEST_SIZE <= len(view) and len(out) < limit:
        magic, _, command, _, offset, length = _REQUEST.unpack_from(view, pos)
        if magic != REQUEST_MAGIC:
            break
        pos += REQUEST_SIZE
        if command == CMD_WRITE:
            if length > 0 and offset + length <= size:
                out.append((offset, length))
            pos += length
    return out


def encode_request(request: Request) -> bytes:
    """The 28-byte header of ``request`` (for clients and tests)."""
    r = request
    return _REQUEST.pack(REQUEST_MAGIC, r.flags, r.command, r.handle, r.offset, r.length)


def simple_reply(handle: int, error: int = 0) -> bytes:
    """A 16-byte simple reply header (a successful READ's data follows it)."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def read_chunk_header(handle: int, offset: int, data_length: int) -> bytes:
    """Header of a final NBD_REPLY_TYPE_OFFSET_DATA chunk; ``data_length`` bytes follow it."""
    return _OFFSET_DATA_HEADER.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        8 + data_length,
        offset,
    )


def done_chunk(handle: int) -> bytes:
    """A final NBD_REPLY_TYPE_NONE chunk (success without data)."""
    return _CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)


def error_chunk(handle: int, error: int, message: str = "", offset: int | None = None) -> bytes:
    """A final NBD_REPLY_TYPE_ERROR chunk, or ERROR_OFFSET when ``offset`` is given."""
    text = message.encode()[:MAX_STRING]
    payload = _ERROR_PAYLOAD.pack(error, len(text)) + text
    kind = REPLY_TYPE_ERROR
    if offset is not None:
        payload += struct.pack(">Q", offset)
        kind = REPLY_TYPE_ERROR_OFFSET
    head = _CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, kind, handle, len(payload))
    return head + payload


def error_reply(
    command: int, handle: int, error: int, *, structured: bool, message: str = ""
) -> bytes:
    """The error reply for a request: an error chunk when structured replies are on, else a
    simple reply (the spec forbids simple replies to READ once structured replies are on)."""
    if structured:
        return error_chunk(handle, error, message or _ERROR_TEXT.get(error, ""))
    return simple_reply(handle, error)


def error_text(error: int) -> str:
    """A human-readable name for an NBD wire error."""
    return _ERROR_TEXT.get(error, f"error {error}")
