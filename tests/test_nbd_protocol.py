"""Pure tests of protocol/nbd.py: handshake fixtures (whole, byte by byte, with trailing data),
every option, the request parser and reply encoders, and Hypothesis fuzzing that garbage only
ever yields NbdProtocolError or NEED_DATA."""

from __future__ import annotations

import contextlib
import errno
import itertools
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import nbd

EXPORT = nbd.ExportInfo(name="disk-1", size=1 << 20, description="test disk")
RO_EXPORT = nbd.ExportInfo(name="disk-1", size=1 << 20, read_only=True)
CLIENT_FLAGS = struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
RW_FLAGS = (
    nbd.FLAG_HAS_FLAGS
    | nbd.FLAG_SEND_FLUSH
    | nbd.FLAG_SEND_FUA
    | nbd.FLAG_SEND_TRIM
    | nbd.FLAG_SEND_WRITE_ZEROES
    | nbd.FLAG_CAN_MULTI_CONN
)


# -- client-side helpers ---------------------------------------------------------------------------


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data


def go_data(name: bytes = b"disk-1", infos: tuple[int, ...] = ()) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_data(name: bytes = b"disk-1", queries: tuple[bytes, ...] = (b"base:allocation",)) -> bytes:
    body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return body + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def parse_replies(buf: bytes) -> list[tuple[int, int, bytes]]:
    """Option replies as (option, reply type, data); asserts the buffer holds only replies."""
    out = []
    pos = 0
    while pos < len(buf):
        magic, option, reply, length = struct.unpack_from(">QIII", buf, pos)
        assert magic == nbd.OPTION_REPLY_MAGIC
        pos += 20
        out.append((option, reply, buf[pos : pos + length]))
        pos += length
    assert pos == len(buf)
    return out


def run(hs: nbd.ServerHandshake, data: bytes, *, bytewise: bool = False) -> list[object]:
    """Feed ``data`` (whole or one byte at a time) and collect events until NEED_DATA."""
    events: list[object] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        hs.receive_data(chunk)
        while (ev := hs.next_event()) is not nbd.NEED_DATA:
            events.append(ev)
    return events


@pytest.fixture(params=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "bytewise")


def fresh(export: nbd.ExportInfo = EXPORT) -> nbd.ServerHandshake:
    hs = nbd.ServerHandshake(export)
    greeting = hs.data_to_send()
    assert greeting == struct.pack(
        ">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
    )
    return hs


# -- handshake ------------------------------------------------------------------------------------


def test_go_with_every_info(bytewise: bool) -> None:
    hs = fresh()
    infos = (nbd.INFO_NAME, nbd.INFO_DESCRIPTION, nbd.INFO_BLOCK_SIZE, 77)
    events = run(hs, CLIENT_FLAGS + opt(nbd.OPT_GO, go_data(infos=infos)), bytewise=bytewise)
    assert events == [nbd.Ready("disk-1", 1 << 20, RW_FLAGS, False)]
    replies = parse_replies(hs.data_to_send())
    assert [r[1] for r in replies] == [nbd.REP_INFO] * 4 + [nbd.REP_ACK]
    assert replies[0][2] == struct.pack(">HQH", nbd.INFO_EXPORT, 1 << 20, RW_FLAGS)
    assert replies[1][2] == struct.pack(">H", nbd.INFO_NAME) + b"disk-1"
    assert replies[2][2] == struct.pack(">H", nbd.INFO_DESCRIPTION) + b"test disk"
    assert replies[3][2] == struct.pack(">HIII", nbd.INFO_BLOCK_SIZE, 1, 4096, 32 * 2**20)
    assert hs.bytes_wanted == 0


def test_go_default_name_and_trailing_data(bytewise: bool) -> None:
    hs = fresh()
    trailing = b"\x25\x60\x95\x13rest-of-a-request"
    data = CLIENT_FLAGS + opt(nbd.OPT_GO, go_data(b"")) + trailing
    events = run(hs, data, bytewise=bytewise)
    assert events == [nbd.Ready("disk-1", 1 << 20, RW_FLAGS, False)]
    assert hs.trailing_data == trailing
    # Only INFO_EXPORT when nothing else was asked for.
    assert [r[1] for r in parse_replies(hs.data_to_send())] == [nbd.REP_INFO, nbd.REP_ACK]


