"""Replication frames: message roundtrips, byte-by-byte feeding, hostile input, state machine."""

from __future__ import annotations

import contextlib
import copy
import struct

import pytest
import xxhash
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocol.batch import CODEC_RAW, CODEC_ZSTD, Extent, Limits, encode_batch, encode_batch_parts
from protocol.errors import ErrorCode, ProtocolError
from protocol.frames import (
    EOF,
    EOF_EVENT,
    HEADER,
    MAX_REPORTS,
    NEED_DATA,
    Ack,
    BatchMsg,
    Connection,
    ConnState,
    DiskReport,
    ErrorMsg,
    FrameDecoder,
    Heartbeat,
    Hello,
    HelloOk,
    Message,
    NeedData,
    Register,
    Registered,
    encode_message,
    encode_message_parts,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
disk_ids = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True).filter(
    lambda s: ".." not in s
)
roles = st.sampled_from(["agent", "master-target", "process-server"])
states = st.from_regex(r"[a-z][a-z0-9-]{0,31}", fullmatch=True)
reports = st.builds(DiskReport, disk_ids, states, u64, u64, u64, u64)


@st.composite
def batch_msgs(draw: st.DrawFn) -> BatchMsg:
    n = draw(st.integers(0, 4))
    extents = []
    offset = draw(st.integers(0, 2**30))
    for _ in range(n):
        offset += draw(st.integers(0, 100))
        data = draw(st.one_of(st.none(), st.binary(min_size=1, max_size=64)))
        length = len(data) if data is not None else draw(st.integers(1, 10_000))
        extents.append(Extent(offset, length, data))
        offset += length
    first = draw(st.integers(1, 2**40))
    encoded = encode_batch(
        draw(disk_ids),
        first,
        first + draw(st.integers(0, 50)),
        extents,
        newest_write_ns=draw(u64),
        codec=draw(st.sampled_from([0, 1])),
    )
    return BatchMsg.from_data(encoded)


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, names, roles),
    st.builds(HelloOk, names, u32, u32),
    st.builds(Register, disk_ids, u64.filter(lambda v: v <= 2**50), u64),
    st.builds(Registered, disk_ids, u64, u64),
    batch_msgs(),
    st.builds(Ack, disk_ids, u64),
    st.builds(Heartbeat, u64, st.lists(reports, max_size=5).map(tuple)),
    st.builds(ErrorMsg, st.integers(0, 2**16 - 1), st.text(max_size=200)),
)

_BATCH = encode_batch(
    "web01-root",
    1,
    3,
    [Extent(0, 4, b"abcd"), Extent(4096, 8192, None)],
    newest_write_ns=123,
)

FIXTURES: list[Message] = [
    Hello("web01", "agent"),
    HelloOk("ps1", 48 * 2**20, 32 * 2**20),
    Register("web01-root", 10 * 2**30, 42),
    Registered("web01-root", 40, 39),
    BatchMsg.from_data(_BATCH),
    Ack("web01-root", 3),
    Heartbeat(7, (DiskReport("web01-root", "replicating", 42, 40, 8192, 1_000_000),)),
    Heartbeat(8),
    ErrorMsg(ErrorCode.SEQ_GAP, "batch starts at 9, expected 4 — gap"),
]


def drain(decoder: FrameDecoder) -> list[Message | EOF]:
    out: list[Message | EOF] = []
    while True:
        event = decoder.next_message()
        if isinstance(event, NeedData):
            return out
        out.append(event)
        if isinstance(event, EOF):
            return out


def feed_all(data: bytes, chunk: int | None = None, limits: Limits | None = None) -> list:
    decoder = FrameDecoder(limits) if limits else FrameDecoder()
    out: list[Message | EOF] = []
    step = chunk or max(len(data), 1)
    for i in range(0, len(data), step):
        decoder.receive_data(data[i : i + step])
        out.extend(drain(decoder))
    decoder.receive_data(b"")
    out.extend(drain(decoder))
    return out


