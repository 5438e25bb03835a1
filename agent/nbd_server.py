"""The agent's NBD export: serves one disk to real NBD clients (qemu, nbdcopy, fio).

A thin asyncio shell over ``protocol.nbd``: the protocol module decides everything about bytes;
this module reads exactly what it is told to read, calls the disk and writes replies. The rule
it keeps: memory is bounded whatever the client does. Each connection has an in-flight budget
(requests and payload bytes); while it is spent the socket is not read, which is the
backpressure. Requests run concurrently (pipelined clients), a reply is written only after the
disk call returned, and a WRITE reaches the disk only once its whole payload was received.
Plain WRITEs that arrived together (a pipelining client's burst, read in one loop step) are
journaled together, one system call for all, then written one by one: the group is done
before the connection next waits for its socket, so it never spans a loop step.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from agent.nbd_stream import NbdStream
from common.errors import DiskError
from protocol import nbd

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0  # seconds a client may take to reach GO / EXPORT_NAME
CLOSE_TIMEOUT = 10.0  # seconds close() waits for in-flight disk calls before cancelling
_DISCARD_CHUNK = 1 << 16
_SMALL_REPLY = 1 << 16  # reads up to this size are sent as one joined buffer
_GROUP_BYTES = 8 << 20  # plain writes of one loop step journaled together, at most this much
_GROUP_WRITE_MAX = 4 << 20  # and each at most this (one journal record)
_UNIX_PATH_MAX = 107


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an export listens: ``kind`` "unix" (``path``) or "tcp" (``host``, ``port``)."""

    kind: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"tcp:{_bracket(self.host)}:{self.port}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_endpoint(spec: str) -> Endpoint:
    """Parse ``"unix:/path.sock"``, ``"tcp:HOST:PORT"`` or ``"tcp:PORT"`` (host 127.0.0.1).

    IPv6 hosts are written in brackets (``tcp:[::1]:10809``); an empty host means loopback,
    never "all interfaces". Raises ValueError naming the problem.
    """
    if not isinstance(spec, str):
        raise ValueError(f"NBD endpoint must be a string, not {type(spec).__name__}")
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("unix", "tcp"):
        raise ValueError(f"NBD endpoint {spec!r}: expected 'unix:/path.sock' or 'tcp:HOST:PORT'")
    if kind == "unix":
        if not rest:
            raise ValueError(f"NBD endpoint {spec!r}: empty socket path")
        if "\0" in rest:
            raise ValueError(f"NBD endpoint {spec!r}: NUL in socket path")
        if len(os.fsencode(rest)) > _UNIX_PATH_MAX:
            raise ValueError(
                f"NBD endpoint {spec!r}: socket path longer than {_UNIX_PATH_MAX} bytes"
            )
        return Endpoint("unix", path=rest)
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        host, port_text = "", rest
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"NBD endpoint {spec!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"NBD endpoint {spec!r}: write IPv6 hosts in brackets, tcp:[::1]:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"NBD endpoint {spec!r}: port must be a number from 0 to 65535")
    return Endpoint("tcp", host=host or "127.0.0.1", port=int(port_text))


class ExportedDisk(Protocol):
    """What an export needs of its disk: the agent's ProtectedDisk, and the process server's
    failover overlay (process_server/pit.py). Methods raise DiskError with an errno."""

    disk_id: str
    size: int
    read_only: bool

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(
        self,
        offset: int,
        data: bytes | memoryview,
        *,
        fua: bool = False,
        also: Sequence[tuple[int, int]] = (),
    ) -> object:
        """``also``: ``(offset, length)`` of the writes queued behind this one (a hint)."""

    def admit_nowait(self, offset: int, length: int) -> bool:
        """May a plain write of this range be done in this loop step? False: the caller
        awaits ``write``. True: it must be passed to ``write_admitted`` in this loop step."""

    def write_admitted(
        self, writes: Sequence[tuple[int, bytes | memoryview]], *, owned: bool = False
    ) -> Sequence[object]:
        """Do admitted writes now, in order: per write a result, or the DiskError it failed
        with. ``owned``: the buffers are handed over (nothing changes them later)."""

    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool = False, may_trim: bool = True
    ) -> object: ...

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> object: ...

    async def flush(self) -> None: ...


