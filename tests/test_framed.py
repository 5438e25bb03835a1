"""Frames received in place: the decoder's buffer API and the TLS stream built on it.

The decoder is fed through ``get_buffer``/``buffer_updated`` (as ``asyncio.BufferedProtocol``
feeds it) in chunks of any size, mixed with ``receive_data``, and must give exactly the
messages that whole frames give, each large batch in the buffer it was received into. Then a
real TLS connection on loopback (``start_framed_server`` / ``open_framed``) carries batches
of every size both ways; a consumer that stops reading holds the sender back instead of
buffering without bound.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import struct
import tracemalloc
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.framed import READ_PAUSE, FramedStream, open_framed, start_framed_server
from common.tls import CLIENT_SERVER_HOSTNAME, client_context, server_context
from process_server.pki import init_pki, issue_credentials, load_bundle
from protocol.batch import CODEC_RAW, Extent, encode_batch, encode_batch_parts
from protocol.errors import ProtocolError
from protocol.frames import (
    EOF,
    NEED_DATA,
    Ack,
    BatchMsg,
    Connection,
    FrameDecoder,
    Hello,
    HelloOk,
    Message,
    NeedData,
    Register,
    Registered,
    encode_message,
)

DISK = "d0"
Contexts = tuple[ssl.SSLContext, ssl.SSLContext]  # server, client


def _batch(seq: int, sizes: list[int], seed: int) -> bytes:
    rnd = random.Random(seed)
    extents, offset = [], 0
    for size in sizes:
        extents.append(Extent(offset, size, rnd.randbytes(size)))
        offset += size + 4096
    return encode_batch(DISK, seq, seq, extents, newest_write_ns=seq, codec=CODEC_RAW)


def _drain(decoder: FrameDecoder) -> list[Message]:
    out: list[Message] = []
    while (event := decoder.next_message()) is not NEED_DATA:
        assert not isinstance(event, EOF | NeedData)
        out.append(event)
    return out


@given(
    sizes=st.lists(st.integers(1, 200_000), min_size=1, max_size=6),
    chunks=st.lists(st.integers(1, 300_000), min_size=1, max_size=40),
    modes=st.lists(st.booleans(), min_size=1, max_size=40),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_in_place_feeding_gives_the_messages_whole_frames_give(
    sizes: list[int], chunks: list[int], modes: list[bool]
) -> None:
    batches = [_batch(i + 1, [size], seed=i) for i, size in enumerate(sizes)]
    frames = b"".join(
        encode_message(m) for b in batches for m in (BatchMsg.from_data(b), Ack("d", 1))
    )
    decoder = FrameDecoder()
    got: list[Message] = []
    pos, i = 0, 0
    while pos < len(frames):
        want = chunks[i % len(chunks)]
        if modes[i % len(modes)]:  # in place: at most what the buffer offered
            view = decoder.get_buffer()
            n = min(want, len(view), len(frames) - pos)
            view[:n] = frames[pos : pos + n]
            if not decoder.buffer_updated(n):  # "no message yet": one must not be hidden
                assert decoder.next_message() is NEED_DATA
        else:
            n = min(want, len(frames) - pos)
            decoder.receive_data(frames[pos : pos + n])
        pos += n
        i += 1
        got.extend(_drain(decoder))
    assert [type(m) for m in got] == [BatchMsg, Ack] * len(batches)
    received = [m for m in got if isinstance(m, BatchMsg)]
    assert [bytes(m.data) for m in received] == batches
    if all(modes):  # fed in place only: every payload that may be is received in place
        for msg, batch in zip(received, batches, strict=True):
            in_place = FrameDecoder.DIRECT_MIN <= len(batch) <= FrameDecoder.DIRECT_MAX
            assert (type(msg.data) is bytearray) == in_place  # not copied out of a buffer
    assert decoder.buffered == 0


def test_a_frame_announced_in_place_costs_at_most_its_own_buffer() -> None:
    """Memory follows what is received, plus one DIRECT_MAX buffer for a frame announced and
    trickled; a larger announcement is buffered as it arrives."""
    for length, bound in (
        (FrameDecoder.DIRECT_MAX, FrameDecoder.DIRECT_MAX + (256 << 10)),
        (40 << 20, 256 << 10),
    ):
        head = bytearray(encode_message(Ack("d", 1))[:24])
        struct.pack_into(">I", head, 8, length)
        struct.pack_into(">I", head, 20, xxhash.xxh32_intdigest(bytes(head[:20])))
        decoder = FrameDecoder()
        tracemalloc.start()
        try:
            decoder.receive_data(bytes(head))
            assert decoder.next_message() is NEED_DATA  # the header read: the payload's turn
            for _ in range(16):
                view = decoder.get_buffer()
                view[:4096] = bytes(4096)
                # in place, a payload short of its length tells the reader not to look yet
                assert decoder.buffer_updated(4096) is (length > FrameDecoder.DIRECT_MAX)
                assert decoder.next_message() is NEED_DATA
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= bound, (length, peak)
        assert decoder.buffered == 16 * 4096 + (0 if length <= FrameDecoder.DIRECT_MAX else 24)


# --------------------------------------------------------------------------- over TLS


@pytest.fixture
def tls(tmp_path: Path) -> Contexts:
    pki = tmp_path / "pki"
    init_pki(pki)
    issue_credentials(pki, "alice", tmp_path / "alice.bundle")
    return server_context(pki), client_context(load_bundle(tmp_path / "alice.bundle"))


async def _pair(tls: Contexts) -> tuple[FramedStream, FramedStream, asyncio.Server]:
    accepted: asyncio.Queue[FramedStream] = asyncio.Queue()
    release = asyncio.Event()

    async def handler(stream: FramedStream) -> None:
        await accepted.put(stream)
        await release.wait()

    server = await start_framed_server(
        handler,
        "127.0.0.1",
        0,
        lambda: Connection("server"),
        ssl_context=tls[0],
    )
    port = server.sockets[0].getsockname()[1]
    client = await open_framed(
        "127.0.0.1",
        port,
        Connection("client"),
        ssl_context=tls[1],
        server_hostname=CLIENT_SERVER_HOSTNAME,
    )
    serving = await asyncio.wait_for(accepted.get(), 10)
    await client.send(Hello("alice", "agent"))
    assert isinstance(await serving.recv(), Hello)
    await serving.send(HelloOk("ps", 48 << 20, 32 << 20))
    assert isinstance(await client.recv(), HelloOk)
    await client.send(Register(DISK, 1 << 40, 0))
    assert isinstance(await serving.recv(), Register)
    await serving.send(Registered(DISK, 0, 0))
    assert isinstance(await client.recv(), Registered)
    return client, serving, server


async def test_batches_cross_a_tls_connection_intact_in_pieces_or_whole(tls: Contexts) -> None:
    client, serving, server = await _pair(tls)
    rnd = random.Random(5)
    sent: list[bytes] = []
    for seq in range(1, 41):
        sizes = [
            rnd.choice([1, 512, 4096, 20_000, 65_536, 300_000]) for _ in range(rnd.randrange(1, 12))
        ]
        extents, offset = [], 0
        for size in sizes:
            extents.append(Extent(offset, size, memoryview(os.urandom(size))))
            offset += size + 4096
        parts = encode_batch_parts(DISK, seq, seq, extents, newest_write_ns=seq, codec=CODEC_RAW)
        sent.append(b"".join(parts))
        msg = BatchMsg.from_parts(parts) if seq % 2 else BatchMsg.from_data(sent[-1])
        await client.send(msg)
        got = await asyncio.wait_for(serving.recv(), 10)
        assert isinstance(got, BatchMsg) and bytes(got.data) == sent[-1]
        await serving.send(Ack(DISK, seq))
        ack = await asyncio.wait_for(client.recv(), 10)
        assert isinstance(ack, Ack) and ack.durable_seq == seq
    assert serving.bytes_in == client.bytes_out
    await client.close()
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(serving.recv(), 10)  # the peer's close, at a frame boundary
    server.close()


async def test_a_consumer_that_stops_reading_holds_the_sender_back(tls: Contexts) -> None:
    """While the receiver takes nothing, reading pauses: the sender's transport fills and its
    ``send`` waits, and the receiver holds about READ_PAUSE plus one frame, not the stream."""
    client, serving, server = await _pair(tls)
    client.transport.set_write_buffer_limits(high=1 << 20)
    sent = 0

    async def sender() -> None:
        nonlocal sent
        for seq in range(1, 201):
            await client.send(BatchMsg.from_data(_batch(seq, [1 << 20], seed=9)))
            sent = seq

    task = asyncio.create_task(sender())
    await asyncio.sleep(1.5)
    assert not task.done() and sent < 100, sent  # 200 MiB did not vanish into buffers
    protocol = serving._protocol
    assert protocol.reading_paused
    assert serving.conn.backlog <= READ_PAUSE + FrameDecoder.SCRATCH
    for seq in range(1, 201):
        got = await asyncio.wait_for(serving.recv(), 20)
        assert isinstance(got, BatchMsg) and got.header.first_seq == seq
    await asyncio.wait_for(task, 20)
    await client.close()
    server.close()


async def test_a_reader_asleep_when_its_connection_fails_wakes_with_the_error(
    tls: Contexts,
) -> None:
    """A connection failed by its own sending side takes no more bytes: the next ones that
    arrive wake the reader waiting in ``recv``, which raises, instead of sleeping on."""
    client, serving, server = await _pair(tls)
    reader = asyncio.create_task(serving.recv())
    await asyncio.sleep(0.1)
    assert not reader.done()
    with pytest.raises(ProtocolError):
        await serving.send(Hello("again", "agent"))  # illegal once ready: the connection fails
    await client.send(BatchMsg.from_data(_batch(1, [4096], seed=1)))
    with pytest.raises(ProtocolError):
        await asyncio.wait_for(reader, 10)
    await serving.close()
    await client.close()
    server.close()