# --- roundtrips ---------------------------------------------------------------------------


@pytest.mark.parametrize("msg", FIXTURES, ids=lambda m: type(m).__name__)
def test_fixture_whole_bytewise_and_with_trailing_data(msg: Message) -> None:
    frame = encode_message(msg)
    assert frame[:4] == b"TDMK" and len(frame) == HEADER.size + HEADER.unpack(frame[:24])[4]
    assert feed_all(frame) == [msg, EOF_EVENT]
    assert feed_all(frame, chunk=1) == [msg, EOF_EVENT]
    trailing = encode_message(Ack("next", 1))
    assert feed_all(frame + trailing) == [msg, Ack("next", 1), EOF_EVENT]
    assert feed_all(frame + trailing, chunk=1) == [msg, Ack("next", 1), EOF_EVENT]
    # trailing partial frame: the first message decodes, the rest is a truncated frame
    decoder = FrameDecoder()
    decoder.receive_data(frame + trailing[:10])
    assert decoder.next_message() == msg
    assert decoder.next_message() is NEED_DATA
    decoder.receive_data(b"")
    with pytest.raises(ProtocolError) as info:
        decoder.next_message()
    assert info.value.code is ErrorCode.BAD_MESSAGE


@FAST
@given(st.lists(messages, min_size=1, max_size=4), st.integers(1, 50))
def test_roundtrip_every_message_type(msgs: list[Message], chunk: int) -> None:
    stream = b"".join(encode_message(m) for m in msgs)
    assert feed_all(stream) == [*msgs, EOF_EVENT]
    assert feed_all(stream, chunk=chunk) == [*msgs, EOF_EVENT]


def test_batch_msg_payload_is_exactly_the_batch() -> None:
    msg = BatchMsg.from_data(_BATCH)
    assert encode_message(msg)[HEADER.size :] == _BATCH
    assert msg.disk_id == "web01-root" and msg.header.last_seq == 3


