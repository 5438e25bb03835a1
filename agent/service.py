"""The agent service: opens the protected disks, runs the shipper, the NBD exports and the admin socket.

This is also the async Python API::

    async with Agent(load_agent_config(path)) as agent:
        disk = agent.disk("web01-root")
        await disk.write(0, b"hello")
        await disk.flush()

Rule: no task is left running unowned; ``stop()`` flushes every disk and records
a clean stop (so no journal redo is needed on the next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from types import TracebackType
from typing import Any

from agent.disk import ProtectedDisk
from agent.points import PointKeeper
from agent.resync import Resyncer, Scanner
from agent.shipper import Shipper, drained
from common.admin import AdminServer
from common.config import AgentConfig
from common.credentials import BundleCheck
from common.errors import TidemarkError
from common.state_lock import hold_state_dir

log = logging.getLogger("tidemark.agent")

WAIT_POLL = 0.01  # seconds between looks at the disks while a ``wait`` request is open


class Agent:
    """One agent: every ``[[disk]]`` of its config, replicated to one process server."""

    def __init__(
        self, cfg: AgentConfig, *, nbd: bool = True, bundle_check: BundleCheck | None = None
    ) -> None:
        """``bundle_check``: the credentials' check, already started (``tidemark-agent run``
        starts it first, common/credentials.py); by default :meth:`start` makes it."""
        self.cfg = cfg
        self._bundle_check = bundle_check
        self.disks: dict[str, ProtectedDisk] = {}
        self.shipper: Shipper | None = None
        self._ship_task: asyncio.Task[None] | None = None
        self._exports: list[Any] = []
        self._admin = AdminServer(
            cfg.admin_socket,
            {
                "status": self._admin_status,
                "verify": self._admin_verify,
                "resync": self._admin_resync,
                "point": self._admin_point,
                "wait": self._admin_wait,
            },
        )
        self.admin = self._admin
        self.points: PointKeeper | None = None
        self.resyncers: dict[str, Resyncer] = {}
        self.scanners: dict[str, Scanner] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._want_nbd = nbd
        self.started_ns = 0
        self._lock_fd: int | None = None  # the state directory's lock (common/state_lock.py)
        self._stopping = False  # ends open ``wait`` requests

    async def start(self) -> None:
        """Open disks, start replication and exports. Raises TidemarkError, OSError."""
        self._stopping = False
        check, self._bundle_check = self._bundle_check, None  # a check serves one start
        creds = await (check or BundleCheck.start(self.cfg.credentials, fork=False)).credentials()
        if creds.name != self.cfg.name:
            raise TidemarkError(
                f"{self.cfg.path}: agent.name is {self.cfg.name!r} but {self.cfg.credentials} was issued to {creds.name!r}"
            )
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # One agent per state directory: a second one would append to the same journals.
        self._lock_fd = hold_state_dir(self.cfg.state_dir, "tidemark-agent run")
        try:
            for dc in self.cfg.disks:
                disk = await ProtectedDisk.open(
                    dc.id,
                    dc.path,
                    self.cfg.state_dir / "disks" / dc.id,
                    journal_quota=self.cfg.journal_quota,
                    segment_bytes=self.cfg.journal_segment,
                    activity_extents=self.cfg.activity_log_extents,
                    scan_only=dc.mode == "scan",  # before open() decides on a journal redo
                )
                disk.copy_in_bulk = self.cfg.initial_copy == "bulk"
                self.disks[dc.id] = disk
            self.shipper = Shipper(self.cfg, creds, self.disks)
            self.shipper.on_verify_request = self.verify
            self.points = PointKeeper(self.cfg, self.disks, self.shipper)
            self.shipper.on_control = self.points.on_control
            self._ship_task = asyncio.create_task(self.shipper.run(), name="shipper")
            self._tasks.append(asyncio.create_task(self.points.run(), name="points"))
            for dc in self.cfg.disks:
                disk = self.disks[dc.id]
                resyncer = Resyncer(disk, self.shipper)
                self.resyncers[dc.id] = resyncer
                self._tasks.append(asyncio.create_task(resyncer.run(), name=f"resync-{dc.id}"))
                if dc.mode == "scan":
                    scanner = Scanner(
                        disk, resyncer, dc.scan_interval, disk.state_dir / "scan.digests"
                    )
                    self.scanners[dc.id] = scanner
                    self._tasks.append(asyncio.create_task(scanner.run(), name=f"scan-{dc.id}"))
            if self._want_nbd:
                await self._start_exports()
            await self._admin.start()
        except BaseException:
            await self.stop()
            raise
        self.started_ns = time.time_ns()
        log.info("event=agent_started name=%s disks=%s", self.cfg.name, ",".join(self.disks))

    async def _start_exports(self) -> None:
        from agent.nbd_server import NbdExport  # the NBD front is optional for API-only users

        for dc in self.cfg.disks:
            if dc.nbd:
                export = NbdExport(self.disks[dc.id], dc.nbd)
                await export.start()
                self._exports.append(export)
                log.info("disk=%s event=nbd_export address=%s", dc.id, export.address)

    def disk(self, disk_id: str) -> ProtectedDisk:
        """The protected disk named ``disk_id`` (KeyError if not configured)."""
        return self.disks[disk_id]

    async def wait_drained(self, timeout: float = 60.0) -> bool:
        """True once the process server acknowledged every journaled write."""
        return await drained(self.disks, timeout)

    async def stop(self) -> None:
        """Stop exports and shipping, flush every disk, record a clean stop."""
        self._stopping = True
        for export in self._exports:
            with contextlib.suppress(OSError):
                await export.close()
        self._exports.clear()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._ship_task is not None:
            self._ship_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ship_task
            self._ship_task = None
        await self._admin.close()
        for disk in self.disks.values():
            try:
                await disk.close()
            except TidemarkError as exc:
                log.error("disk=%s event=close_failed error=%r", disk.disk_id, str(exc))
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # last: nothing of the state directory is open any more
            self._lock_fd = None
        log.info("event=agent_stopped name=%s", self.cfg.name)

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def status(self) -> dict[str, Any]:
        now = time.time_ns()
        disks = []
        for disk in self.disks.values():
            row = disk.status(now)
            row["agent"] = self.cfg.name
            row["applied_seq"] = None  # known only to the process server
            resyncer = self.resyncers.get(disk.disk_id)
            if resyncer is not None:
                row["resync_totals"] = dataclasses.asdict(resyncer.totals)
                bulk = resyncer.bulk
                row["bulk_copy"] = {
                    "allowed": disk.bulk_copy_allowed,
                    "open": disk.bulk_open,
                    "copies": bulk.copies,
                    "fallbacks": bulk.fallbacks,
                    "checkpoints": bulk.checkpoints,
                    "sent_bytes": bulk.sent_bytes_total,
                }
            row["unclean_regions"] = [list(r) for r in disk.unclean_regions]
            row["frozen"] = disk.frozen
            if self.points is not None:
                row.update(self.points.status(disk.disk_id))
            scanner = self.scanners.get(disk.disk_id)
            row["mode"] = "scan" if scanner else "journal"
            if scanner is not None:
                row["rpo_seconds"] = round(scanner.rpo_seconds(now / 1e9), 3)
                row["scans"] = scanner.scans
            disks.append(row)
        return {
            "role": "agent",
            "name": self.cfg.name,
            "running": True,
            "process_server": str(self.cfg.process_server),
            "link": self.shipper.status() if self.shipper else None,
            "exports": [e.address for e in self._exports],
            "disks": disks,
        }

    async def _admin_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, **self.status()}

    async def verify(self, disk_id: str, repair: bool = False) -> dict[str, Any]:
        """Compare source and replica by digests (see agent/resync.py); the report's ``equal``
        says whether they match. Needs the replication link."""
        resyncer = self.resyncers.get(disk_id)
        if resyncer is None:
            return {"ok": False, "error": f"no disk {disk_id!r} on this agent"}
        if self.shipper is None or disk_id not in self.shipper.linked:
            return {"ok": False, "error": "the process server is not connected"}
        try:
            return await resyncer.verify(repair=repair)
        except (ConnectionError, TimeoutError) as exc:
            return {"ok": False, "error": f"verify interrupted: {exc}"}

    async def resync(self, disk_id: str) -> dict[str, Any]:
        """Operator request: compare the whole disk by digests and send what differs."""
        disk = self.disks.get(disk_id)
        if disk is None:
            return {"ok": False, "error": f"no disk {disk_id!r} on this agent"}
        disk.mark_dirty([(0, disk.size)], "operator")
        self.resyncers[disk_id].wake.set()
        return {"ok": True, "disk": disk_id, "marked_bytes": disk.size}

    async def _admin_verify(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.verify(str(request.get("disk")), bool(request.get("repair")))

    async def point(self, disk_id: str, tag: str = "") -> dict[str, Any]:
        """An app-consistent point now (the disk's hooks run around the marker)."""
        if disk_id not in self.disks or self.points is None:
            return {"ok": False, "error": f"no disk {disk_id!r} on this agent"}
        return await self.points.app_consistent_point(disk_id, tag)

    async def _admin_point(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.point(str(request.get("disk")), str(request.get("tag") or ""))

    async def _admin_resync(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.resync(str(request.get("disk")))

    async def wait_protected(
        self, disk_ids: list[str] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Wait until each disk (every one when None) is protected up to now: ``replicating``
        (no initial sync or resync due or running) and every write journaled when asked
        acknowledged by the process server. Later writes are not waited for, so a busy disk
        gets there too. ``ok`` False on the timeout (seconds; None: no limit) or an unknown
        disk; the rows say where each disk is."""
        ids = list(self.disks) if disk_ids is None else disk_ids
        if not ids:
            return {"ok": False, "error": "no disk to wait for"}
        unknown = [d for d in ids if d not in self.disks]
        if unknown:
            return {"ok": False, "error": f"no disk {unknown[0]!r} on this agent"}
        disks = [self.disks[d] for d in ids]
        targets = {d.disk_id: d.journaled_seq for d in disks}
        t0 = time.monotonic()
        while True:
            rows = [
                {
                    "disk": d.disk_id,
                    "state": d.state,
                    "target_seq": targets[d.disk_id],
                    "acked_seq": d.acked_seq,
                    "protected": d.state == "replicating" and d.acked_seq >= targets[d.disk_id],
                }
                for d in disks
            ]
            waited = round(time.monotonic() - t0, 3)
            if all(row["protected"] for row in rows):
                return {"ok": True, "waited_seconds": waited, "disks": rows}
            if self._stopping:
                return {"ok": False, "error": "the agent is stopping", "disks": rows}
            if timeout is not None and waited >= timeout:
                behind = ", ".join(
                    f"{r['disk']} ({r['state']})" for r in rows if not r["protected"]
                )
                return {
                    "ok": False,
                    "error": f"not protected within {timeout:g} s: {behind}",
                    "waited_seconds": waited,
                    "disks": rows,
                }
            await asyncio.sleep(WAIT_POLL)

    async def _admin_wait(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.wait_protected(_wait_disks(request), _wait_timeout(request))


def _wait_disks(request: dict[str, Any]) -> list[str] | None:
    disks = request.get("disks")
    if disks is None:
        return None
    if not isinstance(disks, list) or not all(isinstance(d, str) for d in disks):
        raise ValueError("disks must be a list of disk ids")
    return disks


def _wait_timeout(request: dict[str, Any]) -> float | None:
    timeout = request.get("timeout")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds")
    return float(timeout)
