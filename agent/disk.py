"""A protected disk: the write path every writer goes through (Python API and NBD export).

Rules it keeps:
- A write is journaled, then written to the image, in one event-loop step, so the
  journal order is the image order however many writers there are.
- ``flush()`` / ``fua=True`` return only after the journal and the image are both
  fdatasync'ed (one group commit shared by every caller of the disk).
- After an unclean stop the journal is replayed onto the image (redo), so a write
  that reached the journal but not the image cannot make the replica diverge.
- When the journal quota is exhausted the disk switches to a persisted dirty
  bitmap and the state ``resync-required``; nothing is ever silently dropped.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.activity_log import ActivityLog
from agent.dirty_bitmap import DirtyBitmap
from agent.journal import Journal
from common.direct_write import IMAGE_BUFFER, DirectWriter
from common.durable import (
    GroupCommit,
    atomic_write_json,
    pread_exact,
    pwrite_all,
    read_json,
    zero_range,
)
from common.errors import DiskError

log = logging.getLogger("tidemark.agent.disk")

STATE_FILE = "state.json"
BITMAP_FILE = "dirty.bitmap"
ACTIVITY_LOG_FILE = "activity.log"
MAX_IO = 64 << 20  # largest single read or data write accepted from any writer
MAX_ZERO = (1 << 32) - 1  # largest single write-zeroes / trim (the NBD length field is 32-bit)
RECORD_MAX = 4 << 20  # largest data record in the journal (larger writes are split)


class _PendingWrites:
    """Seq, time and running byte total of every journaled write not yet acknowledged by the
    process server.

    Three flat arrays (24 bytes a write), so memory is bounded by the journal quota. The
    running total gives the bytes pending from any seq on (the shipper's "is a whole batch
    waiting?") as one subtraction."""

    def __init__(self) -> None:
        self.seqs = array.array("q")
        self.times = array.array("q")
        self.totals = array.array("q")  # bytes of every write added, up to and including this
        self.start = 0
        self._dropped = 0  # the running total before the first entry still in the arrays

    @property
    def total(self) -> int:
        """Bytes of every write ever added."""
        return self.totals[-1] if self.totals else self._dropped

    def add(self, seq: int, size: int, time_ns: int) -> None:
        self.seqs.append(seq)
        self.times.append(time_ns)
        self.totals.append(self.total + size)

    def _total_before(self, i: int) -> int:
        return self.totals[i - 1] if i else self._dropped

    @property
    def bytes(self) -> int:
        """Bytes of every pending write."""
        return self.total - self._total_before(self.start)

    def bytes_from(self, seq: int) -> int:
        """Bytes of the pending writes from ``seq`` on."""
        return self.total - self._total_before(bisect.bisect_left(self.seqs, seq, self.start))

    def ack_through(self, seq: int) -> None:
        while self.start < len(self.seqs) and self.seqs[self.start] <= seq:
            self.start += 1
        if self.start > 4096 and self.start * 2 > len(self.seqs):
            self._dropped = self._total_before(self.start)
            del self.seqs[: self.start]
            del self.times[: self.start]
            del self.totals[: self.start]
            self.start = 0

    @property
    def oldest_ns(self) -> int:
        return self.times[self.start] if self.start < len(self.times) else 0

    def __len__(self) -> int:
        return len(self.seqs) - self.start


class ProtectedDisk:
    """One protected disk: image file (or block device) + journal + persisted state."""

    def __init__(
        self,
        disk_id: str,
        image_path: Path,
        state_dir: Path,
        image_fd: int,
        size: int,
        journal: Journal,
        state: dict[str, Any],
    ) -> None:
        self.disk_id = disk_id
        self.image_path = image_path
        self.state_dir = state_dir
        self.size = size
        self.read_only = False
        self.journal = journal
        self._fd = image_fd
        # Aligned writes into holes of the image bypass the page cache (common/direct_write.py)
        self._direct = DirectWriter(image_path, disk_id, IMAGE_BUFFER)
        self._state = state
        self._image_commit = GroupCommit(lambda: os.fdatasync(self._fd))
        self._pending = _PendingWrites()
        self.acked_seq = journal.first_seq - 1
        # The newest seq of a write (NBD, API, or journaled before this process started):
        # resync's digest requests wait for the replica to apply it, not for resync's own
        # records, which never touch the range being compared.
        self.write_seq = journal.last_seq
        # The newest reference record (resync data read from the image when shipped): no
        # point may be taken before the process server holds it (finish_resync).
        self.last_ref_seq = 0
        self.new_records = asyncio.Event()
        self.link_state = (
            "standalone"  # set by the shipper: connecting / replicating / disconnected
        )
        self.bitmap: DirtyBitmap | None = None
        self._closed = False
        self._closing = False  # close() began: new writes are refused, those in flight finish
        self._bitmap_lock = asyncio.Lock()
        self._pending_clears: list[tuple[int, int]] = []
        self._overflows = 0  # journal overflows since open (checkpoint_resync)
        self.redo_records = 0
        self.overflowed = False  # writes bypass the journal (recorded in the bitmap only)
        self.activity_log: ActivityLog | None = None
        self.unclean_regions: list[tuple[int, int]] = []
        self.resync_progress: dict[str, Any] | None = None
        self.scan_only = False  # scan mode: the agent is not in the write path
        self.copy_in_bulk = True  # agent.initial_copy = "bulk" (agent/bulk_copy.py)
        self.state_listener: asyncio.Event | None = None  # set on every state change (heartbeats)
        # Recovery points: a hold stops new writes at the gate; writers already past it finish.
        self.frozen = False  # a planned failover: writes refused until unfrozen
        self._gate = asyncio.Event()
        self._gate.set()
        self._holds = 0
        self._writers = 0
        self._writers_idle = asyncio.Event()
        self._writers_idle.set()
        self.point_cuts: list[int] = []  # seqs where a batch must end (a point falls there)
        self.epoch = 0  # bumped when seq numbering restarts: older points mean nothing

    # ----------------------------------------------------------------- opening
    @classmethod
    async def open(
        cls,
        disk_id: str,
        image_path: Path,
        journal_dir: Path,
        *,
        journal_quota: int = 1 << 30,
        segment_bytes: int = 64 << 20,
        activity_extents: int = 1024,
        scan_only: bool = False,
    ) -> ProtectedDisk:
        """Open a disk for protection. ``journal_dir`` is the disk's own state directory
        (journal, dirty bitmap, activity log, state file). ``scan_only``: scan mode, another
        program writes the image (its journal is never replayed onto it). Raises DiskError,
        IntegrityError."""
        return await asyncio.to_thread(
            cls._open_blocking,
            disk_id,
            image_path,
            journal_dir,
            journal_quota,
            segment_bytes,
            activity_extents,
            scan_only,
        )

    @classmethod
    def _open_blocking(
        cls,
        disk_id: str,
        image_path: Path,
        state_dir: Path,
        quota: int,
        segment_bytes: int,
        activity_extents: int,
        scan_only: bool = False,
    ) -> ProtectedDisk:
        try:
            fd = os.open(image_path, os.O_RDWR)
        except OSError as exc:
            raise DiskError(
                exc.errno or errno.EIO, f"{image_path}: cannot open: {exc.strerror}"
            ) from exc
        mode = os.fstat(fd).st_mode
        size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(mode) else os.fstat(fd).st_size
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state_path = state_dir / STATE_FILE
        state: dict[str, Any]
        if state_path.exists():
            state = read_json(state_path)
            if state.get("size") != size:
                os.close(fd)
                raise DiskError(
                    errno.EINVAL,
                    f"{disk_id}: image size changed from {state.get('size')} to {size}; "
                    "resizing a protected disk is not supported",
                )
        else:
            state = {
                "disk_id": disk_id,
                "size": size,
                "image": str(image_path),
                "created_ns": time.time_ns(),
                "clean": True,
                # Always: even an all-holes source is compared once (cheap: holes are not read)
                # so a replica seeded from a backup, or left over, can never silently differ.
                "resync_required": True,
                "resync_reason": "initial",
                "initially_empty": _image_is_all_holes(fd, size),
                # The first sync may copy the image outside the journal (agent/bulk_copy.py)
                # until anything but that sync marks the bitmap.
                "bulk_copy": True,
            }
        journal = Journal(state_dir / "journal", quota=quota, segment_bytes=segment_bytes)
        disk = cls(disk_id, image_path, state_dir, fd, size, journal, state)
        disk.scan_only = scan_only
        if journal.log.truncated_bytes:
            log.warning(
                "disk=%s event=journal_tail_truncated bytes=%d",
                disk_id,
                journal.log.truncated_bytes,
            )
        # At least 128 extents, so the largest data write (64 MiB, 17 extents) fits a quarter.
        capacity = max(128, activity_extents)
        disk.activity_log = ActivityLog(state_dir / ACTIVITY_LOG_FILE, size, capacity=capacity)
        hot = disk.activity_log.load()
        clean = bool(state.get("clean", False))
        bitmap_path = state_dir / BITMAP_FILE
        disk.overflowed = bool(state.get("overflowed"))
        if state.get("resync_required"):
            disk.bitmap = (
                DirtyBitmap.load(bitmap_path) if bitmap_path.exists() else DirtyBitmap(size)
            )
            if state.get("resync_reason") == "initial" and not bitmap_path.exists():
                disk.bitmap.mark_all()
            if not clean and disk.overflowed:
                disk.bitmap.mark_all()  # writes of the last run went to an in-memory bitmap: lost
        if not clean:
            # Writes of the last run may be in the image and not in the journal: a copy from
            # now on could land after older journaled writes of their regions.
            state["bulk_copy"] = False
            # The host may have lost journal records the process server already holds. Until
            # a registration proves otherwise, a server ahead of this seq means reuse: rebase.
            state["unclean_floor"] = journal.last_seq
        if not clean and hot:
            # Writes may have been in flight in these extents (a host crash can leave the image
            # ahead of the journal): re-verify exactly them against the replica.
            disk.unclean_regions = disk.activity_log.regions(hot)
            for offset, length in disk.unclean_regions:
                disk._mark_for_resync(offset, length, "unclean-stop")
            log.warning("disk=%s event=unclean_stop reverify_extents=%d", disk_id, len(hot))
        redo_from = int(state.get("redo_from") or 0)
        if redo_from and journal.first_seq >= redo_from:
            state["redo_from"] = None  # every record of before the last overflow is released
        if scan_only:
            # Another program writes the image: every record (bytes the resync read) may be
            # older than the image. Never replayed; its range is compared again instead.
            redo_from = journal.next_seq
        disk._scan_journal(redo=not clean and not disk.overflowed, redo_from=redo_from)
        state["clean"] = False
        disk._save_state()
        if disk.bitmap is not None:
            disk.bitmap.save(bitmap_path)
        return disk

    def _scan_journal(self, *, redo: bool, redo_from: int = 0) -> None:
        """One pass over the journal: rebuild the list of writes awaiting acknowledgement and,
        after an unclean stop (``redo``), replay its records onto the image.

        Records older than ``redo_from`` (the journal's next seq when the last overflow
        ended) are not replayed: writes made during that overflow went to the image and the
        bitmap only, so an older record replayed over them would undo a newer, possibly
        acknowledged write. Their ranges are marked for the resync instead."""
        seq = self.journal.first_seq
        while seq <= self.journal.last_seq:
            for entry in self.journal.read(seq, 8 << 20):
                if entry.ref:
                    self.last_ref_seq = entry.seq  # the image holds it: nothing to redo
                elif redo and entry.seq < redo_from:
                    self._mark_for_resync(entry.offset, entry.length, "unclean-stop")
                elif redo:
                    self._apply_to_image(entry.offset, entry.length, entry.data, entry.may_trim)
                    self.redo_records += 1
                self._pending.add(
                    entry.seq, entry.length if entry.carries_data else 0, entry.time_ns
                )
                seq = entry.seq + 1
        if redo:
            os.fdatasync(self._fd)
            if self.redo_records:
                log.info("disk=%s event=journal_redo records=%d", self.disk_id, self.redo_records)

    def _mark_for_resync(self, offset: int, length: int, reason: str) -> None:
        """Mark a range dirty (in memory; the caller saves bitmap and state)."""
        if self.bitmap is None:
            self.bitmap = DirtyBitmap(self.size)
        if not self._state.get("resync_required"):
            self._state["resync_required"] = True
            self._state["resync_reason"] = reason
        self.bitmap.mark(offset, length)

    def _save_state(self, state: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.state_dir / STATE_FILE, self._state if state is None else state)

    # ----------------------------------------------------------------- status
    @property
    def resync_required(self) -> bool:
        return bool(self._state.get("resync_required"))

    @property
    def state(self) -> str:
        if self.resync_required:
            return (
                "initial-sync"
                if self._state.get("resync_reason") == "initial"
                else "resync-required"
            )
        return self.link_state

    @property
    def journaled_seq(self) -> int:
        return self.journal.last_seq

    @property
    def unclean_floor(self) -> int | None:
        floor = self._state.get("unclean_floor")
        return int(floor) if floor is not None else None

    def clear_unclean_floor(self) -> None:
        if self._state.get("unclean_floor") is not None:
            self._state["unclean_floor"] = None
            self._save_state()

    @property
    def pending_bytes(self) -> int:
        return self._pending.bytes

    def pending_bytes_from(self, seq: int) -> int:
        """Bytes of the writes not yet acknowledged from ``seq`` on (data and references at
        their length, zero extents nothing): what the shipper has yet to send past ``seq``."""
        return self._pending.bytes_from(seq)

    @property
    def oldest_pending_ns(self) -> int:
        return self._pending.oldest_ns

    def rpo_seconds(self, now_ns: int) -> float:
        """Age of the oldest write not yet durable at the process server (0 when none)."""
        oldest = self._pending.oldest_ns
        return max(0.0, (now_ns - oldest) / 1e9) if oldest else 0.0

    def status(self, now_ns: int) -> dict[str, Any]:
        return {
            "disk": self.disk_id,
            "path": str(self.image_path),
            "size": self.size,
            "state": self.state,
            "resync_reason": self._state.get("resync_reason"),
            "journaled_seq": self.journaled_seq,
            "acked_seq": self.acked_seq,
            "lag_bytes": self.pending_bytes,
            "lag_writes": len(self._pending),
            "rpo_seconds": round(self.rpo_seconds(now_ns), 3),
            "journal_bytes": self.journal.bytes_used,
            "journal_quota": self.journal.quota,
            "dirty_bytes": self.bitmap.dirty_bytes if self.bitmap else 0,
            "resync": self.resync_progress,
            "read_only": self.read_only,
        }

    # ----------------------------------------------------------------- I/O
    def _check(self, offset: int, length: int, *, writing: bool, limit: int = MAX_IO) -> None:
        if self._closed:
            raise DiskError(errno.ESHUTDOWN, f"{self.disk_id}: disk is closed")
        if writing and self._closing:
            raise DiskError(errno.ESHUTDOWN, f"{self.disk_id}: disk is closing")
        if writing and (self.read_only or self.scan_only or self.frozen):
            raise DiskError(errno.EROFS, f"{self.disk_id}: disk is read-only")
        if writing and self._image_commit.failed is not None:
            # Written pages of the image may be lost: nothing more is accepted until a restart
            # (its journal redo rewrites them).
            raise DiskError(errno.EIO, f"{self.disk_id}: an earlier image fdatasync failed")
        if offset < 0 or length <= 0 or length > limit or offset + length > self.size:
            code = errno.ENOSPC if writing and offset + length > self.size else errno.EINVAL
            raise DiskError(code, f"{self.disk_id}: bad range offset={offset} length={length}")

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length, writing=False)
        try:
            return pread_exact(self._fd, length, offset)
        except OSError as exc:
            raise DiskError(exc.errno or errno.EIO, f"{self.disk_id}: read failed: {exc}") from exc

    async def _activate(
        self, offset: int, length: int, also: Sequence[tuple[int, int]] = ()
    ) -> None:
        al = self.activity_log
        if al is not None and not al.covers(offset, length):
            extents: list[int] = []
            for start, size in also:  # hints: only ranges of the disk, few extents each
                if start >= 0 and 0 < size <= MAX_IO and start + size <= self.size:
                    extents.extend(al.extents_of(start, size))
            try:
                await al.activate(offset, length, self._sync_data, also=extents)
            except OSError as exc:
                full = exc.errno in (
                    errno.ENOSPC,
                    errno.EDQUOT,
                )  # a writer must tell full from broken
                raise DiskError(
                    exc.errno if full and exc.errno else errno.EIO,
                    f"{self.disk_id}: activity log write failed: {exc}",
                ) from exc

    async def _sync_data(self) -> None:
        await asyncio.gather(self.journal.sync(), self._image_commit.commit())

    async def write(
        self,
        offset: int,
        data: bytes | memoryview,
        *,
        fua: bool = False,
        also: Sequence[tuple[int, int]] = (),
    ) -> int:
        """Journal, then write into the image; with ``fua``, durable before it returns.
        ``also``: ``(offset, length)`` of writes about to follow (an NBD client's queued
        requests): should this one wait for the activity log, their extents are persisted
        with its own, so they need not wait in turn. Raises DiskError."""
        self._check(offset, len(data), writing=True)
        while not self._gate.is_set():  # a new hold may close it again before we run
            await self._gate.wait()
            self._check(offset, len(data), writing=True)
        self._writer_enters()
        try:
            await self._activate(offset, len(data), also)
            seq = self._record(offset, len(data), data, may_trim=False)
        finally:
            self._writer_leaves()
        if fua:
            await self.flush()
        return seq

    def admit_nowait(self, offset: int, length: int) -> bool:
        """May a plain write of this range be done in this loop step, with no wait? False when
        a recovery point holds the gate or the activity log must persist the range's extent
        first (the caller awaits :meth:`write`). Raises DiskError as :meth:`write` does.

        The NBD front's path for most writes: it admits the writes of one loop step, then
        hands them to :meth:`write_admitted` before anything else runs (no coroutine, no
        writer count: nothing can happen between the gate and the journal)."""
        if not self._gate.is_set():
            return False
        self._check(offset, length, writing=True)
        al = self.activity_log
        return al is None or al.covers(offset, length)

    def write_admitted(
        self, writes: Sequence[tuple[int, bytes | memoryview]], *, owned: bool = False
    ) -> list[int | DiskError]:
        """Journal writes admitted in this loop step (:meth:`admit_nowait`) with one system
        call, then write each into the image, in order; returns each write's seq, or the
        DiskError it failed with. ``owned``: the caller hands its buffers over (see
        ``Journal.append_writes``). Whatever cannot go the one-call way (one write, a write
        larger than a journal record, a journal that is full or overflowed, a journal write
        that failed: nothing of it is kept) goes write by write, as :meth:`write` does."""
        payload = sum(len(data) for _, data in writes)
        if (
            len(writes) < 2
            or self.overflowed
            or any(len(data) > RECORD_MAX for _, data in writes)
            or not self.journal.fits(payload + 64 * len(writes))
        ):
            return [self._record_or_error(offset, data, owned) for offset, data in writes]
        now = time.time_ns()
        try:
            last = self.journal.append_writes(writes, now, owned=owned)
        except OSError:  # rolled back: the one-by-one path tells a full journal from a broken one
            return [self._record_or_error(offset, data, owned) for offset, data in writes]
        results: list[int | DiskError] = []
        for seq, (offset, data) in enumerate(writes, last - len(writes) + 1):
            self._pending.add(seq, len(data), now)
            try:
                self._apply_to_image(offset, len(data), data, False)
            except OSError as exc:
                results.append(self._image_write_error(exc))
            else:
                results.append(seq)
        self.new_records.set()
        self._image_commit.mark()
        self.write_seq = last
        return results

    def _record_or_error(
        self, offset: int, data: bytes | memoryview, owned: bool
    ) -> int | DiskError:
        try:
            return self._record(offset, len(data), data, may_trim=False, owned=owned)
        except DiskError as exc:
            return exc

    def _writer_enters(self) -> None:
        self._writers += 1
        self._writers_idle.clear()

    def _writer_leaves(self) -> None:
        self._writers -= 1
        if not self._writers:
            self._writers_idle.set()

    # ----------------------------------------------------------------- recovery points
    async def hold(self) -> int:
        """Stop new writes at the gate, let those past it be journaled, and return the seq that
        ends the point (a batch will end there). Pair with :meth:`release`."""
        self._holds += 1
        self._gate.clear()
        try:
            await self._writers_idle.wait()
        except BaseException:
            self.release()
            raise
        return self.cut_here()

    def release(self) -> None:
        self._holds -= 1
        if self._holds <= 0:
            self._holds = 0
            self._gate.set()

    def cut_here(self) -> int:
        """The current journaled seq as a point boundary: the shipper ends a batch there."""
        seq = self.journaled_seq
        if not self.point_cuts or self.point_cuts[-1] < seq:
            self.point_cuts.append(seq)
        return seq

    async def wait_writers_idle(self) -> None:
        await self._writers_idle.wait()

    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool = False, may_trim: bool = True
    ) -> int:
        self._check(offset, length, writing=True, limit=MAX_ZERO)
        while not self._gate.is_set():  # a new hold may close it again before we run
            await self._gate.wait()
            self._check(offset, length, writing=True, limit=MAX_ZERO)
        al = self.activity_log
        seq, pos, end = 0, offset, offset + length
        self._writer_enters()
        try:
            while pos < end:  # a huge trim: one record per piece, each in the activity log's reach
                if al is None:
                    nxt = end
                else:
                    nxt = min(
                        end, (pos // al.extent_bytes + al.max_extents_per_write) * al.extent_bytes
                    )
                await self._activate(pos, nxt - pos)
                seq = self._record(pos, nxt - pos, None, may_trim=may_trim) or seq
                pos = nxt
        finally:
            self._writer_leaves()
        if fua:
            await self.flush()
        return seq

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> int:
        """Discard a range. Trimmed ranges read back as zeros here (and so on the replica)."""
        return await self.write_zeroes(offset, length, fua=fua, may_trim=True)

    def _record(
        self,
        offset: int,
        length: int,
        data: bytes | memoryview | None,
        *,
        may_trim: bool,
        owned: bool = False,
    ) -> int:
        """Journal then apply one write, synchronously (one event-loop step). ``owned``: see
        ``Journal.append_writes``."""
        now = time.time_ns()
        seq = 0
        payload = length if data is not None else 0
        if not self.overflowed and self.journal.fits(payload + 32 * (1 + payload // RECORD_MAX)):
            try:
                if data is None:
                    seq = self.journal_zero(offset, length, may_trim=may_trim, now=now)
                else:
                    # Large writes become several records (consecutive seqs, this same loop
                    # step), so no batch, frame or buffer downstream exceeds RECORD_MAX.
                    view = memoryview(data)
                    for pos in range(0, length, RECORD_MAX):
                        seq = self.journal_bytes(
                            offset + pos, view[pos : pos + RECORD_MAX], now=now, owned=owned
                        )
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskError(
                        errno.EIO, f"{self.disk_id}: journal write failed: {exc}"
                    ) from exc
                self._overflow_or_refuse(f"journal device full: {exc.strerror}", offset, length)
                seq = 0  # the whole range goes to the bitmap, even if part was journaled
        elif not self.overflowed:
            self._overflow_or_refuse("journal quota exhausted", offset, length)
        if not seq:
            if self.bitmap is None:
                self.bitmap = DirtyBitmap(self.size)
            self.bitmap.mark(offset, length)
        try:
            self._apply_to_image(offset, length, data, may_trim)
        except OSError as exc:
            raise self._image_write_error(exc) from exc
        self._image_commit.mark()
        if seq:
            self.write_seq = seq
        return seq

    def _image_write_error(self, exc: OSError) -> DiskError:
        return DiskError(exc.errno or errno.EIO, f"{self.disk_id}: image write failed: {exc}")

    def _apply_to_image(
        self, offset: int, length: int, data: bytes | memoryview | None, may_trim: bool
    ) -> None:
        if data is not None:
            if not self._direct.try_write(self._fd, data, offset):
                pwrite_all(self._fd, data, offset)
        else:
            zero_range(self._fd, offset, length, punch=may_trim)

    def _overflow_or_refuse(self, reason: str, offset: int, length: int) -> None:
        try:
            self._overflow(reason)
        except DiskError:
            assert self.bitmap is not None
            self.bitmap.mark(offset, length)  # part of it may be journaled: resync it whole
            raise

    def _overflow(self, reason: str) -> None:
        """Switch to the dirty bitmap: the journal can take no more."""
        log.error(
            "disk=%s event=journal_overflow reason=%r journal_bytes=%d quota=%d state=resync-required",
            self.disk_id,
            reason,
            self.journal.bytes_used,
            self.journal.quota,
        )
        if self.bitmap is None:
            self.bitmap = DirtyBitmap(self.size)
        self._overflows += 1
        self._pending_clears = []  # checkpoint_resync: a clear must not wipe an overflow write
        changes = {
            "overflowed": True,
            "resync_required": True,
            "resync_reason": "journal-overflow",
            "overflow_at_seq": self.journal.last_seq,
            "bulk_copy": False,  # the overflow's writes are in the image only
        }
        try:
            self.bitmap.save(self.state_dir / BITMAP_FILE)
            self._save_state({**self._state, **changes})
        except OSError as exc:
            # The state directory is full too: the switch to the bitmap is not durable, so this
            # write is refused (the caller marks its range dirty in memory; a crash before the
            # state is saved is healed by the activity log's re-verification), and so is every
            # later one until a save succeeds: ``overflowed`` is set only once it is durable.
            log.error("disk=%s event=state_save_failed error=%r", self.disk_id, str(exc))
            self._state.update(resync_required=True, resync_reason="journal-overflow")
            self._notify_state()  # reported as needing a resync (the refused range is marked)
            raise DiskError(
                exc.errno or errno.EIO,
                f"{self.disk_id}: journal full and its state cannot be saved: {exc.strerror}",
            ) from exc
        self._state.update(changes)
        self.overflowed = True
        self._notify_state()

    def _notify_state(self) -> None:
        if self.state_listener is not None:
            self.state_listener.set()

    async def flush(self) -> None:
        """Make every completed write durable in the journal and the image. Raises DiskError."""
        try:
            await asyncio.gather(self.journal.sync(), self._image_commit.commit())
            if self.bitmap is not None and self.bitmap.changed:
                async with self._bitmap_lock:
                    if self.bitmap.changed:
                        await asyncio.to_thread(self.bitmap.save, self.state_dir / BITMAP_FILE)
        except OSError as exc:
            raise DiskError(exc.errno or errno.EIO, f"{self.disk_id}: flush failed: {exc}") from exc

    # ----------------------------------------------------------------- replication
    async def acknowledge(self, seq: int) -> None:
        """The process server holds everything ``<= seq`` durably: drop it from the journal."""
        if seq <= self.acked_seq:
            return
        self.acked_seq = min(seq, self.journal.last_seq)
        while self.point_cuts and self.point_cuts[0] <= self.acked_seq:
            self.point_cuts.pop(0)
        self._pending.ack_through(self.acked_seq)
        await self.journal.release_through(self.acked_seq)

    # ----------------------------------------------------------------- resync support
    def resync_ready(self) -> bool:
        """A resync may run: needed, and the journal has room to carry its data (data not yet
        acknowledged counts in full, references included, as if it were in the journal)."""
        limit = self.journal.quota // 2
        return (
            self.bitmap is not None
            and self.journal.bytes_used < limit
            and self._pending.bytes < limit
        )

    async def begin_resync(self) -> None:
        """Writes go back to the journal; the bitmap is now the set of regions to verify.

        The bitmap, holding the marks of every write made during the overflow, is saved
        before the state says the overflow is over: until then a restart after an unclean
        stop marks the whole disk, from then on it trusts the saved bitmap. Raises OSError
        (the disk stays overflowed)."""
        if not self.overflowed:
            return
        overflows = self._overflows
        self.overflowed = False  # from this loop step on, writes are journaled again
        # Records before this point are older than the overflow's unjournaled writes: a redo
        # after an unclean stop must not replay them over those (_scan_journal).
        redo_from = self.journal.next_seq
        try:
            if self.bitmap is not None:
                async with self._bitmap_lock:
                    await asyncio.to_thread(self.bitmap.save, self.state_dir / BITMAP_FILE)
            if self._overflows != overflows:
                return  # it overflowed again meanwhile: that overflow's state stands
            self._save_state({**self._state, "overflowed": False, "redo_from": redo_from})
        except BaseException:
            if self._overflows == overflows:
                self.overflowed = True  # not resumed: the saved state still says overflowed
            raise
        self._state.update(overflowed=False, redo_from=redo_from)
        log.info("disk=%s event=journal_resumed after overflow", self.disk_id)

    @property
    def bulk_copy_allowed(self) -> bool:
        """The sync may copy the image outside the journal (agent/bulk_copy.py): the bitmap
        holds only what the first sync has still to send."""
        return bool(self._state.get("bulk_copy")) and not self.scan_only and self.copy_in_bulk

    @property
    def bulk_open(self) -> bool:
        """The process server may be holding this disk's batches for a copy."""
        return bool(self._state.get("bulk_open"))

    def set_bulk_open(self, value: bool) -> None:
        """Saved before a copy begins and after it ends: a restart knows to end it. (In the
        loop, like the overflow's save: a snapshot saved from a thread could land after, and
        undo, a newer state.)"""
        if self.bulk_open != value:
            self._state["bulk_open"] = value
            self._save_state()

    def read_image(self, offset: int, length: int) -> bytes:
        """Read the image directly (synchronous: callers rely on it happening in one loop step)."""
        return pread_exact(self._fd, length, offset)

    def journal_bytes(
        self, offset: int, data: bytes | memoryview, *, now: int = 0, owned: bool = False
    ) -> int:
        """Journal one data record and hand it to the shipper (no image write). The write path
        uses it before writing the image; resync uses it for bytes the image already holds, in
        the same loop step as their read, so they are ordered with every write around them."""
        now = now or time.time_ns()
        seq = self.journal.append_write(offset, data, now, owned=owned)
        self._pending.add(seq, len(data), now)
        self.new_records.set()
        return seq

    def journal_ref(self, offset: int, length: int) -> int:
        """Journal a reference to bytes the image holds (resync): the shipper reads them when
        it builds the batch, so they are written once, to the replica (agent/journal.py)."""
        now = time.time_ns()
        seq = self.journal.append_ref(offset, length, now)
        self.last_ref_seq = seq
        self._pending.add(seq, length, now)
        self.new_records.set()
        return seq

    def journal_zero(self, offset: int, length: int, *, may_trim: bool = True, now: int = 0) -> int:
        """Journal one zero extent (write-zeroes, trim, or a resync of a zero chunk)."""
        now = now or time.time_ns()
        seq = self.journal.append_zero(offset, length, now, may_trim=may_trim)
        self._pending.add(seq, 0, now)
        self.new_records.set()
        return seq

    @property
    def image_fd(self) -> int:
        return self._fd

    def resynced(self, offset: int, length: int) -> None:
        """A range was compared and its differences journaled: its bits may be cleared, but
        only at the next checkpoint, once those journal records are durable. Not while the
        journal is overflowed: a write in the range would then be marked in the bitmap only,
        and the clear would wipe it."""
        if not self.overflowed:
            self._pending_clears.append((offset, length))

    async def checkpoint_resync(self) -> None:
        """Make resync progress durable: the journal first, then the shrunken bitmap. Clears
        are dropped (the ranges stay dirty, to be verified again) if the journal overflowed
        since they were recorded: a write in one of them may be in the bitmap only. Dropped
        too if the journal was rebased meanwhile: the records they stand for went with it."""
        clears, self._pending_clears = self._pending_clears, []
        overflows, epoch = self._overflows, self.epoch
        await self.journal.sync()
        if self.bitmap is not None:
            if self.overflowed or self._overflows != overflows or self.epoch != epoch:
                clears = []
            for offset, length in clears:
                self.bitmap.clear(offset, length)
            async with self._bitmap_lock:
                await asyncio.to_thread(self.bitmap.save, self.state_dir / BITMAP_FILE)

    def _resync_level(self) -> bool:
        """No overflow meanwhile, nothing pending, nothing more marked (finish_resync)."""
        return (
            not self.overflowed
            and not self._pending_clears
            and self.bitmap is not None
            and self.bitmap.empty
        )

    async def finish_resync(self) -> None:
        """Every region was verified or resent: the replica is level with the journal."""
        await self.checkpoint_resync()
        if not self._resync_level():
            return
        # A reference not yet held by the process server may still be read from the image
        # (again, after a reconnection) with bytes newer than a point taken from now on.
        while self.acked_seq < self.last_ref_seq:
            await asyncio.sleep(0.02)
            if not self._resync_level():
                return
        self.bitmap = None
        self.unclean_regions = []
        self._state["resync_required"] = False
        self._state["resync_reason"] = None
        self._state["bulk_copy"] = False  # only the first sync copies in bulk
        self._state["overflowed"] = False
        await asyncio.to_thread(self._save_state, dict(self._state))
        if self.bitmap is not None:
            # Marked again while that snapshot was saved (an overflow, an operator request),
            # whose own state and bitmap were saved in the loop, perhaps before the snapshot
            # replaced the file: the newer state must be the one on disk, with its bitmap.
            self._save_state()
            return
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / BITMAP_FILE).unlink()
        log.info("disk=%s event=resync_complete", self.disk_id)
        self._notify_state()

    def mark_dirty(self, ranges: list[tuple[int, int]], reason: str) -> None:
        """Regions to resync (verify --repair, operator request)."""
        if self.bitmap is None:
            self.bitmap = DirtyBitmap(self.size)
        for offset, length in ranges:
            self.bitmap.mark(offset, length)
        self._state["resync_required"] = True
        self._state["resync_reason"] = reason
        self._state["bulk_copy"] = False
        self._save_state()
        self.bitmap.save(self.state_dir / BITMAP_FILE)
        self.new_records.set()
        self._notify_state()

    async def rebase_journal(self, next_seq: int, reason: str) -> None:
        """The journal cannot resume where the process server stands: restart seq numbering at
        ``next_seq`` with an empty journal, and mark the whole disk for a digest resync."""
        log.error(
            "disk=%s event=journal_rebased next_seq=%d reason=%r", self.disk_id, next_seq, reason
        )
        # First make the need for a full resync durable, then swap the journal: a crash in
        # between must not leave a fresh journal with a "clean" state.
        if self.bitmap is None:
            self.bitmap = DirtyBitmap(self.size)
        self.bitmap.mark_all()
        self._pending_clears = []
        await asyncio.to_thread(self.bitmap.save, self.state_dir / BITMAP_FILE)
        self._state.update(
            resync_required=True, resync_reason=reason, unclean_floor=None, bulk_copy=False
        )
        await asyncio.to_thread(self._save_state)
        directory = self.journal.log.directory
        quota, segment = self.journal.quota, self.journal.log.segment_bytes
        self.journal.close()
        for seg in directory.glob("*.seg"):
            seg.unlink()
        self.journal = Journal(directory, quota=quota, segment_bytes=segment, base_seq=next_seq)
        self.point_cuts = []
        self.epoch += 1
        self._pending = _PendingWrites()
        self.acked_seq = next_seq - 1
        self.write_seq = next_seq - 1
        self.last_ref_seq = 0  # its references went with the journal (all is marked)
        self.overflowed = False
        self._state["overflowed"] = False
        self._state["redo_from"] = None  # only now: the old journal's records are gone
        await asyncio.to_thread(self._save_state)

    async def close(self) -> None:
        """Refuse new writes, let those in flight finish, flush everything and record a
        clean stop (the journal and the image are closed only once no writer uses them)."""
        if self._closed:
            return
        self._closing = True
        await self._writers_idle.wait()
        await self.flush()
        self._closed = True
        if self.bitmap is not None:
            await asyncio.to_thread(self.bitmap.save, self.state_dir / BITMAP_FILE)
        if self.activity_log is not None:
            await asyncio.to_thread(self.activity_log.clear)
            self.activity_log.close()
        self._state["clean"] = True
        await asyncio.to_thread(self._save_state)
        self.journal.close()
        self._direct.close()
        os.close(self._fd)


def _image_is_all_holes(fd: int, size: int) -> bool:
    """True when the image has no allocated data at all (a fresh sparse file)."""
    if size == 0:
        return True
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        return exc.errno == errno.ENXIO
    return False


__all__ = ["MAX_IO", "ProtectedDisk"]
