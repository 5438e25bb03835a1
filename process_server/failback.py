"""Failback, the process server's side: the reverse stream to a master target.

After a committed failover the DR disk (the replica, written by the failover export) is live,
and every write it took is in the failover's journal. A master target on the source site
connects (TLS, a ``master-target`` certificate; the frames' roles swapped: batches flow from
here) and registers the disk. What travels back:

- every DR write since the failover: the failover journal, as is;
- the *delta*: the extents the failover rolled back (saved at commit), the source writes the
  process server cached but never applied (the fence), and what the master target reports
  from the agent's journal and bitmap; their DR contents are appended to the failover journal
  once, so the reverse stream is one journal shipped in seq order, like forward replication
  (``agent.shipper.encode_entries`` builds the batches, the master target's applier is the
  process server's own ``ReplicaDisk``). Without the source's state, a digest comparison
  finds the delta; an alternate-location failback sends every data range.

Exactly-once: the master target registers with its durable cached seq and the stream resumes
after it. Journal records are released only once the master target acknowledged them (and the
replica holding them was fdatasync'ed).

Planned failback: DR writes stop (the export goes read-only), the last delta is shipped and
applied, the source is verified equal by chunk digests, then the roles swap back: the failover
is removed, the replica's seq numbering restarts after its cache, and the master target resets
the agent's journal there, so the agent resumes forward protection without a resync.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.failback_state import merge_ranges
from agent.shipper import encode_entries
from common.aio import wait_event
from common.digests import DigestTracker, chunk_digests, data_ranges, is_zero, verify_chunk
from common.durable import atomic_write_json, read_json
from common.failpoints import failpoint
from common.segment_log import Cursor
from protocol.batch import DEFAULT_LIMITS, read_batch_table_in, validate_disk_id
from protocol.control import (
    FailbackDigests,
    FailbackDone,
    FailbackRanges,
    FailbackVerify,
    decode_control,
    encode_control,
)
from protocol.errors import ErrorCode, ProtocolError
from protocol.frames import Ack, Control, Heartbeat, Register, Registered

if TYPE_CHECKING:
    from process_server.failover import Failover
    from process_server.server import ProcessServer, _Session

log = logging.getLogger("tidemark.ps.failback")
ROLLED_BACK_FILE = "rolled_back.json"
SWAP_FILE = "failback-swap.json"  # in the disk's directory: a planned swap was decided
PIECE = 4 << 20
WINDOW_BATCHES = 8
MAX_BATCH = 4 << 20


class FailbackError(Exception):
    """A failback cannot go on (the message says why)."""


@dataclass
class ReverseLink:
    """The reverse stream of one disk to one master target connection."""

    disk_id: str
    peer: str
    stream: Any
    next_seq: int
    inflight: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    acked_seq: int = 0
    applied_seq: int = 0
    bytes_sent: int = 0
    raw_sent: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)
    digests: dict[int, bytes] = field(default_factory=dict)
    digest_chunk: int = 0
    digests_done: asyncio.Event = field(default_factory=asyncio.Event)


class FailbackManager:
    """Every reverse stream of one process server."""

    def __init__(self, server: ProcessServer) -> None:
        self.server = server
        self.links: dict[str, ReverseLink] = {}
        self._ranges: dict[str, list[FailbackRanges]] = {}
        self._fallback_digests: dict[str, dict[int, bytes]] = {}
        self._fallback_chunk: dict[str, int] = {}
        self.completed: dict[str, dict[str, Any]] = {}
        self.trackers: dict[str, DigestTracker] = {}  # the DR disk's digests, kept current
        self._hashing: dict[str, asyncio.Future[None]] = {}
        self.wire_total: dict[str, int] = collections.Counter()  # every session's bytes
        self.raw_total: dict[str, int] = collections.Counter()

    # ----------------------------------------------------------------- the connection
    async def serve(self, session: _Session) -> None:
        """Converse with a master target until it goes away."""
        stream = session.stream
        async with asyncio.TaskGroup() as tg:
            try:
                while True:
                    async with asyncio.timeout(self.server.cfg.heartbeat_timeout):
                        msg = await stream.recv()
                    if isinstance(msg, Control):
                        await self._on_control(msg)
                    elif isinstance(msg, Register):
                        link = await self._register(session, msg)
                        if link is None:
                            continue
                        tg.create_task(self._ship(session, link), name=f"failback-{link.disk_id}")
                    elif isinstance(msg, Ack):
                        self._on_ack(msg)
                    elif isinstance(msg, Heartbeat):
                        for report in msg.reports:
                            link = self.links.get(report.disk_id)
                            if link is not None:
                                link.applied_seq = max(link.applied_seq, report.acked_seq)
                        await stream.send(Heartbeat(msg.counter, ()))
                    else:
                        raise ProtocolError(
                            ErrorCode.UNEXPECTED, f"unexpected {type(msg).__name__}"
                        )
            finally:
                for disk_id, link in list(self.links.items()):
                    if link.peer == session.peer:
                        del self.links[disk_id]

    async def _on_control(self, msg: Control) -> None:
        body = decode_control(msg)
        if isinstance(body, FailbackRanges):
            self._ranges.setdefault(body.disk, []).append(body)
        elif isinstance(body, FailbackDigests):
            link = self.links.get(body.disk)
            if link is not None and link.digest_chunk:
                target, chunk = link.digests, link.digest_chunk
            else:
                target = self._fallback_digests.setdefault(body.disk, {})
                chunk = self._fallback_chunk.setdefault(body.disk, body.chunk)
            if body.chunk != chunk:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "digests of another chunk size")
            raw = bytes.fromhex(body.digests)
            for i in range(0, len(raw), 16):
                target[body.offset + (i // 16) * chunk] = raw[i : i + 16]
            if body.last and link is not None and link.digest_chunk:
                link.digests_done.set()
        else:
            raise ProtocolError(ErrorCode.UNEXPECTED, f"unexpected control {msg.name}")

    def _failover(self, disk_id: str) -> Failover:
        failover = self.server.failovers.active.get(disk_id)
        if failover is None or failover.record["state"] != "committed":
            raise ProtocolError(
                ErrorCode.DISK,
                f"disk {disk_id} has no committed failover: nothing to fail back "
                "(tidemark-ps failover commit first)",
            )
        return failover

    async def _register(self, session: _Session, msg: Register) -> ReverseLink | None:
        disk_id = validate_disk_id(msg.disk_id)
        done = self.completed.get(disk_id)
        if done is not None and disk_id not in self.server.failovers.active:
            # The swap is done but the target never heard (a crash before FailbackDone went
            # out, or the target died before acting on it): tell it again.
            await session.stream.send(Registered(disk_id, msg.journaled_seq, msg.journaled_seq))
            await session.stream.send(encode_control(FailbackDone(disk_id, done["next_seq"])))
            return None
        failover = self._failover(disk_id)
        if done is not None:  # a new failback of this disk: the old swap is history
            self.completed.pop(disk_id, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.server.disks[disk_id].directory / SWAP_FILE)
        disk = self.server.disks[disk_id]
        if msg.size != disk.size:
            raise ProtocolError(
                ErrorCode.DISK, f"disk {disk_id}: target has {msg.size} bytes, not {disk.size}"
            )
        if disk_id in self.links:
            raise ProtocolError(ErrorCode.DISK, f"disk {disk_id} is already failing back")
        journal = failover.overlay.journal
        mt_seq = msg.journaled_seq
        if not failover.record.get("failback", {}).get("delta_prepared"):
            if mt_seq:
                raise ProtocolError(ErrorCode.DISK, f"disk {disk_id}: target state is not ours")
            await self._prepare_delta(failover)
        if mt_seq > journal.last_seq or mt_seq < journal.first_seq - 1:
            raise ProtocolError(
                ErrorCode.SEQ_GAP,
                f"disk {disk_id}: target holds seq {mt_seq}, the DR journal has "
                f"{journal.first_seq}..{journal.last_seq} (delete the target's state to restart)",
            )
        self.watch(failover)
        link = ReverseLink(disk_id, session.peer, session.stream, mt_seq + 1, acked_seq=mt_seq)
        self.links[disk_id] = link
        await session.stream.send(Registered(disk_id, mt_seq, journal.last_seq))
        log.info(
            "disk=%s event=failback_registered peer=%s resume_seq=%d journal_last=%d",
            disk_id,
            session.peer,
            mt_seq + 1,
            journal.last_seq,
        )
        return link

    def _on_ack(self, msg: Ack) -> None:
        link = self.links.get(msg.disk_id)
        if link is None:
            raise ProtocolError(ErrorCode.UNEXPECTED, f"ACK for unknown disk {msg.disk_id}")
        while link.inflight and link.inflight[0][0] <= msg.durable_seq:
            link.inflight.popleft()
        link.acked_seq = max(link.acked_seq, msg.durable_seq)
        link.acked.set()

    def watch(self, failover: Failover) -> None:
        """Keep the digests of a committed failover's DR disk from now on: hashed once in the
        background (right after the commit, or after a restart), then each DR write marks its
        chunks. A failback then verifies the whole disk without reading it all at cut-over."""
        disk_id = failover.disk_id
        if disk_id in self.trackers or failover.record.get("state") != "committed":
            return
        disk = self.server.disks[disk_id]
        tracker = DigestTracker(disk.replica_fd, disk.size, verify_chunk(disk.size))
        failover.overlay.on_written = tracker.touch
        self.trackers[disk_id] = tracker
        self._hashing[disk_id] = asyncio.ensure_future(asyncio.to_thread(tracker.start))

    async def close(self) -> None:
        """Stop the background hashing (the replicas' fds close after this)."""
        for tracker in self.trackers.values():
            tracker.close()
        await asyncio.gather(*self._hashing.values(), return_exceptions=True)

    # ----------------------------------------------------------------- the delta
    async def _prepare_delta(self, failover: Failover) -> None:
        disk_id = failover.disk_id
        disk = self.server.disks[disk_id]
        if disk.replica_sync_error is not None:
            # The delta is read from the replica and journaled after the DR writes, so it
            # wins over them on the master target. After a failed fdatasync a page the kernel
            # failed to write back may have left the cache: the read would return what the
            # disk held before, newer-seq'd than the guest's write. A restart on a fixed disk
            # writes the failover journal back into the replica first (OverlayDisk._replay).
            raise ProtocolError(
                ErrorCode.DISK,
                f"disk {disk_id}: no failback delta from a replica whose fdatasync failed "
                f"({disk.replica_sync_error}): restart the process server on a fixed disk "
                "first (it writes the failover journal back into the replica)",
            )
        reports = self._ranges.pop(disk_id, [])
        started = time.monotonic()
        alternate = any(r.alternate for r in reports)
        full_compare = any(r.full_compare for r in reports) or not reports
        if alternate:
            ranges = [(s, e - s) for s, e in data_ranges(disk.replica_fd, 0, disk.size)]
            how = "alternate location: every data range"
        elif full_compare:
            theirs = self._fallback_digests.pop(disk_id, {})
            chunk = self._fallback_chunk.pop(disk_id, 0)
            if not theirs or not chunk:
                raise ProtocolError(
                    ErrorCode.DISK,
                    f"disk {disk_id}: the target sent neither ranges nor digests of the source",
                )
            ranges = await asyncio.to_thread(
                _differing_chunks, disk.replica_fd, disk.size, chunk, theirs
            )
            how = f"digest comparison ({chunk}-byte chunks)"
        else:
            ranges = [r for report in reports for r in report.ranges]
            ranges += _load_rolled_back(self.server.failovers.directory / disk_id)
            ranges += _fenced_extents(disk)
            how = "journals: rolled back + fenced + the agent's"
        ranges = merge_ranges(ranges)
        journal = failover.overlay.journal
        first = journal.next_seq
        nbytes = await asyncio.to_thread(_append_ranges, failover, disk.replica_fd, ranges)
        failpoint("failback.delta.after_append")
        await journal.sync()
        failpoint("failback.delta.after_sync")
        failover.record["failback"] = {
            "delta_prepared": True,
            "delta_seqs": [first, journal.last_seq],
            "delta_bytes": nbytes,
            "delta_ranges": len(ranges),
            "delta_source": how,
            "dr_writes_seqs": [journal.first_seq, first - 1],
        }
        await asyncio.to_thread(self.server.failovers.save, failover.record)
        log.info(
            "disk=%s event=failback_delta how=%r ranges=%d bytes=%d seconds=%.3f",
            disk_id,
            how,
            len(ranges),
            nbytes,
            time.monotonic() - started,
        )

    # ----------------------------------------------------------------- shipping
    async def _ship(self, session: _Session, link: ReverseLink) -> None:
        failover = self._failover(link.disk_id)
        journal = failover.overlay.journal
        cursor = Cursor()
        replica = self.server.disks[link.disk_id]
        released = link.acked_seq
        while True:
            if link.acked_seq > released:
                # The target holds these durably: the replica's copy is made durable, then the
                # records may go (a restart replays the journal onto the replica).
                await replica.sync_replica()
                released = link.acked_seq
                await journal.release_through(released)
            if len(link.inflight) >= WINDOW_BATCHES or link.next_seq > journal.last_seq:
                link.acked.clear()
                await wait_event(link.acked, 0.01)
                continue
            entries = journal.read(link.next_seq, MAX_BATCH, cursor)
            msg, last, raw = await encode_entries(link.disk_id, entries, MAX_BATCH, 1)
            link.inflight.append((last, raw))
            await session.stream.send(msg)
            link.next_seq = last + 1
            link.bytes_sent += msg.size
            link.raw_sent += raw
            self.wire_total[link.disk_id] += msg.size
            self.raw_total[link.disk_id] += raw
            link.batches += 1

    # ----------------------------------------------------------------- planned failback
    async def planned(self, disk_id: str, timeout: float = 3600) -> dict[str, Any]:
        """DR writes stop, the last delta is applied at the source, digests are compared, the
        roles swap back. Raises FailbackError."""
        failover = self.server.failovers.active.get(disk_id)
        if failover is None or failover.record["state"] != "committed":
            raise FailbackError(f"disk {disk_id} has no committed failover")
        link = self.links.get(disk_id)
        if link is None:
            raise FailbackError(f"no master target is connected for disk {disk_id}")
        disk = self.server.disks[disk_id]
        started = time.monotonic()
        timings: dict[str, float] = {}
        overlay = failover.overlay
        overlay.read_only = True  # DR writes stop; reads go on
        await overlay.flush()
        target = overlay.journal.last_seq
        deadline = time.monotonic() + timeout
        try:
            while link.applied_seq < target or link.acked_seq < target:
                if time.monotonic() > deadline or self.links.get(disk_id) is not link:
                    raise FailbackError(f"disk {disk_id}: the target did not apply seq {target}")
                await asyncio.sleep(0.01)
            timings["drain_ms"] = round((time.monotonic() - started) * 1000, 1)
            mark = time.monotonic()
            equal, first_diff = await self._verify(link, disk)
            timings["verify_ms"] = round((time.monotonic() - mark) * 1000, 1)
            if not equal:
                raise FailbackError(
                    f"disk {disk_id}: source and DR disk differ at offset {first_diff} after "
                    "the reverse stream drained; nothing was swapped"
                )
        except BaseException:
            overlay.read_only = False
            raise
        mark = time.monotonic()
        report = {
            "ok": True,
            "disk": disk_id,
            "wire_bytes": self.wire_total[disk_id],
            "raw_bytes": self.raw_total[disk_id],
            "wire_bytes_last_session": link.bytes_sent,
            "batches_last_session": link.batches,
            **failover.record.get("failback", {}),
        }
        failover.overlay.on_written = None
        self.trackers.pop(disk_id, None)
        self._hashing.pop(disk_id, None)
        # The swap is decided, durably, before it starts: a crash anywhere in it is finished by
        # restore() and the target is told again when it registers (the agent is stopped, so
        # nothing more reaches the cache meanwhile).
        next_seq = disk.cached_seq + 1
        report.update(next_seq=next_seq, failover_id=failover.record["id"], swapped=False)
        await asyncio.to_thread(atomic_write_json, disk.directory / SWAP_FILE, report)
        failpoint("failback.swap.before_retire")
        await self._swap(disk_id, report)
        failpoint("failback.swap.before_done")
        await link.stream.send(encode_control(FailbackDone(disk_id, next_seq)))
        self.links.pop(disk_id, None)
        timings["swap_ms"] = round((time.monotonic() - mark) * 1000, 1)
        timings["total_ms"] = round((time.monotonic() - started) * 1000, 1)
        report.update(next_seq=next_seq, timings=timings)
        self.completed[disk_id] = report
        log.info(
            "disk=%s event=failback_done next_seq=%d wire_bytes=%d",
            disk_id,
            next_seq,
            link.bytes_sent,
        )
        return report

    async def _swap(self, disk_id: str, report: dict[str, Any]) -> None:
        """Retire the failover and restart the seq numbering after ``next_seq - 1``, then mark
        the swap done (idempotent: also the end of a swap a crash interrupted)."""
        disk = self.server.disks[disk_id]
        active = self.server.failovers.active.get(disk_id)
        if active is not None and active.record["id"] == report["failover_id"]:
            await self.server.failovers.retire(disk_id)
        failpoint("failback.swap.after_retire")
        await disk.restart_sequence()  # the agent is stopped: nothing new reached the cache
        disk.unfence()
        report["swapped"] = True
        await asyncio.to_thread(atomic_write_json, disk.directory / SWAP_FILE, report)

    async def restore(self) -> None:
        """At start, before any applier runs: finish a planned swap a crash interrupted."""
        for disk_id, disk in self.server.disks.items():
            path = disk.directory / SWAP_FILE
            if path.exists():
                report = await asyncio.to_thread(read_json, path)
                if not report.get("swapped"):
                    await self._swap(disk_id, report)
                self.completed[disk_id] = report

    async def _verify(self, link: ReverseLink, disk: Any) -> tuple[bool, int | None]:
        tracker = self.trackers[link.disk_id]
        chunk = tracker.chunk
        link.digests, link.digest_chunk = {}, chunk
        link.digests_done.clear()
        # Both sides hash at once: ours in a thread while the master target hashes the source.
        mine = asyncio.ensure_future(asyncio.to_thread(tracker.current))
        try:
            await link.stream.send(encode_control(FailbackVerify(link.disk_id, chunk)))
            deadline = time.monotonic() + 600
            while not link.digests_done.is_set():
                if self.links.get(link.disk_id) is not link or time.monotonic() > deadline:
                    raise FailbackError(
                        f"disk {link.disk_id}: the master target went away during verification"
                    )
                await wait_event(link.digests_done, 0.1)
            ours = await mine
        finally:
            link.digest_chunk = 0
            if not mine.done():
                mine.cancel()
        for index, digest in enumerate(ours):
            if link.digests.get(index * chunk) != digest:
                return False, index * chunk
        return True, None

    def status(self) -> list[dict[str, Any]]:
        out = []
        for disk_id, link in self.links.items():
            failover = self.server.failovers.active.get(disk_id)
            last = failover.overlay.journal.last_seq if failover else link.next_seq - 1
            first_pending = link.acked_seq + 1
            lag = 0  # an upper bound: the journal bytes not yet released
            if failover is not None and first_pending <= last:
                lag = max(0, failover.overlay.journal.bytes_used)
            elapsed = time.monotonic() - link.started
            rate = link.raw_sent / elapsed if elapsed > 0 else 0.0
            out.append(
                {
                    "disk": disk_id,
                    "direction": "reverse",
                    "master_target": link.peer,
                    "journal_last_seq": last,
                    "sent_seq": link.next_seq - 1,
                    "acked_seq": link.acked_seq,
                    "applied_seq": link.applied_seq,
                    "lag_bytes": lag,
                    "wire_bytes": link.bytes_sent,
                    "raw_bytes": link.raw_sent,
                    "progress": round(link.acked_seq / last, 4) if last else 1.0,
                    "eta_seconds": round(lag / rate, 1) if rate and lag else 0.0,
                }
            )
        return out


def save_rolled_back(directory: Any, ranges: list[tuple[int, int]]) -> None:
    atomic_write_json(directory / ROLLED_BACK_FILE, {"ranges": merge_ranges(ranges)})


def _load_rolled_back(directory: Any) -> list[tuple[int, int]]:
    path = directory / ROLLED_BACK_FILE
    if not path.exists():
        return []
    return [(int(a), int(b)) for a, b in read_json(path)["ranges"]]


def _fenced_extents(disk: Any) -> list[tuple[int, int]]:
    """Extents of the batches cached but never applied (the source went on after the point)."""
    out: list[tuple[int, int]] = []
    seq = disk.applied_seq + 1
    cursor = Cursor()
    while seq <= disk.cached_seq:
        records = disk.cache.read_records(seq, 16 << 20, cursor)
        if not records:
            break
        for record in records:
            _, rows, _ = read_batch_table_in(record.payload, DEFAULT_LIMITS)
            out.extend((offset, length) for offset, length, _, _ in rows)
            seq = record.last_seq + 1
    return out


def _append_ranges(failover: Failover, fd: int, ranges: list[tuple[int, int]]) -> int:
    """Append the DR contents of ``ranges`` to the failover journal; returns data bytes."""
    journal = failover.overlay.journal
    now = time.time_ns()
    nbytes = 0
    for start, length in ranges:
        pos, end = start, start + length
        while pos < end:
            n = min(PIECE, end - pos)
            data = os.pread(fd, n, pos)
            if is_zero(data):
                journal.append_zero(pos, n, now, may_trim=True)
            else:
                journal.append_write(pos, data, now)
                nbytes += n
            pos += n
    return nbytes


def _differing_chunks(
    fd: int, size: int, chunk: int, theirs: dict[int, bytes]
) -> list[tuple[int, int]]:
    ours = chunk_digests(fd, 0, size, chunk, size)
    out = []
    for index, digest in enumerate(ours.digests):
        offset = index * chunk
        if theirs.get(offset) != digest:
            out.append((offset, min(chunk, size - offset)))
    return out


__all__ = ["FailbackError", "FailbackManager", "save_rolled_back"]
