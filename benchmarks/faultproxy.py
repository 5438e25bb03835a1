# A fault-injection TCP proxy for the replication link (as asyncpg's adversity tests use):
# agent -> 127.0.0.1:proxy.port -> 127.0.0.1:target_port (the process server). It cuts, stalls,
# delays and jitters, fragments, corrupts, half-closes, freezes (half-open) and resets mid-frame.
# Two modes, chosen per new connection: "passthrough" forwards the TLS records untouched (a fault
# there can only be caught by TLS itself), "terminate" ends TLS on both sides with the
# deployment's own credentials, so faults reach the replication frames (plaintext) and the
# protocol's own checksums and digests are what must catch them. Rule kept: it listens on and
# connects to loopback only, runs its own event loop in a background thread, and every fault is
# parsed and counted here, independently of the code under test.
"""Fault-injection proxy between an agent and the process server (tests and the soak
benchmark)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import xxhash

from benchmarks.proxy import stop_loop_thread

Direction = Literal["up", "down"]  # up: agent -> process server; down: the replies
Mode = Literal["passthrough", "terminate"]
T = TypeVar("T")

# The replication frame header, parsed here without the code under test (docs/architecture.md).
FRAME_HEADER = struct.Struct(">4sBBHIQI")
FRAME_MAGIC = b"TDMK"
MSG_BATCH = 5
MSG_HEARTBEAT = 7
_BATCH_PREFIX = struct.Struct(">4sBBB")  # magic, version, codec, disk id length
_BATCH_FIELDS = struct.Struct(">QQQIII")  # first, last, newest_ns, n_extents, raw, compressed
_EXTENT_ROW = 29
_READ = 1 << 16


@dataclass
class FrameFault:
    """A one-shot (or ``count``-shot) fault on upstream frames of one type (terminate mode).

    ``action``:
      - "header": flip a byte of the 24-byte header after the magic (its xxh32 must catch it);
      - "payload": flip a byte of the payload, checksums left as sent (the xxh3_64 must);
      - "batch-data": flip a byte of a batch's data section and recompute both frame
        checksums, so only the batch's per-extent XXH3-128 can catch it;
      - "reset": forward ``fraction`` of the frame's bytes, then reset both connections.
    """

    msg_type: int
    action: Literal["header", "payload", "batch-data", "reset"]
    count: int | None = 1  # None: every matching frame
    fraction: float = 0.5
    fired: int = 0
    flipped: list[tuple[int, int]] = field(default_factory=list)  # (offset in frame, xor)


@dataclass
class Stats:
    connections: int = 0
    refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    corrupted_chunks: int = 0
    resets: int = 0
    frames_up: dict[int, int] = field(default_factory=dict)


class _Link:
    """One proxied connection: the agent side and the process-server side."""

    def __init__(
        self,
        proxy: FaultProxy,
        mode: Mode,
        agent: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.mode = mode
        self.agent_reader, self.agent_writer = agent
        self.server_reader, self.server_writer = server
        self.frozen = asyncio.Event()  # set: half-open, nothing moves any more
        self.dead = asyncio.Event()  # set once aborted
        self.half_closed: set[Direction] = set()
        self.up_bytes = 0
        self.reset_at: int | None = None  # passthrough: reset after this many upstream bytes

    def abort(self) -> None:
        self.dead.set()
        for w in (self.agent_writer, self.server_writer):
            with contextlib.suppress(Exception):
                w.transport.abort()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump("up", self.agent_reader, self.server_writer))
                tg.create_task(self._pump("down", self.server_reader, self.agent_writer))
        except* (ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            self.abort()

    # ------------------------------------------------------------------ pumps
    async def _pump(
        self, direction: Direction, src: asyncio.StreamReader, dst: asyncio.StreamWriter
    ) -> None:
        framed = self.mode == "terminate" and direction == "up"
        pending = bytearray()  # terminate mode, upstream: bytes of an incomplete frame
        while True:
            await self.proxy._flowing.wait()
            if self.frozen.is_set() or direction in self.half_closed:
                await self.dead.wait()  # nothing moves this way again; only an abort ends it
                return
            data = await src.read(_READ)
            if self.frozen.is_set():
                continue  # frozen while we waited: these bytes are lost on the wire
            if not data:
                if pending:
                    await self._forward(direction, dst, bytes(pending))
                with contextlib.suppress(Exception):
                    if dst.can_write_eof():
                        dst.write_eof()
                    else:
                        dst.close()
                if self.half_closed:
                    self.abort()  # the other way was closed by us: nothing is left to carry
                return
            if framed:
                pending += data
                for chunk in self._frames(pending):
                    if not await self._forward(direction, dst, chunk):
                        return
            else:
                if not await self._forward(direction, dst, data):
                    return

    def _frames(self, pending: bytearray) -> list[bytes | _Reset]:
        """Whole frames taken from ``pending`` (frame faults applied); bytes that are not a
        frame header are passed on as they are (the server must refuse them, not us)."""
        out: list[bytes | _Reset] = []
        while len(pending) >= FRAME_HEADER.size:
            magic, _v, msg_type, _f, length, _p, _h = FRAME_HEADER.unpack_from(pending)
            if magic != FRAME_MAGIC:
                out.append(bytes(pending))
                pending.clear()
                break
            end = FRAME_HEADER.size + length
            if len(pending) < end:
                break
            frame = bytearray(pending[:end])
            del pending[:end]
            stats = self.proxy.stats
            stats.frames_up[msg_type] = stats.frames_up.get(msg_type, 0) + 1
            out.extend(self.proxy._apply_frame_fault(self, msg_type, frame))
        return out

    async def _forward(
        self, direction: Direction, dst: asyncio.StreamWriter, data: bytes | _Reset
    ) -> bool:
        """Delay, corrupt, fragment and write ``data``; False once the link was reset."""
        proxy = self.proxy
        if isinstance(data, _Reset):
            proxy.stats.resets += 1
            self.abort()
            return False
        if proxy.latency or proxy.jitter:
            pause = proxy.latency + proxy._rng.uniform(-proxy.jitter, proxy.jitter)
            await asyncio.sleep(max(0.0, pause))
            await proxy._flowing.wait()
        data = proxy._maybe_corrupt(direction, data)
        if direction == "up":
            proxy.stats.bytes_up += len(data)
            self.up_bytes += len(data)
            if self.reset_at is not None and self.up_bytes >= self.reset_at:
                keep = len(data) - (self.up_bytes - self.reset_at)
                dst.write(data[:keep])
                with contextlib.suppress(Exception):
                    await dst.drain()
                proxy.stats.resets += 1
                self.abort()
                return False
        else:
            proxy.stats.bytes_down += len(data)
        pieces = [data]
        if proxy.fragment:
            pieces, pos = [], 0
            while pos < len(data):
                n = proxy._rng.randint(1, proxy.fragment)
                pieces.append(data[pos : pos + n])
                pos += n
        for piece in pieces:
            dst.write(piece)
            await dst.drain()
            if proxy.fragment:
                await asyncio.sleep(0)
        return True


class _Reset:
    """Sentinel in a frame list: reset the link here."""


_RESET = _Reset()


class FaultProxy:
    """``127.0.0.1:port`` -> ``127.0.0.1:target_port`` with faults switched on from tests.

    ``terminate`` is ``(server_ctx, client_ctx, server_hostname)``: the context presented to
    the agent, the one presented to the process server and the name to verify it by. Every
    method may be called from the test's thread.
    """

    def __init__(
        self,
        target_port: int,
        *,
        terminate: tuple[ssl.SSLContext, ssl.SSLContext, str] | None = None,
        seed: int = 0,
    ) -> None:
        self.target_port = target_port
        self.port = 0
        self.mode: Mode = "passthrough"
        self._terminate = terminate
        self.stats = Stats()
        self.latency = 0.0
        self.jitter = 0.0
        self.fragment = 0
        self.refusing = False
        self._rng = random.Random(seed)
        self._corrupt: dict[Direction, int | None] = {"up": 0, "down": 0}  # chunks left
        self._frame_faults: list[FrameFault] = []
        self._reset_after: int | None = None
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._flowing = asyncio.Event()
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._failed is not None:
            raise RuntimeError(f"fault proxy did not start: {self._failed!r}")

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(lambda loop, context: None)  # resets are the point
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:
            self._failed = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._flowing.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._accept_task = asyncio.ensure_future(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            task = asyncio.ensure_future(self._accept(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the proxy's loop and return its result."""

        async def wrapper() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(10)

    async def _accept(self, sock: socket.socket) -> None:
        if self.refusing:
            self.stats.refused += 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST
            return
        mode = self.mode
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ)
        server_ctx = self._terminate[0] if mode == "terminate" and self._terminate else None
        try:
            # The agent's TLS ends here in terminate mode (the handshake starts with the very
            # first byte, so no ClientHello can be read as plaintext first).
            transport, protocol = await asyncio.wait_for(
                loop.connect_accepted_socket(
                    lambda: asyncio.StreamReaderProtocol(reader), sock, ssl=server_ctx
                ),
                10,
            )
        except (OSError, ssl.SSLError, TimeoutError):
            sock.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            if mode == "terminate":
                assert self._terminate is not None
                _server_ctx, client_ctx, hostname = self._terminate
                up = await asyncio.wait_for(
                    asyncio.open_connection(
                        "127.0.0.1", self.target_port, ssl=client_ctx, server_hostname=hostname
                    ),
                    10,
                )
            else:
                up = await asyncio.open_connection("127.0.0.1", self.target_port)
        except (OSError, ssl.SSLError, TimeoutError):
            writer.transport.abort()
            return
        link = _Link(self, mode, (reader, writer), up)
        link.reset_at = self._reset_after
        self._reset_after = None
        self.stats.connections += 1
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)

    # ------------------------------------------------------------------ fault logic
    def _maybe_corrupt(self, direction: Direction, data: bytes) -> bytes:
        left = self._corrupt[direction]
        if left == 0 or not data:
            return data
        if left is not None:
            self._corrupt[direction] = left - 1
        out = bytearray(data)
        pos = self._rng.randrange(len(out))
        out[pos] ^= self._rng.randint(1, 255)
        self.stats.corrupted_chunks += 1
        return bytes(out)

    def _apply_frame_fault(
        self, link: _Link, msg_type: int, frame: bytearray
    ) -> list[bytes | _Reset]:
        fault = next(
            (
                f
                for f in self._frame_faults
                if f.msg_type == msg_type and (f.count is None or f.fired < f.count)
            ),
            None,
        )
        if fault is None:
            return [bytes(frame)]
        if fault.action == "batch-data" and not _batch_data_span(frame):
            return [bytes(frame)]  # a batch without data bytes: wait for one that has some
        fault.fired += 1
        if fault.action == "reset":
            keep = max(1, min(len(frame) - 1, int(len(frame) * fault.fraction)))
            return [bytes(frame[:keep]), _RESET]
        xor = self._rng.randint(1, 255)
        if fault.action == "header":
            pos = self._rng.randrange(4, FRAME_HEADER.size)  # past the magic: xxh32 covers it
        elif fault.action == "payload":
            pos = self._rng.randrange(FRAME_HEADER.size, len(frame))
        else:
            span = _batch_data_span(frame)
            assert span is not None  # checked above
            pos = self._rng.randrange(*span)
        frame[pos] ^= xor
        fault.flipped.append((pos, xor))
        if fault.action == "batch-data":
            _reseal_frame(frame)
        return [bytes(frame)]

    # ------------------------------------------------------------------ public API
    def set_mode(self, mode: Mode) -> None:
        """Mode of the connections accepted from now on (open ones keep theirs)."""
        if mode == "terminate" and self._terminate is None:
            raise ValueError("terminate mode needs TLS contexts")
        self._call(lambda: setattr(self, "mode", mode))

    def cut(self) -> None:
        """Reset (RST) every open connection; the listener stays."""

        def go() -> None:
            for link in list(self._links):
                link.abort()
                self.stats.resets += 1

        self._call(go)

    def refuse(self, on: bool = True) -> None:
        """Accept-and-reset every new connection (as a server that is down) while ``on``."""
        self._call(lambda: setattr(self, "refusing", on))

    def stall(self) -> None:
        """Stop forwarding in both directions; connections stay open, TCP backpressure builds."""
        self._call(self._flowing.clear)

    def resume(self) -> None:
        """Undo :meth:`stall`."""
        self._call(self._flowing.set)

    def freeze(self) -> int:
        """Half-open: every open connection stops moving data forever and is never closed (as
        a peer whose host vanished); new connections work. Returns how many were frozen."""

        def go() -> int:
            for link in self._links:
                link.frozen.set()
            return len(self._links)

        return self._call(go)

    def half_close(self, direction: Direction) -> int:
        """Send FIN one way on every open connection (the other way keeps flowing)."""

        def go() -> int:
            for link in self._links:
                link.half_closed.add(direction)
                writer = link.server_writer if direction == "up" else link.agent_writer
                with contextlib.suppress(Exception):
                    writer.write_eof()
            return len(self._links)

        return self._call(go)

    def set_delay(self, latency: float = 0.0, jitter: float = 0.0, fragment: int = 0) -> None:
        """Each chunk waits ``latency`` ± ``jitter`` seconds (order kept per direction) and is
        written in random pieces of 1..``fragment`` bytes (0: whole)."""

        def go() -> None:
            self.latency, self.jitter, self.fragment = latency, jitter, fragment

        self._call(go)

    def corrupt(self, direction: Direction, chunks: int | None = 1) -> None:
        """Flip one random byte in each of the next ``chunks`` chunks (None: all, 0: stop)."""

        def go() -> None:
            self._corrupt[direction] = chunks

        self._call(go)

    def reset_after(self, nbytes: int) -> None:
        """The next connection is reset once ``nbytes`` went upstream (passthrough mode)."""
        self._call(lambda: setattr(self, "_reset_after", nbytes))

    def add_frame_fault(self, fault: FrameFault) -> FrameFault:
        """Arm a fault on upstream frames (terminate mode). Returns it (``fired`` counts)."""
        self._call(lambda: self._frame_faults.append(fault))
        return fault

    def clear_faults(self) -> None:
        """Back to a clean link: no delay, corruption, frame fault, refusal or stall."""

        def go() -> None:
            self.latency = self.jitter = 0.0
            self.fragment = 0
            self._corrupt = {"up": 0, "down": 0}
            self._frame_faults.clear()
            self._reset_after = None
            self.refusing = False
            self._flowing.set()

        self._call(go)

    def open_connections(self) -> int:
        return self._call(lambda: len(self._links))

    def close(self) -> None:
        async def close_sockets() -> None:
            if self._accept_task is not None:
                self._accept_task.cancel()
            if self._listener is not None:
                self._listener.close()
            for link in list(self._links):
                link.abort()
            self._flowing.set()

        stop_loop_thread(self._loop, self._thread, close_sockets)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _batch_data_span(frame: bytearray | bytes) -> tuple[int, int] | None:
    """``[start, end)`` of a BATCH frame's data section within the frame, None if empty."""
    base = FRAME_HEADER.size
    if len(frame) < base + _BATCH_PREFIX.size:
        return None
    _magic, _version, _codec, id_len = _BATCH_PREFIX.unpack_from(frame, base)
    fields = base + _BATCH_PREFIX.size + id_len
    if len(frame) < fields + _BATCH_FIELDS.size:
        return None
    n_extents, _raw, compressed = _BATCH_FIELDS.unpack_from(frame, fields)[3:]
    start = fields + _BATCH_FIELDS.size + n_extents * _EXTENT_ROW
    if compressed == 0 or start + compressed != len(frame):
        return None
    return start, len(frame)


def _reseal_frame(frame: bytearray) -> None:
    """Recompute a frame's payload xxh3_64 and header xxh32 after the payload was changed."""
    payload_sum = xxhash.xxh3_64_intdigest(bytes(frame[FRAME_HEADER.size :]))
    struct.pack_into(">Q", frame, 12, payload_sum)
    struct.pack_into(">I", frame, 20, xxhash.xxh32_intdigest(bytes(frame[:20])))


__all__ = ["MSG_BATCH", "MSG_HEARTBEAT", "FaultProxy", "FrameFault", "Stats"]