def test_structured_then_go(bytewise: bool) -> None:
    hs = fresh()
    data = CLIENT_FLAGS + opt(nbd.OPT_STRUCTURED_REPLY) + opt(nbd.OPT_GO, go_data())
    events = run(hs, data, bytewise=bytewise)
    assert events == [
        nbd.OptionReplied(nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK),
        nbd.Ready("disk-1", 1 << 20, RW_FLAGS, True),
    ]
    assert hs.structured_replies


def test_structured_reply_with_data_is_invalid() -> None:
    hs = fresh()
    events = run(hs, CLIENT_FLAGS + opt(nbd.OPT_STRUCTURED_REPLY, b"x"))
    assert events == [nbd.OptionReplied(nbd.OPT_STRUCTURED_REPLY, nbd.REP_ERR_INVALID)]
    assert not hs.structured_replies


def test_info_then_go_and_unknown_names(bytewise: bool) -> None:
    hs = fresh()
    data = (
        CLIENT_FLAGS
        + opt(nbd.OPT_INFO, go_data(b"nope"))
        + opt(nbd.OPT_INFO, go_data(b"disk-1", (nbd.INFO_BLOCK_SIZE,)))
        + opt(nbd.OPT_GO, go_data(b"other"))
        + opt(nbd.OPT_GO, go_data(b"disk-1"))
    )
    events = run(hs, data, bytewise=bytewise)
    assert events == [
        nbd.OptionReplied(nbd.OPT_INFO, nbd.REP_ERR_UNKNOWN),
        nbd.OptionReplied(nbd.OPT_INFO, nbd.REP_ACK),
        nbd.OptionReplied(nbd.OPT_GO, nbd.REP_ERR_UNKNOWN),
        nbd.Ready("disk-1", 1 << 20, RW_FLAGS, False),
    ]
    kinds = [(o, r) for o, r, _ in parse_replies(hs.data_to_send())]
    assert kinds == [
        (nbd.OPT_INFO, nbd.REP_ERR_UNKNOWN),
        (nbd.OPT_INFO, nbd.REP_INFO),
        (nbd.OPT_INFO, nbd.REP_INFO),
        (nbd.OPT_INFO, nbd.REP_ACK),
        (nbd.OPT_GO, nbd.REP_ERR_UNKNOWN),
        (nbd.OPT_GO, nbd.REP_INFO),
        (nbd.OPT_GO, nbd.REP_ACK),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00",
        struct.pack(">I", 5) + b"disk-1" + b"\x00\x00",  # name length off by one
        struct.pack(">I", 6) + b"disk-1" + struct.pack(">H", 2) + b"\x00\x01",  # too few infos
        struct.pack(">I", 6) + b"disk-1" + struct.pack(">H", 0) + b"\x00",  # trailing byte
        struct.pack(">I", 0xFFFFFFFF) + b"\x00\x00",
    ],
)
@pytest.mark.parametrize("option", [nbd.OPT_GO, nbd.OPT_INFO])
def test_malformed_go_is_invalid_and_haggling_goes_on(option: int, data: bytes) -> None:
    hs = fresh()
    events = run(hs, CLIENT_FLAGS + opt(option, data) + opt(nbd.OPT_GO, go_data()))
    assert events[0] == nbd.OptionReplied(option, nbd.REP_ERR_INVALID)
    assert isinstance(events[1], nbd.Ready)


def test_export_name_with_and_without_zeroes(bytewise: bool) -> None:
    for flags, pad in ((nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES, 0), (1, 124), (0, 124)):
        hs = fresh()
        data = struct.pack(">I", flags) + opt(nbd.OPT_EXPORT_NAME, b"disk-1") + b"T"
        events = run(hs, data, bytewise=bytewise)
        assert events == [nbd.Ready("disk-1", 1 << 20, RW_FLAGS, False)]
        assert hs.data_to_send() == struct.pack(">QH", 1 << 20, RW_FLAGS) + bytes(pad)
        assert hs.trailing_data == b"T"


