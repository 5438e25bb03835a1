"""The NBD export's socket: received bytes go straight where they will stay.

An ``asyncio.BufferedProtocol`` with the small part of ``StreamReader`` and ``StreamWriter``
the export uses (``readexactly``, ``write``, ``drain``, ``close``). Why not the standard
streams: a pipelining client's 1 MiB writes cost ``StreamReader`` three copies of every
payload (the event loop's read buffer, the stream's buffer, the ``bytes`` it hands out) and a
pause and resume of the socket for each, and a minimal export built on it wrote 0.36 GB/s
where the same export reading into its own buffers wrote 1.2-2.4 GB/s (docs/nbd.md,
"Reading requests"). Here:

- a payload of ``DIRECT_MIN`` bytes or more is received into its own ``bytearray``: the
  kernel copies it there and nothing copies it again;
- everything else (request headers, small payloads, handshake options) lands in one fixed
  ``CAPACITY``-byte buffer and is sliced out of it.

Rules it keeps: memory is bounded (the fixed buffer, plus the one payload ``readexactly`` was
asked for, which the export's in-flight budget already counts); the socket is not read while
the fixed buffer is full and nobody reads, which is the export's backpressure; bytes are
handed out exactly once and in order; end of stream and a lost connection are reported as
``StreamReader`` reports them (``IncompleteReadError`` with what was received, or the
connection's error).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, cast

from common.aio import ProtocolWaits

CAPACITY = 1 << 20  # the fixed buffer: headers and small payloads
DIRECT_MIN = 64 << 10  # payloads this large are received into their own buffer


class NbdStream(ProtocolWaits, asyncio.BufferedProtocol):
    """One connection's reader and writer."""

    def __init__(self, on_connect: Callable[[NbdStream], Coroutine[Any, Any, None]]) -> None:
        super().__init__()
        self._on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(CAPACITY)
        self._start = 0  # unread bytes are _buf[_start:_end]
        self._end = 0
        self._target: bytearray | None = None  # a large payload being received in place
        self._filled = 0
        self._eof = False
        self._error: BaseException | None = None
        self._reading_paused = False
        self._closed: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None  # held: the loop keeps tasks only weakly

    # ----------------------------------------------------------------- transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        self.task = loop.create_task(self._on_connect(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return memoryview(self._target)[self._filled :]
        if self._end == CAPACITY:  # room only before the unread bytes: move them down
            self._compact()
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None:
            self._filled += nbytes
            if self._filled == len(self._target):
                self._target = None  # whole: what follows goes to the fixed buffer
                self._wake()
            return
        self._end += nbytes
        if self._end == CAPACITY and self._start == 0:
            self._pause_reading()  # full: the reader must take something first
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # keep the transport open: replies to what was received still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None:
            self._error = exc
        self._wake()
        self._fail_writers("connection lost")
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    # ----------------------------------------------------------------- reading
    def buffered(self) -> memoryview:
        """The bytes received and not yet read (a view: valid until the next read)."""
        return memoryview(self._buf)[self._start : self._end]

    def buffered_bytes(self) -> int:
        return self._end - self._start

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes. Raises ``asyncio.IncompleteReadError`` at the end of the
        stream (with the bytes received), the connection's error if it was lost."""
        data = await self.read_payload(n)
        return data if isinstance(data, bytes) else bytes(data)

    async def read_payload(self, n: int) -> bytes | memoryview:
        """:meth:`readexactly`, but ``n`` of ``DIRECT_MIN`` or more that are not all here yet
        come as a view of a buffer of their own, received in place and referenced by nothing
        else (those already here are copied out as ``bytes``)."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        while True:
            have = self._end - self._start
            if have >= n:
                out = bytes(self._buf[self._start : self._start + n])
                self._consumed(n)
                return out
            if n >= DIRECT_MIN:
                return memoryview(await self._read_direct(n))
            if self._eof:
                self._raise_at_end(n)
            if self._start + n > CAPACITY:
                self._compact()
            await self._wait_data()

    async def _read_direct(self, n: int) -> bytearray:
        have = self._end - self._start
        target = bytearray(n)
        target[:have] = memoryview(self._buf)[self._start : self._end]
        self._start = self._end = 0
        self._target, self._filled = target, have
        try:
            while self._filled < n:
                if self._eof:
                    if self._error is not None:
                        raise self._error
                    raise asyncio.IncompleteReadError(bytes(target[: self._filled]), n)
                await self._wait_data()
        finally:
            self._target = None  # (already, when whole)
        return target

    def _raise_at_end(self, n: int) -> None:
        if self._error is not None:
            raise self._error
        partial = bytes(self._buf[self._start : self._end])
        self._consumed(self._end - self._start)
        raise asyncio.IncompleteReadError(partial, n)

    def _consumed(self, n: int) -> None:
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0

    def _compact(self) -> None:
        have = self._end - self._start
        self._buf[:have] = self._buf[self._start : self._end]
        self._start, self._end = 0, have

    async def _wait_data(self) -> None:
        if self._reading_paused and self.transport is not None and not self._eof:
            self._reading_paused = False
            self.transport.resume_reading()
        await self._await_data()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    # ----------------------------------------------------------------- writing
    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark, as
        ``StreamWriter.drain``. Raises the connection's error, or ConnectionResetError once
        it is lost."""
        if self._error is not None:
            raise self._error
        if self.transport is not None and self.transport.is_closing():
            await asyncio.sleep(0)  # let connection_lost run
        if self._closed is not None and self._closed.done():
            raise ConnectionResetError("connection lost")
        await self._await_writable()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        if self._closed is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._closed)
