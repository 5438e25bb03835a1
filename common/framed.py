"""The asyncio shell around the sans-I/O replication protocol: bytes in, typed messages out.

A connection is an ``asyncio.BufferedProtocol`` whose receive buffer is the frame decoder's
own (``FrameDecoder.get_buffer``): TLS decrypts a large payload (a batch) straight into the
buffer the message keeps, with no copy in between (a ``StreamReader`` cost four: its
buffer, ``read``, the decoder's buffer, the payload). Reading pauses while more than
READ_PAUSE bytes wait to be taken, so a slow consumer holds at most that plus one frame.

Rule: protocol errors raised by the pure code are caught here once and turned
into an ERROR frame (best effort) and a closed connection; callers see
:class:`ProtocolError` or :class:`ConnectionError`, never a half-read frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, cast

from common.aio import ProtocolWaits
from protocol.errors import ErrorCode, ProtocolError
from protocol.frames import (
    EOF,
    NEED_DATA,
    Buffer,
    Connection,
    ErrorMsg,
    Message,
    NeedData,
    encode_message,
)

log = logging.getLogger(__name__)

READ_PAUSE = 1 << 20  # received bytes not yet taken by recv() before reading pauses
SMALL_WRITE = 64 << 10  # frames smaller than this are joined into one write
TLS_RECORD = 16 << 10  # the largest TLS record's plaintext


class _FrameProtocol(ProtocolWaits, asyncio.BufferedProtocol):
    """Transport callbacks for one connection: received bytes go into the decoder in place."""

    def __init__(self, conn: Connection, on_ready: Callable[[FramedStream], None] | None) -> None:
        super().__init__()
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.bytes_in = 0
        self.feed_error: ProtocolError | None = None
        self.eof = False
        self.lost: BaseException | None = None
        self.reading_paused = False
        self._on_ready = on_ready

    # ----------------------------------------------------------------- transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's TLS transport is a Transport in all but its class)
        self.transport = cast(asyncio.Transport, transport)
        if self._on_ready is not None:
            self._on_ready(FramedStream(self.transport, self))

    def get_buffer(self, sizehint: int) -> memoryview:
        try:
            return self.conn.get_buffer()
        except ProtocolError as exc:  # reported by recv(); nothing more is read
            self.feed_error = exc
            self._pause_reading()
            self._wake()  # a reader asleep in recv() raises it now
            return memoryview(bytearray(1 << 16))

    def buffer_updated(self, nbytes: int) -> None:
        if self.feed_error is not None:
            return
        self.bytes_in += nbytes
        if not self.conn.buffer_updated(nbytes):
            return  # the middle of a large payload: nothing to read yet, nothing to pause on
        if self.conn.backlog >= READ_PAUSE:
            self._pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.eof = True  # a clean close: what was received is read to its end
        self.lost = exc if exc is not None else ConnectionResetError("connection closed")
        self._wake()
        self._fail_writers("connection lost while sending")

    # ----------------------------------------------------------------- for FramedStream
    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and self.lost is None:
            self.reading_paused = False
            self.transport.resume_reading()

    async def wait_data(self) -> None:
        """Until more bytes, EOF or the connection's end arrive."""
        self.resume_reading()
        await self._await_data()

    async def drain(self) -> None:
        if self.lost is not None:
            raise ConnectionResetError("connection lost")
        await self._await_writable()