def test_export_name_default_and_unknown() -> None:
    hs = fresh()
    assert isinstance(run(hs, CLIENT_FLAGS + opt(nbd.OPT_EXPORT_NAME))[0], nbd.Ready)
    hs = fresh()
    with pytest.raises(nbd.NbdProtocolError) as info:
        run(hs, CLIENT_FLAGS + opt(nbd.OPT_EXPORT_NAME, b"disk-2"))
    assert info.value.drop
    with pytest.raises(nbd.NbdProtocolError):
        hs.next_event()  # stays failed


def test_list(bytewise: bool) -> None:
    hs = fresh()
    events = run(hs, CLIENT_FLAGS + opt(nbd.OPT_LIST) + opt(nbd.OPT_LIST, b"x"), bytewise=bytewise)
    assert events == [
        nbd.OptionReplied(nbd.OPT_LIST, nbd.REP_ACK),
        nbd.OptionReplied(nbd.OPT_LIST, nbd.REP_ERR_INVALID),
    ]
    replies = parse_replies(hs.data_to_send())
    assert replies[0] == (nbd.OPT_LIST, nbd.REP_SERVER, struct.pack(">I", 6) + b"disk-1")
    assert replies[1][:2] == (nbd.OPT_LIST, nbd.REP_ACK)
    assert replies[2][:2] == (nbd.OPT_LIST, nbd.REP_ERR_INVALID)


def test_abort(bytewise: bool) -> None:
    hs = fresh()
    events = run(hs, CLIENT_FLAGS + opt(nbd.OPT_ABORT), bytewise=bytewise)
    assert events == [nbd.Aborted()]
    assert parse_replies(hs.data_to_send()) == [(nbd.OPT_ABORT, nbd.REP_ACK, b"")]


@pytest.mark.parametrize(
    "option", [nbd.OPT_STARTTLS, nbd.OPT_PEEK_EXPORT, nbd.OPT_EXTENDED_HEADERS, 99, 0xFFFFFFFF]
)
def test_unknown_options_are_unsupported(option: int) -> None:
    hs = fresh()
    events = run(hs, CLIENT_FLAGS + opt(option, b"some data") + opt(nbd.OPT_GO, go_data()))
    assert events[0] == nbd.OptionReplied(option, nbd.REP_ERR_UNSUP)
    assert isinstance(events[1], nbd.Ready)
    assert parse_replies(hs.data_to_send())[0][:2] == (option, nbd.REP_ERR_UNSUP)


@pytest.mark.parametrize("option", [nbd.OPT_LIST_META_CONTEXT, nbd.OPT_SET_META_CONTEXT])
def test_meta_context_has_zero_contexts(option: int) -> None:
    hs = fresh()
    events = run(
        hs,
        CLIENT_FLAGS
        + opt(option, meta_data())  # before structured replies
        + opt(nbd.OPT_STRUCTURED_REPLY)
        + opt(option, meta_data())
        + opt(option, meta_data(queries=()))
        + opt(option, meta_data(b"other"))
        + opt(option, meta_data()[:-1])
        + opt(option, meta_data() + b"x")
        + opt(option, b"\x00\x00\x00\x00\x00\x00\x00\x05"),
    )
    assert [e.reply for e in events if isinstance(e, nbd.OptionReplied)] == [
        nbd.REP_ERR_INVALID,
        nbd.REP_ACK,
        nbd.REP_ACK,
        nbd.REP_ACK,
        nbd.REP_ERR_UNKNOWN,
        nbd.REP_ERR_INVALID,
        nbd.REP_ERR_INVALID,
        nbd.REP_ERR_INVALID,
    ]
    replies = parse_replies(hs.data_to_send())
    assert all(r[1] != nbd.REP_META_CONTEXT for r in replies)


def test_read_only_flags() -> None:
    hs = fresh(RO_EXPORT)
    (ready,) = run(hs, CLIENT_FLAGS + opt(nbd.OPT_GO, go_data()))
    assert isinstance(ready, nbd.Ready)
    assert ready.transmission_flags == (
        nbd.FLAG_HAS_FLAGS
        | nbd.FLAG_READ_ONLY
        | nbd.FLAG_SEND_FLUSH
        | nbd.FLAG_SEND_FUA
        | nbd.FLAG_CAN_MULTI_CONN
    )


