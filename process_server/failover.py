"""Failover: a recovery point made into a disk a DR VM can use, over NBD or as an image file.

Modes (``tidemark-ps failover``):
- test (``--test``): a point-in-time view with a writable overlay, exported over NBD, while
  replication goes on untouched; ``failover cleanup`` removes it.
- unplanned: the disk is fenced (nothing more is applied; batches still arriving are kept in
  the cache, they are what the source wrote after the point) and the point is exported.
- planned (``--planned``): the agent first stops accepting writes and drains, so the point
  ``latest`` holds every acknowledged write.
- ``--to FILE``: the point written out as a standalone sparse raw image (no export).
- ``failover commit``: the replica is rolled back to the point and the overlay merged into it;
  the export then serves the replica directly (writes still journaled, for failback), the
  undo history and the other points are deleted.

Every step is timed; the timings are the RTO breakdown in the output and in status. A failover
is recorded in ``state_dir/failovers/DISK.json`` (atomically) so a restarted process server
brings its exports back, and finishes a commit a crash interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.nbd_server import NbdExport
from common.durable import atomic_write_json, fsync_dir, read_json
from common.errors import IntegrityError
from common.failpoints import failpoint
from process_server.catalog import Point
from process_server.failback import save_rolled_back
from process_server.materialise import materialise
from process_server.pit import OverlayDisk, PointView
from process_server.points import PointError, new_point_id
from process_server.replica import ReplicaError
from protocol.control import Freeze, Frozen, Unfreeze

if TYPE_CHECKING:
    from process_server.replica import ReplicaDisk
    from process_server.server import ProcessServer

log = logging.getLogger("tidemark.ps.failover")
SPECIAL_POINTS = ("latest", "latest-processed", "latest-app-consistent")


class FailoverError(Exception):
    """A failover request cannot be carried out (the message says why)."""


@dataclass
class Failover:
    disk_id: str
    record: dict[str, Any]
    view: PointView
    overlay: OverlayDisk
    export: NbdExport | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        r = self.record
        return {
            "id": r["id"],
            "disk": self.disk_id,
            "state": r["state"],
            "test": r["test"],
            "planned": r["planned"],
            "point": r["point"],
            "nbd": self.export.address if self.export else None,
            "overlay_writes": self.overlay.writes,
            "overlay_bytes": self.overlay.written_bytes,
            "timings_ms": r.get("timings_ms", {}),
            "created_ns": r["created_ns"],
            "error": self.view.broken,  # the point's history was cut: reads fail (EIO)
        }


class _Timer:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.last = self.start
        self.steps: dict[str, float] = {}

    def step(self, name: str) -> None:
        now = time.monotonic()
        self.steps[name] = round((now - self.last) * 1000, 3)
        self.last = now

    def total(self) -> dict[str, float]:
        return {**self.steps, "total": round((time.monotonic() - self.start) * 1000, 3)}


@dataclass
class _Prepared:
    """A failover with its point resolved and its view open, not yet exported."""

    disk: ReplicaDisk
    point: Point
    view: PointView
    test: bool
    planned: bool
    endpoint: str
    timer: _Timer


class FailoverManager:
    """Every failover of one process server."""

    def __init__(self, server: ProcessServer) -> None:
        self.server = server
        self.directory = server.cfg.state_dir / "failovers"
        self.socket_dir = server.cfg.failover_dir or (server.cfg.state_dir / "failover")
        self.active: dict[str, Failover] = {}
        # Records a restart could not bring back, with why: kept (and the disk kept fenced)
        # until the operator cleans them up; the other failovers and the server go on.
        self.broken: dict[str, tuple[dict[str, Any], str]] = {}
        self._lock = asyncio.Lock()

    # ----------------------------------------------------------------- choosing the point
    async def resolve(self, disk: ReplicaDisk, spec: str, *, fence: bool) -> Point:
        """The point ``spec`` names on ``disk``; with ``fence`` the applier stops there."""
        if disk.bulk_fence:
            raise FailoverError(
                f"disk {disk.disk_id}: its initial sync is still copying; the replica is not "
                "consistent and has no recovery point yet"
            )
        catalog = self.server.points.catalog
        now = time.time_ns()
        if spec == "latest":
            target = disk.durable_seq
            if fence:
                disk.fence(f"failover to {spec}", target)
            await disk.wait_applied(target)
            return Point("latest", disk.disk_id, target, now, "latest")
        if spec == "latest-processed":
            seq = disk.applying_seq
            if fence:
                disk.fence(f"failover to {spec}", seq)
                await disk.wait_still()  # the applier may finish one more group
                seq = disk.applying_seq
            return Point("latest-processed", disk.disk_id, seq, now, "latest-processed")
        if spec == "latest-app-consistent":
            point = catalog.newest(disk.disk_id, kind="app-consistent")
        else:
            point = catalog.get(disk.disk_id, spec)
            if point is None:
                when = parse_time(spec)
                if when is None:
                    raise FailoverError(f"disk {disk.disk_id}: no point {spec!r}")
                point = catalog.newest(disk.disk_id, at_or_before_ns=when)
        if point is None:
            raise FailoverError(f"disk {disk.disk_id}: no point matches {spec!r}")
        if fence:  # at the point, or where the applier is if it is already past it
            disk.fence(f"failover to point {point.id}", max(point.seq, disk.applying_seq))
        await disk.wait_applied(point.seq)  # a point the applier has not reached yet
        return point

    # ----------------------------------------------------------------- failing over
    async def failover(
        self,
        disk_ids: list[str],
        spec: str,
        *,
        test: bool,
        planned: bool,
        nbd: str | None,
        group: str = "",
    ) -> dict[str, Any]:
        """Fail ``disk_ids`` over to ``spec`` (one point of ``group`` for them all). Every
        disk's view is opened before any export comes up, and a failure on any disk undoes
        every disk's failover. With ``planned`` every disk is frozen and drained first, so
        ``latest`` holds every acknowledged write of each. Raises FailoverError, ReplicaError."""
        async with self._lock:
            for disk_id in disk_ids:
                if disk_id not in self.server.disks:
                    raise FailoverError(f"no disk {disk_id!r} on this process server")
                if disk_id in self.active:
                    raise FailoverError(
                        f"disk {disk_id} already has a failover ({self.active[disk_id].record['id']}); "
                        "clean it up or commit it first"
                    )
                if disk_id in self.broken:
                    raise FailoverError(
                        f"disk {disk_id} has a failover that could not be restored "
                        f"({self.broken[disk_id][1]}); clean it up first"
                    )
            if nbd and len(disk_ids) > 1:
                raise FailoverError("--nbd names one endpoint: it fits a single disk only")
            if planned and test:
                raise FailoverError("--planned and --test do not go together")
            disks = [self.server.disks[d] for d in disk_ids]
            timers = {d: _Timer() for d in disk_ids}
            frozen: list[ReplicaDisk] = []
            prepared: list[_Prepared] = []
            try:
                if planned:  # every member stops and drains before any point is chosen
                    for disk in disks:
                        frozen.append(disk)
                        await self._freeze(disk)
                    for timer in timers.values():
                        timer.step("freeze_and_drain")
                points: dict[str, Point] | None = None
                if group and not (planned and spec == "latest"):
                    points = await self._group_points(disk_ids, spec, group)
                for disk in disks:  # every view is opened before any export comes up
                    point_spec = points[disk.disk_id].id if points else spec
                    prepared.append(
                        await self._prepare(disk, point_spec, test, planned, nbd, timers)
                    )
                results = [await self._activate(item) for item in prepared]
            except BaseException:
                # Nothing half-done stays behind: every disk applies again, agents take writes.
                for item in reversed(prepared):
                    await self._abandon(item)
                for disk in frozen:
                    await self._unfreeze(disk)
                raise
            return {"ok": True, "failovers": results}

    async def _group_points(self, disk_ids: list[str], spec: str, group: str) -> dict[str, Point]:
        rows = self.server.points.catalog.group_points(group, disk_ids)
        if spec == "latest-app-consistent":
            rows = [r for r in rows if r[0].kind == "app-consistent"]
        if spec in SPECIAL_POINTS:
            chosen = rows[-1] if rows else None
        else:
            chosen = next((r for r in rows if r[0].id == spec), None)
            when = parse_time(spec)
            if chosen is None and when is not None:
                before = [r for r in rows if r[0].time_ns <= when]
                chosen = before[-1] if before else None
        if chosen is None:
            raise FailoverError(f"group {group}: no group point matches {spec!r}")
        return {p.disk: p for p in chosen}

    async def _prepare(
        self,
        disk: ReplicaDisk,
        spec: str,
        test: bool,
        planned: bool,
        nbd: str | None,
        timers: dict[str, _Timer],
    ) -> _Prepared:
        """Fence (unless ``test``) at the point and open its view; nothing is exported yet.
        On failure the disk is left as it was (but still frozen: the caller unfreezes)."""
        timer = timers[disk.disk_id]
        if test and disk.undo is None:
            raise FailoverError(
                f"disk {disk.disk_id}: a test failover needs the undo log (server.undo = true): "
                "without it the replica moves under the export"
            )
        endpoint = nbd or self._default_endpoint(disk.disk_id)
        try:
            point = await self.resolve(disk, spec, fence=not test)
            timer.step("resolve_point")
            view = await disk.open_view_async(point.seq)  # not on the event loop
            timer.step("open_view")
        except BaseException:
            if not test:
                disk.unfence()
            raise
        return _Prepared(disk, point, view, test, planned, endpoint, timer)

    async def _activate(self, item: _Prepared) -> dict[str, Any]:
        """Bring up the export of a prepared failover and save its record."""
        disk, point = item.disk, item.point
        record: dict[str, Any] = {
            "id": new_point_id("failover"),
            "disk": disk.disk_id,
            "state": "active",
            "test": item.test,
            "planned": item.planned,
            "point": point.as_dict(),
            "created_ns": time.time_ns(),
            "nbd": item.endpoint,
        }
        failover = await self._bring_up(disk, record, item.view)
        item.timer.step("start_export")
        failpoint("failover.after_overlay")
        record["timings_ms"] = item.timer.total()
        # The record names a seq a restart must be able to open: applied, durably.
        await disk.make_applied_durable()
        await asyncio.to_thread(self._save, record)
        log.info(
            "disk=%s event=failover id=%s point=%s seq=%d test=%s planned=%s nbd=%s rto_ms=%.1f",
            disk.disk_id,
            record["id"],
            point.id,
            point.seq,
            item.test,
            item.planned,
            failover.export.address if failover.export else None,
            record["timings_ms"]["total"],
        )
        return failover.status()

    async def _abandon(self, item: _Prepared) -> None:
        """Undo a prepared (maybe activated) failover: export down, view closed, record and
        overlay gone, the applier free again."""
        disk = item.disk
        if disk.disk_id in self.active:
            await self._tear_down(self.active[disk.disk_id])
        else:
            disk.close_view(item.view)
        await asyncio.to_thread(self._forget, disk.disk_id)  # no stale overlay journal
        if not item.test:
            disk.unfence()

    async def _bring_up(
        self, disk: ReplicaDisk, record: dict[str, Any], view: PointView
    ) -> Failover:
        directory = self.directory / disk.disk_id
        direct = record["state"] == "committed"
        overlay = await asyncio.to_thread(
            OverlayDisk,
            disk.disk_id,
            view,
            directory,
            direct_fd=disk.replica_fd if direct else None,
        )
        failover = Failover(disk.disk_id, record, view, overlay)
        try:
            export = NbdExport(overlay, record["nbd"])
            await export.start()
        except BaseException:
            overlay.close()
            raise
        failover.export = export
        self.active[disk.disk_id] = failover
        return failover

    def _default_endpoint(self, disk_id: str) -> str:
        path = self.socket_dir / f"{disk_id}.sock"
        if len(str(path).encode()) > 107:
            raise FailoverError(
                f"{path} is too long for a unix socket: set server.failover_dir or pass --nbd"
            )
        return f"unix:{path}"

    async def _freeze(self, disk: ReplicaDisk) -> None:
        if disk.session is None:
            raise FailoverError(
                f"--planned needs the agent of {disk.disk_id} ({disk.owner}) connected"
            )
        reply = await self.server.ask(disk.disk_id, Freeze(disk.disk_id, 60.0), 90.0)
        if not isinstance(reply, Frozen) or not reply.ok:
            error = reply.error if isinstance(reply, Frozen) else repr(reply)
            raise FailoverError(f"disk {disk.disk_id}: the agent could not freeze: {error}")
        deadline = time.monotonic() + 60
        while disk.durable_seq < reply.seq:
            if time.monotonic() > deadline:
                raise FailoverError(f"disk {disk.disk_id}: the drain did not reach seq {reply.seq}")
            await asyncio.sleep(0.01)

    async def _unfreeze(self, disk: ReplicaDisk) -> None:
        if disk.session is not None:
            with contextlib.suppress(Exception):
                await self.server.tell(disk.disk_id, Unfreeze(disk.disk_id))

    # ----------------------------------------------------------------- ending
    async def cleanup(self, disk_id: str) -> dict[str, Any]:
        """Remove a failover that was not committed; replication goes on from where it was."""
        async with self._lock:
            if disk_id in self.broken:
                return await self._clean_broken(disk_id)
            failover = self._get(disk_id)
            if failover.record["state"] != "active":
                raise FailoverError(f"disk {disk_id}: a committed failover cannot be cleaned up")
            disk = self.server.disks[disk_id]
            await self._tear_down(failover)
            await asyncio.to_thread(self._forget, disk_id)
            if not failover.record["test"]:
                disk.unfence()
            if failover.record["planned"]:
                await self._unfreeze(disk)
            log.info("disk=%s event=failover_cleaned id=%s", disk_id, failover.record["id"])
            return {"ok": True, "disk": disk_id, "removed": failover.record["id"]}

    async def _clean_broken(self, disk_id: str) -> dict[str, Any]:
        """Remove a failover record a restart could not bring back. A committed one is
        refused: the replica holds the DR writes, and only failback may take it over."""
        record, error = self.broken[disk_id]
        if record.get("state") == "committed":
            raise FailoverError(f"disk {disk_id}: a committed failover cannot be cleaned up")
        await asyncio.to_thread(self._forget, disk_id)
        del self.broken[disk_id]
        disk = self.server.disks[disk_id]
        if not record.get("test"):
            disk.unfence()
        log.info("disk=%s event=failover_cleaned id=%s broken=%r", disk_id, record["id"], error)
        return {"ok": True, "disk": disk_id, "removed": record["id"]}

    async def commit(self, disk_id: str) -> dict[str, Any]:
        """Make a failover final: the replica becomes the point plus the DR writes."""
        async with self._lock:
            failover = self._get(disk_id)
            record = failover.record
            if record["test"]:
                raise FailoverError(f"disk {disk_id}: a test failover cannot be committed")
            if record["state"] == "committed":
                return {"ok": True, "disk": disk_id, "state": "committed"}
            if failover.view.broken:
                raise FailoverError(f"disk {disk_id}: {failover.view.broken}")
            timer = _Timer()
            record["state"] = "committing"
            await asyncio.to_thread(self._save, record)
            await self._finish_commit(failover)
            timer.step("merge")
            record["commit_timings_ms"] = timer.total()
            await asyncio.to_thread(self._save, record)
            log.info("disk=%s event=failover_committed id=%s", disk_id, record["id"])
            return {"ok": True, "disk": disk_id, "state": "committed", **failover.status()}

    async def _finish_commit(self, failover: Failover) -> None:
        disk = self.server.disks[failover.disk_id]
        await disk.wait_still()  # fenced: once the group in flight is written, no more
        if not failover.overlay.direct:  # what the rollback changes must travel back at failback
            rolled_back = [(s, e - s) for s, e, _ in failover.view.map.items()]
            await asyncio.to_thread(
                save_rolled_back, self.directory / failover.disk_id, rolled_back
            )
        failpoint("failover.commit.before_merge")
        # the export's I/O waits meanwhile
        await failover.overlay.merge(disk.replica_fd, disk.sync_replica_blocking)
        failpoint("failover.commit.after_merge")
        failover.record["state"] = "committed"
        await asyncio.to_thread(self._save, failover.record)
        # Every point goes, the failed-over one too (the record keeps it): the replica is now
        # the live DR disk, and a listed point would read (or be written out as) its writes.
        self.server.points.catalog.delete_disk(disk.disk_id)
        await disk.drop_history()
        self.server.failbacks.watch(failover)

    async def _tear_down(self, failover: Failover) -> None:
        if failover.export is not None:
            await failover.export.close()
        failover.overlay.close()
        self.server.disks[failover.disk_id].close_view(failover.view)
        self.active.pop(failover.disk_id, None)

    def _get(self, disk_id: str) -> Failover:
        failover = self.active.get(disk_id)
        if failover is None:
            raise FailoverError(f"disk {disk_id} has no failover")
        return failover

    async def retire(self, disk_id: str) -> None:
        """Failback is done: the failover ends, leaving the replica as it is."""
        async with self._lock:
            failover = self._get(disk_id)
            await self._tear_down(failover)
            await asyncio.to_thread(self._forget, disk_id)

    # ----------------------------------------------------------------- persistence
    def save(self, record: dict[str, Any]) -> None:
        self._save(record)

    def _save(self, record: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(self.directory / f"{record['disk']}.json", record)

    def _forget(self, disk_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{disk_id}.json").unlink()
        shutil.rmtree(self.directory / disk_id, ignore_errors=True)
        if self.directory.is_dir():  # (no failover was ever saved: nothing to make durable)
            fsync_dir(self.directory)

    async def restore(self) -> None:
        """Bring back the failovers of a previous run (finishing an interrupted commit)."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.json")):
            record = read_json(path)
            disk = self.server.disks.get(record["disk"])
            if disk is None:
                log.error("event=failover_orphan file=%s", path)
                continue
            if not record["test"]:
                disk.fence(f"failover {record['id']}", disk.applying_seq)
            try:
                await self._restore_one(disk, record)
            except (ReplicaError, LookupError, OSError, IntegrityError, ValueError) as exc:
                # One failover that cannot come back must not keep the server (and every
                # other disk) down: it is kept, its disk stays fenced, status says why.
                if disk.disk_id in self.active:
                    with contextlib.suppress(OSError):
                        await self._tear_down(self.active[disk.disk_id])
                self.broken[disk.disk_id] = (record, str(exc))
                log.error(
                    "disk=%s event=failover_not_restored id=%s error=%r",
                    disk.disk_id,
                    record["id"],
                    str(exc),
                )

    async def _restore_one(self, disk: ReplicaDisk, record: dict[str, Any]) -> None:
        seq = record["point"]["seq"] if record["state"] != "committed" else disk.applying_seq
        view = await disk.open_view_async(seq)
        try:
            failover = await self._bring_up(disk, record, view)
        except BaseException:
            disk.close_view(view)
            raise
        if record["state"] == "committing":
            await self._finish_commit(failover)
        self.server.failbacks.watch(failover)
        log.info("disk=%s event=failover_restored id=%s", disk.disk_id, record["id"])

    async def close(self) -> None:
        for failover in list(self.active.values()):
            await self._tear_down(failover)

    def status(self) -> list[dict[str, Any]]:
        out = [f.status() for f in self.active.values()]
        for disk_id, (record, error) in self.broken.items():
            out.append(
                {
                    "id": record.get("id"),
                    "disk": disk_id,
                    "state": "broken",
                    "test": record.get("test"),
                    "planned": record.get("planned"),
                    "point": record.get("point"),
                    "nbd": None,
                    "error": f"not restored at start: {error} (failover cleanup removes it)",
                    "created_ns": record.get("created_ns"),
                }
            )
        return out

    # ----------------------------------------------------------------- to a file
    async def to_file(self, disk_id: str, spec: str, path: Path) -> dict[str, Any]:
        """Write the point out as a sparse raw image at ``path`` (replication goes on)."""
        disk = self.server.disks.get(disk_id)
        if disk is None:
            raise FailoverError(f"no disk {disk_id!r} on this process server")
        if path.exists() or path.is_symlink():
            raise FailoverError(f"{path} exists: --to writes a new image, it never overwrites")
        active = self.active.get(disk_id)
        record = active.record if active is not None else self.broken.get(disk_id, ({}, ""))[0]
        if record.get("state") in ("committing", "committed"):
            raise FailoverError(
                f"disk {disk_id}: its failover is committed: the replica is the live DR disk "
                "(read it through the failover's export), no recovery point is left"
            )
        if disk.undo is not None:
            return await self._to_file(disk, spec, path, hold=False)
        # Without the undo log the view is the replica itself: it must stand still for the
        # copy. The applier is fenced for its length (under the failover lock, so no failover
        # fences or unfences meanwhile); batches still arrive into the cache.
        async with self._lock:
            if disk.fenced or disk.disk_id in self.active or disk.disk_id in self.broken:
                raise FailoverError(
                    f"disk {disk.disk_id}: the undo log is off and a failover owns the disk: "
                    "--to cannot copy a replica that is not its own (use the failover's export)"
                )
            return await self._to_file(disk, spec, path, hold=True)

    async def _to_file(
        self, disk: ReplicaDisk, spec: str, path: Path, hold: bool
    ) -> dict[str, Any]:
        timer = _Timer()
        try:
            point = await self.resolve(disk, spec, fence=hold)
            if hold:
                disk.fenced = f"writing out {spec} with --to (undo log off)"
                await disk.wait_still()  # the replica no longer changes
                if point.seq != disk.applying_seq:  # latest-processed: a group was in flight
                    point = replace(point, seq=disk.applying_seq)
            view = await disk.open_view_async(point.seq)
            timer.step("open_view")
            try:
                written = await asyncio.to_thread(materialise, view, path)
            finally:
                disk.close_view(view)
        finally:
            if hold:
                disk.unfence()
        timer.step("write_image")
        return {
            "ok": True,
            "disk": disk.disk_id,
            "point": point.as_dict(),
            "path": str(path),
            "data_bytes": written,
            "size": disk.size,
            "timings_ms": timer.total(),
        }


def parse_time(spec: str) -> int | None:
    """A point time: ISO 8601 (UTC when no zone is given) or seconds since the epoch."""
    with contextlib.suppress(ValueError):
        return int(float(spec) * 1e9)
    try:
        when = datetime.datetime.fromisoformat(spec)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1e9)


__all__ = ["FailoverError", "FailoverManager", "PointError", "materialise", "parse_time"]