def test_large_payload_in_64k_chunks() -> None:
    data = bytes(range(256)) * (8 * 2**20 // 256)
    batch = encode_batch("d", 1, 1, [Extent(0, len(data), data)], newest_write_ns=0, codec=0)
    frame = encode_message(BatchMsg.from_data(batch))
    decoder = FrameDecoder()
    peak = 0
    events: list[Message | EOF] = []
    for i in range(0, len(frame), 65536):
        decoder.receive_data(frame[i : i + 65536])
        peak = max(peak, decoder.buffered)
        events.extend(drain(decoder))
    assert [type(e) for e in events] == [BatchMsg]
    assert isinstance(events[0], BatchMsg) and events[0].data == batch
    assert peak <= len(frame) and decoder.buffered == 0


@given(
    st.lists(st.tuples(st.integers(1, 9000), st.booleans(), st.booleans()), max_size=12),
    st.sampled_from([CODEC_RAW, CODEC_ZSTD]),
)
@FAST
def test_a_batch_sent_in_pieces_is_the_frame_of_the_joined_batch(
    extents: list[tuple[int, bool, bool]], codec: int
) -> None:
    """``BatchMsg.from_parts`` (the shipper's way: no join) frames byte for byte what
    ``from_data`` frames for the joined batch, and its raw pieces are the extents' buffers."""
    built, offset = [], 0
    for length, has_data, as_view in extents:
        data = None
        if has_data:
            raw = bytes([length % 256]) * length
            data = memoryview(raw) if as_view else raw
        built.append(Extent(offset, length, data))
        offset += length + 512
    kwargs = {"newest_write_ns": 7, "codec": codec}
    parts = encode_batch_parts("d0", 1, 1 + len(built), built, **kwargs)
    joined = encode_batch("d0", 1, 1 + len(built), built, **kwargs)
    assert b"".join(parts) == joined
    msg = BatchMsg.from_parts(parts)
    assert msg.size == len(joined) and msg.header == BatchMsg.from_data(joined).header
    assert encode_message(msg) == encode_message(BatchMsg.from_data(joined))
    wire = encode_message_parts(msg)
    assert b"".join(wire) == encode_message(msg)
    if codec == CODEC_RAW:
        sent = [e.data for e in built if e.data is not None]
        assert all(a is b for a, b in zip(wire[2:], sent, strict=True))


def test_a_batch_of_pieces_that_do_not_add_up_is_refused() -> None:
    parts = encode_batch_parts(
        "d0", 1, 1, [Extent(0, 4096, b"x" * 4096)], newest_write_ns=1, codec=CODEC_RAW
    )
    with pytest.raises(ProtocolError):
        BatchMsg.from_parts([parts[0], b"x" * 4095])
    with pytest.raises(ProtocolError):
        BatchMsg.from_parts([])


# --- hostile input ------------------------------------------------------------------------


def _frame(msg_type: int, payload: bytes, *, version: int = 1, flags: int = 0) -> bytes:
    head = struct.pack(
        ">4sBBHIQ",
        b"TDMK",
        version,
        msg_type,
        flags,
        len(payload),
        xxhash.xxh3_64_intdigest(payload),
    )
    return head + struct.pack(">I", xxhash.xxh32_intdigest(head)) + payload


def _error_code(data: bytes, limits: Limits | None = None) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        feed_all(data, limits=limits)
    return info.value.code


def test_header_checks_in_order() -> None:
    good = encode_message(Ack("d", 1))
    assert _error_code(b"XDMK" + good[4:]) is ErrorCode.BAD_MAGIC
    corrupt = bytearray(good)
    corrupt[23] ^= 1
    assert _error_code(bytes(corrupt)) is ErrorCode.BAD_CHECKSUM
    payload = good[HEADER.size :]
    assert _error_code(_frame(6, payload, version=2)) is ErrorCode.BAD_VERSION
    assert _error_code(_frame(6, payload, flags=1)) is ErrorCode.BAD_MESSAGE
    assert _error_code(_frame(99, payload)) is ErrorCode.UNKNOWN_TYPE
    assert _error_code(_frame(6, payload + b"\0")) is ErrorCode.BAD_MESSAGE
    assert _error_code(_frame(6, payload[:-1])) is ErrorCode.BAD_MESSAGE
    assert _error_code(_frame(6, b"")) is ErrorCode.BAD_MESSAGE
    bad_payload = bytearray(good)
    bad_payload[-1] ^= 1
    assert _error_code(bytes(bad_payload)) is ErrorCode.BAD_CHECKSUM
    assert _error_code(good, Limits(max_frame_bytes=len(payload) - 1)) is (
        ErrorCode.FRAME_TOO_LARGE
    )


def test_invalid_payload_values_are_bad_message() -> None:
    def s(text: bytes) -> bytes:
        return struct.pack(">H", len(text)) + text

    cases = [
        _frame(1, s(b"web01") + s(b"root")),  # unknown role
        _frame(1, s(b"-web01") + s(b"agent")),  # bad name
        _frame(1, s(b"\xff\xfe") + s(b"agent")),  # not UTF-8
        _frame(6, s(b"../etc") + struct.pack(">Q", 1)),  # path escape in disk id
        _frame(7, struct.pack(">QH", 1, 1) + s(b"d") + s(b"BAD STATE") + bytes(32)),
    ]
    for frame in cases:
        assert _error_code(frame) is ErrorCode.BAD_MESSAGE
    too_many = _frame(7, struct.pack(">QH", 1, MAX_REPORTS + 1))
    assert _error_code(too_many) is ErrorCode.LIMIT
    huge_disk = _frame(3, s(b"d") + struct.pack(">QQ", 2**50 + 1, 0))
    assert _error_code(huge_disk) is ErrorCode.LIMIT
    bad_batch = _frame(5, b"TBAT\x01\x00")
    assert _error_code(bad_batch) is ErrorCode.BAD_MESSAGE


def test_huge_length_is_refused_after_the_header_without_buffering() -> None:
    head = struct.pack(">4sBBHIQ", b"TDMK", 1, 5, 0, 2**32 - 1, 0)
    header = head + struct.pack(">I", xxhash.xxh32_intdigest(head))
    decoder = FrameDecoder()
    for byte in header[:-1]:
        decoder.receive_data(bytes([byte]))
        assert decoder.next_message() is NEED_DATA
    decoder.receive_data(header[-1:])
    with pytest.raises(ProtocolError) as info:
        decoder.next_message()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert decoder.buffered == HEADER.size
    with pytest.raises(ProtocolError):  # the decoder stays failed
        decoder.receive_data(b"more")


def test_feeding_without_draining_is_bounded() -> None:
    limits = Limits(max_frame_bytes=1024)
    decoder = FrameDecoder(limits)
    frame = encode_message(ErrorMsg(1, "x" * 900))
    decoder.receive_data(frame)
    decoder.receive_data(frame)  # one more chunk is allowed ...
    with pytest.raises(ProtocolError) as info:
        decoder.receive_data(frame)  # ... but not unbounded buffering
    assert info.value.code is ErrorCode.INTERNAL


def test_eof_handling() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    assert decoder.next_message() is EOF_EVENT
    assert decoder.next_message() is EOF_EVENT
    with pytest.raises(ProtocolError):
        decoder.receive_data(b"x")
    for cut in (1, 23, 24, 25):
        frame = encode_message(Ack("d", 1))[:cut]
        assert _error_code(frame) is ErrorCode.BAD_MESSAGE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 40))
