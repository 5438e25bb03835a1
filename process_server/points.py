"""Recovery points on the process server: recording markers, consistency-group barriers,
manual points, retention and thinning.

Rules it keeps:
- A point is recorded only at a seq the cache holds durably and where a received batch ends
  (a marker elsewhere would name a state the undo log cannot rebuild), at or after the oldest
  history kept.
- A group point exists only if every member has it: the barrier asks every agent of the group
  to hold writes, commits only when all answered, and releases them in any case.
- History goes oldest first: past ``retention`` (age of points), past ``undo_quota`` (bytes of
  undo log; status and the log say how much the window shrank), never past an open view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from common.config import GroupConfig, ServerConfig
from common.failpoints import failpoint
from process_server.catalog import Catalog, Point
from protocol.control import PointHeld, PointMark, PointRelease, PointRequest

if TYPE_CHECKING:
    from process_server.replica import ReplicaDisk

log = logging.getLogger("tidemark.ps.points")
PRUNE_INTERVAL = 5.0

# Sends a control body to the agent owning a disk and returns its reply (raises on failure).
Ask = Callable[[str, Any, float], Awaitable[Any]]
Tell = Callable[[str, Any], Awaitable[None]]


class PointError(Exception):
    """A point could not be taken or recorded (the message says why)."""


def new_point_id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


class PointsService:
    """Owns the catalog; the server calls it for markers, requests and pruning."""

    def __init__(self, cfg: ServerConfig, catalog: Catalog, disks: dict[str, ReplicaDisk]) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.disks = disks
        self.groups: dict[str, GroupConfig] = {g.name: g for g in cfg.groups}
        self.group_of: dict[str, str] = {d: g.name for g in cfg.groups for d in g.disks}
        self.barrier_stats: dict[str, dict[str, Any]] = {}
        self.window_note: dict[str, str] = {}
        self.recorded = 0
        self.refused = 0

    # ----------------------------------------------------------------- markers
    def record_mark(self, disk: ReplicaDisk, mark: PointMark) -> bool:
        """Record a marker from the disk's agent. Raises PointError when it cannot be a point."""
        if mark.disk != disk.disk_id:
            raise PointError(f"marker of {mark.disk} on disk {disk.disk_id}")
        if disk.fenced:
            raise PointError(f"disk {disk.disk_id} is failed over: no new points")
        if disk.bulk_fence:
            raise PointError(f"disk {disk.disk_id}: its initial sync is still copying")
        if mark.seq > disk.durable_seq:
            raise PointError(f"point at seq {mark.seq} beyond the cache ({disk.durable_seq})")
        if not disk.is_boundary(mark.seq):
            raise PointError(f"seq {mark.seq} is not where a batch ends")
        if disk.undo is None:
            raise PointError("the undo log is off on this process server")
        if mark.seq < disk.undo.oldest_restorable():
            raise PointError(f"seq {mark.seq} is older than the history kept")
        point = Point(
            mark.point_id,
            disk.disk_id,
            mark.seq,
            mark.time_ns,
            mark.kind,
            mark.tag,
            mark.group,
            mark.hold_ms,
        )
        failpoint("points.before_insert")
        added = self.catalog.add(point, time.time_ns())
        failpoint("points.after_insert")
        if added:
            self.recorded += 1
            if point.kind != "crash-consistent":
                log.info(
                    "disk=%s event=point_recorded id=%s seq=%d kind=%s tag=%r group=%s",
                    disk.disk_id,
                    point.id,
                    point.seq,
                    point.kind,
                    point.tag,
                    point.group,
                )
        return added

    # ----------------------------------------------------------------- barriers
    async def take(
        self,
        disks: list[str],
        kind: str,
        tag: str,
        group: str,
        ask: Ask,
        tell: Tell,
        hold_timeout: float,
    ) -> dict[str, Any]:
        """Take one point of ``disks`` at a barrier: every owning agent holds writes, reports its
        seq, and gets a release (commit only when all held). Returns the point's report; the
        catalog rows arrive as the agents' markers (after their batches are acknowledged)."""
        point_id = new_point_id(group or kind)
        owners: dict[Any, list[str]] = {}
        for disk_id in disks:
            disk = self.disks.get(disk_id)
            if disk is None:
                raise PointError(f"no disk {disk_id!r} on this process server")
            if disk.session is None:
                raise PointError(f"the agent of disk {disk_id} ({disk.owner}) is not connected")
            owners.setdefault(disk.session, []).append(disk_id)
        started = time.monotonic()
        point_time = time.time_ns()
        held: dict[Any, PointHeld] = {}
        error = ""
        try:
            replies = await asyncio.gather(
                *(
                    ask(
                        ids[0],
                        PointRequest(point_id, tuple(ids), kind, tag, group, hold_timeout),
                        # app-consistent: the agents' hooks run first, within their own timeouts
                        3600.0 if kind == "app-consistent" else hold_timeout + 5.0,
                    )
                    for ids in owners.values()
                ),
                return_exceptions=True,
            )
            for session, reply in zip(owners, replies, strict=True):
                if isinstance(reply, PointHeld) and reply.ok:
                    held[session] = reply
                elif isinstance(reply, PointHeld):
                    error = error or reply.error
                else:
                    error = error or f"{type(reply).__name__}: {reply}"
        finally:
            commit = not error and len(held) == len(owners)
            for ids in owners.values():
                with contextlib.suppress(Exception):
                    await tell(ids[0], PointRelease(point_id, commit, point_time))
        hold_ms = (time.monotonic() - started) * 1000
        if group:
            stats = self.barrier_stats.setdefault(group, {"points": 0, "failed": 0})
            stats["last_hold_ms"] = round(hold_ms, 3)
            stats["max_hold_ms"] = round(max(stats.get("max_hold_ms", 0.0), hold_ms), 3)
            stats["points" if commit else "failed"] += 1
        if not commit:
            raise PointError(f"point {point_id} not taken: {error or 'an agent did not hold'}")
        seqs: dict[str, int] = {}
        for reply in held.values():
            seqs.update(reply.seqs)
        return {"id": point_id, "kind": kind, "group": group, "seqs": seqs, "hold_ms": hold_ms}

    async def wait_recorded(self, point_id: str, disks: list[str], timeout: float) -> bool:
        """Wait until every disk has the point in the catalog (markers arrive after acks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.catalog.get(d, point_id) is not None for d in disks):
                return True
            await asyncio.sleep(0.01)
        return False

    async def run_group(self, group: GroupConfig, ask: Ask, tell: Tell) -> None:
        """Group barriers every ``interval`` while every member's agent is connected."""
        next_app = time.monotonic() + group.app_consistent_interval
        while True:
            await asyncio.sleep(group.interval)
            members = [self.disks.get(d) for d in group.disks]
            if any(m is None or m.session is None or m.fenced for m in members):
                continue
            if any(
                (m.report or {}).get("state", "replicating") != "replicating"
                for m in members
                if m is not None
            ):
                continue  # a member mid-resync has no consistent state to offer
            kind = "crash-consistent"
            if group.app_consistent_interval and time.monotonic() >= next_app:
                kind = "app-consistent"
                next_app = time.monotonic() + group.app_consistent_interval
            try:
                await self.take(
                    list(group.disks), kind, "", group.name, ask, tell, group.hold_timeout
                )
            except (PointError, ConnectionError, TimeoutError) as exc:
                log.warning("group=%s event=barrier_failed error=%r", group.name, str(exc))

    # ----------------------------------------------------------------- listing
    def list_points(self, disk: str) -> list[dict[str, Any]]:
        replica = self.disks.get(disk)
        oldest = replica.undo.oldest_restorable() if replica and replica.undo else None
        out = []
        for p in self.catalog.points(disk):
            if oldest is not None and p.seq < oldest:
                continue
            out.append(p.as_dict())
        return out

    def list_group(self, group: str) -> list[dict[str, Any]]:
        config = self.groups.get(group)
        if config is None:
            raise PointError(f"no group {group!r} in the configuration")
        out = []
        for members in self.catalog.group_points(group, list(config.disks)):
            out.append(
                {
                    "id": members[0].id,
                    "group": group,
                    "time_ns": members[0].time_ns,
                    "kind": members[0].kind,
                    "hold_ms": round(max(m.hold_ms for m in members), 3),
                    "seqs": {m.disk: m.seq for m in members},
                }
            )
        return out

    # ----------------------------------------------------------------- retention
    async def prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            for disk in list(self.disks.values()):
                try:
                    await self.prune(disk)
                except OSError as exc:
                    log.error("disk=%s event=prune_failed error=%r", disk.disk_id, str(exc))

    async def prune(self, disk: ReplicaDisk, now_ns: int | None = None) -> None:
        """Drop points and undo history past the retention window or the undo quota."""
        undo = disk.undo
        if undo is None or disk.fenced:
            return
        now_ns = now_ns or time.time_ns()
        cfg = self.cfg
        if cfg.keep_all_points_for:
            self.catalog.thin(disk.disk_id, now_ns - int(cfg.keep_all_points_for * 1e9))
        horizon = now_ns - int(cfg.retention * 1e9)
        # The oldest point kept needs every undo record after it.
        oldest_kept = self.catalog.first_seq(disk.disk_id, horizon)
        release = disk.applied_seq if oldest_kept is None else oldest_kept
        if undo.bytes_used > cfg.undo_quota:
            # Over quota: give up the oldest points until what is left fits (estimated by seq
            # position in the log, then checked again on the next round).
            excess = undo.bytes_used - cfg.undo_quota
            span = max(1, undo.last_seq - undo.first_seq + 1)
            cut_seq = undo.first_seq + (span * excess) // undo.bytes_used
            later = self.catalog.first_seq(disk.disk_id, horizon, cut_seq)
            release = max(release, disk.applied_seq if later is None else later)
            note = (
                f"undo quota {cfg.undo_quota} bytes reached: recovery points before seq "
                f"{release} dropped early"
            )
            if self.window_note.get(disk.disk_id) != note:
                log.warning("disk=%s event=retention_shortened %s", disk.disk_id, note)
            self.window_note[disk.disk_id] = note
        # Never past an open view nor applied_seq, and never while the applier's thread
        # appends to the undo log (both checked in the undo log's turn).
        await disk.release_undo(release)
        self.catalog.delete_before(disk.disk_id, undo.oldest_restorable())

    def status(self, disk: ReplicaDisk) -> dict[str, Any]:
        undo = disk.undo
        newest = self.catalog.newest(disk.disk_id)
        count, oldest_ns = self.catalog.summary(
            disk.disk_id, undo.oldest_restorable() if undo else 0
        )
        return {
            "points": count,
            "oldest_point_ns": oldest_ns,
            "newest_point_ns": newest.time_ns if newest else None,
            "newest_point_age_seconds": round((time.time_ns() - newest.time_ns) / 1e9, 3)
            if newest
            else None,
            "undo_bytes": undo.bytes_used if undo else 0,
            "undo_quota": self.cfg.undo_quota,
            "retention_seconds": self.cfg.retention,
            "retention_note": self.window_note.get(disk.disk_id),
            "group": self.group_of.get(disk.disk_id),
        }


__all__ = ["PointError", "PointsService", "new_point_id"]
