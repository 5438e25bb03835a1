"""The master target: receives the reverse stream of a failback and applies it to the source
disk, with the process server's own receiver and applier (``ReplicaDisk``: a durable cache,
acknowledged after fdatasync, applied in seq order, every digest verified) pointed at the
original disk instead of a replica file.

Per disk, on (re)connection:
- a fresh target first tells the process server what the source wrote that the failover point
  may not hold (the stopped agent's journal and bitmap, ``agent.failback_state``), or sends the
  source's chunk digests when that state is gone, or asks for everything (a new disk);
- then it registers with its durable cached seq, so the stream resumes exactly after it;
- it reports its applied seq in heartbeats, answers a verification with its digests, and on
  ``failback-done`` makes everything durable and resets the agent's journal to resume forward
  protection without a resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from typing import Any

from agent.failback_state import reset_after_failback, source_divergence
from common.admin import AdminServer
from common.aio import first_leaf, wait_event
from common.config import MasterTargetConfig, MtDiskConfig
from common.credentials import BundleCheck
from common.digests import DigestTracker, chunk_digests, verify_chunk
from common.durable import atomic_write_json, read_json
from common.errors import TidemarkError
from common.failpoints import failpoint
from common.framed import FramedStream, open_framed
from common.tls import CLIENT_SERVER_HOSTNAME, client_context
from process_server.replica import ReplicaDisk
from protocol.batch import Limits
from protocol.control import (
    MAX_RANGES,
    FailbackDigests,
    FailbackDone,
    FailbackRanges,
    FailbackVerify,
    decode_control,
    encode_control,
)
from protocol.errors import ErrorCode, ProtocolError
from protocol.frames import (
    Ack,
    BatchMsg,
    Connection,
    Control,
    DiskReport,
    Heartbeat,
    Hello,
    HelloOk,
    Register,
    Registered,
)

log = logging.getLogger("tidemark.mt")
DONE_FILE = "failback-done.json"
DIGEST_CHUNK = 4 << 20
DIGESTS_PER_MESSAGE = 1024


class MasterTarget:
    """Every ``[[disk]]`` of a master-target configuration."""

    def __init__(self, cfg: MasterTargetConfig, *, bundle_check: BundleCheck | None = None) -> None:
        """``bundle_check``: the credentials' check, already started (``tidemark-mt run``
        starts it first, common/credentials.py); by default :meth:`run` makes it."""
        self.cfg = cfg
        self._bundle_check = bundle_check
        self.disks: dict[str, ReplicaDisk] = {}
        self.done: dict[str, dict[str, Any]] = {}
        self.last_error: str | None = None
        self.connected = False
        self._admin = AdminServer(cfg.admin_socket, {"status": self._admin_status})
        self._stop = asyncio.Event()
        self._appliers: dict[str, asyncio.Task[None]] = {}
        self._trackers: dict[str, DigestTracker] = {}
        self._hashing: list[asyncio.Future[None]] = []
        self._ack_events: dict[str, asyncio.Event] = {}

    # ----------------------------------------------------------------- lifecycle
    async def run(self, ready: asyncio.Event | None = None) -> None:
        check, self._bundle_check = self._bundle_check, None  # a check serves one start
        creds = await (check or BundleCheck.start(self.cfg.credentials, fork=False)).credentials()
        if creds.role != "master-target":
            raise TidemarkError(
                f"{self.cfg.credentials} is a {creds.role} credential; a master target needs "
                "one issued with --role master-target"
            )
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for dc in self.cfg.disks:
            done = self.cfg.state_dir / "disks" / dc.id / DONE_FILE
            if done.exists():
                self.done[dc.id] = read_json(done)
                continue
            self.disks[dc.id] = await asyncio.to_thread(self._open, dc)
        for disk in self.disks.values():
            self._track(disk)
        await self._admin.start()
        if ready is not None:
            ready.set()
        ssl = client_context(creds)
        delay = self.cfg.reconnect_min
        try:
            while not self._stop.is_set() and self.disks:
                started = time.monotonic()
                try:
                    await self._session(ssl)
                except* (ProtocolError, ConnectionError, OSError, TimeoutError) as group:
                    exc = first_leaf(group)
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("event=reverse_link_down error=%r", self.last_error)
                self.connected = False
                if not self.disks:
                    break
                if time.monotonic() - started > 5 * self.cfg.reconnect_max:
                    delay = self.cfg.reconnect_min
                if self.disks:
                    await wait_event(self._stop, delay * (0.8 + 0.4 * random.random()))
                    delay = min(delay * 2, self.cfg.reconnect_max)
        finally:
            await self._admin.close()
            for tracker in self._trackers.values():
                tracker.close()
            await asyncio.gather(*self._hashing, return_exceptions=True)
            for disk in self.disks.values():
                with contextlib.suppress(OSError):
                    await disk.make_applied_durable()
                disk.close()

    def stop(self) -> None:
        self._stop.set()

    def _track(self, disk: ReplicaDisk) -> None:
        """Hash the source disk at once, while the link comes up and the delta flows, and keep
        the digests current as batches land: the final verification re-reads only what
        changed."""
        tracker = DigestTracker(disk.replica_fd, disk.size, verify_chunk(disk.size))
        disk.on_written = tracker.touch
        self._trackers[disk.disk_id] = tracker
        started = time.monotonic()
        hashing = asyncio.ensure_future(asyncio.to_thread(tracker.start))
        hashing.add_done_callback(
            lambda f: log.info(
                "disk=%s event=source_hashed seconds=%.3f error=%r",
                disk.disk_id,
                time.monotonic() - started,
                None if f.cancelled() else f.exception(),
            )
        )
        self._hashing.append(hashing)

    def _open(self, dc: MtDiskConfig) -> ReplicaDisk:
        fd = os.open(dc.path, os.O_RDONLY)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        root = self.cfg.state_dir / "disks"
        exists = (root / dc.id / "state.json").exists()
        return ReplicaDisk.open(
            root,
            dc.id,
            limits=Limits(),
            apply_sync_interval=0.05,
            cache_quota=self.cfg.cache_quota,
            cache_segment=self.cfg.cache_segment,
            create=None if exists else (self.cfg.name, size),
            image=dc.path,
        )

    # ----------------------------------------------------------------- one connection
    async def _session(self, ssl: Any) -> None:
        ps = self.cfg.process_server
        stream = await asyncio.wait_for(
            open_framed(
                ps.host,
                ps.port,
                Connection("client"),
                ssl_context=ssl,
                server_hostname=CLIENT_SERVER_HOSTNAME,
            ),
            self.cfg.connect_timeout,
        )
        try:
            await stream.send(Hello(self.cfg.name, "master-target"))
            async with asyncio.timeout(self.cfg.connect_timeout):
                hello = await stream.recv()
            if not isinstance(hello, HelloOk):
                raise ProtocolError(
                    ErrorCode.UNEXPECTED, f"expected HELLO_OK, got {type(hello).__name__}"
                )
            try:
                async with asyncio.TaskGroup() as tg:
                    for dc in self.cfg.disks:
                        disk = self.disks.get(dc.id)
                        if disk is None:
                            continue
                        if disk.cached_seq == 0:
                            await self._describe_source(stream, dc, disk)
                        # The answer (REGISTERED) comes in _receive: batches of a disk registered
                        # first may already be flowing meanwhile.
                        await stream.send(Register(dc.id, disk.size, disk.durable_seq))
                    self.connected = True
                    self.last_error = None
                    log.info("event=reverse_link_up disks=%s", ",".join(self.disks))
                    tg.create_task(self._heartbeats(stream))
                    await self._receive(stream, tg)
            except* _AllDone:
                pass  # every disk failed back
        finally:
            await stream.close()

    async def _describe_source(
        self, stream: FramedStream, dc: MtDiskConfig, disk: ReplicaDisk
    ) -> None:
        if dc.alternate:
            await stream.send(encode_control(FailbackRanges(dc.id, (), False, True, True)))
            return
        ranges = None
        if dc.agent_state_dir is not None:
            ranges = await asyncio.to_thread(source_divergence, dc.agent_state_dir)
        if ranges is None:
            log.warning("disk=%s event=failback_digest_fallback (no agent journal)", dc.id)
            await self._send_digests(stream, dc.id, disk, DIGEST_CHUNK)
            await stream.send(encode_control(FailbackRanges(dc.id, (), True, False, True)))
            return
        pieces = [ranges[i : i + MAX_RANGES] for i in range(0, len(ranges), MAX_RANGES)] or [[]]
        for index, piece in enumerate(pieces):
            await stream.send(
                encode_control(
                    FailbackRanges(dc.id, tuple(piece), False, False, index == len(pieces) - 1)
                )
            )

    async def _send_digests(
        self, stream: FramedStream, disk_id: str, disk: ReplicaDisk, chunk: int
    ) -> None:
        tracker = self._trackers.get(disk_id)
        if tracker is not None and tracker.chunk == chunk:
            digests = await asyncio.to_thread(tracker.current)
        else:
            result = await asyncio.to_thread(
                chunk_digests, disk.replica_fd, 0, disk.size, chunk, disk.size
            )
            digests = result.digests
        for start in range(0, max(len(digests), 1), DIGESTS_PER_MESSAGE):
            part = digests[start : start + DIGESTS_PER_MESSAGE]
            await stream.send(
                encode_control(
                    FailbackDigests(
                        disk_id,
                        start * chunk,
                        chunk,
                        b"".join(part).hex(),
                        start + DIGESTS_PER_MESSAGE >= len(digests),
                    )
                )
            )

    async def _receive(self, stream: FramedStream, tg: asyncio.TaskGroup) -> None:
        timeout = max(3 * self.cfg.heartbeat_interval, 30.0)
        while True:
            async with asyncio.timeout(timeout):
                msg = await stream.recv()
            if isinstance(msg, BatchMsg):
                disk = self.disks.get(msg.disk_id)
                if disk is None:
                    raise ProtocolError(ErrorCode.UNEXPECTED, f"batch for {msg.disk_id}")
                if msg.header.last_seq <= disk.cached_seq:
                    await stream.send(Ack(msg.disk_id, disk.durable_seq))
                    continue
                await disk.wait_for_cache_space(len(msg.data))
                disk.append_batch(msg.data, msg.header)
                self._ack_events[msg.disk_id].set()  # group commit: the pump syncs and acks
            elif isinstance(msg, Registered):
                disk = self.disks.get(msg.disk_id)
                if disk is None:
                    raise ProtocolError(ErrorCode.UNEXPECTED, f"REGISTERED for {msg.disk_id}")
                self._appliers[msg.disk_id] = tg.create_task(
                    disk.run_applier(), name=f"apply-{msg.disk_id}"
                )
                event = self._ack_events[msg.disk_id] = asyncio.Event()
                tg.create_task(self._ack_pump(stream, disk, event), name=f"acks-{msg.disk_id}")
            elif isinstance(msg, Heartbeat):
                continue
            elif isinstance(msg, Control):
                body = decode_control(msg)
                if isinstance(body, FailbackVerify):
                    disk = self.disks[body.disk]
                    started = time.monotonic()
                    await disk.make_applied_durable()
                    durable = time.monotonic()
                    await self._send_digests(stream, body.disk, disk, body.chunk)
                    log.info(
                        "disk=%s event=failback_verify applied_durable_ms=%.1f digests_ms=%.1f",
                        body.disk,
                        (durable - started) * 1000,
                        (time.monotonic() - durable) * 1000,
                    )
                elif isinstance(body, FailbackDone):
                    await self._finish(body)
                    if not self.disks:
                        self._stop.set()
                        raise _AllDone
                else:
                    raise ProtocolError(ErrorCode.UNEXPECTED, f"unexpected control {msg.name}")
            else:
                raise ProtocolError(ErrorCode.UNEXPECTED, f"unexpected {type(msg).__name__}")

    async def _ack_pump(
        self, stream: FramedStream, disk: ReplicaDisk, event: asyncio.Event
    ) -> None:
        """One fdatasync and one ACK for every batch that arrived meanwhile."""
        while disk.disk_id in self.disks:
            await event.wait()
            event.clear()
            seq = await disk.sync_cache()
            failpoint("mt.cache.after_durable")
            await stream.send(Ack(disk.disk_id, seq))

    async def _finish(self, body: FailbackDone) -> None:
        disk = self.disks.pop(body.disk)
        disk.on_written = None
        self._trackers.pop(body.disk, None)
        applier = self._appliers.pop(body.disk, None)
        if applier is not None:
            applier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await applier
        await disk.make_applied_durable()
        # One more sync of the replica, through its record (it fails at once after an
        # earlier failed sync): the fdatasync covers the data and the size the source needs.
        await disk.sync_replica()
        dc = next(d for d in self.cfg.disks if d.id == body.disk)
        report = {
            "disk": body.disk,
            "next_seq": body.next_seq,
            "applied_seq": disk.applied_seq,
            "time_ns": time.time_ns(),
            "agent_reset": False,
        }
        failpoint("mt.finish.before_reset")
        if dc.agent_state_dir is not None and (dc.agent_state_dir / "state.json").exists():
            await asyncio.to_thread(reset_after_failback, dc.agent_state_dir, body.next_seq)
            report["agent_reset"] = True
        disk.close()
        await asyncio.to_thread(
            atomic_write_json, self.cfg.state_dir / "disks" / body.disk / DONE_FILE, report
        )
        self.done[body.disk] = report
        log.info(
            "disk=%s event=failback_done next_seq=%d agent_reset=%s",
            body.disk,
            body.next_seq,
            report["agent_reset"],
        )

    async def _heartbeats(self, stream: FramedStream) -> None:
        counter = 0
        while True:
            counter += 1
            reports = tuple(
                DiskReport(d.disk_id, "failback", d.cached_seq, d.applying_seq, 0, 0)
                for d in self.disks.values()
            )
            await stream.send(Heartbeat(counter, reports))
            await asyncio.sleep(min(self.cfg.heartbeat_interval, 0.05) if reports else 1.0)

    # ----------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        return {
            "role": "master-target",
            "name": self.cfg.name,
            "running": True,
            "connected": self.connected,
            "last_error": self.last_error,
            "disks": [
                {
                    "disk": d.disk_id,
                    "state": "failing-back",
                    "direction": "reverse",
                    "cached_seq": d.cached_seq,
                    "applied_seq": d.applying_seq,
                    "path": str(d.replica_path),
                }
                for d in self.disks.values()
            ]
            + [{"disk": k, "state": "failed-back", **v} for k, v in self.done.items()],
        }

    async def _admin_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, **self.status()}


class _AllDone(Exception):
    """Every disk failed back: the session (and the service) ends."""


def status_offline(cfg: MasterTargetConfig) -> dict[str, Any]:
    rows = []
    for dc in cfg.disks:
        done = cfg.state_dir / "disks" / dc.id / DONE_FILE
        state = "failed-back" if done.exists() else "stopped"
        rows.append({"disk": dc.id, "state": state, "path": str(dc.path)})
    return {"role": "master-target", "running": False, "disks": rows}


__all__ = ["MasterTarget", "status_offline"]
