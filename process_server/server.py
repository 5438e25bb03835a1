"""The process server's network shell: mutual-TLS sessions with agents, acks, appliers, status.

Rules it keeps:
- A peer is who its certificate says (CN and role); its HELLO must agree, and it may
  register and write only disks it owns (the first registrant owns a disk).
- One session owns a disk at a time: a new registration fences the old session.
- A bad frame closes only that connection, with a logged reason; other agents go on.
- Every batch is acknowledged only once durable in the cache (group commit).
- Recovery points come from agents' markers (``protocol.control``); barriers, failovers and
  retention live in ``points`` and ``failover``, this module only routes to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from common.admin import AdminServer
from common.aio import first_leaf
from common.at_rest import cache_sealer
from common.config import ServerConfig
from common.errors import IntegrityError, TidemarkError
from common.failpoints import failpoint
from common.framed import FramedStream, start_framed_server
from common.rate_limit import cache_pressure_delay
from common.stage_trace import stamp
from common.state_lock import StateDirBusy, hold_state_dir, state_dir_held
from common.tls import peer_identity, server_context
from process_server.bulk import BulkDigestError, BulkError, BulkReceiver
from process_server.catalog import Catalog
from process_server.failback import FailbackError, FailbackManager
from process_server.failover import FailoverError, FailoverManager
from process_server.pki import REVOKED, load_revoked_serials
from process_server.points import PointError, PointsService
from process_server.replica import ReplicaDisk, ReplicaError, ReplicaSyncError, check_disk_size
from protocol.batch import Limits, decode_batch, validate_disk_id
from protocol.control import (
    BulkBegin,
    BulkState,
    BulkSync,
    ControlBody,
    Frozen,
    PointHeld,
    PointMark,
    PointRecorded,
    decode_control,
    encode_control,
)
from protocol.errors import ErrorCode, ProtocolError
from protocol.frames import (
    MAX_DIGEST_REQUESTS,
    Ack,
    BatchMsg,
    BulkData,
    Connection,
    Control,
    DigestReply,
    DigestRequest,
    Heartbeat,
    Hello,
    HelloOk,
    Register,
    Registered,
    VerifyRequest,
    VerifyResult,
    selected_ranges,
)

log = logging.getLogger("tidemark.ps")
SERVER_NAME = "tidemark-process-server"
HELLO_TIMEOUT = 10.0
REVOCATION_POLL = 1.0  # seconds between checks of pki/revoked.txt for open sessions


class _Session:
    """One agent connection."""

    def __init__(self, peer: str, role: str, stream: FramedStream, address: str) -> None:
        self.peer = peer
        self.role = role
        self.stream = stream
        self.address = address
        self.task: asyncio.Task[None] | None = asyncio.current_task()
        self.done = asyncio.Event()
        self.ack_events: dict[str, asyncio.Event] = {}
        self.verify_waiters: dict[int, asyncio.Future[str]] = {}
        self.next_request = 0
        self.revoked = False
        self.serial = 0
        self.digest_requests = 0
        self.started = time.monotonic()
        self.control_waiters: dict[int, asyncio.Future[ControlBody]] = {}
        self.bulk_notifiers: set[str] = set()  # disks whose copy reports progress here
        self.bulk_syncing: set[str] = set()  # disks with a bulk-sync being answered (one each)


class ProcessServer:
    """Receives, caches and applies the batches of many agents."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.limits = Limits(
            max_frame_bytes=cfg.max_batch_bytes + (4 << 20),
            max_batch_raw_bytes=cfg.max_batch_bytes,
        )
        self.disks_dir = cfg.state_dir / "disks"
        self.disks: dict[str, ReplicaDisk] = {}
        self.bulk: dict[str, BulkReceiver] = {}  # initial syncs' copies (process_server/bulk.py)
        self.sessions: set[_Session] = set()
        self._server: asyncio.AbstractServer | None = None
        self._admin = AdminServer(
            cfg.admin_socket,
            {
                "status": self._admin_status,
                "verify": self._admin_verify,
                "points": self._admin_points,
                "point-create": self._admin_point_create,
                "failover": self._admin_failover,
                "failover-cleanup": self._admin_failover_cleanup,
                "failover-commit": self._admin_failover_commit,
                "failback": self._admin_failback,
            },
        )
        self.admin = self._admin
        # Sealing the cache at rest (docs/security.md); raises KeyFileError for a bad key file.
        self.sealer = cache_sealer(cfg.cache_key_file, cfg.state_dir)
        self.catalog: Catalog | None = None
        self.points: PointsService = None  # type: ignore[assignment]  # set by run()
        self.failovers = FailoverManager(self)
        self.failbacks = FailbackManager(self)
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self.port = 0
        self.rejected_connections = 0
        self._lock_fd: int | None = None  # the state directory's lock (common/state_lock.py)

    # ----------------------------------------------------------------- lifecycle
    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until :meth:`stop` is called. Raises OSError when it cannot listen."""
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = hold_state_dir(self.cfg.state_dir, "tidemark-ps serve")
        self.disks_dir.mkdir(exist_ok=True, mode=0o700)
        ssl_ctx = server_context(self.cfg.pki_dir)
        self.catalog = await asyncio.to_thread(Catalog, self.cfg.state_dir / "catalog.sqlite")
        self.points = PointsService(self.cfg, self.catalog, self.disks)
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for path in sorted(self.disks_dir.iterdir()):
                if (path / "state.json").exists():
                    await asyncio.to_thread(self._open_disk, path.name, None)
            await self.failovers.restore()  # fences first: nothing is applied past a failover
            await self.failbacks.restore()  # a planned swap a crash interrupted is finished
            for disk in self.disks.values():
                self._start_applier(disk)
            tg.create_task(self.points.prune_forever(), name="prune")
            tg.create_task(self._watch_revocations(), name="revocations")
            for group in self.cfg.groups:
                tg.create_task(
                    self.points.run_group(group, self.ask, self.tell), name=f"group-{group.name}"
                )
            self._server = await start_framed_server(
                self._handle,
                self.cfg.listen.host,
                self.cfg.listen.port,
                lambda: Connection("server", self.limits),
                ssl_context=ssl_ctx,
            )
            self.port = self._server.sockets[0].getsockname()[1]
            await self._admin.start()
            log.info(
                "event=listening address=%s:%d disks=%d",
                self.cfg.listen.host,
                self.port,
                len(self.disks),
            )
            if ready is not None:
                ready.set()
            await self._stop.wait()
            log.info("event=stopping sessions=%d", len(self.sessions))
            self._server.close()
            for session in list(self.sessions):
                if session.task is not None:
                    session.task.cancel()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            await self._admin.close()
            await self.failbacks.close()
            await self.failovers.close()
            for receiver in self.bulk.values():
                await receiver.drain(reraise=False)  # no copy thread writes a closed replica
            for disk in self.disks.values():
                with contextlib.suppress(OSError):
                    await disk.make_applied_durable()
            raise _Stopped
        # not reached

    def stop(self) -> None:
        self._stop.set()

    def _open_disk(self, disk_id: str, create: tuple[str, int] | None) -> ReplicaDisk:
        disk = ReplicaDisk.open(
            self.disks_dir,
            disk_id,
            limits=self.limits,
            apply_sync_interval=self.cfg.apply_sync_interval,
            cache_quota=self.cfg.cache_quota,
            cache_segment=self.cfg.cache_segment,
            create=create,
            undo=self.cfg.undo,
            undo_segment=self.cfg.undo_segment,
            sealer=self.sealer,
        )
        self.disks[disk_id] = disk
        return disk

    def _start_applier(self, disk: ReplicaDisk) -> None:
        assert self._tg is not None
        self._tg.create_task(self._applier(disk), name=f"applier-{disk.disk_id}")

    async def _applier(self, disk: ReplicaDisk) -> None:
        """Run a disk's applier; after an I/O error (a full disk) retry with backoff, so applying
        resumes by itself once space returns. Corruption, or a failed fdatasync of the replica
        (ReplicaDisk.sync_replica), stops it for good, loudly."""
        delay = 0.1
        while True:
            try:
                await disk.run_applier()
                return
            except (IntegrityError, LookupError, ReplicaSyncError) as exc:
                disk.applier_error = str(exc)
                log.error("disk=%s event=applier_stopped error=%r", disk.disk_id, str(exc))
                return
            except OSError as exc:
                disk.applier_error = str(exc)
                log.error(
                    "disk=%s event=applier_stopped error=%r retry_in=%.1fs",
                    disk.disk_id,
                    str(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # ----------------------------------------------------------------- sessions
    async def _watch_revocations(self) -> None:
        """End the open sessions whose certificate ``pki revoke`` has since revoked: the
        revocation list is checked when it changes (polled every REVOCATION_POLL seconds), not
        only when a connection starts. An unreadable list keeps the sessions and says so."""
        path = self.cfg.pki_dir / REVOKED
        seen: tuple[int, int, int] | None = None
        while True:
            await asyncio.sleep(REVOCATION_POLL)
            try:
                st = path.stat()
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                stamp = (0, 0, 0)
            except OSError as exc:
                log.error("event=revocation_list_unreadable path=%s error=%r", path, str(exc))
                continue
            if stamp == seen:
                continue
            try:
                revoked = await asyncio.to_thread(load_revoked_serials, self.cfg.pki_dir)
            except TidemarkError as exc:
                log.error("event=revocation_list_unreadable path=%s error=%r", path, str(exc))
                continue
            seen = stamp
            for session in list(self.sessions):
                if session.serial in revoked and not session.revoked:
                    session.revoked = True
                    log.warning(
                        "event=session_revoked peer=%s address=%s", session.peer, session.address
                    )
                    if session.task is not None:
                        session.task.cancel()

    async def _handle(self, stream: FramedStream) -> None:
        address = str(stream.get_extra_info("peername"))
        try:
            ssl_object = stream.get_extra_info("ssl_object")
            peer, role = peer_identity(ssl_object)
            serial = int(ssl_object.getpeercert()["serialNumber"], 16)
            revoked = serial in await asyncio.to_thread(load_revoked_serials, self.cfg.pki_dir)
        except (ValueError, KeyError, TidemarkError) as exc:
            log.warning("event=connection_refused peer=%s reason=%r", address, str(exc))
            self.rejected_connections += 1
            await stream.close()
            return
        session = _Session(peer, role, stream, address)
        session.revoked = revoked
        session.serial = serial
        self.sessions.add(session)
        reason = "closed"
        try:
            try:
                await self._converse(session)
            except BaseExceptionGroup as group:
                raise first_leaf(group) from None
        except ProtocolError as exc:
            reason = f"protocol error {exc}"
            self.rejected_connections += 1
            await stream.send_error(exc.code, str(exc))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            reason = f"connection lost: {exc}"
        except TimeoutError:
            reason = "timed out"
        except asyncio.CancelledError:
            if session.revoked:  # cut by _watch_revocations
                reason = "certificate revoked"
                await stream.send_error(ErrorCode.AUTH, f"the certificate of {peer} is revoked")
            else:
                reason = "fenced or stopping"
        except OSError as exc:
            reason = f"I/O error: {exc}"
            await stream.send_error(ErrorCode.INTERNAL, "process server I/O error")
        finally:
            for disk in self.disks.values():
                if disk.session is session:
                    disk.session = None
            self.sessions.discard(session)
            await stream.close()
            session.done.set()
            log.info("event=session_closed peer=%s address=%s reason=%r", peer, address, reason)

    async def _converse(self, session: _Session) -> None:
        stream = session.stream
        async with asyncio.timeout(HELLO_TIMEOUT):
            hello = await stream.recv()
        if not isinstance(hello, Hello):
            raise ProtocolError(ErrorCode.UNEXPECTED, "expected HELLO")
        if hello.name != session.peer or hello.role != session.role:
            raise ProtocolError(
                ErrorCode.AUTH,
                f"HELLO says {hello.name}/{hello.role}, certificate says {session.peer}/{session.role}",
            )
        if session.revoked:
            raise ProtocolError(ErrorCode.AUTH, f"the certificate of {session.peer} is revoked")
        if session.role not in ("agent", "master-target"):
            raise ProtocolError(
                ErrorCode.AUTH,
                f"{session.peer} has a {session.role} certificate: only agents and master "
                "targets connect here",
            )
        await stream.send(
            HelloOk(SERVER_NAME, self.limits.max_frame_bytes, self.cfg.max_batch_bytes)
        )
        if session.role == "master-target":
            log.info("event=session_opened peer=%s role=master-target", session.peer)
            await self.failbacks.serve(session)  # the reverse stream: process_server/failback.py
            return
        log.info(
            "event=session_opened peer=%s role=%s address=%s",
            session.peer,
            session.role,
            session.address,
        )
        async with asyncio.TaskGroup() as tg:
            while True:
                async with asyncio.timeout(self.cfg.heartbeat_timeout):
                    msg = await stream.recv()
                if isinstance(msg, BatchMsg):
                    await self._on_batch(session, msg)
                elif isinstance(msg, BulkData):
                    await self._on_bulk(session, msg)
                elif isinstance(msg, Register):
                    await self._on_register(session, msg, tg)
                elif isinstance(msg, Heartbeat):
                    await self._on_heartbeat(session, msg)
                elif isinstance(msg, DigestRequest):
                    self._owned(session, msg.disk_id)
                    if session.digest_requests >= MAX_DIGEST_REQUESTS:
                        raise ProtocolError(
                            ErrorCode.LIMIT,
                            f"more than {MAX_DIGEST_REQUESTS} digest requests outstanding",
                        )
                    session.digest_requests += 1
                    tg.create_task(self._on_digest_request(session, msg))
                elif isinstance(msg, VerifyResult):
                    future = session.verify_waiters.pop(msg.request_id, None)
                    if future is not None and not future.done():
                        future.set_result(msg.report)
                elif isinstance(msg, Control):
                    await self._on_control(session, msg, tg)
                else:
                    raise ProtocolError(ErrorCode.UNEXPECTED, f"unexpected {type(msg).__name__}")

    async def _on_register(self, session: _Session, msg: Register, tg: asyncio.TaskGroup) -> None:
        disk_id = validate_disk_id(msg.disk_id)
        if disk_id in session.ack_events:
            raise ProtocolError(
                ErrorCode.UNEXPECTED, f"disk {disk_id} is already registered on this connection"
            )
        disk = self.disks.get(disk_id)
        try:
            if disk is None:
                disk = await asyncio.to_thread(self._open_disk, disk_id, (session.peer, msg.size))
                self._start_applier(disk)
                log.info(
                    "disk=%s event=replica_created owner=%s size=%d",
                    disk_id,
                    session.peer,
                    msg.size,
                )
            if disk.owner != session.peer:
                raise ProtocolError(ErrorCode.AUTH, f"disk {disk_id} belongs to another agent")
            check_disk_size(disk, msg.size)
        except ReplicaError as exc:
            raise ProtocolError(ErrorCode.DISK, str(exc)) from exc
        old = disk.session
        if old is not None and old is not session:
            log.warning("disk=%s event=session_fenced old=%s", disk_id, old.address)
            if old.task is not None:
                old.task.cancel()
            await old.done.wait()
        disk.session = session
        await disk.sync_cache()
        event = asyncio.Event()
        session.ack_events[disk_id] = event
        tg.create_task(self._ack_pump(session, disk, event), name=f"acks-{disk_id}")
        await session.stream.send(Registered(disk_id, disk.durable_seq, disk.applied_seq))
        log.info(
            "disk=%s event=registered peer=%s cached_seq=%d applied_seq=%d journaled_seq=%d",
            disk_id,
            session.peer,
            disk.durable_seq,
            disk.applied_seq,
            msg.journaled_seq,
        )

    async def _on_batch(self, session: _Session, msg: BatchMsg) -> None:
        header = msg.header
        disk = self.disks.get(header.disk_id)
        if disk is None or disk.session is not session:
            raise ProtocolError(
                ErrorCode.UNEXPECTED, f"disk {header.disk_id} is not registered here"
            )
        stamp("received", header.last_seq)
        if header.last_seq <= disk.cached_seq:
            session.ack_events[disk.disk_id].set()  # a resend: acknowledge again, store nothing
            return
        if header.first_seq != disk.cached_seq + 1:
            raise ProtocolError(
                ErrorCode.SEQ_GAP,
                f"disk {disk.disk_id}: batch {header.first_seq}..{header.last_seq} after seq {disk.cached_seq}",
            )
        batch = None
        if self.cfg.verify_on_receive:
            batch = await asyncio.to_thread(decode_batch, msg.data, self.limits)
            for extent in batch.extents:
                if extent.offset + extent.length > disk.size:
                    raise ProtocolError(
                        ErrorCode.BAD_MESSAGE, f"extent past the end of disk {disk.disk_id}"
                    )
        if disk.bulk_fence and disk.cache.bytes_used + len(msg.data) > disk.cache_quota // 2:
            # Nothing is applied during the copy (even one a restart kept, whose agent has not
            # come back to it): the writes it holds would fill the cache and stop the
            # connection. The rest of the sync goes in journal order.
            receiver = self._bulk_of(disk)
            await receiver.end("the cache is half full of writes held during the copy")
            await session.stream.send(encode_control(receiver.state()))
        delay = cache_pressure_delay(disk.cache.bytes_used, disk.cache_quota)
        if delay:
            await asyncio.sleep(
                delay
            )  # slow the agent as the cache nears its quota (operations.md)
        await disk.wait_for_cache_space(len(msg.data))
        disk.append_batch(msg.data, header, batch)
        stamp("cached", header.last_seq)
        session.ack_events[disk.disk_id].set()

    async def _on_bulk(self, session: _Session, msg: BulkData) -> None:
        disk = self._owned(session, msg.disk_id)
        try:
            await self._bulk_of(disk).receive(msg)
        except BulkError as exc:
            raise _bulk_protocol_error(disk.disk_id, exc) from None

    def _bulk_of(self, disk: ReplicaDisk) -> BulkReceiver:
        receiver = self.bulk.get(disk.disk_id)
        if receiver is None:
            receiver = self.bulk[disk.disk_id] = BulkReceiver(disk)
        return receiver

    async def _on_bulk_control(
        self, session: _Session, request_id: int, body: BulkBegin | BulkSync, tg: asyncio.TaskGroup
    ) -> None:
        """``bulk-begin`` inline (pieces after it find the fence up); ``bulk-sync`` in a task
        (pieces go on being received while it waits for the writes and the fdatasync)."""
        disk = self._owned(session, body.disk)
        receiver = self._bulk_of(disk)
        if isinstance(body, BulkSync):
            if disk.disk_id in session.bulk_syncing:
                raise ProtocolError(ErrorCode.LIMIT, f"disk {disk.disk_id}: a bulk-sync is running")
            session.bulk_syncing.add(disk.disk_id)
            tg.create_task(self._answer_bulk_sync(session, request_id, receiver, body))
            return
        refusal = self._bulk_refusal(disk)
        if refusal:
            state = BulkState(disk.disk_id, False, error=refusal)
        else:
            state = await receiver.begin()
            if disk.disk_id not in session.bulk_notifiers:
                session.bulk_notifiers.add(disk.disk_id)
                tg.create_task(self._bulk_progress(session, receiver))
        await session.stream.send(encode_control(state, request_id))

    def _bulk_refusal(self, disk: ReplicaDisk) -> str:
        """Why a copy may not start on ``disk`` ('' when it may)."""
        if disk.fenced:
            return f"disk {disk.disk_id} is failed over"
        if disk.replica_sync_error is not None:
            return f"disk {disk.disk_id}: the replica's fdatasync failed: {disk.replica_sync_error}"
        assert self.catalog is not None
        if self.catalog.newest(disk.disk_id) is not None:
            return f"disk {disk.disk_id} has recovery points: a copy would break them"
        if disk.cache.bytes_used > disk.cache_quota // 4:
            return f"disk {disk.disk_id}: the cache holds too much to hold back during a copy"
        return ""

    async def _answer_bulk_sync(
        self, session: _Session, request_id: int, receiver: BulkReceiver, body: BulkSync
    ) -> None:
        try:
            state = await receiver.sync(body.through, end=body.end)
        except BulkError as exc:
            raise _bulk_protocol_error(body.disk, exc) from None
        finally:
            session.bulk_syncing.discard(body.disk)
        await session.stream.send(encode_control(state, request_id))

    async def _bulk_progress(self, session: _Session, receiver: BulkReceiver) -> None:
        """Unasked ``bulk-state`` reports as pieces are written (the agent's send window)."""
        while True:
            await receiver.progress.wait()
            receiver.progress.clear()
            try:
                receiver.check()  # a bad piece ends the connection as soon as it is found
            except BulkError as exc:
                raise _bulk_protocol_error(receiver.disk.disk_id, exc) from None
            await session.stream.send(encode_control(receiver.state()))

    def _owned(self, session: _Session, disk_id: str) -> ReplicaDisk:
        disk = self.disks.get(disk_id)
        if disk is None or disk.session is not session:
            raise ProtocolError(ErrorCode.UNEXPECTED, f"disk {disk_id} is not registered here")
        return disk

    async def _on_digest_request(self, session: _Session, msg: DigestRequest) -> None:
        """Answer with replica digests once the batches up to ``min_seq`` are applied."""
        try:
            await self._answer_digests(session, msg)
        finally:
            session.digest_requests -= 1

    async def _answer_digests(self, session: _Session, msg: DigestRequest) -> None:
        disk = self._owned(session, msg.disk_id)
        try:
            ranges = selected_ranges(msg.offset, msg.length, msg.select_unit, msg.select)
            seq, digests = await disk.digests(
                msg.offset, msg.length, msg.chunk_size, msg.min_seq, msg.width, ranges
            )
        except ReplicaError as exc:
            raise ProtocolError(ErrorCode.DISK, str(exc)) from exc
        await session.stream.send(
            DigestReply(
                msg.disk_id, msg.request_id, msg.offset, msg.chunk_size, seq, digests, msg.width
            )
        )

    async def verify(self, disk_id: str, repair: bool, timeout: float = 3600) -> dict[str, Any]:
        """Ask the owning agent to verify (and optionally repair) a disk; returns its report."""
        disk = self.disks.get(disk_id)
        if disk is None:
            return {"ok": False, "error": f"no disk {disk_id!r} on this process server"}
        session = disk.session
        if session is None:
            return {
                "ok": False,
                "error": f"the agent of disk {disk_id} ({disk.owner}) is not connected",
            }
        session.next_request += 1
        request_id = session.next_request
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        session.verify_waiters[request_id] = future
        await session.stream.send(VerifyRequest(disk_id, request_id, repair))
        try:
            report = await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            session.verify_waiters.pop(request_id, None)
        return {"ok": True, "report": json.loads(report)}

    # ----------------------------------------------------------------- control exchanges
    async def _on_control(self, session: _Session, msg: Control, tg: asyncio.TaskGroup) -> None:
        body = decode_control(msg)
        if isinstance(body, BulkBegin | BulkSync):
            await self._on_bulk_control(session, msg.request_id, body, tg)
        elif isinstance(body, PointMark):
            disk = self._owned(session, body.disk)
            try:
                self.points.record_mark(disk, body)
            except PointError as exc:
                self.points.refused += 1
                log.warning(
                    "disk=%s event=point_refused id=%s error=%r",
                    disk.disk_id,
                    body.point_id,
                    str(exc),
                )
            await session.stream.send(encode_control(PointRecorded(body.point_id, body.disk)))
        elif isinstance(body, PointHeld | Frozen):
            future = session.control_waiters.pop(msg.request_id, None)
            if future is not None and not future.done():
                future.set_result(body)
        else:
            raise ProtocolError(ErrorCode.UNEXPECTED, f"unexpected control {msg.name}")

    async def ask(self, disk_id: str, body: ControlBody, timeout: float) -> ControlBody:
        """Send ``body`` to the agent owning ``disk_id`` and wait for its answer.
        Raises ConnectionError when that agent is not connected, TimeoutError."""
        disk = self.disks.get(disk_id)
        session = disk.session if disk is not None else None
        if session is None:
            raise ConnectionResetError(f"the agent of disk {disk_id} is not connected")
        session.next_request = (session.next_request + 1) % (1 << 32)
        request_id = session.next_request
        future: asyncio.Future[ControlBody] = asyncio.get_running_loop().create_future()
        session.control_waiters[request_id] = future
        try:
            await session.stream.send(encode_control(body, request_id))
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            session.control_waiters.pop(request_id, None)

    async def tell(self, disk_id: str, body: ControlBody) -> None:
        disk = self.disks.get(disk_id)
        session = disk.session if disk is not None else None
        if session is None:
            raise ConnectionResetError(f"the agent of disk {disk_id} is not connected")
        await session.stream.send(encode_control(body))

    async def _ack_pump(self, session: _Session, disk: ReplicaDisk, event: asyncio.Event) -> None:
        """Group commit: one fdatasync and one ACK for every batch that arrived meanwhile."""
        while True:
            await event.wait()
            event.clear()
            seq = await disk.sync_cache()
            failpoint("cache.after_durable")
            await session.stream.send(
                Ack(disk.disk_id, seq)
            )  # drains: a peer that never reads stalls

    async def _on_heartbeat(self, session: _Session, msg: Heartbeat) -> None:
        now = time.monotonic()
        for report in msg.reports:
            disk = self.disks.get(report.disk_id)
            if disk is not None and disk.owner == session.peer:
                disk.report = {
                    "state": report.state,
                    "journaled_seq": report.journaled_seq,
                    "acked_seq": report.acked_seq,
                    "pending_bytes": report.pending_bytes,
                    "oldest_pending_ns": report.oldest_pending_ns,
                }
                disk.report_time = now
        await session.stream.send(Heartbeat(msg.counter, ()))  # drains: bounded for a silent reader

    # ----------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        now = time.time_ns()
        disks = []
        for d in sorted(self.disks.values(), key=lambda d: (d.owner, d.disk_id)):
            entry = d.status(now)
            if self.points is not None:
                entry.update(self.points.status(d))
            failover = self.failovers.active.get(d.disk_id)
            if failover is not None:
                entry["failover"] = failover.status()
            disks.append(entry)
        return {
            "role": "process-server",
            "running": True,
            "listen": f"{self.cfg.listen.host}:{self.port}",
            "state_dir": str(self.cfg.state_dir),
            "sessions": [
                {
                    "peer": s.peer,
                    "role": s.role,
                    "address": s.address,
                    "bytes_in": s.stream.bytes_in,
                    "bytes_out": s.stream.bytes_out,
                }
                for s in self.sessions
            ],
            "rejected_connections": self.rejected_connections,
            "cache_bytes": sum(d.cache.bytes_used for d in self.disks.values()),
            "cache_quota_per_disk": self.cfg.cache_quota,
            "disks": disks,
            "failovers": self.failovers.status(),
            "failbacks": self.failbacks.status(),
            "groups": {
                g.name: {"disks": list(g.disks), **self.points.barrier_stats.get(g.name, {})}
                for g in self.cfg.groups
            },
        }

    async def _admin_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, **self.status()}

    async def _admin_points(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            if request.get("group"):
                group = str(request["group"])
                return {"ok": True, "group": group, "points": self.points.list_group(group)}
            disk = str(request.get("disk"))
            if disk not in self.disks:
                return {"ok": False, "error": f"no disk {disk!r} on this process server"}
            return {"ok": True, "disk": disk, "points": self.points.list_points(disk)}
        except PointError as exc:
            return {"ok": False, "error": str(exc)}

    async def _admin_point_create(self, request: dict[str, Any]) -> dict[str, Any]:
        group = str(request.get("group") or "")
        kind = str(request.get("kind") or "manual")
        tag = str(request.get("tag") or "")
        try:
            if group:
                config = self.points.groups.get(group)
                if config is None:
                    raise PointError(f"no group {group!r} in the configuration")
                disks, hold = list(config.disks), config.hold_timeout
            else:
                disks, hold = [str(request.get("disk"))], 5.0
            taken = await self.points.take(disks, kind, tag, group, self.ask, self.tell, hold)
            recorded = await self.points.wait_recorded(taken["id"], disks, 30.0)
            return {"ok": recorded, **taken, "recorded": recorded}
        except (PointError, ConnectionError, TimeoutError, ProtocolError) as exc:
            return {"ok": False, "error": str(exc) or type(exc).__name__}

    async def _admin_failover(self, request: dict[str, Any]) -> dict[str, Any]:
        group = str(request.get("group") or "")
        try:
            if group:
                config = self.points.groups.get(group)
                if config is None:
                    raise FailoverError(f"no group {group!r} in the configuration")
                disks = list(config.disks)
            else:
                disks = [str(request.get("disk"))]
            spec = str(request.get("point") or "latest")
            if request.get("to"):
                if group:
                    raise FailoverError("--to writes one disk: name a disk, not a group")
                return await self.failovers.to_file(disks[0], spec, Path(str(request["to"])))
            return await self.failovers.failover(
                disks,
                spec,
                test=bool(request.get("test")),
                planned=bool(request.get("planned")),
                nbd=request.get("nbd") or None,
                group=group,
            )
        except (FailoverError, ReplicaError, PointError, LookupError, OSError) as exc:
            return {"ok": False, "error": str(exc)}
        except (ConnectionError, TimeoutError) as exc:
            return {"ok": False, "error": f"agent unreachable: {exc or type(exc).__name__}"}

    async def _admin_failover_cleanup(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.failovers.cleanup(str(request.get("disk")))
        except (FailoverError, OSError) as exc:
            return {"ok": False, "error": str(exc)}

    async def _admin_failback(self, request: dict[str, Any]) -> dict[str, Any]:
        disk = str(request.get("disk"))
        if not request.get("planned"):
            rows = [r for r in self.failbacks.status() if r["disk"] == disk]
            if rows:
                return {"ok": True, "disk": disk, "state": "reverse-replicating", **rows[0]}
            if disk in self.failbacks.completed:
                return {"ok": True, "state": "done", **self.failbacks.completed[disk]}
            return {"ok": False, "error": f"no master target is failing back disk {disk}"}
        try:
            return await self.failbacks.planned(disk, float(request.get("timeout") or 3600))
        except (FailbackError, FailoverError, OSError, TimeoutError) as exc:
            return {"ok": False, "error": str(exc) or type(exc).__name__}

    async def _admin_failover_commit(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.failovers.commit(str(request.get("disk")))
        except (FailoverError, OSError) as exc:
            return {"ok": False, "error": str(exc)}

    async def _admin_verify(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.verify(str(request.get("disk")), bool(request.get("repair")))
        except (TimeoutError, ConnectionError, ProtocolError) as exc:
            return {"ok": False, "error": f"verify failed: {exc}"}


def _bulk_protocol_error(disk_id: str, exc: BulkError) -> ProtocolError:
    code = ErrorCode.DIGEST if isinstance(exc, BulkDigestError) else ErrorCode.BAD_MESSAGE
    return ProtocolError(code, f"disk {disk_id}: {exc}")


class _Stopped(Exception):
    """Raised inside the task group to end :meth:`ProcessServer.run` cleanly."""


async def serve(
    cfg: ServerConfig, ready: asyncio.Event | None = None, server: ProcessServer | None = None
) -> None:
    """Run a process server until stopped (SIGTERM/SIGINT in the CLI)."""
    ps = server or ProcessServer(cfg)
    try:
        await ps.run(ready)
    except* _Stopped:
        pass
    finally:
        for receiver in ps.bulk.values():
            receiver.close()
        for disk in ps.disks.values():
            disk.close()
        if ps.catalog is not None:
            ps.catalog.close()
        if ps._lock_fd is not None:
            os.close(ps._lock_fd)  # last: nothing of the state directory is open any more
            ps._lock_fd = None


def offline_status(cfg: ServerConfig) -> dict[str, Any]:
    """Status from the state directory when the server does not answer. If a server still
    holds the directory (busy, or hung) nothing is opened: opening its logs would cut their
    tails under it."""
    status: dict[str, Any] = {
        "role": "process-server",
        "running": False,
        "state_dir": str(cfg.state_dir),
        "disks": [],
    }
    if not cfg.state_dir.is_dir():
        return status
    try:
        with state_dir_held(cfg.state_dir, "tidemark-ps status"):
            status["disks"] = _offline_disks(cfg, cfg.state_dir / "disks")
    except StateDirBusy as exc:
        status.update(
            running=True,
            answering=False,
            error=f"{exc}, which does not answer on {cfg.admin_socket}",
        )
    return status


def _offline_disks(cfg: ServerConfig, disks_dir: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if disks_dir.is_dir():
        for path in sorted(disks_dir.iterdir()):
            if not (path / "state.json").exists():
                continue
            disk = ReplicaDisk.open(
                disks_dir,
                path.name,
                limits=Limits(),
                apply_sync_interval=1,
                cache_quota=cfg.cache_quota,
                cache_segment=cfg.cache_segment,
                sealer=cache_sealer(cfg.cache_key_file, cfg.state_dir),
            )
            try:
                out.append(disk.offline_status())
            finally:
                disk.close()
    return out


__all__ = ["ProcessServer", "offline_status", "serve"]
