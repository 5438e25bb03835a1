"""Recovery points on the agent: where they fall in the write stream, and telling the process
server once it holds them.

- Crash-consistent: every ``crash_consistent_interval``, while the disk is replicating (not
  resyncing) and has new writes, the current journaled seq becomes a point. Any journal
  prefix is crash-consistent: a write is acknowledged only after it is journaled.
- App-consistent: the pre-snapshot hook runs (e.g. ``fsfreeze -f``), the point is marked, the
  post hook runs, always, even after a failed or timed-out pre hook; a point whose pre hook
  failed is reported and never recorded as app-consistent.
- On request (manual points, consistency-group barriers): writes are held on the named disks,
  the seqs reported, and released on the process server's word or after ``hold_timeout``.
- A point's seq is a *cut*: the shipper ends a batch there. Its marker is sent once the process
  server acknowledged that seq, and again after a reconnect until it is confirmed recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.aio import wait_event
from protocol.control import (
    ControlBody,
    Freeze,
    Frozen,
    PointHeld,
    PointMark,
    PointRecorded,
    PointRelease,
    PointRequest,
    Unfreeze,
)

if TYPE_CHECKING:
    from agent.disk import ProtectedDisk
    from agent.shipper import Shipper
    from common.config import AgentConfig, DiskConfig

log = logging.getLogger("tidemark.agent.points")
MAX_PENDING = 4096
SEND_INTERVAL = 0.02


@dataclass
class _Pending:
    mark: PointMark
    epoch: int
    sent_on: int = -1  # the shipper connection count it was last sent on


@dataclass
class HookResult:
    ok: bool
    error: str = ""
    seconds: float = 0.0


class PointKeeper:
    """Takes this agent's points and reports them to the process server."""

    def __init__(self, cfg: AgentConfig, disks: dict[str, ProtectedDisk], shipper: Shipper) -> None:
        self.cfg = cfg
        self.disks = disks
        self.shipper = shipper
        self.disk_cfg: dict[str, DiskConfig] = {d.id: d for d in cfg.disks}
        self.pending: dict[tuple[str, str], _Pending] = {}  # (point id, disk)
        self._releases: dict[str, asyncio.Future[PointRelease]] = {}
        self._wake = asyncio.Event()
        self.marked = 0
        self.recorded = 0
        self.app_consistent: dict[str, dict[str, Any]] = {}  # last attempt per disk
        self._last_seq: dict[str, int] = {}

    # ----------------------------------------------------------------- running
    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._send_forever())
            for dc in self.cfg.disks:
                if dc.mode != "journal":
                    continue
                if dc.crash_consistent_interval:
                    tg.create_task(self._crash_consistent(dc))
                if dc.app_consistent_interval:
                    tg.create_task(self._app_consistent_forever(dc))

    async def _crash_consistent(self, dc: DiskConfig) -> None:
        disk = self.disks[dc.id]
        while True:
            await asyncio.sleep(dc.crash_consistent_interval)
            if disk.state != "replicating" or disk.frozen:
                continue
            if disk.journaled_seq <= self._last_seq.get(dc.id, 0):
                continue  # nothing new: the previous point still describes the disk
            self.mark(disk, disk.cut_here(), "crash-consistent")

    async def _app_consistent_forever(self, dc: DiskConfig) -> None:
        while True:
            await asyncio.sleep(dc.app_consistent_interval)
            await self.app_consistent_point(dc.id)

    # ----------------------------------------------------------------- taking points
    def mark(
        self,
        disk: ProtectedDisk,
        seq: int,
        kind: str,
        *,
        point_id: str = "",
        tag: str = "",
        group: str = "",
        time_ns: int = 0,
        hold_ms: float = 0.0,
    ) -> PointMark:
        """Remember a point at ``seq`` (already a cut) until the process server records it."""
        mark = PointMark(
            point_id or f"{disk.disk_id[:40]}-{seq}-{secrets.token_hex(4)}",
            disk.disk_id,
            seq,
            time_ns or time.time_ns(),
            kind,
            tag,
            group,
            hold_ms,
        )
        if len(self.pending) >= MAX_PENDING:  # the server is away for long: keep the newest
            oldest = next(iter(self.pending))
            del self.pending[oldest]
        self.pending[(mark.point_id, mark.disk)] = _Pending(mark, disk.epoch)
        self._last_seq[disk.disk_id] = max(self._last_seq.get(disk.disk_id, 0), seq)
        self.marked += 1
        self._wake.set()
        return mark

    async def app_consistent_point(self, disk_id: str, tag: str = "") -> dict[str, Any]:
        """Pre hook, marker, post hook (always). Returns what happened."""
        dc = self.disk_cfg[disk_id]
        disk = self.disks[disk_id]
        started = time.monotonic()
        report: dict[str, Any] = {"time_ns": time.time_ns(), "ok": False}
        if disk.state != "replicating":
            report["error"] = f"disk is {disk.state}: no consistent state to mark"
        else:
            pre = await run_hook(dc.pre_snapshot_hook, dc.hook_timeout)
            try:
                if pre.ok:
                    mark = self.mark(disk, disk.cut_here(), "app-consistent", tag=tag)
                    report.update(ok=True, point_id=mark.point_id, seq=mark.seq)
                else:
                    report["error"] = f"pre-snapshot hook: {pre.error}"
            finally:
                post = await run_hook(dc.post_snapshot_hook, dc.hook_timeout)
            report["pre_seconds"] = round(pre.seconds, 3)
            report["post_seconds"] = round(post.seconds, 3)
            if not post.ok:
                report["post_error"] = post.error
        report["seconds"] = round(time.monotonic() - started, 3)
        self.app_consistent[disk_id] = report
        if report["ok"]:
            log.info("disk=%s event=app_consistent_point seq=%s", disk_id, report["seq"])
        else:
            log.warning(
                "disk=%s event=app_consistent_point_failed error=%r", disk_id, report["error"]
            )
        if report.get("post_error"):
            log.warning("disk=%s event=post_hook_failed error=%r", disk_id, report["post_error"])
        return report

    # ----------------------------------------------------------------- the process server asks
    async def on_control(self, request_id: int, body: ControlBody) -> None:
        if isinstance(body, PointRecorded):
            if self.pending.pop((body.point_id, body.disk), None) is not None:
                self.recorded += 1
        elif isinstance(body, PointRequest):
            await self._on_point_request(request_id, body)
        elif isinstance(body, PointRelease):
            future = self._releases.get(body.point_id)
            if future is not None and not future.done():
                future.set_result(body)
        elif isinstance(body, Freeze):
            await self._on_freeze(request_id, body)
        elif isinstance(body, Unfreeze):
            disk = self.disks.get(body.disk)
            if disk is not None:
                disk.frozen = False
                log.info("disk=%s event=unfrozen", body.disk)
        else:
            log.warning("event=unexpected_control name=%s", body.NAME)

    async def _on_point_request(self, request_id: int, req: PointRequest) -> None:
        unknown = [d for d in req.disks if d not in self.disks]
        disks = [self.disks[d] for d in req.disks if d in self.disks]
        not_ready = [d.disk_id for d in disks if d.state != "replicating" or d.frozen]
        if unknown or not_ready:
            error = f"not on this agent: {unknown}" if unknown else f"not replicating: {not_ready}"
            await self.shipper.send_control(PointHeld(False, {}, error), request_id)
            return
        hooks_ok, hook_error = True, ""
        if req.kind == "app-consistent":
            results = [
                await run_hook(
                    self.disk_cfg[d.disk_id].pre_snapshot_hook,
                    self.disk_cfg[d.disk_id].hook_timeout,
                )
                for d in disks
            ]
            hooks_ok = all(r.ok for r in results)
            hook_error = "; ".join(r.error for r in results if not r.ok)
        future: asyncio.Future[PointRelease] = asyncio.get_running_loop().create_future()
        self._releases[req.point_id] = future
        started = time.monotonic()
        held: list[ProtectedDisk] = []
        seqs: dict[str, int] = {}
        release: PointRelease | None = None
        post_done = False
        try:
            if not hooks_ok:
                await self._post_hooks(disks)  # before the answer: the caller sees them done
                post_done = True
                await self.shipper.send_control(
                    PointHeld(False, {}, f"pre-snapshot hook: {hook_error}"), request_id
                )
                return
            tasks = {asyncio.ensure_future(d.hold()): d for d in disks}
            done, pending = await asyncio.wait(tasks, timeout=req.hold_timeout)
            for task in pending:
                task.cancel()  # a cancelled hold releases itself
            if pending:
                await asyncio.wait(pending)
            for task in done:
                if not task.cancelled() and task.exception() is None:
                    held.append(tasks[task])
                    seqs[tasks[task].disk_id] = task.result()
            if len(held) != len(disks):
                await self.shipper.send_control(
                    PointHeld(False, {}, "writes could not be held in time"), request_id
                )
                return
            await self.shipper.send_control(PointHeld(True, seqs), request_id)
            release = await asyncio.wait_for(future, req.hold_timeout)
        except (TimeoutError, ConnectionError) as exc:
            log.warning("event=point_hold_abandoned id=%s error=%r", req.point_id, str(exc))
            return
        finally:
            for d in held:
                d.release()
            self._releases.pop(req.point_id, None)
            if req.kind == "app-consistent" and not post_done:
                await self._post_hooks(disks)
        hold_ms = (time.monotonic() - started) * 1000
        if release is not None and release.commit:
            for d in disks:
                self.mark(
                    d,
                    seqs[d.disk_id],
                    req.kind,
                    point_id=req.point_id,
                    tag=req.tag,
                    group=req.group,
                    time_ns=release.time_ns,
                    hold_ms=hold_ms,
                )

    async def _post_hooks(self, disks: list[ProtectedDisk]) -> None:
        for d in disks:
            dc = self.disk_cfg[d.disk_id]
            await run_hook(dc.post_snapshot_hook, dc.hook_timeout)

    async def _on_freeze(self, request_id: int, req: Freeze) -> None:
        disk = self.disks.get(req.disk)
        if disk is None:
            await self.shipper.send_control(Frozen(req.disk, False, 0, "no such disk"), request_id)
            return
        disk.frozen = True
        log.warning("disk=%s event=frozen reason=planned_failover", req.disk)
        await disk.wait_writers_idle()
        await disk.flush()
        deadline = time.monotonic() + req.drain_timeout
        while disk.acked_seq < disk.journaled_seq or disk.resync_required:
            if time.monotonic() > deadline:
                await self.shipper.send_control(
                    Frozen(req.disk, False, disk.journaled_seq, "drain timed out"), request_id
                )
                return
            await asyncio.sleep(0.01)
        await self.shipper.send_control(Frozen(req.disk, True, disk.journaled_seq), request_id)

    # ----------------------------------------------------------------- sending markers
    async def _send_forever(self) -> None:
        while True:
            if self.pending:  # until each is acknowledged through its seq, then sent
                await wait_event(self._wake, SEND_INTERVAL)
            else:  # nothing to send until a point is marked (mark() sets _wake)
                await self._wake.wait()
            self._wake.clear()
            connection = self.shipper.stats.connects
            if not self.shipper.connected.is_set():
                continue
            for key, entry in list(self.pending.items()):
                disk = self.disks.get(entry.mark.disk)
                if disk is None or entry.epoch != disk.epoch:
                    del self.pending[key]  # seq numbering restarted: the seq means nothing
                    continue
                if entry.sent_on == connection or disk.acked_seq < entry.mark.seq:
                    continue
                try:
                    await self.shipper.send_control(entry.mark)
                except ConnectionError:
                    break
                entry.sent_on = connection

    def status(self, disk_id: str) -> dict[str, Any]:
        return {
            "points_pending": sum(1 for p in self.pending.values() if p.mark.disk == disk_id),
            "last_app_consistent": self.app_consistent.get(disk_id),
        }


async def run_hook(argv: tuple[str, ...], timeout: float) -> HookResult:
    """Run a hook command (no shell) with a timeout; a timed-out hook is killed."""
    if not argv:
        return HookResult(True)
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return HookResult(False, f"{argv[0]}: {exc.strerror}", time.monotonic() - started)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return HookResult(False, f"timed out after {timeout}s", time.monotonic() - started)
    if proc.returncode != 0:
        tail = stderr.decode(errors="replace").strip()[-200:]
        return HookResult(
            False, f"exit status {proc.returncode}: {tail}", time.monotonic() - started
        )
    return HookResult(True, "", time.monotonic() - started)


__all__ = ["HookResult", "PointKeeper", "run_hook"]