@pytest.mark.parametrize(
    "data",
    [
        struct.pack(">I", 4),  # unknown client flag
        struct.pack(">I", 0x80000001),
        CLIENT_FLAGS + struct.pack(">QII", 0x1234, nbd.OPT_GO, 0),  # bad option magic
        CLIENT_FLAGS + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, nbd.MAX_OPTION_LENGTH + 1),
        CLIENT_FLAGS + struct.pack(">QII", nbd.IHAVEOPT, 99, 0xFFFFFFFF),
        struct.pack(">I", 0) + opt(nbd.OPT_GO, go_data()),  # GO from a non-fixed client
        CLIENT_FLAGS + opt(nbd.OPT_LIST) * (nbd.MAX_OPTIONS + 1),
    ],
    ids=["flag4", "flag31", "magic", "too-long", "huge", "non-fixed-go", "too-many"],
)
def test_hostile_handshakes_drop(data: bytes, bytewise: bool) -> None:
    hs = fresh()
    with pytest.raises(nbd.NbdProtocolError) as info:
        run(hs, data, bytewise=bytewise)
    assert info.value.drop
    with pytest.raises(nbd.NbdProtocolError):
        hs.next_event()


def test_max_options_is_allowed() -> None:
    hs = fresh()
    data = CLIENT_FLAGS + opt(nbd.OPT_LIST) * (nbd.MAX_OPTIONS - 1) + opt(nbd.OPT_GO, go_data())
    assert isinstance(run(hs, data)[-1], nbd.Ready)


def test_eof_cases() -> None:
    hs = fresh()
    assert run(hs, b"") == [nbd.Closed()]
    hs = fresh()
    assert run(hs, CLIENT_FLAGS + opt(nbd.OPT_LIST)) == [
        nbd.OptionReplied(nbd.OPT_LIST, nbd.REP_ACK)
    ]
    hs.receive_data(b"")
    assert hs.next_event() == nbd.Closed()
    for partial in (
        b"\x00\x00",
        CLIENT_FLAGS + b"IHAVE",
        CLIENT_FLAGS + opt(nbd.OPT_GO, b"abc")[:-1],
    ):
        hs = fresh()
        hs.receive_data(partial)
        hs.receive_data(b"")
        with pytest.raises(nbd.NbdProtocolError):
            while hs.next_event() is not nbd.NEED_DATA:
                pass


def test_bytes_wanted_guides_exact_reads() -> None:
    """A shell that reads exactly ``bytes_wanted`` never over-reads into transmission data."""
    hs = fresh()
    stream = CLIENT_FLAGS + opt(nbd.OPT_INFO, go_data()) + opt(nbd.OPT_GO, go_data()) + b"REQ"
    pos = 0
    while True:
        ev = hs.next_event()
        if isinstance(ev, nbd.Ready):
            break
        if ev is nbd.NEED_DATA:
            n = hs.bytes_wanted
            assert n >= 1
            hs.receive_data(stream[pos : pos + n])
            pos += n
    assert stream[pos:] == b"REQ"
    assert hs.trailing_data == b""


# -- handshake fuzzing ----------------------------------------------------------------------------


def drive(hs: nbd.ServerHandshake, chunks: list[bytes], eof: bool) -> None:
    """Feed chunks, pulling events; only NbdProtocolError may escape."""
    for chunk in [*chunks, b""] if eof else chunks:
        hs.receive_data(chunk)
        for _ in range(1000):
            ev = hs.next_event()
            assert ev is nbd.NEED_DATA or isinstance(
                ev, nbd.OptionReplied | nbd.Ready | nbd.Aborted | nbd.Closed
            )
            if ev is nbd.NEED_DATA:
                break
        hs.data_to_send()
        if hs.bytes_wanted == 0:
            return


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


@st.composite
def option_stream(draw: st.DrawFn) -> bytes:
    """Mostly well-framed options with hostile numbers and payloads, to reach deep states."""
    flags = draw(st.sampled_from([0, 1, 2, 3, 4, 0xFFFFFFFF]))
    out = struct.pack(">I", flags)
    for _ in range(draw(st.integers(0, 6))):
        option = draw(st.sampled_from([*range(0, 13), 0xFFFFFFFF]))
        data = draw(
            st.one_of(
                st.binary(max_size=40),
                st.builds(
                    go_data, st.sampled_from([b"", b"disk-1", b"x"]), st.tuples(st.integers(0, 5))
                ),
                st.builds(meta_data, st.sampled_from([b"", b"disk-1"])),
            )
        )
        length = draw(st.one_of(st.just(len(data)), st.integers(0, 2**32 - 1)))
        out += struct.pack(">QII", nbd.IHAVEOPT, option, length) + data
    return out


