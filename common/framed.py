"""The asyncio shell around the sans-I/O replication protocol: bytes in, typed messages out.

Rule: protocol errors raised by the pure code are caught here once and turned
into an ERROR frame (best effort) and a closed connection; callers see
:class:`ProtocolError` or :class:`ConnectionError`, never a half-read frame.
"""

from __future__ import annotations

import asyncio
import contextlib

from protocol.errors import ErrorCode, ProtocolError
from protocol.frames import EOF, NEED_DATA, Connection, ErrorMsg, Message, NeedData, encode_message

READ_CHUNK = 256 << 10


class FramedStream:
    """One replication connection (TLS stream + protocol state machine)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.bytes_in = 0
        self.bytes_out = 0
        self._send_lock = asyncio.Lock()

    async def recv(self) -> Message:
        """The next message. Raises ProtocolError, ConnectionError (EOF or reset)."""
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                data = await self.reader.read(READ_CHUNK)
                self.bytes_in += len(data)
                self.conn.receive_data(data)
                continue
            if isinstance(event, EOF):
                raise ConnectionResetError("peer closed the connection")
            if isinstance(event, ErrorMsg):
                raise ConnectionAbortedError(f"peer error {event.code}: {event.message}")
            assert not isinstance(event, NeedData)
            return event

    async def send(self, msg: Message, *, drain: bool = True) -> None:
        """Send one message; waits for the transport to drain past its high-water mark."""
        parts = self.conn.send_parts(msg)
        size = sum(len(p) for p in parts)
        self.bytes_out += size
        if size < 65536:
            self.writer.write(b"".join(parts))
        else:
            self.writer.writelines(parts)
        if drain:
            async with self._send_lock:
                await self.writer.drain()

    async def send_error(self, code: ErrorCode, message: str) -> None:
        """Best-effort ERROR frame before closing; never raises."""
        with contextlib.suppress(ProtocolError, ConnectionError, OSError, RuntimeError):
            # Straight to the wire: after a protocol error the state machine refuses to send.
            self.writer.write(encode_message(ErrorMsg(int(code), message[:500])))
            await asyncio.wait_for(self.writer.drain(), 2.0)

    async def close(self) -> None:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError, asyncio.TimeoutError):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
