"""An initial sync's copy: the source's data sent straight into the replica, outside the
journal, while the writes made meanwhile are journaled, cached and held back.

Why: through the journal every byte of an initial sync is cached, recorded in the undo log
and applied in seq order, one batch after another, at the pace of the process server's
applier (docs/resync.md, "The initial sync's pace"). No recovery point exists before the
first sync completes and the replica is not consistent until then, so the copy need not be
in journal order. It only needs every write made during the copy to land after it.

How:
1. ``bulk-begin``: the process server stops applying the disk's batches (saved in its state,
   so a restart keeps it). Writes go on being journaled, shipped and cached as always.
2. The dirty ranges are compared by chunk digests with the replica, as a resync does, except
   that nothing waits for the applier (it is held): a chunk the replica holds as zeros (all
   of a fresh replica) is filled from the source's data extents, its zero blocks skipped so
   holes stay holes; a chunk that differs otherwise is sent whole. Reading, finding zero
   blocks, compressing and hashing run in threads; the event loop only sends.
3. The process server writes the pieces (``BulkData``) with ``O_DIRECT`` from its own
   threads (process_server/bulk.py). At most ``window_bytes`` are sent and not yet written
   there.
4. A checkpoint (``bulk-sync``) returns once the pieces up to it are durable in the replica;
   only then are their ranges cleared from the bitmap (and the bitmap saved), so an
   interrupted copy resumes where it stopped.
5. ``bulk-sync`` with ``end``: the fence lifts and the held writes are applied in seq order
   over the copy. Each write made during the copy is applied after the copy of its region,
   so its bytes are the ones that stay, whatever the copy read there (before the write, after
   it, or during it).

What would break 5 is an image change that is not in the journal, after an older journaled
write of the same region: the write would be applied over the newer bytes the copy read.
Such changes come from a journal overflow (writes recorded in the bitmap only), an unclean
stop (the image may be ahead of the journal) and regions marked by an operator or a rebase.
Each of them turns the copy off for good (``bulk_copy`` in the disk's state, saved with the
event); a copy under way stops and is ended, and the sync goes on in journal order, where
seq order keeps it correct. ``bulk_open`` (saved before ``bulk-begin``, cleared after the
end) makes a restarted agent end a copy the process server may still be holding.

The process server may end the copy on its own (its cache half full of held writes): pieces
after that are dropped, the agent learns it from ``bulk-state`` and goes on in journal order.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import xxhash

from agent.compression_level import AdaptiveLevel
from agent.resync import BLOCK, CHUNK, RANGE, zero_chunks
from common.digests import chunk_digests, data_ranges, zero_block_runs
from common.failpoints import failpoint
from protocol.batch import zstd_compressor
from protocol.control import BulkBegin, BulkState, BulkSync
from protocol.frames import BULK_MAX, BULK_RAW, BULK_ZERO, BULK_ZSTD, BulkData

if TYPE_CHECKING:
    from agent.disk import ProtectedDisk
    from agent.resync import SyncStats
    from agent.shipper import Shipper

log = logging.getLogger("tidemark.agent.bulk")

READERS = 2  # threads reading, compressing and hashing pieces
READ_AHEAD = 6  # pieces read and not yet sent
DIGESTS_AHEAD = 4  # ranges whose replica digests are asked for before their turn
CHECKPOINT_BYTES = 256 << 20
CHECKPOINT_SECONDS = 2.0
LEVEL_PATIENCE = 16  # pieces with neither the window full nor the readers behind: a step up


_Item: TypeAlias = "asyncio.Future[list[Piece]] | tuple[int, int] | None"
"""What the planner queues for the sender: a piece being read, the end of a range (offset,
length: every piece of it queued before), or the end of the copy."""


@dataclass(frozen=True, slots=True)
class Piece:
    """One ``BulkData`` as read: ``payload`` raw or compressed, empty for zeros."""

    offset: int
    length: int
    codec: int
    digest: int
    payload: bytes


class _PieceReader:
    """The threads' side: read a region, split it by zero blocks, compress and hash.

    Each thread reads into a buffer of its own, kept for the copy: a fresh 4 MiB ``bytes``
    per read is memory the kernel maps, zeroes and unmaps again, and zstd then reads it
    cold (measured here: 2 GiB read and compressed at -5 in 1.74 s with ``pread``, 0.84 s
    into a kept buffer). Compressed pieces are new bytes anyway; raw ones are copied out."""

    def __init__(self, fd: int, buffer_bytes: int) -> None:
        self.fd = fd
        self.buffer_bytes = buffer_bytes
        self._local = threading.local()

    def _buffer(self) -> bytearray:
        buffer: bytearray | None = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = bytearray(self.buffer_bytes)
        return buffer

    def read(self, start: int, end: int, fill: bool, level: int) -> list[Piece]:
        """``fill``: the replica holds zeros there, so zero blocks are not sent; otherwise
        they are sent as zeros (the replica's bytes there differ)."""
        data = self._buffer()
        n = end - start
        if n > len(data):
            raise ValueError(f"a piece of {n} bytes is longer than the read buffer")
        view = memoryview(data)
        got = os.preadv(self.fd, [view[:n]], start)
        if got != n:
            raise OSError(f"short read of the image at {start}: {got} of {n}")
        pieces = []
        for a, b, zero in zero_block_runs(data, n):
            if zero:
                if not fill:
                    pieces.append(Piece(start + a, b - a, BULK_ZERO, 0, b""))
                continue
            raw = view[a:b]
            digest = xxhash.xxh3_64_intdigest(raw)
            if level:
                packed = zstd_compressor(level).compress(raw)
                if len(packed) < len(raw):
                    pieces.append(Piece(start + a, b - a, BULK_ZSTD, digest, packed))
                    continue
            pieces.append(Piece(start + a, b - a, BULK_RAW, digest, bytes(raw)))
        return pieces


class BulkCopier:
    """The copy of one disk (module comment)."""

    def __init__(self, disk: ProtectedDisk, shipper: Shipper) -> None:
        self.disk = disk
        self.shipper = shipper
        self.piece_bytes = BULK_MAX  # set from the configuration by each copy
        self.copies = 0  # copies that ran to their end (tests read these)
        self.fallbacks = 0  # copies that stopped early, the sync going on in journal order
        self.checkpoints = 0  # bulk-syncs answered, the last of each copy included
        self.sent_bytes_total = 0  # piece bytes sent (compressed), over the process's life
        self._reset()

    def _reset(self) -> None:
        self._sent_id = 0
        self._sent_bytes = 0
        self._sent: collections.deque[tuple[int, int]] = collections.deque()  # (id, total)
        self._written_bytes = 0
        self._done: collections.deque[tuple[int, int, int]] = collections.deque()
        self._stopped = ""  # why the copy stopped early
        self._levels: collections.Counter[int] = collections.Counter()  # zstd level: reads
        self._checkpoint_task: asyncio.Future[BulkState] | None = None

    # ----------------------------------------------------------------- the copy
    async def copy(self, regions: list[tuple[int, int]], stats: SyncStats) -> bool:
        """Copy ``regions``. True: all of them are durable in the replica, cleared from the
        bitmap, and the copy is ended (held writes are being applied). False: it stopped
        early (refused, ended by the process server, or the disk may no longer copy); what
        was made durable is cleared, the rest is for the journal's order. Raises
        ConnectionError (the link dropped: the copy resumes on the next connection)."""
        disk = self.disk
        self._reset()
        cfg = self.shipper.cfg
        self.piece_bytes = max(BLOCK, min(BULK_MAX, cfg.max_batch_bytes) // BLOCK * BLOCK)
        disk.set_bulk_open(True)
        state = await self.shipper.ask_bulk(BulkBegin(disk.disk_id), disk.disk_id)
        failpoint("bulk.after_begin")
        if not state.active:
            log.info("disk=%s event=bulk_copy_refused reason=%r", disk.disk_id, state.error)
            await self.end()
            self.fallbacks += 1
            return False
        log.info(
            "disk=%s event=bulk_copy_started bytes=%d",
            disk.disk_id,
            sum(n for _, n in regions),
        )
        started = time.monotonic()
        await self._pieces(regions, stats)
        state = await self._checkpoint(stats, self._sent_id, end=True)
        if not self._stopped and (state.active or state.synced < self._sent_id):
            self._stopped = state.error or "the process server did not make every piece durable"
        disk.set_bulk_open(False)
        if self._stopped:
            self.fallbacks += 1
            log.warning(
                "disk=%s event=bulk_copy_stopped reason=%r sent=%d seconds=%.1f",
                disk.disk_id,
                self._stopped,
                self._sent_bytes,
                time.monotonic() - started,
            )
            return False
        self.copies += 1
        log.info(
            "disk=%s event=bulk_copy_done sent=%d seconds=%.1f levels=%s",
            disk.disk_id,
            self._sent_bytes,
            time.monotonic() - started,
            ",".join(f"{n}:{reads}" for n, reads in sorted(self._levels.items())),
        )
        return True

    async def _pieces(self, regions: list[tuple[int, int]], stats: SyncStats) -> None:
        """Plan, read and send every piece (or until the copy stops early); the last
        checkpoint is the caller's."""
        pool = concurrent.futures.ThreadPoolExecutor(READERS, "bulk-reader")
        reader = _PieceReader(self.disk.image_fd, self.piece_bytes)
        cfg = self.shipper.cfg
        level = AdaptiveLevel(
            cfg.compression_level, cfg.compression_fast_level, patience=LEVEL_PATIENCE
        )
        queue: asyncio.Queue[_Item] = asyncio.Queue()  # bounded by the read-ahead slots
        slots = asyncio.Semaphore(READ_AHEAD)
        try:
            async with asyncio.TaskGroup() as tg:
                plan = tg.create_task(self._plan(regions, stats, queue, slots, pool, reader, level))
                try:
                    await self._send_pieces(queue, slots, stats, level)
                except BaseException:
                    if self._checkpoint_task is not None:
                        self._checkpoint_task.cancel()
                    raise
                if self._checkpoint_task is not None:  # never beside the last checkpoint
                    await self._checkpoint_task
                plan.cancel()  # stopped early, it may wait for room that never comes
        finally:
            # A read under way finishes first (a few ms): none outlives the copy, or the
            # image's file descriptor, which a stop closes after it.
            pool.shutdown(wait=True, cancel_futures=True)

    async def end(self) -> None:
        """End a copy the process server may hold (a restart, or a disk that may no longer
        copy): its held writes are applied. Raises ConnectionError."""
        await self.shipper.ask_bulk(BulkSync(self.disk.disk_id, 0, True), self.disk.disk_id)
        self.disk.set_bulk_open(False)

    def _may_go_on(self) -> bool:
        if self._stopped:
            return False
        disk = self.disk
        if disk.overflowed or not disk.bulk_copy_allowed or disk.bitmap is None:
            self._stopped = "the disk may no longer copy (overflow, unclean stop or marked)"
            return False
        state = self.shipper.bulk_states.get(disk.disk_id)
        if state is not None and not state.active:
            self._stopped = state.error or "ended by the process server"
            return False
        return True

    # ----------------------------------------------------------------- planning (loop)
    async def _plan(
        self,
        regions: list[tuple[int, int]],
        stats: SyncStats,
        queue: asyncio.Queue[_Item],
        slots: asyncio.Semaphore,
        pool: concurrent.futures.ThreadPoolExecutor,
        reader: _PieceReader,
        level: AdaptiveLevel,
    ) -> None:
        """Each range: its replica digests, then its pieces handed to the reader threads (as
        the read-ahead allows), in order."""
        loop = asyncio.get_running_loop()
        ranges = [
            (pos, min(RANGE, offset + length - pos))
            for offset, length in regions
            for pos in range(offset, offset + length, RANGE)
        ]
        # The digests of the next ranges are asked for ahead: each request waits behind the
        # pieces already on the link.
        asked: collections.deque[asyncio.Task[list[tuple[int, int, bool]]]] = collections.deque()
        try:
            for i, (pos, piece) in enumerate(ranges):
                while len(asked) < DIGESTS_AHEAD and i + len(asked) < len(ranges):
                    ahead = ranges[i + len(asked)]
                    asked.append(asyncio.ensure_future(self._regions_to_send(*ahead, stats)))
                todo = await asked.popleft()
                if not self._may_go_on():
                    break
                for start, end, fill in todo:
                    await slots.acquire()
                    self._levels[level.level] += 1
                    job = loop.run_in_executor(pool, reader.read, start, end, fill, level.level)
                    await queue.put(job)
                await queue.put((pos, piece))  # its pieces are all queued before it
        finally:
            for task in asked:
                task.cancel()
        await queue.put(None)

    async def _regions_to_send(
        self, pos: int, length: int, stats: SyncStats
    ) -> list[tuple[int, int, bool]]:
        """``(start, end, fill)`` pieces of one range: the source's data where the replica
        holds zeros (``fill``), whole chunks where it holds something else."""
        disk = self.disk
        end = min(pos + length, disk.size)
        reply = await self.shipper.request_digests(disk.disk_id, pos, length, CHUNK, 0)
        replica = reply.split()
        zeros = zero_chunks(pos, end, replica)
        others = set(range(len(replica))) - zeros
        differing: set[int] = set()
        if others:  # a seeded replica: only chunks that differ are sent
            source = await asyncio.to_thread(
                chunk_digests, disk.image_fd, pos, length, CHUNK, disk.size, skip=zeros
            )
            stats.hashed_bytes += source.bytes_read
            differing = {i for i in others if source.digests[i] != replica[i]}
            stats.equal_chunks += len(others) - len(differing)
        stats.differing_chunks += len(differing) + len(zeros)
        kinds = [
            "fill" if i in zeros else "whole" if i in differing else "" for i in range(len(replica))
        ]
        out: list[tuple[int, int, bool]] = []
        for kind, run in itertools.groupby(range(len(replica)), kinds.__getitem__):
            chunks = list(run)
            a, b = pos + chunks[0] * CHUNK, min(pos + (chunks[-1] + 1) * CHUNK, end)
            if kind == "fill":
                for s, e in data_ranges(disk.image_fd, a, b):
                    out.extend(self._split(s, e, True))
            elif kind == "whole":
                out.extend(self._split(a, b, False))
        return out

    def _split(self, start: int, end: int, fill: bool) -> list[tuple[int, int, bool]]:
        """Pieces of at most ``piece_bytes``, cut at block boundaries."""
        start -= start % BLOCK
        out = []
        while start < end:
            stop = min(end, start + self.piece_bytes)
            out.append((start, stop, fill))
            start = stop
        return out

    # ----------------------------------------------------------------- sending (loop)
    async def _send_pieces(
        self,
        queue: asyncio.Queue[_Item],
        slots: asyncio.Semaphore,
        stats: SyncStats,
        level: AdaptiveLevel,
    ) -> None:
        disk = self.disk
        window = self.shipper.cfg.window_bytes
        last_checkpoint = (time.monotonic(), 0)
        while (item := await queue.get()) is not None:
            if isinstance(item, asyncio.Future):
                encoder_bound = not item.done()
                pieces = await item
                slots.release()
                for piece in pieces:
                    if not self._may_go_on():
                        return
                    link_bound = await self._window(window)
                    if not self._may_go_on():  # ended while it waited (pieces now dropped)
                        return
                    self._sent_id += 1
                    await self.shipper.send_bulk(
                        BulkData(
                            disk.disk_id,
                            self._sent_id,
                            piece.offset,
                            piece.length,
                            piece.codec,
                            piece.digest,
                            piece.payload,
                        )
                    )
                    self._sent_bytes += len(piece.payload)
                    self.sent_bytes_total += len(piece.payload)
                    self._sent.append((self._sent_id, self._sent_bytes))
                    if piece.codec == BULK_ZERO:
                        stats.zero_bytes += piece.length
                    else:
                        stats.sent_bytes += piece.length
                    level.after_batch(link_bound=link_bound, encoder_bound=encoder_bound)
                    encoder_bound = False
                continue
            pos, length = item
            self._done.append((pos, length, self._sent_id))
            checkpoint = self._checkpoint_task
            if checkpoint is not None and checkpoint.done():
                self._checkpoint_task = None
                checkpoint.result()  # a failure (the link) ends the copy here
            since, sent = last_checkpoint
            due = (
                self._sent_bytes - sent >= CHECKPOINT_BYTES
                or time.monotonic() - since > CHECKPOINT_SECONDS
            )
            if due and self._checkpoint_task is None:
                last_checkpoint = (time.monotonic(), self._sent_bytes)
                # Through the pieces sent now: the task runs at the sender's next wait, which
                # may come after the next piece's id is taken and before that piece is sent
                # (the bandwidth limiter), and a count past what was sent ends the link.
                self._checkpoint_task = asyncio.ensure_future(
                    self._checkpoint(stats, self._sent_id)
                )

    async def _window(self, window: int) -> bool:
        """Wait until less than ``window`` bytes are sent and not yet written at the process
        server; True if it waited (the link, not the readers, is the limit)."""
        waited = False
        while (
            self._sent_bytes - self._written(self.shipper.bulk_states.get(self.disk.disk_id))
            >= window
        ):
            waited = True
            if not self._may_go_on():
                break  # the process server ended the copy: what is in flight is dropped
            self.shipper.bulk_event.clear()
            if self.disk.disk_id not in self.shipper.linked:
                raise ConnectionResetError("replication link lost")
            await self.shipper.bulk_event.wait()
        return waited

    def _written(self, state: BulkState | None) -> int:
        through = state.written if state is not None else 0
        while self._sent and self._sent[0][0] <= through:
            self._written_bytes = self._sent.popleft()[1]
        return self._written_bytes

    async def _checkpoint(self, stats: SyncStats, through: int, *, end: bool = False) -> BulkState:
        """Ask for every piece through ``through`` (sent already: taken when the checkpoint
        is asked for, not when it runs) to be made durable; clear the ranges it covers."""
        disk = self.disk
        state = await self.shipper.ask_bulk(BulkSync(disk.disk_id, through, end), disk.disk_id)
        self.checkpoints += 1
        while self._done and self._done[0][2] <= state.synced:
            pos, length, _ = self._done.popleft()
            disk.resynced(pos, length)
            stats.done_bytes += length
        disk.resync_progress = stats.progress("resync")
        await disk.checkpoint_resync()
        return state


__all__ = ["BulkCopier"]