def _raises_only_protocol_error(fn: Callable[[], None]) -> None:
    with contextlib.suppress(nbd.NbdProtocolError):
        fn()


@settings(max_examples=400, deadline=None)
@given(
    data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 300), max_size=6), eof=st.booleans()
)
def test_fuzz_handshake_binary(data: bytes, cuts: list[int], eof: bool) -> None:
    _raises_only_protocol_error(lambda: drive(fresh(), chunked(data, cuts), eof))


@settings(max_examples=400, deadline=None)
@given(
    data=option_stream(),
    tail=st.binary(max_size=30),
    cuts=st.lists(st.integers(0, 500), max_size=6),
    eof=st.booleans(),
)
def test_fuzz_handshake_options(data: bytes, tail: bytes, cuts: list[int], eof: bool) -> None:
    _raises_only_protocol_error(lambda: drive(fresh(), chunked(data + tail, cuts), eof))


# -- requests -------------------------------------------------------------------------------------


def header(
    command: int,
    offset: int = 0,
    length: int = 512,
    flags: int = 0,
    handle: int = 7,
    magic: int = nbd.REQUEST_MAGIC,
) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, command, handle, offset, length)


def parse(h: bytes, *, read_only: bool = False, size: int = 1 << 20) -> nbd.Request:
    return nbd.parse_request(h, size=size, read_only=read_only, max_payload=1 << 16)


@given(
    command=st.sampled_from([nbd.CMD_READ, nbd.CMD_WRITE, nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES]),
    fua=st.booleans(),
    handle=st.integers(0, 2**64 - 1),
    offset=st.integers(0, (1 << 20) - 1),
    data=st.data(),
)
def test_request_roundtrip(
    command: int, fua: bool, handle: int, offset: int, data: st.DataObject
) -> None:
    length = data.draw(st.integers(1, min(1 << 16, (1 << 20) - offset)))
    flags = nbd.CMD_FLAG_FUA if fua else 0
    req = nbd.Request(command, flags, handle, offset, length)
    assert parse(nbd.encode_request(req)) == req
    assert req.fua == fua


def test_valid_specials() -> None:
    assert parse(header(nbd.CMD_FLUSH, 0, 0)).command == nbd.CMD_FLUSH
    assert parse(header(nbd.CMD_FLUSH, 0, 0, nbd.CMD_FLAG_FUA)).fua
    disc = parse(header(nbd.CMD_DISC, 99, 99, 0xFFFF))
    assert disc.command == nbd.CMD_DISC
    wz = parse(header(nbd.CMD_WRITE_ZEROES, flags=nbd.CMD_FLAG_NO_HOLE))
    assert wz.no_hole and not wz.fua
    assert parse(header(nbd.CMD_READ, (1 << 20) - 512, 512)).offset == (1 << 20) - 512
    assert parse(header(nbd.CMD_READ, 0, 1 << 16)).length == 1 << 16  # exactly max payload


