"""One replicated disk on the process server: its batch cache, its replica file and its applier.

Rules it keeps:
- A batch is acknowledged only after it is in the cache and the cache is fdatasync'ed.
- The applier applies cached batches in seq order, each exactly once in effect
  (a batch holds the final contents of its extents, so replay is idempotent),
  verifies every extent digest, and records ``applied_seq`` only after the replica
  is fdatasync'ed; the state file is replaced atomically.
- With the undo log on, the old contents of a batch's extents are durable in the undo log
  before the batch touches the replica; one fdatasync of the undo log covers a group of
  batches (where they overlap, a batch's old contents are the group's earlier new contents).
- Open point-in-time views (failovers) learn of every new undo piece before the replica bytes
  under it change (``view_lock``).
- The undo log (a ``SegmentLog``, not thread-safe) is used by one side at a time
  (``undo_turn``): the applier holds the turn for each group its worker thread writes;
  releasing history (pruning, a commit) and opening a view take it too.
- Nothing from the wire becomes a path: the directory is named by a validated disk id.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.aio import to_thread_outliving_cancel
from common.digests import chunk_digests
from common.direct_write import DirectWriter
from common.durable import GroupCommit, atomic_write_json, pwrite_all, read_json, zero_range
from common.errors import IntegrityError, TidemarkError
from common.failpoints import failpoint
from common.segment_log import Cursor, RecordLocation, SegmentLog
from common.stage_trace import stamp
from process_server.extent_map import ExtentMap
from process_server.pit import PointView
from process_server.undo import RECORD_MAX, TAG_CUT, UndoLog
from protocol.batch import Batch, BatchHeader, Extent, Limits, decode_batch, validate_disk_id
from protocol.errors import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from common.at_rest import Sealer  # imports cryptography: only where logs are sealed

log = logging.getLogger("tidemark.ps.replica")

TAG_BATCH = 1
STATE_FILE = "state.json"
APPLY_GROUP_RECORDS = 64  # batches applied as one group (one undo sync, one replica pass)
APPLY_GROUP_BYTES = 32 << 20  # data bytes of a group taken from memory
GROUP_EXTENTS_MAX = 1 << 17  # extents of one undo group (its overlay, hence its undo records)
DECODED_LIMIT = 32 << 20  # verified batches kept in memory for the applier (beyond: re-read)
RECYCLE_MIN, RECYCLE_MAX = 2, 16  # released cache segment files kept for reuse (recycle_count)
REPLICA_FILE = "replica.img"
UNDO_DIR = "undo"
BOUNDARIES_KEPT = 1 << 16  # recent batch ends: where a recovery point may fall


class ReplicaError(TidemarkError):
    """A replica cannot be created or used (size mismatch, owner mismatch, corrupt state)."""


class ReplicaSyncError(OSError):
    """The replica's ``fdatasync`` failed, now or earlier in this process (permanent)."""