class _Budget:
    """In-flight requests and payload bytes of one connection; only the reader waits on it."""

    __slots__ = ("_bytes", "_count", "_max_bytes", "_max_count", "_room")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._count = 0
        self._bytes = 0
        self._room = asyncio.Event()

    def try_acquire(self, cost: int) -> bool:
        """``acquire`` when there is room now (no coroutine); False: await ``acquire``. One
        request alone always fits, so a max-size request cannot stall the connection."""
        if self._count >= self._max_count or (self._bytes and self._bytes + cost > self._max_bytes):
            return False
        self._count += 1
        self._bytes += cost
        return True

    async def acquire(self, cost: int) -> None:
        while not self.try_acquire(cost):
            self._room.clear()
            await self._room.wait()

    def release(self, cost: int) -> None:
        self._count -= 1
        self._bytes -= cost
        self._room.set()


class NbdExport:
    """Serves ``disk`` over NBD at ``endpoint`` until ``close()``.

    Every connection shares the one disk object, so a FLUSH on any connection covers the
    writes completed on all of them (hence CAN_MULTI_CONN). ``start`` raises OSError when the
    endpoint cannot be bound (or a non-socket file sits at a unix path); the constructor raises
    ValueError for a bad endpoint or limit.
    """

    def __init__(
        self,
        disk: ExportedDisk,
        endpoint: str,
        *,
        max_payload: int = nbd.MAX_PAYLOAD,
        max_inflight_bytes: int = 64 * 2**20,
        max_inflight_requests: int = 64,
    ) -> None:
        if not 4096 <= max_payload <= 2**31:
            raise ValueError(f"max_payload {max_payload} must be between 4096 and 2 GiB")
        if max_inflight_bytes < 1 or max_inflight_requests < 1:
            raise ValueError("in-flight limits must be positive")
        self.disk = disk
        self.endpoint = parse_endpoint(endpoint)
        self.max_payload = max_payload
        self.max_inflight_bytes = max_inflight_bytes
        self.max_inflight_requests = max_inflight_requests
        self._server: asyncio.Server | None = None
        self._port = self.endpoint.port
        self._connections: dict[asyncio.Task[None], NbdStream] = {}
        self._closing = False

    @property
    def address(self) -> str:
        """The NBD URI clients use (with the actual port once started on port 0)."""
        if self.endpoint.kind == "unix":
            return f"nbd+unix:///{self.disk.disk_id}?socket={self.endpoint.path}"
        return f"nbd://{_bracket(self.endpoint.host)}:{self._port}/{self.disk.disk_id}"

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError if the endpoint cannot be bound."""
        if self._server is not None:
            raise RuntimeError("NBD export already started")
        ep = self.endpoint
        loop = asyncio.get_running_loop()
        if ep.kind == "unix":
            path = Path(ep.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise FileExistsError(f"{path} exists and is not a socket; not replacing it")
                path.unlink()  # a stale socket of an earlier run
            self._server = await loop.create_unix_server(
                lambda: NbdStream(self._on_client), path=ep.path
            )
            os.chmod(ep.path, 0o660)
        else:
            self._server = await loop.create_server(
                lambda: NbdStream(self._on_client), ep.host, ep.port, reuse_address=True
            )
            self._port = self._server.sockets[0].getsockname()[1]
        logger.info("NBD export of %s at %s", self.disk.disk_id, self.address)

    async def close(self) -> None:
        """Stop accepting, close every connection and wait for their handlers to finish."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for stream in list(self._connections.values()):
            assert stream.transport is not None
            stream.transport.abort()
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if server is not None:
            await server.wait_closed()
            if self.endpoint.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.endpoint.path)

    async def __aenter__(self) -> NbdExport:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _on_client(self, stream: NbdStream) -> None:
        task = asyncio.current_task()
        assert stream.transport is not None
        if self._closing or task is None:
            stream.transport.abort()
            return
        self._connections[task] = stream
        try:
            await _Connection(self, stream).run()
        except Exception:  # the boundary: a bug in one connection must not take the export down
            logger.exception("NBD connection to %s failed", self.disk.disk_id)
        finally:
            del self._connections[task]
            if self._closing:
                stream.transport.abort()
            else:
                stream.close()
            with contextlib.suppress(OSError):
                await stream.wait_closed()