@pytest.mark.parametrize(
    ("h", "error", "discard"),
    [
        (header(nbd.CMD_CACHE), nbd.NBD_EINVAL, 0),
        (header(nbd.CMD_BLOCK_STATUS), nbd.NBD_EINVAL, 0),
        (header(999), nbd.NBD_EINVAL, 0),
        (header(nbd.CMD_READ, flags=nbd.CMD_FLAG_NO_HOLE), nbd.NBD_EINVAL, 0),
        (header(nbd.CMD_READ, flags=nbd.CMD_FLAG_DF), nbd.NBD_EINVAL, 0),
        (header(nbd.CMD_WRITE, flags=0x100), nbd.NBD_EINVAL, 512),
        (header(nbd.CMD_WRITE_ZEROES, flags=nbd.CMD_FLAG_FAST_ZERO), nbd.NBD_EINVAL, 0),
        (header(nbd.CMD_FLUSH, 0, 1), nbd.NBD_EINVAL, 0),
        (header(nbd.CMD_READ, length=0), nbd.NBD_EINVAL, 0),
        (header(nbd.CMD_WRITE, length=0), nbd.NBD_EINVAL, 0),
        (header(nbd.CMD_TRIM, length=0), nbd.NBD_EINVAL, 0),
        (header(nbd.CMD_READ, length=(1 << 16) + 1), nbd.NBD_EINVAL, 0),
        (header(nbd.CMD_READ, 1 << 20, 1), nbd.NBD_EINVAL, 0),
        (header(nbd.CMD_TRIM, (1 << 20) - 1, 2), nbd.NBD_EINVAL, 0),
        (header(nbd.CMD_WRITE, (1 << 20) - 1, 2), nbd.NBD_ENOSPC, 2),
        (header(nbd.CMD_WRITE_ZEROES, 2**64 - 1, 1), nbd.NBD_ENOSPC, 0),
    ],
)
def test_request_errnos(h: bytes, error: int, discard: int) -> None:
    with pytest.raises(nbd.NbdProtocolError) as info:
        parse(h)
    assert info.value.errno == error
    assert not info.value.drop
    assert info.value.handle == 7
    assert info.value.discard == discard
    assert info.value.command == struct.unpack_from(">H", h, 6)[0]


@pytest.mark.parametrize("command", [nbd.CMD_WRITE, nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES])
def test_read_only_is_eperm(command: int) -> None:
    with pytest.raises(nbd.NbdProtocolError) as info:
        parse(header(command), read_only=True)
    assert info.value.errno == nbd.NBD_EPERM
    assert parse(header(nbd.CMD_READ), read_only=True).command == nbd.CMD_READ
    assert parse(header(nbd.CMD_FLUSH, 0, 0), read_only=True).command == nbd.CMD_FLUSH


@pytest.mark.parametrize(
    "h",
    [
        header(nbd.CMD_READ, magic=0x25609514),
        header(nbd.CMD_WRITE, length=(1 << 16) + 1),
        header(nbd.CMD_WRITE, length=0xFFFFFFFF, flags=0xFFFF),
        header(nbd.CMD_READ)[:-1],
        header(nbd.CMD_READ) + b"\x00",
        b"",
    ],
)
def test_request_drops(h: bytes) -> None:
    with pytest.raises(nbd.NbdProtocolError) as info:
        parse(h)
    assert info.value.drop


@settings(max_examples=1000)
@given(
    st.one_of(
        st.binary(max_size=40),
        st.binary(min_size=24, max_size=24).map(lambda b: struct.pack(">I", nbd.REQUEST_MAGIC) + b),
    ),
    st.booleans(),
)
def test_fuzz_request_parser(data: bytes, read_only: bool) -> None:
    try:
        req = parse(data, read_only=read_only)
    except nbd.NbdProtocolError as exc:
        assert exc.drop or exc.errno in (nbd.NBD_EINVAL, nbd.NBD_ENOSPC, nbd.NBD_EPERM)
        assert exc.discard == 0 or exc.command == nbd.CMD_WRITE
        return
    assert req.command == nbd.CMD_DISC or req.offset + req.length <= 1 << 20


# -- replies --------------------------------------------------------------------------------------


def test_simple_reply() -> None:
    assert nbd.simple_reply(0x0102030405060708, 22) == struct.pack(
        ">IIQ", nbd.SIMPLE_REPLY_MAGIC, 22, 0x0102030405060708
    )
    assert len(nbd.simple_reply(1)) == nbd.SIMPLE_REPLY_SIZE


def test_read_chunk_header() -> None:
    h = nbd.read_chunk_header(5, 4096, 512)
    assert h == struct.pack(
        ">IHHQIQ",
        nbd.STRUCTURED_REPLY_MAGIC,
        nbd.REPLY_FLAG_DONE,
        nbd.REPLY_TYPE_OFFSET_DATA,
        5,
        520,
        4096,
    )