def test_garbage_raises_only_protocol_error(data: bytes, chunk: int) -> None:
    for prefix in (b"", b"TDMK", b"TDMK\x01"):
        with contextlib.suppress(ProtocolError):
            feed_all(prefix + data, chunk=chunk)


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_any_single_byte_mutation_is_detected(msg: Message, data: st.DataObject) -> None:
    frame = bytearray(encode_message(msg))
    pos = data.draw(st.integers(0, len(frame) - 1))
    frame[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ProtocolError):
        feed_all(bytes(frame), chunk=data.draw(st.integers(1, 64)))


@pytest.mark.parametrize(
    "build",
    [
        lambda: Hello("web01", "root"),
        lambda: Hello("", "agent"),
        lambda: HelloOk("ps", -1, 0),
        lambda: Register("D", 1, 1),
        lambda: Register("d", 2**64, 1),
        lambda: Ack("a..b", 1),
        lambda: DiskReport("d", "Replicating", 0, 0, 0, 0),
        lambda: Heartbeat(1, tuple([DiskReport("d", "ok", 0, 0, 0, 0)] * (MAX_REPORTS + 1))),
        lambda: ErrorMsg(2**16, "x"),
        lambda: ErrorMsg(1, "x" * 5000),
    ],
)
def test_invalid_messages_cannot_be_built(build: object) -> None:
    assert callable(build)
    with pytest.raises(ProtocolError):
        build()


def test_error_msg_from_exception() -> None:
    msg = ErrorMsg.from_exception(ProtocolError(ErrorCode.SEQ_GAP, "é" * 5000))
    assert msg.code == ErrorCode.SEQ_GAP and len(msg.message.encode()) <= 4096
    assert ErrorMsg.from_exception(KeyError("k")).code == ErrorCode.INTERNAL
    assert feed_all(encode_message(msg)) == [msg, EOF_EVENT]


# --- connection state machine -------------------------------------------------------------


def _batch(disk_id: str) -> BatchMsg:
    data = encode_batch(disk_id, 1, 1, [Extent(0, 3, b"abc")], newest_write_ns=0, codec=CODEC_RAW)
    return BatchMsg.from_data(data)


