"""One replicated disk on the process server: its batch cache, its replica file and its applier.

Rules it keeps:
- A batch is acknowledged only after it is in the cache and the cache is fdatasync'ed.
- The applier applies cached batches in seq order, each exactly once in effect
  (a batch holds the final contents of its extents, so replay is idempotent),
  verifies every extent digest, and records ``applied_seq`` only after the replica
  is fdatasync'ed; the state file is replaced atomically.
- Nothing from the wire becomes a path: the directory is named by a validated disk id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from common.digests import chunk_digests
from common.durable import atomic_write_json, pwrite_all, read_json, zero_range
from common.errors import IntegrityError, TidemarkError
from common.segment_log import Cursor, SegmentLog
from protocol.batch import Batch, BatchHeader, Limits, decode_batch, validate_disk_id
from protocol.errors import ErrorCode, ProtocolError

log = logging.getLogger("tidemark.ps.replica")

TAG_BATCH = 1
STATE_FILE = "state.json"
DECODED_LIMIT = 64 << 20  # verified batches kept in memory for the applier (beyond: re-read)
REPLICA_FILE = "replica.img"


class ReplicaError(TidemarkError):
    """A replica cannot be created or used (size mismatch, owner mismatch, corrupt state)."""


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
    ) -> None:
        self.directory = directory
        self.disk_id: str = state["disk_id"]
        self.owner: str = state["owner"]
        self.size: int = state["size"]
        self._state = state
        self.cache = cache
        self._fd = replica_fd
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
        self._decoded: dict[int, Batch] = {}
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
            }
            atomic_write_json(state_path, state)
        else:
            raise ReplicaError(f"no replica for disk {disk_id!r}")
        cache = SegmentLog.open(
            directory / "cache", base_seq=state["applied_seq"] + 1, segment_bytes=cache_segment
        )
        if cache.last_seq < state["applied_seq"]:
            raise IntegrityError(
                f"{directory}: cache ends at seq {cache.last_seq} before applied seq {state['applied_seq']}"
            )
        fd = os.open(directory / REPLICA_FILE, os.O_RDWR)
        return cls(directory, state, cache, fd, limits, apply_sync_interval, cache_quota)

    @property
    def replica_path(self) -> Path:
        return self.directory / REPLICA_FILE

    @property
    def cached_seq(self) -> int:
        """Newest seq appended to the cache (durable once ``durable_seq`` reaches it)."""
        return self.cache.last_seq

    # ----------------------------------------------------------------- receiving
    async def wait_for_cache_space(self, nbytes: int) -> None:
        """Backpressure: wait until the cache has room for ``nbytes`` more."""
        while (
            self.cache.bytes_used + nbytes > self.cache_quota
            and self.applying_seq < self.cached_seq
        ):
            self._space_freed.clear()
            await self._space_freed.wait()

    def append_batch(self, data: bytes, header: BatchHeader, decoded: Batch | None = None) -> None:
        """Append a received batch to the cache (page cache; durable after :meth:`sync_cache`).
        Raises ProtocolError(SEQ_GAP) when it does not follow the cache."""
        if header.first_seq != self.cached_seq + 1:
            raise ProtocolError(
                ErrorCode.SEQ_GAP,
                f"disk {self.disk_id}: batch starts at seq {header.first_seq}, expected {self.cached_seq + 1}",
            )
        self.cache.append(TAG_BATCH, header.first_seq, header.last_seq, (data,))
        if decoded is not None and self._decoded_bytes + header.raw_bytes <= DECODED_LIMIT:
            self._decoded[header.first_seq] = decoded  # the applier need not decode it again
            self._decoded_bytes += header.raw_bytes
        self.received_batches += 1
        self.received_bytes += header.raw_bytes
        self.newest_cached_write_ns = max(self.newest_cached_write_ns, header.newest_write_ns)
        self._cache_appended.set()

    async def sync_cache(self) -> int:
        """fdatasync the cache (group commit); returns the seq now durable."""
        target = self.cached_seq
        await self.cache.sync()
        if target > self.durable_seq:
            self.durable_seq = target
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
            if self.applying_seq >= self.durable_seq:
                if self.applying_seq > self.applied_seq:
                    await self.make_applied_durable()
                self._cache_durable.clear()
                if self.applying_seq >= self.durable_seq:
                    await self._cache_durable.wait()
                continue
            records = self.cache.read_records(
                self.applying_seq + 1, 16 << 20, cursor, max_records=64
            )
            for record in records:
                if record.last_seq > self.durable_seq:
                    break
                if record.first_seq != self.applying_seq + 1:
                    raise IntegrityError(
                        f"{self.directory}: cache record {record.first_seq}..{record.last_seq} "
                        f"does not follow applied seq {self.applying_seq}"
                    )
                decoded = self._decoded.pop(record.first_seq, None)
                if decoded is not None:
                    self._decoded_bytes -= decoded.header.raw_bytes
                try:
                    batch = await asyncio.to_thread(self._apply_record, record.payload, decoded)
                except ProtocolError as exc:
                    raise IntegrityError(
                        f"{self.directory}: cached batch {record.first_seq}..{record.last_seq}: {exc}"
                    ) from exc
                self.applying_seq = record.last_seq
                self._applied_event.set()
                self.applied_bytes += batch.header.raw_bytes
                self.newest_applied_write_ns = max(
                    self.newest_applied_write_ns, batch.header.newest_write_ns
                )
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

    def _apply_record(self, payload: bytes | memoryview, decoded: Batch | None = None) -> Batch:
        """Decode (verifying every digest) and write one batch into the replica. ``decoded``
        is the same batch as decoded and verified on receipt, when still in memory."""
        batch = decoded if decoded is not None else decode_batch(payload, self.limits)
        if batch.header.disk_id != self.disk_id:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"batch of disk {batch.header.disk_id}")
        for extent in batch.extents:
            if extent.offset + extent.length > self.size:
                raise ProtocolError(
                    ErrorCode.BAD_MESSAGE, f"extent past the end of disk {self.disk_id}"
                )
            if extent.data is None:
                zero_range(self._fd, extent.offset, extent.length, punch=True)
            else:
                pwrite_all(self._fd, extent.data, extent.offset)
        return batch

    async def make_applied_durable(self) -> None:
        """fdatasync the replica, record applied_seq, free cache segments. Serialized: the
        recorded applied_seq only ever grows (the stop path and the applier may both call)."""
        async with self._durable_lock:
            target = self.applying_seq
            if target > self.applied_seq:
                await asyncio.to_thread(os.fdatasync, self._fd)
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
        await self.wait_applied(min_seq)
        seq = self.applying_seq

        def compute() -> tuple[bytes, int]:
            out: list[bytes] = []
            read = 0
            for start, n in ranges or [(offset, length)]:
                if start >= self.size:
                    break
                result = chunk_digests(self._fd, start, n, chunk, self.size)
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

    def close(self) -> None:
        self.cache.close()
        os.close(self._fd)


def check_disk_size(disk: ReplicaDisk, size: int) -> None:
    """Registration of an existing disk must keep its size. Raises ReplicaError."""
    if size != disk.size:
        raise ReplicaError(
            f"disk {disk.disk_id}: registered with size {size}, replica has {disk.size} (resize unsupported)"
        )


__all__ = ["TAG_BATCH", "ReplicaDisk", "ReplicaError", "check_disk_size"]