class ReplicaDisk:
    """Cache + replica + applier of one disk."""

    def __init__(
        self,
        directory: Path,
        state: dict[str, Any],
        cache: SegmentLog,
        replica_fd: int,
        limits: Limits,
        apply_sync_interval: float,
        cache_quota: int,
        undo: UndoLog | None = None,
    ) -> None:
        self.directory = directory
        self.disk_id: str = state["disk_id"]
        self.owner: str = state["owner"]
        self.size: int = state["size"]
        self._state = state
        self.cache = cache
        self._fd = replica_fd
        self._replica_commit = GroupCommit(self._fdatasync_replica)  # see sync_replica
        self.limits = limits
        self.apply_sync_interval = apply_sync_interval
        self.cache_quota = cache_quota
        self.applied_seq: int = state["applied_seq"]  # durable in the replica
        self.applying_seq = self.applied_seq  # written to the replica (page cache)
        self.durable_seq = cache.last_seq  # durable in the cache (acknowledgeable)
        self._cache_appended = asyncio.Event()
        self._cache_durable = asyncio.Event()
        self._space_freed = asyncio.Event()
        self._applied_event = asyncio.Event()
        self._durable_lock = asyncio.Lock()
        self._durable_task: asyncio.Future[None] | None = None
        # Batches verified on receipt, by first seq, with where the cache holds them: the
        # applier takes them from here instead of reading the cache back (which, with the
        # decode and the fresh buffers, cost the process server more than the receive).
        self._decoded: dict[int, tuple[Batch, RecordLocation]] = {}
        self._decoded_bytes = 0
        self.digest_bytes_read = 0
        self.applier_error: str | None = None
        self.session: Any = None  # the connection currently owning the disk
        self.report: dict[str, Any] | None = None  # newest heartbeat report from the agent
        self.report_time = 0.0
        self.received_batches = 0
        self.received_bytes = 0
        self.applied_bytes = 0
        self.newest_applied_write_ns = 0
        self.newest_cached_write_ns = 0
        self._last_durable_apply = time.monotonic()
        self.undo = undo
        self.views: list[PointView] = []
        self.view_lock = threading.Lock()
        # Whose turn it is with the undo log: the applier's group (its worker thread appends
        # records) or a release / a view being opened (module comment).
        self.undo_turn = asyncio.Lock()
        self.fenced: str | None = None  # why nothing more is applied (a failover owns the disk)
        self.apply_limit: int | None = None  # the applier stops at this seq while fenced
        # An initial sync's copy writes the replica (process_server/bulk.py): nothing cached
        # is applied until it ends. Saved in the state file: a restart keeps it.
        self.bulk_fence = bool(state.get("bulk_copy"))
        self.on_written: Callable[[int, int], None] | None = None  # after each replica write
        # Aligned extents into holes bypass the page cache (common/direct_write.py).
        self.direct = DirectWriter(self.replica_path, self.disk_id)
        self._boundaries: collections.deque[int] = collections.deque(maxlen=BOUNDARIES_KEPT)
        self._boundary_set: set[int] = set()
        self.note_boundary(self.durable_seq)

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        root: Path,
        disk_id: str,
        *,
        limits: Limits,
        apply_sync_interval: float,
        cache_quota: int,
        cache_segment: int,
        create: tuple[str, int] | None = None,
        undo: bool = False,
        undo_segment: int = 64 << 20,
        image: Path | None = None,
        sealer: Sealer | None = None,
    ) -> ReplicaDisk:
        """Open an existing replica, or create it when ``create=(owner, size)`` is given.
        Raises ReplicaError, IntegrityError, OSError."""
        validate_disk_id(disk_id)
        directory = root / disk_id
        state_path = directory / STATE_FILE
        if state_path.exists():
            state = read_json(state_path)
            if state.get("disk_id") != disk_id:
                raise ReplicaError(f"{state_path}: belongs to disk {state.get('disk_id')!r}")
        elif create is not None:
            owner, size = create
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if image is None:
                fd = os.open(directory / REPLICA_FILE, os.O_RDWR | os.O_CREAT, 0o600)
                os.ftruncate(fd, size)
                os.fsync(fd)
                os.close(fd)
            state = {
                "disk_id": disk_id,
                "owner": owner,
                "size": size,
                "applied_seq": 0,
                "created_ns": time.time_ns(),
                **({"image": str(image)} if image is not None else {}),
            }
            atomic_write_json(state_path, state)
        else:
            raise ReplicaError(f"no replica for disk {disk_id!r}")
        cache = SegmentLog.open(
            directory / "cache",
            base_seq=state["applied_seq"] + 1,
            segment_bytes=cache_segment,
            sealer=sealer.for_context(b"cache:" + disk_id.encode()) if sealer else None,
            recycle=recycle_count(cache_quota, cache_segment),
            # The applier takes most batches from memory (``_decoded``); the rest it reads
            # back from the disk (docs/operations.md, "Page cache").
            drop_synced=True,
        )
        if cache.last_seq < state["applied_seq"]:
            raise IntegrityError(
                f"{directory}: cache ends at seq {cache.last_seq} before applied seq {state['applied_seq']}"
            )
        undo_log = None
        if undo:
            # Sealed at rest under the cache's key, bound to this disk's undo log.
            undo_sealer = sealer.for_context(b"undo:" + disk_id.encode()) if sealer else None
            undo_log = UndoLog.open(
                directory / UNDO_DIR, disk_id, state["applied_seq"], undo_segment, undo_sealer
            )
            if undo_log.last_seq < state["applied_seq"]:
                # Undo was off for a while (or this replica predates it): history starts now.
                undo_log.close()
                undo_log = _restart_undo(
                    directory / UNDO_DIR, disk_id, state, undo_segment, undo_sealer
                )
        fd = os.open(state.get("image") or directory / REPLICA_FILE, os.O_RDWR)
        return cls(directory, state, cache, fd, limits, apply_sync_interval, cache_quota, undo_log)

    @property
    def replica_path(self) -> Path:
        image = self._state.get("image")
        return Path(image) if image else self.directory / REPLICA_FILE

    @property
    def cached_seq(self) -> int:
        """Newest seq appended to the cache (durable once ``durable_seq`` reaches it)."""
        return self.cache.last_seq

    # ----------------------------------------------------------------- receiving
    async def wait_for_cache_space(self, nbytes: int) -> None:
        """Backpressure: wait until the cache has room for ``nbytes`` more."""
        while self.cache.bytes_used + nbytes > self.cache_quota and (
            self.applying_seq < self.cached_seq or self.fenced
        ):  # fenced (failed over): nothing frees space until failback or cleanup
            self._space_freed.clear()
            await self._space_freed.wait()

    def append_batch(
        self, data: bytes | bytearray, header: BatchHeader, decoded: Batch | None = None
    ) -> None:
        """Append a received batch to the cache (page cache; durable after :meth:`sync_cache`).
        Raises ProtocolError(SEQ_GAP) when it does not follow the cache."""
        if header.first_seq != self.cached_seq + 1:
            raise ProtocolError(
                ErrorCode.SEQ_GAP,
                f"disk {self.disk_id}: batch starts at seq {header.first_seq}, expected {self.cached_seq + 1}",
            )
        location = self.cache.append(TAG_BATCH, header.first_seq, header.last_seq, (data,))
        if decoded is not None and self._decoded_bytes + header.raw_bytes <= DECODED_LIMIT:
            self._decoded[header.first_seq] = (decoded, location)  # not read back, not decoded
            self._decoded_bytes += header.raw_bytes
        self.note_boundary(header.last_seq)
        self.received_batches += 1
        self.received_bytes += header.raw_bytes
        self.newest_cached_write_ns = max(self.newest_cached_write_ns, header.newest_write_ns)
        self._cache_appended.set()

    def note_boundary(self, seq: int) -> None:
        if len(self._boundaries) == self._boundaries.maxlen:
            self._boundary_set.discard(self._boundaries[0])
        self._boundaries.append(seq)
        self._boundary_set.add(seq)

    def is_boundary(self, seq: int) -> bool:
        """Does a received batch end at ``seq``? Recent ones are remembered; older ones are
        found where the next batch starts, in the cache or the undo log."""
        if seq in self._boundary_set or seq in (self.applied_seq, self.durable_seq):
            return True
        for log in (self.cache, self.undo.log if self.undo is not None else None):
            if log is None or not log.first_seq <= seq + 1 <= log.last_seq:
                continue
            with contextlib.suppress(LookupError):
                found = log.locate(seq + 1)
                if found:
                    return found[0].first_seq == seq + 1
        return False

    async def sync_cache(self) -> int:
        """fdatasync the cache (group commit); returns the seq now durable."""
        target = self.cached_seq
        await self.cache.sync()
        if target > self.durable_seq:
            self.durable_seq = target
            stamp("durable", target)
            self._cache_durable.set()
        return self.durable_seq

    # ----------------------------------------------------------------- applying
    async def run_applier(self) -> None:
        """Apply durable cached batches to the replica, forever (until cancelled)."""
        try:
            await self._apply_forever()
        finally:
            if self._durable_task is not None:
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await asyncio.shield(self._durable_task)
                self._durable_task = None

    async def _apply_forever(self) -> None:
        cursor = Cursor()
        while True:
            if self.applying_seq >= self._apply_target():
                if self.applying_seq > self.applied_seq:
                    await self.make_applied_durable()
                self._cache_durable.clear()
                if self.applying_seq >= self._apply_target():
                    await self._cache_durable.wait()
                continue
            items = self._take_decoded(cursor)
            if not items:
                items = self._read_cached(cursor)
            if items:
                stamp("apply_started", self.applying_seq, len(items))
                async with self.undo_turn:  # no release rolls the undo log under the thread
                    # Cancelled (a stop), the turn ends only with the thread: the replica and
                    # the O_DIRECT buffer are not closed under it.
                    batches = await to_thread_outliving_cancel(self._apply_records, items)
                    for batch in batches:
                        self.applied_bytes += batch.header.raw_bytes
                        self.newest_applied_write_ns = max(
                            self.newest_applied_write_ns, batch.header.newest_write_ns
                        )
                    # Still in the turn: whoever takes it next sees applying_seq match the
                    # replica.
                    self.applying_seq = batches[-1].header.last_seq
                    stamp("applied", self.applying_seq)
                    self.applier_error = None  # applying again (after a full disk, say)
                    self._applied_event.set()
            background = self._durable_task
            if background is not None and background.done():
                self._durable_task = None
                background.result()  # an fdatasync failure stops the applier, loudly
            if self.cache.bytes_used > self.cache_quota // 2:
                await self.make_applied_durable()  # free cache space before going on
            elif (
                self._durable_task is None
                and time.monotonic() - self._last_durable_apply >= self.apply_sync_interval
            ):
                # Record applied_seq in the background: applying goes on meanwhile.
                self._last_durable_apply = time.monotonic()
                self._durable_task = asyncio.ensure_future(self.make_applied_durable())

    def _apply_target(self) -> int:
        if self.bulk_fence:
            return self.applying_seq
        if self.apply_limit is None:
            return self.durable_seq
        return min(self.durable_seq, self.apply_limit)

    def fence(self, reason: str, limit: int) -> None:
        """Stop applying beyond ``limit`` (a failover owns the disk); batches still arrive."""
        self.fenced = reason
        self.apply_limit = limit
        self._cache_durable.set()

    async def wait_still(self) -> None:
        """After :meth:`fence`: wait until the group in flight (if any) is written and
        counted in ``applying_seq``; the replica then stays still until unfenced."""
        async with self.undo_turn:
            pass

    def unfence(self) -> None:
        self.fenced = None
        self.apply_limit = None
        self._cache_durable.set()
        self._space_freed.set()

    async def set_bulk_fence(self, on: bool) -> None:
        """Fence (or free) the applier for an initial sync's copy, durably: on, it returns
        once the group in flight is written (the copy's writes never race the applier's);
        off, it is saved before anything more is applied."""
        if on:
            self.bulk_fence = True
            await self.wait_still()
        async with self._durable_lock:  # make_applied_durable replaces the state file too
            state = dict(self._state, bulk_copy=on)
            await asyncio.to_thread(atomic_write_json, self.directory / STATE_FILE, state)
            self._state = state
        if not on:
            self.bulk_fence = False
            self._cache_durable.set()

    @property
    def replica_fd(self) -> int:
        return self._fd

    async def restart_sequence(self) -> int:
        """After a failback: the replica equals the source again and whatever the cache still
        holds (source writes older than the failback) must never be applied. Everything is
        released, applied_seq jumps to the newest cached seq (the agent's journal restarts
        after it) and the undo history starts there. Returns that seq."""
        seq = self.cached_seq
        await self.sync_replica()
        state = dict(self._state, applied_seq=seq)
        await asyncio.to_thread(atomic_write_json, self.directory / STATE_FILE, state)
        self._state = state
        self.applied_seq = self.applying_seq = seq
        self._decoded.clear()
        self._decoded_bytes = 0
        await self.cache.release_through(seq)
        async with self.undo_turn:
            if self.undo is not None:
                segment, undo_sealer = self.undo.log.segment_bytes, self.undo.log.sealer
                self.undo.close()
                self.undo = await asyncio.to_thread(
                    _restart_undo,
                    self.directory / UNDO_DIR,
                    self.disk_id,
                    state,
                    segment,
                    undo_sealer,
                )
        self.note_boundary(seq)
        self._space_freed.set()
        return seq

    async def drop_history(self) -> None:
        """After a committed failover: the undo history means nothing any more."""
        undo = self.undo
        if undo is None:
            return
        await self.make_applied_durable()
        async with self.undo_turn:
            await undo.release_through(undo.last_seq)
            undo.valid_from = undo.last_seq
            await asyncio.to_thread(undo.save_history)

    async def release_undo(self, seq: int) -> int:
        """Release undo history through ``seq``, never past an open view's point nor past
        ``applied_seq`` (both read in the turn: a view opened while this waited counts).
        Returns bytes freed. Raises OSError."""
        async with self.undo_turn:
            undo = self.undo
            if undo is None:
                return 0
            pinned = self.pinned_seq()
            seq = min(seq, self.applied_seq, seq if pinned is None else pinned)
            if seq < undo.first_seq:
                return 0
            return await undo.release_through(seq)

    async def open_view_async(self, seq: int) -> PointView:
        """:meth:`open_view` in a worker thread, in the undo log's turn (no release deletes
        a segment it is reading). Raises ReplicaError, LookupError."""
        async with self.undo_turn:  # cancelled: the turn ends with the thread, its view closed
            return await to_thread_outliving_cancel(
                self.open_view, seq, on_abandoned=self.close_view
            )

    def _take_decoded(self, cursor: Cursor) -> list[tuple[bytes | memoryview, Batch | None]]:
        """The next durable batches, as far as they are held decoded in memory (up to
        APPLY_GROUP_BYTES of data); ``cursor`` is moved past them in the cache."""
        items: list[tuple[bytes | memoryview, Batch | None]] = []
        expected, target, taken = self.applying_seq + 1, self._apply_target(), 0
        while len(items) < APPLY_GROUP_RECORDS and taken < APPLY_GROUP_BYTES:
            entry = self._decoded.get(expected)
            if entry is None or entry[0].header.last_seq > target:
                break
            batch, location = entry
            self._pop_decoded(expected)
            self.cache.skip_past(cursor, location)
            items.append((b"", batch))
            taken += batch.header.raw_bytes
            expected = batch.header.last_seq + 1
        return items

    def _pop_decoded(self, first_seq: int) -> tuple[Batch, RecordLocation] | None:
        entry = self._decoded.pop(first_seq, None)
        if entry is not None:
            self._decoded_bytes -= entry[0].header.raw_bytes
        return entry

    def _read_cached(self, cursor: Cursor) -> list[tuple[bytes | memoryview, Batch | None]]:
        """The next durable batches read back from the cache (after a restart, or beyond
        what is held in memory)."""
        records = self.cache.read_records(
            self.applying_seq + 1, 16 << 20, cursor, max_records=APPLY_GROUP_RECORDS
        )
        items: list[tuple[bytes | memoryview, Batch | None]] = []
        expected = self.applying_seq + 1
        for record in records:
            if record.last_seq > self._apply_target():
                break
            if record.first_seq != expected:
                raise IntegrityError(
                    f"{self.directory}: cache record {record.first_seq}..{record.last_seq} "
                    f"does not follow applied seq {expected - 1}"
                )
            expected = record.last_seq + 1
            entry = self._pop_decoded(record.first_seq)
            items.append((record.payload, entry[0] if entry is not None else None))
        return items

    def _apply_records(self, items: list[tuple[bytes | memoryview, Batch | None]]) -> list[Batch]:
        """Decode (verifying every digest) and apply consecutive cached batches (a worker
        thread). ``None`` entries of ``items`` are batches already decoded on receipt."""
        batches: list[Batch] = []
        for payload, decoded in items:
            try:
                batch = decoded if decoded is not None else decode_batch(payload, self.limits)
                self._check_batch(batch)
            except ProtocolError as exc:
                raise IntegrityError(f"{self.directory}: cached batch: {exc}") from exc
            batches.append(batch)
        if self.undo is None:
            self._write_group(batches)
            return batches
        start, extents = 0, 0
        for index, batch in enumerate(batches):
            # The overlay holds at most ~2 pieces per extent assigned, and a batch's undo
            # record one extent per overlay piece it meets: a bound keeps records far below
            # UNDO_LIMITS.max_extents however small the writes.
            if index > start and extents + len(batch.extents) > GROUP_EXTENTS_MAX:
                self._undo_then_write(batches[start:index])
                start, extents = index, 0
            extents += len(batch.extents)
        self._undo_then_write(batches[start:])
        return batches

    def _check_batch(self, batch: Batch) -> None:
        if batch.header.disk_id != self.disk_id:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"batch of disk {batch.header.disk_id}")
        for extent in batch.extents:
            if extent.offset + extent.length > self.size:
                raise ProtocolError(
                    ErrorCode.BAD_MESSAGE, f"extent past the end of disk {self.disk_id}"
                )

    def _undo_then_write(self, group: list[Batch]) -> None:
        """Undo records of ``group`` made durable, open views told, then the group written to
        the replica. Where batches of the group overlap, a later batch's old contents are the
        earlier one's new contents, taken from memory (``overlay``): one undo sync covers the
        whole group."""
        undo = self.undo
        assert undo is not None
        overlay: ExtentMap[Extent] = ExtentMap()
        locations = []
        for index, batch in enumerate(group):
            locations.append(undo.record(batch, self._fd, overlay))
            if index + 1 < len(group):  # the last batch's writes are nobody's old contents
                for extent in batch.extents:
                    overlay.assign(extent.offset, extent.offset + extent.length, extent)
        undo.sync_blocking()
        failpoint("applier.after_undo_sync")
        # Checked under the lock: a view being opened right now (open_view holds the lock while
        # it reads the undo log, maybe before these records) must be told of them too.
        with self.view_lock:
            if self.views:
                first = group[0].header.first_seq
                # Records made before a crash (None here) are already in every view's map.
                made = [loc for loc in locations if loc is not None]
                # A cut (old contents too large to keep) ends every view older than it: such
                # a view is marked broken (its reads fail with EIO, status says why) rather
                # than the applier, hence the process server, going down.
                cuts = [loc.last_seq for loc in made if loc.tag == TAG_CUT]
                pieces = undo.pieces_of([loc for loc in made if loc.tag != TAG_CUT], first - 1)
                for view in self.views:
                    cut = next((seq for seq in cuts if seq > view.seq), None)
                    if cut is not None:
                        view.set_broken(
                            f"the undo history after seq {view.seq} was cut at seq {cut} "
                            f"(a batch overwrote more than {RECORD_MAX} bytes of data)"
                        )
                    elif not view.broken:
                        view.add([p for p in pieces if p[2].seq > view.seq])
        self._write_group(group)

    def _write_group(self, group: list[Batch]) -> None:
        for batch in group:
            for extent in batch.extents:
                if extent.data is None:
                    zero_range(self._fd, extent.offset, extent.length, punch=True)
                elif not self.direct.try_write(self._fd, extent.data, extent.offset):
                    pwrite_all(self._fd, extent.data, extent.offset)
                if self.on_written is not None:
                    self.on_written(extent.offset, extent.length)
        failpoint("applier.after_replica_write")

    @property
    def replica_sync_error(self) -> OSError | None:
        """The failure of the replica's fdatasync, once one failed (see sync_replica)."""
        return self._replica_commit.failed

    def _fdatasync_replica(self) -> None:
        """The replica's fdatasync (a worker thread). What a failure sets is set here, not by
        the awaiting caller, which may be cancelled meanwhile."""
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self.applier_error = f"the replica's fdatasync failed: {exc}"
            if not self.fenced:  # a failover's guest keeps what it reads until it stops
                with contextlib.suppress(OSError):
                    os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            log.error("disk=%s event=replica_sync_failed error=%r", self.disk_id, str(exc))
            raise

    def sync_replica_blocking(self) -> None:
        """:meth:`sync_replica` for a worker thread. Raises ReplicaSyncError."""
        self._replica_commit.mark()
        try:
            self._replica_commit.sync_now()
        except OSError as exc:
            raise self._sync_error(exc) from exc

    def _sync_error(self, exc: OSError) -> ReplicaSyncError:
        return ReplicaSyncError(
            exc.errno or errno.EIO, f"disk {self.disk_id}: fdatasync of the replica: {exc}"
        )

    async def sync_replica(self) -> None:
        """``fdatasync`` the replica. Raises ReplicaSyncError, then and on every later call:
        the kernel reports a writeback error once, and pages whose writeback failed stay in
        the page cache looking written, so a later ``fdatasync`` that succeeds, or a digest
        read from the cache, would call durable what may never reach the disk. Unless a
        failover serves the replica, its cached pages are dropped so that what reads it from
        now on (this process, and one restarted on it) sees what the disk holds. What depends
        on it stops, loudly: the applier (its cache is kept), a copy (its pieces are not
        counted durable), digests; an operator restarts the process server once the disk is
        fixed, and everything not recorded durable is applied or sent again. One sync at a
        time, shared by the callers that ask meanwhile (common.durable.GroupCommit)."""
        self._replica_commit.mark()
        try:
            await self._replica_commit.commit()
        except OSError as exc:
            raise self._sync_error(exc) from exc

    async def make_applied_durable(self) -> None:
        """fdatasync the replica, record applied_seq, free cache segments. Serialized: the
        recorded applied_seq only ever grows (the stop path and the applier may both call)."""
        async with self._durable_lock:
            target = self.applying_seq
            if target > self.applied_seq:
                await self.sync_replica()
                failpoint("applier.before_applied_saved")
                state = dict(self._state, applied_seq=target)
                await asyncio.to_thread(atomic_write_json, self.directory / STATE_FILE, state)
                self._state = state
                self.applied_seq = target
            self._last_durable_apply = time.monotonic()
            await self.cache.release_through(self.applied_seq)
            self._space_freed.set()

    # ----------------------------------------------------------------- resync support
    async def wait_applied(self, seq: int) -> None:
        """Wait until every batch up to ``seq`` is written to the replica (page cache)."""
        while self.applying_seq < seq:
            if self.applier_error:
                raise ReplicaError(f"disk {self.disk_id}: applier stopped: {self.applier_error}")
            self._applied_event.clear()
            await self._applied_event.wait()

    async def digests(
        self,
        offset: int,
        length: int,
        chunk: int,
        min_seq: int,
        width: int = 16,
        ranges: list[tuple[int, int]] | None = None,
    ) -> tuple[int, bytes]:
        """``(seq, digests)`` of the replica's chunks (of ``ranges``, default the whole range)
        once ``min_seq`` is applied; ``width`` 8 keeps the first 8 bytes of each XXH3-128."""
        if offset >= self.size:
            raise ReplicaError(f"disk {self.disk_id}: digest range starts past the end")
        if self.replica_sync_error is not None:
            raise ReplicaError(
                f"disk {self.disk_id}: no digests: the replica's fdatasync failed "
                f"({self.replica_sync_error})"
            )
        await self.wait_applied(min_seq)
        seq = self.applying_seq

        def compute() -> tuple[bytes, int]:
            out: list[bytes] = []
            read = 0
            for start, n in ranges or [(offset, length)]:
                if start >= self.size:
                    break
                result = chunk_digests(self._fd, start, n, chunk, self.size, mapped=True)
                read += result.bytes_read
                out.extend(d[:width] for d in result.digests)
            return b"".join(out), read

        digests, read = await asyncio.to_thread(compute)
        self.digest_bytes_read += read
        return seq, digests

    # ----------------------------------------------------------------- status
    def status(self, now_ns: int) -> dict[str, Any]:
        report = self.report or {}
        journaled = max(int(report.get("journaled_seq", 0)), self.cached_seq)
        oldest_pending = int(report.get("oldest_pending_ns", 0))
        lag = int(report.get("pending_bytes", 0))
        if journaled <= self.durable_seq:  # everything the agent last reported is here
            oldest_pending, lag = 0, 0
        rpo = max(0.0, (now_ns - oldest_pending) / 1e9) if oldest_pending else 0.0
        if self.applier_error:
            state = "error"
        elif self.fenced:
            state = "failed-over"
        elif report.get("state") in ("resync-required", "initial-sync"):
            state = str(report["state"])
        elif self.session is not None:
            state = "replicating"
        else:
            state = "disconnected"
        return {
            "agent": self.owner,
            "disk": self.disk_id,
            "state": state,
            "size": self.size,
            "journaled_seq": journaled,
            "acked_seq": self.durable_seq,
            "cached_seq": self.cached_seq,
            "applied_seq": self.applied_seq,
            "applying_seq": self.applying_seq,
            "lag_bytes": lag,
            "rpo_seconds": round(rpo, 3),
            "report_age_seconds": round(time.monotonic() - self.report_time, 1)
            if self.report
            else None,
            "cache_bytes": self.cache.bytes_used,
            "cache_quota": self.cache_quota,
            "received_batches": self.received_batches,
            "received_bytes": self.received_bytes,
            "applied_bytes": self.applied_bytes,
            "direct_written_bytes": self.direct.written_bytes,
            "bulk_copy": self.bulk_fence,
            "replica_path": str(self.replica_path),
            "digest_bytes_read": self.digest_bytes_read,
            "error": self.applier_error,
        }

    def offline_status(self) -> dict[str, Any]:
        """Status read from disk while the server is not running."""
        return {
            "agent": self.owner,
            "disk": self.disk_id,
            "state": "stopped",
            "size": self.size,
            "journaled_seq": self.cached_seq,
            "acked_seq": self.cached_seq,
            "cached_seq": self.cached_seq,
            "applied_seq": self.applied_seq,
            "lag_bytes": None,
            "rpo_seconds": None,
            "cache_bytes": self.cache.bytes_used,
            "cache_quota": self.cache_quota,
            "replica_path": str(self.replica_path),
        }

    # ----------------------------------------------------------------- point-in-time views
    def open_view(self, seq: int) -> PointView:
        """A view of the replica as at ``seq`` (a batch boundary with its history kept), kept
        up to date as the applier goes on. Raises ReplicaError, LookupError."""
        if self.undo is None:
            if seq != self.applying_seq:
                raise ReplicaError(f"disk {self.disk_id}: the undo log is off: only now exists")
        elif seq < self.undo.oldest_restorable():
            raise ReplicaError(
                f"disk {self.disk_id}: seq {seq} is older than the history kept "
                f"(oldest {self.undo.oldest_restorable()})"
            )
        if seq > self.applying_seq:
            raise ReplicaError(f"disk {self.disk_id}: seq {seq} is not applied yet")
        unseal = self.undo.log.unseal if self.undo is not None else None
        view = PointView(self._fd, self.size, seq, self.view_lock, unseal)
        with self.view_lock:
            if self.undo is not None:
                try:
                    view.add(self.undo.pieces_after(seq))
                except ValueError as exc:
                    raise ReplicaError(f"disk {self.disk_id}: {exc}") from exc
            self.views.append(view)
        return view

    def close_view(self, view: PointView) -> None:
        with self.view_lock:
            if view in self.views:
                self.views.remove(view)
            view.close()

    def pinned_seq(self) -> int | None:
        """The oldest seq an open view needs kept in the undo log."""
        return min((v.seq for v in self.views), default=None)

    def close(self) -> None:
        for view in list(self.views):
            self.close_view(view)
        self.cache.close()
        if self.undo is not None:
            self.undo.close()
        self.direct.close()
        os.close(self._fd)


