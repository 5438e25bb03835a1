"""NbdStream (agent/nbd_stream.py) over a real socket pair: every byte handed out exactly once
and in order, whatever the sizes read and however the sender cuts the stream; the end of the
stream and a full buffer behave as the export relies on."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import threading
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.nbd_stream import CAPACITY, DIRECT_MIN, NbdStream


class Pair:
    """An NbdStream on one end of a socket pair; the test sends on the other (blocking)."""

    def __init__(self, stream: NbdStream, peer: socket.socket, done: asyncio.Event) -> None:
        self.stream = stream
        self.peer = peer
        self.done = done
        self.sender: threading.Thread | None = None

    def send(self, data: bytes, piece: int, close: bool = True) -> None:
        """Send ``data`` in pieces of ``piece`` bytes from a thread, then maybe shut down."""

        def run() -> None:
            with contextlib.suppress(OSError):
                for pos in range(0, len(data), piece):
                    self.peer.sendall(data[pos : pos + piece])
                if close:
                    self.peer.shutdown(socket.SHUT_WR)

        self.sender = threading.Thread(target=run, daemon=True)
        self.sender.start()


async def _pair() -> Pair:
    loop = asyncio.get_running_loop()
    ours, peer = socket.socketpair()
    got: asyncio.Future[NbdStream] = loop.create_future()
    done = asyncio.Event()

    async def on_connect(stream: NbdStream) -> None:
        got.set_result(stream)
        await done.wait()

    await loop.connect_accepted_socket(lambda: NbdStream(on_connect), ours)
    return Pair(await got, peer, done)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = await _pair()
    yield p
    p.done.set()
    p.stream.close()
    p.peer.close()
    if p.sender is not None:
        p.sender.join(5)


def _pattern(n: int, seed: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:n])


async def _read_all(stream: NbdStream, sizes: list[int]) -> list[bytes]:
    out = []
    for n in sizes:
        data = await stream.read_payload(n)
        assert len(data) == n
        out.append(bytes(data))
    return out


@pytest.mark.parametrize(
    "sizes",
    [
        [28, 1, 28, DIRECT_MIN - 1, 28, DIRECT_MIN, 28, 1 << 20, 28, (1 << 20) + 1, 28],
        [28, (3 << 20) + 5, 5, 28, 4096] * 3,
        [CAPACITY, 28, CAPACITY - 1, 3],
    ],
)
@pytest.mark.parametrize("piece", [1, 4093, 100_003, 1 << 20])
async def test_bytes_come_back_whole_and_in_order(pair: Pair, sizes: list[int], piece: int) -> None:
    if piece == 1 and sum(sizes) > 1 << 20:
        sizes = [min(n, 70_000) for n in sizes]  # one byte per send: keep it short
    stream_bytes = _pattern(sum(sizes) + 17, piece)
    pair.send(stream_bytes, piece)
    got = await asyncio.wait_for(_read_all(pair.stream, sizes), 60)
    assert (
        hashlib.sha256(b"".join(got)).digest()
        == hashlib.sha256(stream_bytes[: sum(sizes)]).digest()
    )
    # what follows the last read is still there, then the end of the stream
    assert await pair.stream.readexactly(17) == stream_bytes[-17:]
    with pytest.raises(asyncio.IncompleteReadError) as err:
        await pair.stream.readexactly(1)
    assert err.value.partial == b""


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    sizes=st.lists(
        st.one_of(
            st.integers(0, 200),
            st.integers(DIRECT_MIN - 2, DIRECT_MIN + 2),
            st.integers(1, 3 << 20),
        ),
        min_size=1,
        max_size=12,
    ),
    piece=st.integers(1, 2 << 20),
    seed=st.integers(0, 1000),
)
async def test_any_sizes_any_cuts(sizes: list[int], piece: int, seed: int) -> None:
    """Hypothesis: any read sizes against any cutting of the stream by the sender."""
    piece = max(piece, sum(sizes) // 2000 + 1)  # bounded number of sends
    p = await _pair()
    try:
        stream_bytes = _pattern(sum(sizes), seed)
        p.send(stream_bytes, piece)
        got = await asyncio.wait_for(_read_all(p.stream, sizes), 60)
        assert b"".join(got) == stream_bytes
    finally:
        p.done.set()
        p.stream.close()
        p.peer.close()
        if p.sender is not None:
            p.sender.join(5)


@pytest.mark.parametrize("want", [10, DIRECT_MIN + 10, 2 << 20])
async def test_end_mid_read_reports_what_came(pair: Pair, want: int) -> None:
    """The sender stops 7 bytes short: IncompleteReadError carries exactly what came."""
    data = _pattern(want - 7, want)
    pair.send(data, 50_000)
    with pytest.raises(asyncio.IncompleteReadError) as err:
        await asyncio.wait_for(pair.stream.read_payload(want), 30)
    assert err.value.partial == data
    assert err.value.expected == want


async def test_unread_bytes_are_bounded_and_the_socket_stops(pair: Pair) -> None:
    """Nobody reads: at most CAPACITY bytes are taken off the socket, the rest stays in the
    kernel (the sender blocks), and every byte still comes out in order afterwards."""
    total = 16 << 20
    data = _pattern(total, 3)
    pair.send(data, 1 << 20)
    await asyncio.sleep(0.5)
    assert pair.stream.buffered_bytes() <= CAPACITY
    assert pair.sender is not None and pair.sender.is_alive()  # blocked: the socket is full
    got = await asyncio.wait_for(_read_all(pair.stream, [1000, total - 1000]), 60)
    assert b"".join(got) == data


async def test_a_large_payload_is_its_own_buffer(pair: Pair) -> None:
    """A large payload is a buffer of its own, never a view of the fixed buffer: received in
    place when the read waits for it (a view of that buffer), copied out when it had all
    arrived already (bytes). Reading on changes neither."""
    first, second = _pattern(1 << 20, 1), _pattern(1 << 20, 2)
    reading = asyncio.ensure_future(pair.stream.read_payload(1 << 20))
    await asyncio.sleep(0.05)  # the read waits before a byte is sent: in place, for certain
    pair.send(first + second, 65_536)
    a = await asyncio.wait_for(reading, 30)
    await asyncio.sleep(0.2)  # the second payload may arrive whole or in part: either is fine
    b = await asyncio.wait_for(pair.stream.read_payload(1 << 20), 30)
    assert isinstance(a, memoryview)
    fixed = pair.stream.buffered().obj
    assert a.obj is not fixed
    assert not (isinstance(b, memoryview) and (b.obj is fixed or b.obj is a.obj))
    assert bytes(a) == first and bytes(b) == second


async def test_many_small_reads_across_the_buffer_end(pair: Pair) -> None:
    """Small reads (headers) over several times the fixed buffer: the unread bytes are moved
    down whenever the buffer's end is reached, and none is lost or repeated."""
    sizes = [(i * 7919) % 200 + 1 for i in range(40_000)]  # ~4 MB, 4x CAPACITY
    data = _pattern(sum(sizes), 9)
    pair.send(data, 100_003)
    got = []
    for i, n in enumerate(sizes):
        got.append(await pair.stream.readexactly(n))
        if i % 5000 == 0:
            await asyncio.sleep(0.01)  # let the buffer fill up behind the reader
    assert b"".join(got) == data


async def test_replies_go_out_after_the_client_stops_sending(pair: Pair) -> None:
    """A client that shuts down its sending side still gets the replies to what it sent."""
    pair.send(b"request", 7)  # then SHUT_WR
    assert await pair.stream.readexactly(7) == b"request"
    with pytest.raises(asyncio.IncompleteReadError):
        await pair.stream.readexactly(1)
    pair.stream.write(b"reply")
    await pair.stream.drain()
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, pair.peer.recv, 5) == b"reply"