class _Connection:
    """One client: the handshake, then the request loop and the per-request tasks."""

    def __init__(self, export: NbdExport, stream: NbdStream) -> None:
        self.export = export
        self.disk = export.disk
        self.stream = stream  # reads requests and writes replies
        assert stream.transport is not None
        self.transport = stream.transport
        self.structured = False
        self.budget = _Budget(export.max_inflight_requests, export.max_inflight_bytes)
        self._loop = asyncio.get_running_loop()
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._high_water = self.transport.get_write_buffer_limits()[1]
        # Admitted writes not yet written: (request, payload, budget cost).
        self._group: list[tuple[nbd.Request, bytes | memoryview, int]] = []
        self._group_bytes = 0

    async def run(self) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                ready = await self._handshake()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            logger.debug("NBD handshake ended: %r", exc)
            return
        except nbd.NbdProtocolError as exc:
            logger.info("NBD handshake dropped: %s", exc)
            return
        if ready is None:
            return
        self.structured = ready.structured_replies
        async with asyncio.TaskGroup() as tasks:
            # Exceptions are handled inside the group so in-flight disk calls always finish
            # (a TaskGroup cancels its children when its body raises).
            try:
                await self._serve(tasks)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                logger.debug("NBD client went away: %r", exc)
            except nbd.NbdProtocolError as exc:
                logger.info("NBD connection dropped: %s", exc)

    async def _handshake(self) -> nbd.Ready | None:
        d = self.disk
        info = nbd.ExportInfo(
            name=d.disk_id,
            size=d.size,
            read_only=d.read_only,
            description=f"tidemark protected disk {d.disk_id}",
            max_payload=self.export.max_payload,
        )
        hs = nbd.ServerHandshake(info)
        self.stream.write(hs.data_to_send())
        while True:
            event = hs.next_event()
            out = hs.data_to_send()
            if out:
                self.stream.write(out)
            if event is nbd.NEED_DATA:
                await self.stream.drain()
                try:
                    data = await self.stream.readexactly(hs.bytes_wanted)
                except asyncio.IncompleteReadError as exc:
                    hs.receive_data(exc.partial)
                    hs.receive_data(b"")
                else:
                    hs.receive_data(data)
            elif isinstance(event, nbd.Ready):
                await self.stream.drain()
                return event
            elif isinstance(event, nbd.Aborted | nbd.Closed):
                await self.stream.drain()
                return None

    async def _serve(self, tasks: asyncio.TaskGroup) -> None:
        try:
            await self._serve_requests(tasks)
        finally:
            # Writes received whole before the connection ended are done, as they always were
            # (no await: a group never waits across a loop step).
            if self._group:
                self._write_group()

    async def _serve_requests(self, tasks: asyncio.TaskGroup) -> None:
        stream, disk, budget = self.stream, self.disk, self.budget
        size, max_payload = disk.size, self.export.max_payload
        while True:
            if self._group and stream.buffered_bytes() < nbd.REQUEST_SIZE:
                await self._finish_group()  # the next request is not here yet: do the group
            header = await stream.readexactly(nbd.REQUEST_SIZE)
            try:
                req = nbd.parse_request(
                    header, size=size, read_only=disk.read_only, max_payload=max_payload
                )
            except nbd.NbdProtocolError as exc:
                if exc.errno is None:
                    raise
                await self._finish_group()
                await self._discard(exc.discard)
                self._write(
                    nbd.error_reply(
                        exc.command,
                        exc.handle,
                        exc.errno,
                        structured=self.structured,
                        message=str(exc),
                    )
                )
                await self._drain_if_full()
                continue
            command = req.command
            if command == nbd.CMD_DISC:
                return  # the TaskGroup finishes the outstanding requests, then we close
            cost = req.length if command <= nbd.CMD_WRITE else 0  # READ and WRITE carry data
            if not budget.try_acquire(cost):
                await self._finish_group()  # releases what the group holds
                await budget.acquire(cost)
            payload: bytes | memoryview = b""
            queued: list[tuple[int, int]] = []  # for a write that must wait: see _perform
            if command == nbd.CMD_WRITE:
                if self._group and stream.buffered_bytes() < req.length:
                    await self._finish_group()
                try:
                    payload = await stream.read_payload(req.length)
                except BaseException:
                    budget.release(cost)
                    raise
                if not req.fua and req.length <= _GROUP_WRITE_MAX:
                    try:
                        admitted = disk.admit_nowait(req.offset, req.length)
                    except DiskError as exc:
                        self._write_disk_error(req, exc)
                        budget.release(cost)
                        await self._finish_group()  # and drains replies a client leaves unread
                        continue
                    if admitted:  # most writes: done with the others of this loop step
                        self._group.append((req, payload, cost))
                        self._group_bytes += req.length
                        if self._group_bytes >= _GROUP_BYTES:
                            await self._finish_group()
                        continue
                    if stream.buffered_bytes():
                        queued = nbd.queued_write_ranges(stream.buffered(), disk.size)
            if self._group:
                await self._finish_group()  # this connection's requests stay in order
            if command == nbd.CMD_FLUSH or req.fua:
                tasks.create_task(self._execute(req, payload, cost))  # waits for fdatasync
            else:
                # Reads, writes, trims and zeroes complete without waiting for the disk (page
                # cache), so they run inline: no task per request, and request order is kept.
                await self._execute(req, payload, cost, queued)

    async def _finish_group(self) -> None:
        self._write_group()
        await self._drain_if_full()

    def _write_group(self) -> None:
        """Do the admitted plain writes of this loop step: journaled together (one system
        call), then each written into the image; replies (or errnos) queued."""
        group, self._group = self._group, []
        self._group_bytes = 0
        # Each payload is a buffer of its own that nothing changes later (NbdStream).
        results = self.disk.write_admitted(
            [(req.offset, payload) for req, payload, _ in group], owned=True
        )
        for (req, _, cost), result in zip(group, results, strict=True):
            if isinstance(result, DiskError):
                self._write_disk_error(req, result)
            else:
                self._write(nbd.simple_reply(req.handle))
            self.budget.release(cost)

    async def _discard(self, length: int) -> None:
        while length > 0:
            chunk = await self.stream.readexactly(min(length, _DISCARD_CHUNK))
            length -= len(chunk)

    def _write(self, data: bytes) -> None:
        """Queue a reply; every reply queued in one loop iteration goes out in one writev."""
        if self.transport.is_closing():
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        self._out_bytes = 0
        if out and not self.transport.is_closing():
            self.transport.writelines(out)

    async def _execute(
        self,
        req: nbd.Request,
        payload: bytes | memoryview,
        cost: int,
        queued: Sequence[tuple[int, int]] = (),
    ) -> None:
        try:
            try:
                await self._perform(req, payload, queued)
            except DiskError as exc:
                self._write_disk_error(req, exc)
            del payload
            await self._drain_if_full()  # holds the budget until the client reads
        finally:
            self.budget.release(cost)

    async def _drain_if_full(self) -> None:
        if self._replies_backlogged():
            await self._drain()

    def _replies_backlogged(self) -> bool:
        """Replies queued and unsent past the transport's high-water mark (a client that does
        not read them): the request loop waits for them to drain before reading more."""
        return self._out_bytes + self.transport.get_write_buffer_size() > self._high_water

    async def _drain(self) -> None:
        self._flush_out()  # queued replies count against the bound too
        if self.transport.get_write_buffer_size() > self._high_water:
            with contextlib.suppress(ConnectionError):
                await self.stream.drain()

    def _write_disk_error(self, req: nbd.Request, exc: DiskError) -> None:
        self._write(
            nbd.error_reply(
                req.command,
                req.handle,
                nbd.nbd_errno(exc.errno),
                structured=self.structured,
                message=str(exc),
            )
        )

    async def _perform(
        self, req: nbd.Request, payload: bytes | memoryview, queued: Sequence[tuple[int, int]] = ()
    ) -> None:
        disk, command = self.disk, req.command
        if command == nbd.CMD_READ:
            data = await disk.read(req.offset, req.length)
            if len(data) != req.length:
                raise DiskError(5, f"short read: {len(data)} of {req.length} bytes")
            self._send_read(req, data)
            return
        if command == nbd.CMD_WRITE:
            # ``queued``, for a plain write not admitted (it waits for the activity log or a
            # point): the writes behind it, whose extents are persisted with its own (one
            # fdatasync for a burst to fresh extents).
            await disk.write(req.offset, payload, fua=req.fua, also=queued)
        elif command == nbd.CMD_FLUSH:
            await disk.flush()
        elif command == nbd.CMD_WRITE_ZEROES:
            await disk.write_zeroes(req.offset, req.length, fua=req.fua, may_trim=not req.no_hole)
        elif command == nbd.CMD_TRIM:
            await disk.trim(req.offset, req.length, fua=req.fua)
        else:  # parse_request lets nothing else through
            raise AssertionError(f"unexpected command {command}")
        self._write(nbd.simple_reply(req.handle))

    def _send_read(self, req: nbd.Request, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self.structured:
            head = nbd.read_chunk_header(req.handle, req.offset, len(data))
        else:
            head = nbd.simple_reply(req.handle)
        if len(data) <= _SMALL_REPLY:
            self._write(head + data)  # a small copy beats an extra iovec
        else:
            self._write(head)
            self._write(data)