def _recv(conn: Connection, msg: Message) -> Message | NeedData | EOF:
    conn.receive_data(encode_message(msg))
    return conn.next_event()


def test_full_conversation() -> None:
    client, server = Connection("client"), Connection("server")

    def c2s(msg: Message) -> None:
        server.receive_data(client.send(msg))
        assert server.next_event() == msg
        assert server.next_event() is NEED_DATA

    def s2c(msg: Message) -> None:
        client.receive_data(server.send(msg))
        assert client.next_event() == msg

    c2s(Hello("web01", "agent"))
    assert (client.state, server.state) == (ConnState.HELLO_SENT, ConnState.HELLO_RECEIVED)
    s2c(HelloOk("ps1", 48 * 2**20, 32 * 2**20))
    assert client.state is server.state is ConnState.READY
    c2s(Register("web01-root", 2**30, 5))
    assert client.registered == server.registered == frozenset()
    s2c(Registered("web01-root", 2, 1))
    assert client.registered == server.registered == frozenset({"web01-root"})
    c2s(_batch("web01-root"))
    s2c(Ack("web01-root", 5))
    c2s(Heartbeat(1, (DiskReport("web01-root", "replicating", 5, 5, 0, 0),)))
    s2c(Heartbeat(1))
    c2s(ErrorMsg(ErrorCode.SHUTDOWN, "bye"))
    assert client.state is server.state is ConnState.CLOSED
    server.receive_data(b"")
    assert server.next_event() is EOF_EVENT


def test_batch_before_registered_is_unexpected() -> None:
    client, server = Connection("client"), Connection("server")
    server.receive_data(client.send(Hello("a", "agent")))
    server.next_event()
    client.receive_data(server.send(HelloOk("ps", 1 << 20, 1 << 20)))
    client.next_event()
    client.send(Register("d", 1, 1))
    with pytest.raises(ProtocolError) as info:
        client.send(_batch("d"))  # Registered not received yet
    assert info.value.code is ErrorCode.UNEXPECTED
    assert client.state is ConnState.ERROR
    with pytest.raises(ProtocolError):
        client.send(Heartbeat(1))
    with pytest.raises(ProtocolError):
        client.receive_data(b"")
    with pytest.raises(ProtocolError):
        client.next_event()
    with pytest.raises(ProtocolError) as info:
        _recv(server, _batch("d"))
    assert info.value.code is ErrorCode.UNEXPECTED and server.state is ConnState.ERROR


def test_frame_errors_move_connection_to_error() -> None:
    server = Connection("server")
    server.receive_data(b"GET / HTTP/1.1\r\n\r\n1234567")
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.code is ErrorCode.BAD_MAGIC and server.state is ConnState.ERROR


def test_eof_closes() -> None:
    client = Connection("client")
    client.send(Hello("a", "agent"))
    client.receive_data(b"")
    assert client.next_event() is EOF_EVENT and client.state is ConnState.CLOSED
    with pytest.raises(ProtocolError):
        client.send(Heartbeat(1))
    assert client.state is ConnState.ERROR


# A model of the rules, written from the spec independently of the implementation's table.
CLIENT_SENDS = (Hello, Register, BatchMsg, Heartbeat, ErrorMsg)
SERVER_SENDS = (HelloOk, Registered, Ack, Heartbeat, ErrorMsg)
POOL: list[Message] = [
    Hello("a", "agent"),
    HelloOk("ps", 1 << 20, 1 << 20),
    Register("d1", 100, 1),
    Register("d2", 100, 1),
    Registered("d1", 0, 0),
    Registered("d2", 0, 0),
    _batch("d1"),
    _batch("d2"),
    Ack("d1", 1),
    Ack("d2", 1),
    Heartbeat(1),
    ErrorMsg(ErrorCode.SHUTDOWN, "bye"),
]


