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
import logging
import time
from types import TracebackType
from typing import Any

from agent.disk import ProtectedDisk
from agent.shipper import Shipper, drained
from common.admin import AdminServer
from common.config import AgentConfig
from common.errors import TidemarkError
from process_server.pki import load_bundle

log = logging.getLogger("tidemark.agent")


class Agent:
    """One agent: every ``[[disk]]`` of its config, replicated to one process server."""

    def __init__(self, cfg: AgentConfig, *, nbd: bool = True) -> None:
        self.cfg = cfg
        self.disks: dict[str, ProtectedDisk] = {}
        self.shipper: Shipper | None = None
        self._ship_task: asyncio.Task[None] | None = None
        self._exports: list[Any] = []
        self._admin = AdminServer(cfg.admin_socket, {"status": self._admin_status})
        self._want_nbd = nbd
        self.started_ns = 0

    async def start(self) -> None:
        """Open disks, start replication and exports. Raises TidemarkError, OSError."""
        creds = load_bundle(self.cfg.credentials)
        if creds.name != self.cfg.name:
            raise TidemarkError(
                f"{self.cfg.path}: agent.name is {self.cfg.name!r} but {self.cfg.credentials} was issued to {creds.name!r}"
            )
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            for dc in self.cfg.disks:
                self.disks[dc.id] = await ProtectedDisk.open(
                    dc.id,
                    dc.path,
                    self.cfg.state_dir / "disks" / dc.id,
                    journal_quota=self.cfg.journal_quota,
                    segment_bytes=self.cfg.journal_segment,
                )
            self.shipper = Shipper(self.cfg, creds, self.disks)
            self._ship_task = asyncio.create_task(self.shipper.run(), name="shipper")
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
        for export in self._exports:
            with contextlib.suppress(OSError):
                await export.close()
        self._exports.clear()
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
