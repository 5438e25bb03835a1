"""Resync, initial sync, verify and scan: bring a replica level by comparing digests, sending
only what differs, while writes go on.

How (each side hashes locally; only digests and differing data cross the wire):
1. Level 1: from the process server, XXH3-128 of every 64 KiB chunk of a range of the
   replica once it has applied every write journaled before the request; then the same
   of the source, except holes and chunks the replica holds as zeros (all of a fresh
   replica), which are not hashed (nor read, but where a span read for a neighbour covers
   them): such a chunk differs wherever the source holds data, so it is journaled as a
   reference. Where the source's holes are unknown (a block device, a fully allocated
   file) that includes its all-zero chunks: the shipper reads them once and sends them as
   zero extents, where the hashing pass would have read them once and sent nothing.
   The records of the ranges just before are not waited for: they lie in other ranges
   (ranges are disjoint), so the agent hashes and journals ahead while the shipper and
   the process server catch up (a record of an earlier, interrupted pass that is not
   applied yet only makes its chunk differ, and be sent again); see 3 for how far.
2. Level 2, for each differing chunk: the chunk is read again, compared by 4 KiB block
   digests against the replica's, and only the differing blocks are journaled (an all-zero
   chunk as one zero extent). A chunk the replica holds as zeros (a fresh replica: the
   initial sync) needs no comparison: runs of such chunks are journaled as they are.
   Resync data travels as journal records, in seq order with the writes around it:
   exactly-once, crash safety and ordering come from the journal. The records are
   *references* (agent/journal.py): the shipper reads the bytes from the image when it
   builds the batch, so they are written once, to the replica, not also to the journal.
3. Flow control: a range's digest request also waits until the replica applied what was
   journaled up to the last range to finish with ``APPLY_LAG`` bytes of resync data
   journaled after it (``_Pacer``; the ranges in flight journal more meanwhile, up to
   ``PIPELINE`` ranges), so a resync that sends much runs at the pace of the process
   server's applier, not of its cache. Otherwise references, which cost the journal
   nothing, are journaled and acknowledged far ahead, and the process server's cache grows
   (measured: the whole ~1 GB of an initial sync at times) into page-cache pages it never
   wrote before, while its applier reads back and decodes again what no longer fits in
   memory (32 MiB, ``DECODED_LIMIT``, process_server/replica.py). A resync that sends
   little never waits (counting ranges instead of bytes made a 1% resync ~30% slower:
   every range waited for a round trip through the shipper's batching and the cache).
4. Progress is the dirty bitmap: a range's bits are cleared once its records are in the
   journal, and the bitmap is persisted after the journal is synced (a checkpoint), so an
   interrupted sync resumes where it stopped.

Rules it keeps: never clear a bit for data that is not journaled; a difference found by
verify is reported only if it persists when rechecked at a newer seq; the journal is kept
below half its quota by waiting, so resync never causes an overflow by itself.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from common.aio import first_leaf, wait_event
from common.digests import chunk_digests, zero_digest
from common.durable import atomic_write
from common.stage_trace import stamp
from protocol.errors import ProtocolError
from protocol.frames import DIGEST_SIZE

if TYPE_CHECKING:
    from agent.disk import ProtectedDisk
    from agent.shipper import Shipper

log = logging.getLogger("tidemark.agent.resync")

CHUNK = 64 << 10
BLOCK = 4 << 10
BLOCK_WIDTH = 8  # level-2 digests: the first 8 bytes of each block's XXH3-128
PIPELINE = 6  # ranges in flight at once (hash the next while the previous drains)
APPLY_LAG = 32 << 20  # resync data the replica may have left to apply (step 3)
RANGE = 16 << 20  # one level-1 request: 256 chunk digests
CHECKPOINT_BYTES = 256 << 20
CHECKPOINT_SECONDS = 2.0
REF_MAX = 1 << 20  # longest reference record (the shipper reads it into one batch)


_ZERO_BLOCK = zero_digest(4 << 10)[:8]


def chunk_length(offset: int, end: int, i: int) -> int:
    """Length of chunk ``i`` of a range starting at ``offset`` and clipped at ``end``."""
    return min(CHUNK, end - (offset + i * CHUNK))


def zero_chunks(offset: int, end: int, digests: list[bytes]) -> set[int]:
    """The chunks (indexes) of a range whose level-1 digests are those of zeros."""
    return {i for i, d in enumerate(digests) if d == zero_digest(chunk_length(offset, end, i))}


def split(digests: bytes) -> list[bytes]:
    return [digests[i : i + DIGEST_SIZE] for i in range(0, len(digests), DIGEST_SIZE)]


@dataclass
class SyncStats:
    """What one pass did; also the basis of progress reports."""

    total_bytes: int = 0
    done_bytes: int = 0
    hashed_bytes: int = 0  # source bytes read and hashed
    sent_bytes: int = 0  # data journaled for the replica
    zero_bytes: int = 0  # sent as zero extents (no data)
    equal_chunks: int = 0
    differing_chunks: int = 0
    started: float = 0.0

    def progress(self, phase: str) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done_bytes / elapsed
        left = self.total_bytes - self.done_bytes
        return {
            "phase": phase,
            "total_bytes": self.total_bytes,
            "done_bytes": self.done_bytes,
            "percent": round(100 * self.done_bytes / self.total_bytes, 1)
            if self.total_bytes
            else 100.0,
            "hashed_bytes": self.hashed_bytes,
            "sent_bytes": self.sent_bytes,
            "zero_bytes": self.zero_bytes,
            "rate_bytes_per_s": round(rate),
            "eta_seconds": round(left / rate, 1) if rate > 0 else None,
        }


class Resyncer:
    """The digest engine of one disk."""

    def __init__(self, disk: ProtectedDisk, shipper: Shipper) -> None:
        self.disk = disk
        self.shipper = shipper
        self.totals = SyncStats()  # over the life of the process (tests read these)
        self.wake = asyncio.Event()
        from agent.bulk_copy import BulkCopier  # (it builds on this module's units)

        self.bulk = BulkCopier(disk, shipper)  # the first sync's copy

    # ----------------------------------------------------------------- background loop
    async def run(self) -> None:
        """Resync whenever the disk needs it and the link is up (until cancelled)."""
        disk = self.disk
        while True:
            if (
                disk.bulk_open
                and (disk.bitmap is None or not disk.bulk_copy_allowed)
                and disk.disk_id in self.shipper.linked
            ):
                # A copy the process server may still hold, that may not go on (a restart did
                # not see its end, or the disk may no longer copy): ended first, before any
                # wait for the journal to drain (the held writes may be what it waits for).
                with contextlib.suppress(ConnectionError, TimeoutError, OSError, ProtocolError):
                    await self.bulk.end()
            if disk.bitmap is None:
                self.wake.clear()
                await wait_event(self.wake, 1.0)  # overflow or rebase may mark it anytime
                continue
            if disk.disk_id not in self.shipper.linked:
                await self.shipper.connected.wait()
                if disk.disk_id not in self.shipper.linked:  # connected without this disk:
                    await asyncio.sleep(0.05)  # no busy loop while it is not replicating
                continue
            if not disk.resync_ready():
                await asyncio.sleep(0.2)  # the journal is draining first
                continue
            try:
                try:
                    await self.resync_pass()
                except BaseExceptionGroup as group:
                    raise first_leaf(group) from None
            except (ConnectionError, TimeoutError, OSError, ProtocolError) as exc:
                log.warning("disk=%s event=resync_interrupted error=%r", disk.disk_id, str(exc))
                await asyncio.sleep(1.0)

    async def resync_pass(self) -> SyncStats:
        """One pass over the dirty bitmap. Raises ConnectionError if the link drops."""
        disk = self.disk
        assert disk.bitmap is not None
        await disk.begin_resync()
        stats = SyncStats(started=time.monotonic())
        regions = disk.bitmap.regions()
        stats.total_bytes = sum(length for _, length in regions)
        log.info("disk=%s event=resync_started bytes=%d", disk.disk_id, stats.total_bytes)
        if disk.bulk_open and (not disk.bulk_copy_allowed or not regions):
            await self.bulk.end()  # the held writes go first: the rest is in journal order
        if disk.bulk_copy_allowed and regions:
            try:
                copied = await self.bulk.copy(regions, stats)
            finally:
                self._add_totals(stats)
            if disk.overflowed or disk.bitmap is None:
                return stats
            # What is left goes in journal order (the copy's figures are counted already).
            regions = [] if copied else disk.bitmap.regions()
            stats = SyncStats(
                started=time.monotonic(), total_bytes=sum(length for _, length in regions)
            )
        checkpoint = {"time": time.monotonic(), "bytes": 0}
        checkpoint_lock = asyncio.Lock()
        gate = asyncio.Semaphore(PIPELINE)
        pacer = _Pacer(disk)

        async def one(pos: int, piece: int) -> None:
            """One range: hashed, compared and journaled while the next ones are hashed."""
            try:
                await self._journal_room()
                if disk.overflowed:
                    return
                await self._sync_range(pos, piece, stats, pacer.applied_first(stats.sent_bytes))
                pacer.range_done(stats.sent_bytes)
                if disk.overflowed or disk.bitmap is None:
                    return  # bits set meanwhile must survive: a new pass starts later
                disk.resynced(pos, piece)
                stats.done_bytes += piece
                checkpoint["bytes"] += piece
                disk.resync_progress = stats.progress("resync")
                due = (
                    checkpoint["bytes"] >= CHECKPOINT_BYTES
                    or time.monotonic() - checkpoint["time"] > CHECKPOINT_SECONDS
                )
                if due and not checkpoint_lock.locked():
                    async with checkpoint_lock:
                        checkpoint.update(time=time.monotonic(), bytes=0)
                        await disk.checkpoint_resync()
            finally:
                gate.release()

        counted = False
        try:
            async with asyncio.TaskGroup() as tg:
                for offset, length in regions:
                    for pos in range(offset, offset + length, RANGE):
                        await gate.acquire()
                        if disk.overflowed:
                            gate.release()
                            break
                        tg.create_task(one(pos, min(RANGE, offset + length - pos)))
            if disk.overflowed:
                return stats
            await disk.checkpoint_resync()
            # Counted before the disk can report level: whoever sees `replicating` sees this.
            self._add_totals(stats)
            counted = True
            if disk.bitmap is not None and disk.bitmap.empty and not disk.overflowed:
                await disk.finish_resync()
            log.info(
                "disk=%s event=resync_pass_done bytes=%d hashed=%d sent=%d zero=%d seconds=%.1f",
                disk.disk_id,
                stats.total_bytes,
                stats.hashed_bytes,
                stats.sent_bytes,
                stats.zero_bytes,
                time.monotonic() - stats.started,
            )
            return stats
        finally:
            disk.resync_progress = stats.progress("resync") if disk.bitmap is not None else None
            if not counted:
                self._add_totals(stats)

    def _add_totals(self, stats: SyncStats) -> None:
        t = self.totals
        for name in (
            "total_bytes",
            "done_bytes",
            "hashed_bytes",
            "sent_bytes",
            "zero_bytes",
            "equal_chunks",
            "differing_chunks",
        ):
            setattr(t, name, getattr(t, name) + getattr(stats, name))

    async def _journal_room(self) -> None:
        """Flow control: let the shipper drain the journal below half its quota."""
        while not self.disk.resync_ready():
            if self.disk.bitmap is None:
                return
            await asyncio.sleep(0.05)

    async def _sync_range(
        self, offset: int, length: int, stats: SyncStats, applied: int = 0
    ) -> None:
        """Level 1 over a range, then level 2 over its differing chunks (one request each).
        ``applied``: a seq the replica must have applied first (flow control, see above)."""
        disk = self.disk
        # Every write journaled so far; resync's own records only as far as the pacing asks
        # (they lie in other ranges).
        seq = max(disk.write_seq, applied)
        end = min(offset + length, disk.size)
        # The replica's digests first: a chunk it holds as zeros (all of a fresh replica)
        # differs wherever the source holds data, so the source's is not needed, and not
        # read (the shipper finds the zero blocks in it anyway). A write made after `seq`
        # only makes its chunk differ, and be sent again.
        stamp("digests_asked", offset, seq)
        reply = await self.shipper.request_digests(disk.disk_id, offset, length, CHUNK, seq)
        stamp("digests_got", offset, seq)
        replica = reply.split()
        zero_replica = zero_chunks(offset, end, replica)
        source = await asyncio.to_thread(
            chunk_digests,
            disk.image_fd,
            offset,
            length,
            CHUNK,
            disk.size,
            mapped=not disk.scan_only,  # another program writing it may shrink it
            skip=zero_replica,
        )
        stats.hashed_bytes += source.bytes_read
        differing = [
            i for i, (a, b) in enumerate(zip(source.digests, replica, strict=False)) if a != b
        ]
        stats.equal_chunks += len(source.digests) - len(differing)
        stats.differing_chunks += len(differing)
        if not differing:
            return
        # Differing chunks the replica holds as zeros: every non-zero source block differs,
        # so their block digests need not be asked for.
        zero_differing = zero_replica.intersection(differing)
        asked = [i for i in differing if i not in zero_differing]
        blocks = await self._block_digests(offset, length, asked) if asked else {}
        if disk.scan_only:  # another program writes the image: journal its bytes as read
            for i in zero_differing:
                blocks[i] = [_ZERO_BLOCK] * -(-chunk_length(offset, end, i) // BLOCK)
            asked = differing
        else:
            self._journal_zero_replica_chunks(offset, end, sorted(zero_differing), stats)
        stats.hashed_bytes += sum(chunk_length(offset, end, i) for i in asked)
        for i in asked:
            self._sync_chunk(offset + i * CHUNK, chunk_length(offset, end, i), blocks[i], stats)
            await asyncio.sleep(0)  # each chunk is one loop step; let writers in between

    def _journal_zero_replica_chunks(
        self, offset: int, end: int, chunks: list[int], stats: SyncStats
    ) -> None:
        """Chunks the replica holds as zeros differ wherever the source holds data: runs of
        them are journaled as references, unread (the shipper sends zero blocks it finds in
        them as zero extents, so holes stay holes)."""
        run_start = run_end = -1
        for i in chunks:
            start = offset + i * CHUNK
            stop = min(start + CHUNK, end)
            if start == run_end and stop - run_start <= REF_MAX:
                run_end = stop
                continue
            if run_start >= 0:
                self.disk.journal_ref(run_start, run_end - run_start)
                stats.sent_bytes += run_end - run_start
            run_start, run_end = start, stop
        if run_start >= 0:
            self.disk.journal_ref(run_start, run_end - run_start)
            stats.sent_bytes += run_end - run_start

    async def _block_digests(
        self, offset: int, length: int, chunks: list[int]
    ) -> dict[int, list[bytes]]:
        """Level 2: 8-byte digests of every 4 KiB block of the given chunks of the replica,
        as of now (one request for the whole range, chunks selected by a bitmask)."""
        mask = bytearray((-(-length // CHUNK) + 7) // 8)
        for i in chunks:
            mask[i >> 3] |= 1 << (i & 7)
        reply = await self.shipper.request_digests(
            self.disk.disk_id,
            offset,
            length,
            BLOCK,
            self.disk.write_seq,
            width=BLOCK_WIDTH,
            select_unit=CHUNK,
            select=bytes(mask),
        )
        digests = reply.split()
        out: dict[int, list[bytes]] = {}
        pos = 0
        end = min(offset + length, self.disk.size)
        for i in chunks:
            n = -(-chunk_length(offset, end, i) // BLOCK)
            out[i] = digests[pos : pos + n]
            pos += n
        return out

    def _sync_chunk(self, offset: int, length: int, replica: list[bytes], stats: SyncStats) -> None:
        """Journal exactly the blocks of one chunk that differ from the replica: references,
        or in scan mode the bytes read (the read and the appends in one loop step)."""
        disk = self.disk
        fresh = disk.read_image(offset, length)
        if xxhash.xxh3_128_digest(fresh) == zero_digest(length):
            if any(
                d != zero_digest(min(BLOCK, length - j * BLOCK))[:BLOCK_WIDTH]
                for j, d in enumerate(replica)
            ):
                disk.journal_zero(offset, length)  # holes stay holes on the replica
                stats.zero_bytes += length
            return
        runs: list[tuple[int, int]] = []  # differing blocks, [start, end) within the chunk
        for i in range(0, length, BLOCK):
            j = i // BLOCK
            digest = xxhash.xxh3_128_digest(fresh[i : i + BLOCK])[:BLOCK_WIDTH]
            if j < len(replica) and digest == replica[j]:
                continue
            stop = min(i + BLOCK, length)
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], stop)
            else:
                runs.append((i, stop))
        for start, stop in runs:
            if disk.scan_only:
                disk.journal_bytes(offset + start, fresh[start:stop])
            else:
                disk.journal_ref(offset + start, stop - start)
            stats.sent_bytes += stop - start

    # ----------------------------------------------------------------- verify
    async def verify(self, *, repair: bool = False, recheck: int = 3) -> dict[str, Any]:
        """Compare the whole source with the replica by digests at a consistent seq.

        Differences are rechecked at 4 KiB against newer seqs (a write in flight is not a
        difference); what persists is reported and, with ``repair``, marked for resync."""
        disk = self.disk
        stats = SyncStats(started=time.monotonic(), total_bytes=disk.size)
        candidates: list[int] = []
        seq = disk.journaled_seq
        pos = 0
        while pos < disk.size:
            piece = min(RANGE, disk.size - pos)
            s = disk.journaled_seq
            source = await asyncio.to_thread(
                chunk_digests, disk.image_fd, pos, piece, CHUNK, disk.size
            )
            stats.hashed_bytes += source.bytes_read
            reply = await self.shipper.request_digests(disk.disk_id, pos, piece, CHUNK, s)
            for i, (a, b) in enumerate(zip(source.digests, reply.split(), strict=False)):
                if a != b:
                    candidates.append(pos + i * CHUNK)
            pos += piece
            stats.done_bytes = pos
            disk.resync_progress = stats.progress("verify")
        differences: list[tuple[int, int]] = []
        for chunk_offset in candidates:
            length = min(CHUNK, disk.size - chunk_offset)
            blocks: list[tuple[int, int]] = []
            for _attempt in range(recheck):
                s = disk.journaled_seq
                fresh = disk.read_image(chunk_offset, length)  # same loop step as reading s
                reply = await self.shipper.request_digests(
                    disk.disk_id, chunk_offset, length, BLOCK, s, width=BLOCK_WIDTH
                )
                replica = reply.split()
                blocks = [
                    (chunk_offset + i, min(BLOCK, length - i))
                    for i in range(0, length, BLOCK)
                    if xxhash.xxh3_128_digest(fresh[i : i + BLOCK])[:BLOCK_WIDTH]
                    != replica[i // BLOCK]
                ]
                if not blocks:
                    break
            differences.extend(blocks)
        merged = _merge(differences)
        disk.resync_progress = None
        report: dict[str, Any] = {
            "ok": True,
            "disk": disk.disk_id,
            "seq": seq,
            "size": disk.size,
            "bytes_compared": disk.size,
            "hashed_bytes": stats.hashed_bytes,
            "equal": not merged,
            "differing_bytes": sum(length for _, length in merged),
            "differences": [[o, n] for o, n in merged[:10000]],
            "seconds": round(time.monotonic() - stats.started, 3),
            "repair": repair and bool(merged),
        }
        if repair and merged:
            disk.mark_dirty(merged, "verify-repair")
            self.wake.set()
        return report


class _Pacer:
    """Resync's flow control (module comment, step 3): which seq the replica must have
    applied before a range asks for its digests."""

    def __init__(self, disk: ProtectedDisk) -> None:
        self.disk = disk
        self._epoch = disk.epoch
        # As ranges finished, in order: (resync bytes journaled so far, the journal's seq).
        self._finished: list[tuple[int, int]] = []

    def applied_first(self, sent: int) -> int:
        """The newest seq after which at least APPLY_LAG bytes of resync data were journaled
        (0: none yet); never past the journal, whose numbering a rebase may restart."""
        self._same_numbering()
        k = bisect.bisect_right(self._finished, sent - APPLY_LAG, key=itemgetter(0))
        if not k:
            return 0
        del self._finished[: k - 1]  # older ones are never needed again
        return min(self._finished[0][1], self.disk.journaled_seq)

    def range_done(self, sent: int) -> None:
        self._same_numbering()
        self._finished.append((sent, self.disk.journaled_seq))

    def _same_numbering(self) -> None:
        if self.disk.epoch != self._epoch:  # a rebase restarted the seqs: forget the old ones
            self._epoch = self.disk.epoch
            self._finished.clear()


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if out and out[-1][0] + out[-1][1] >= offset:
            prev = out[-1]
            out[-1] = (prev[0], max(prev[0] + prev[1], offset + length) - prev[0])
        else:
            out.append((offset, length))
    return out


# ----------------------------------------------------------------- scan mode
class Scanner:
    """Scan mode: the agent is not in the write path. Every interval the whole source is
    hashed; chunks whose digest changed since the last scan are marked and resynced.
    The RPO is the scan interval (plus the time of one scan)."""

    def __init__(
        self, disk: ProtectedDisk, resyncer: Resyncer, interval: float, state_file: Path
    ) -> None:
        self.disk = disk
        self.resyncer = resyncer
        self.interval = interval
        self.state_file = state_file
        self.last_scan_started = 0.0
        self.scans = 0

    def _load(self) -> list[bytes] | None:
        try:
            raw = self.state_file.read_bytes()
        except FileNotFoundError:
            return None
        digests = split(raw)
        return digests if len(digests) == -(-self.disk.size // CHUNK) else None

    async def run(self) -> None:
        while True:
            await self.scan_once()
            await asyncio.sleep(self.interval)

    async def scan_once(self) -> int:
        """Hash the source, mark what changed, resync it; returns the bytes marked."""
        disk = self.disk
        self.last_scan_started = time.time()
        result = await asyncio.to_thread(
            chunk_digests, disk.image_fd, 0, disk.size, CHUNK, disk.size
        )
        previous = await asyncio.to_thread(self._load)
        changed = [
            (i * CHUNK, min(CHUNK, disk.size - i * CHUNK))
            for i, digest in enumerate(result.digests)
            if previous is None or previous[i] != digest
        ]
        if changed:
            disk.mark_dirty(_merge(changed), "scan" if previous is not None else "initial")
            while disk.bitmap is not None:  # the resync loop carries it out
                self.resyncer.wake.set()
                await asyncio.sleep(0.1)
        await asyncio.to_thread(atomic_write, self.state_file, b"".join(result.digests), mode=0o600)
        self.scans += 1
        return sum(length for _, length in changed)

    def rpo_seconds(self, now: float) -> float:
        return max(0.0, now - self.last_scan_started) if self.last_scan_started else 0.0


__all__ = ["BLOCK", "CHUNK", "Resyncer", "Scanner", "SyncStats"]