def test_error_chunks() -> None:
    chunk = nbd.error_chunk(9, nbd.NBD_EIO, "bad")
    magic, flags, kind, handle, length = struct.unpack_from(">IHHQI", chunk)
    assert (magic, flags, kind, handle, length) == (
        nbd.STRUCTURED_REPLY_MAGIC,
        nbd.REPLY_FLAG_DONE,
        nbd.REPLY_TYPE_ERROR,
        9,
        9,
    )
    assert chunk[20:] == struct.pack(">IH", 5, 3) + b"bad"
    chunk = nbd.error_chunk(9, nbd.NBD_EIO, "", offset=1024)
    assert struct.unpack_from(">H", chunk, 6)[0] == nbd.REPLY_TYPE_ERROR_OFFSET
    assert chunk[20:] == struct.pack(">IHQ", 5, 0, 1024)
    done = nbd.done_chunk(3)
    assert done == struct.pack(">IHHQI", nbd.STRUCTURED_REPLY_MAGIC, 1, nbd.REPLY_TYPE_NONE, 3, 0)


def test_error_reply_picks_the_form() -> None:
    assert nbd.error_reply(nbd.CMD_WRITE, 4, 22, structured=False) == nbd.simple_reply(4, 22)
    structured = nbd.error_reply(nbd.CMD_READ, 4, 22, structured=True)
    assert struct.unpack_from(">IHHQ", structured)[:3] == (
        nbd.STRUCTURED_REPLY_MAGIC,
        nbd.REPLY_FLAG_DONE,
        nbd.REPLY_TYPE_ERROR,
    )
    assert b"Invalid argument" in structured
    assert nbd.error_text(22) == "Invalid argument"


@pytest.mark.parametrize(
    ("py", "wire"),
    [
        (errno.EPERM, 1),
        (errno.EROFS, 1),
        (errno.EIO, 5),
        (errno.ENOMEM, 12),
        (errno.EINVAL, 22),
        (errno.ENOSPC, 28),
        (errno.EDQUOT, 28),
        (errno.EFBIG, 28),
        (errno.EOVERFLOW, 75),
        (errno.ENOTSUP, 95),
        (errno.ESHUTDOWN, 108),
        (errno.ENOENT, 5),
    ],
)
def test_errno_mapping(py: int, wire: int) -> None:
    assert nbd.nbd_errno(py) == wire


def test_queued_write_ranges_lists_the_writes_in_a_buffer() -> None:
    """The WRITEs of pipelined requests, in order, skipping their payloads and the other
    commands; a write past the end is left out; the walk stops at a bad magic or where the
    buffer ends (a header cut short is not read)."""

    def req(command: int, offset: int, length: int, payload: bytes = b"") -> bytes:
        return nbd.encode_request(nbd.Request(command, 0, 1, offset, length)) + payload

    size = 1 << 20
    buffer = b"".join(
        (
            req(nbd.CMD_WRITE, 4096, 3, b"abc"),
            req(nbd.CMD_READ, 0, 512),
            req(nbd.CMD_WRITE, size - 1, 2, b"xy"),  # past the end: left out
            req(nbd.CMD_WRITE_ZEROES, 0, 4096),
            req(nbd.CMD_WRITE, 8192, 4096, bytes(100)),  # its payload not all here yet
            req(nbd.CMD_WRITE, 0, 1, b"z"),  # lies inside that payload: never read
        )
    )
    assert nbd.queued_write_ranges(buffer, size) == [(4096, 3), (8192, 4096)]
    assert nbd.queued_write_ranges(buffer, size, limit=1) == [(4096, 3)]
    assert nbd.queued_write_ranges(buffer[:40], size) == [(4096, 3)]
    assert nbd.queued_write_ranges(b"\0" * 28 + buffer, size) == []


@given(data=st.binary(max_size=400), size=st.integers(0, 1 << 40))
@settings(max_examples=300)
def test_queued_write_ranges_never_raises_on_garbage(data: bytes, size: int) -> None:
    """Whatever the bytes: a list of in-range, non-empty ranges, never an exception."""
    for blob in (data, nbd.encode_request(nbd.Request(nbd.CMD_WRITE, 0, 1, 0, 4)) + data):
        ranges = nbd.queued_write_ranges(bytearray(blob), size)
        assert all(
            length > 0 and offset >= 0 and offset + length <= size for offset, length in ranges
        )