class Model:
    def __init__(self, role: str) -> None:
        self.role = role
        self.state = ConnState.START
        self.pending: set[str] = set()
        self.registered: set[str] = set()

    def step(self, sending: bool, msg: Message) -> bool:
        """Apply; return whether legal."""
        sender = self.role if sending else ("server" if self.role == "client" else "client")
        allowed = CLIENT_SENDS if sender == "client" else SERVER_SENDS
        if not isinstance(msg, allowed) or self.state in (ConnState.CLOSED, ConnState.ERROR):
            return False
        if isinstance(msg, ErrorMsg):
            self.state = ConnState.CLOSED
            return True
        if isinstance(msg, Hello):
            if self.state is not ConnState.START:
                return False
            self.state = ConnState.HELLO_SENT if sending else ConnState.HELLO_RECEIVED
            return True
        if isinstance(msg, HelloOk):
            expected = ConnState.HELLO_RECEIVED if sending else ConnState.HELLO_SENT
            if self.state is not expected:
                return False
            self.state = ConnState.READY
            return True
        if self.state is not ConnState.READY:
            return False
        if isinstance(msg, Register):
            self.pending.add(msg.disk_id)
        elif isinstance(msg, Registered):
            if msg.disk_id not in self.pending:
                return False
            self.pending.discard(msg.disk_id)
            self.registered.add(msg.disk_id)
        elif isinstance(msg, BatchMsg | Ack):
            return msg.disk_id in self.registered
        return True


def _run(role: str, steps: list[tuple[bool, Message]]) -> None:
    """Drive a Connection and the Model side by side; stop after the first illegal step."""
    conn = Connection("client" if role == "client" else "server")
    model = Model(role)
    for sending, msg in steps:
        legal = model.step(sending, msg)
        if legal:
            if sending:
                assert conn.send(msg) == encode_message(msg)
            else:
                assert _recv(conn, msg) == msg
            assert conn.state is model.state
            assert conn.registered == frozenset(model.registered)
            continue
        with pytest.raises(ProtocolError) as info:
            if sending:
                conn.send(msg)
            else:
                _recv(conn, msg)
        assert info.value.code is ErrorCode.UNEXPECTED
        assert conn.state is ConnState.ERROR
        with pytest.raises(ProtocolError):
            conn.send(Heartbeat(1))
        return


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["client", "server"]), st.data())
def test_random_sequences_follow_the_model(role: str, data: st.DataObject) -> None:
    # Mostly legal steps (so long conversations are reached), sometimes any step at all.
    model = Model(role)
    steps: list[tuple[bool, Message]] = []
    for _ in range(data.draw(st.integers(0, 30))):
        moves = [(s, m) for s in (True, False) for m in POOL]
        legal = [mv for mv in moves if copy.deepcopy(model).step(*mv)]
        legal = [mv for mv in legal if not isinstance(mv[1], ErrorMsg)] or legal
        pick_any = not legal or data.draw(st.integers(0, 7)) == 0
        move = data.draw(st.sampled_from(moves if pick_any else legal))
        steps.append(move)
        if not model.step(*move):
            event("ended by an illegal step")
            break
    event(f"{role} reached {model.state.name} with {len(model.registered)} disks")
    _run(role, steps)


def test_every_state_input_pair_is_decided() -> None:
    """Every (state, direction, type) pair either moves per the model or fails into ERROR."""
    prefixes: dict[ConnState, list[tuple[bool, Message]]] = {
        ConnState.START: [],
        ConnState.HELLO_SENT: [(True, POOL[0])],
        ConnState.READY: [(True, POOL[0]), (False, POOL[1])],
        ConnState.CLOSED: [(True, POOL[-1])],
    }
    for role in ("client", "server"):
        for prefix in prefixes.values():
            for sending in (True, False):
                for msg in POOL:
                    steps = [(s if role == "client" else not s, m) for s, m in prefix] + [
                        (sending, msg)
                    ]
                    _run(role, steps)