class FramedStream:
    """One replication connection (TLS transport + protocol state machine)."""

    def __init__(self, transport: asyncio.Transport, protocol: _FrameProtocol) -> None:
        self.transport = transport
        self._protocol = protocol
        self.conn = protocol.conn
        self.bytes_out = 0
        self._send_lock = asyncio.Lock()

    @property
    def bytes_in(self) -> int:
        return self._protocol.bytes_in

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    async def recv(self) -> Message:
        """The next message. Raises ProtocolError, ConnectionError (EOF or reset)."""
        protocol = self._protocol
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                if protocol.feed_error is not None:
                    raise protocol.feed_error
                if protocol.eof:
                    self.conn.receive_data(b"")  # then EOF_EVENT, or a truncated frame
                    continue
                if protocol.lost is not None:
                    raise ConnectionResetError(f"connection lost: {protocol.lost}")
                await protocol.wait_data()
                continue
            if isinstance(event, EOF):
                raise ConnectionResetError("peer closed the connection")
            if isinstance(event, ErrorMsg):
                raise ConnectionAbortedError(f"peer error {event.code}: {event.message}")
            assert not isinstance(event, NeedData)
            return event

    async def send(self, msg: Message, *, drain: bool = True) -> None:
        """Send one message; waits for the transport to drain past its high-water mark."""
        if self._protocol.lost is not None:
            raise ConnectionResetError("connection lost")
        parts = self.conn.send_parts(msg)
        size = sum(len(p) for p in parts)
        self.bytes_out += size
        if size < SMALL_WRITE:
            self.transport.write(b"".join(parts))
        else:
            self.transport.writelines(_coalesced(parts))
        if drain:
            async with self._send_lock:
                await self._protocol.drain()

    async def send_error(self, code: ErrorCode, message: str) -> None:
        """Best-effort ERROR frame before closing; never raises."""
        with contextlib.suppress(ProtocolError, ConnectionError, OSError, RuntimeError):
            # Straight to the wire: after a protocol error the state machine refuses to send.
            self.transport.write(encode_message(ErrorMsg(int(code), message[:500])))
            await asyncio.wait_for(self._protocol.drain(), 2.0)

    async def close(self) -> None:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError, asyncio.TimeoutError):
            self.transport.close()
            if self._protocol.lost is None:
                await asyncio.wait_for(self._closed(), 2.0)

    async def _closed(self) -> None:
        while self._protocol.lost is None:
            await self._protocol.wait_data()


def _coalesced(parts: list[Buffer]) -> list[Buffer]:
    """``parts`` for a TLS transport: neighbours shorter than a TLS record are joined, longer
    ones go as they are. (The transport encrypts each part it is given on its own, so a
    4 KiB piece would otherwise cost a record, and the peer a read, of its own.)"""
    out: list[Buffer] = []
    run: list[Buffer] = []
    run_size = 0
    for part in parts:
        if len(part) >= TLS_RECORD:
            if run:
                out.append(b"".join(run))
                run, run_size = [], 0
            out.append(part)
            continue
        run.append(part)
        run_size += len(part)
        if run_size >= TLS_RECORD:
            out.append(b"".join(run))
            run, run_size = [], 0
    if run:
        out.append(b"".join(run))
    return out


async def open_framed(
    host: str,
    port: int,
    conn: Connection,
    *,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None = None,
) -> FramedStream:
    """Connect; the returned stream speaks ``conn``. Raises OSError, ssl.SSLError."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: _FrameProtocol(conn, None),
        host,
        port,
        ssl=ssl_context,
        server_hostname=server_hostname if ssl_context is not None else None,
    )
    return FramedStream(cast(asyncio.Transport, transport), protocol)


async def start_framed_server(
    handler: Callable[[FramedStream], Coroutine[Any, Any, None]],
    host: str,
    port: int,
    new_connection: Callable[[], Connection],
    *,
    ssl_context: ssl.SSLContext | None,
) -> asyncio.Server:
    """Listen; every accepted connection (after its TLS handshake) runs ``handler`` in a task
    of its own with a stream speaking ``new_connection()``."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=connection_handler_failed error=%r", str(task.exception()))

    def ready(stream: FramedStream) -> None:
        task = loop.create_task(handler(stream))
        tasks.add(task)
        task.add_done_callback(done)

    return await loop.create_server(
        lambda: _FrameProtocol(new_connection(), ready),
        host,
        port,
        ssl=ssl_context,
        reuse_address=True,
    )