def _restart_undo(
    directory: Path, disk_id: str, state: dict[str, Any], segment: int, sealer: Sealer | None
) -> UndoLog:
    for path in directory.iterdir():
        path.unlink()
    return UndoLog.open(directory, disk_id, state["applied_seq"], segment, sealer)


def recycle_count(cache_quota: int, cache_segment: int) -> int:
    """How many released cache segment files are kept for reuse (common/segment_log.py): an
    eighth of the segments the quota holds, from 2 to 16 (1 GiB at the default 64 MiB).

    The cache is released only as far as the replica is durable, each ``fdatasync`` of the
    replica taking up to a second or two under a bulk load, so it swings by several hundred
    MiB during an initial sync; with only two files kept, most new segments were new files
    (docs/operations.md). Measured before the cache dropped its pages once durable (a reused
    file now saves the block allocation, not the pages), 2 GiB of random data synced:
    8.7-9.3 s with 12 kept against 10.6-12.0 s with 2, process-server CPU 7.5-8.2 s against
    9.1-10.7 s."""
    return max(RECYCLE_MIN, min(RECYCLE_MAX, cache_quota // cache_segment // 8))


def check_disk_size(disk: ReplicaDisk, size: int) -> None:
    """Registration of an existing disk must keep its size. Raises ReplicaError."""
    if size != disk.size:
        raise ReplicaError(
            f"disk {disk.disk_id}: registered with size {size}, replica has {disk.size} (resize unsupported)"
        )


__all__ = ["TAG_BATCH", "ReplicaDisk", "ReplicaError", "check_disk_size"]
