"""A failed ``fdatasync`` of a replica is permanent (process_server/replica.py,
``ReplicaDisk.sync_replica``): the kernel reports a writeback error once, and the pages
whose writeback failed stay in the page cache looking written. A later ``fdatasync`` that
succeeds, or a digest read from the cache, must not call them durable: not the applier's
(its cache is kept), not a copy's (its pieces are not counted durable, its fence stays),
and no failback delta is read from such a replica; a failover's journal, replayed by a
restart, brings back what the replica lost.

Also: the copy's receive backlog counts a piece's cost, not only its bytes, so a flood of
zero pieces (no payload) cannot queue without bound. Real files, a real ``ReplicaDisk``;
only the replica's ``fdatasync`` is made to fail (EIO, as a failing disk returns it)."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import xxhash

import process_server.bulk as bulk_mod
from process_server.bulk import BACKLOG, PIECE_COST, BulkReceiver
from process_server.failback import FailbackManager
from process_server.pit import OverlayDisk
from process_server.replica import ReplicaDisk, ReplicaError, ReplicaSyncError
from process_server.server import ProcessServer
from protocol.batch import Extent, Limits, encode_batch, peek_batch_header
from protocol.control import FailbackRanges
from protocol.errors import ProtocolError
from protocol.frames import BULK_RAW, BULK_ZERO, BulkData

MIB = 1 << 20
SIZE = 8 * MIB


def _open(root: Path, *, create: bool = True) -> ReplicaDisk:
    """A new replica, or (``create`` False) the one at ``root`` opened again."""
    return ReplicaDisk.open(
        root,
        "d1",
        limits=Limits(),
        apply_sync_interval=0.0,
        cache_quota=1 << 30,
        cache_segment=1 * MIB,
        create=("agent", SIZE) if create else None,
    )


@pytest.fixture
def failing_replica_sync(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[ReplicaDisk, int], list[int]]]:
    """``arm(disk, times)``: the next ``times`` fdatasyncs of that disk's replica fail with
    EIO (every other file syncs as usual); returns the list of failures seen."""
    real = os.fdatasync
    armed: dict[int, int] = {}
    failures: list[int] = []

    def fdatasync(fd: int) -> None:
        if armed.get(fd, 0) > 0:
            armed[fd] -= 1
            failures.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    def arm(disk: ReplicaDisk, times: int) -> list[int]:
        armed[disk.replica_fd] = times
        return failures

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    yield arm


def test_a_failed_replica_sync_stops_the_applier_for_good(
    tmp_path: Path, failing_replica_sync: Callable[[ReplicaDisk, int], list[int]]
) -> None:
    async def main() -> None:
        disk = _open(tmp_path / "d")
        failures = failing_replica_sync(disk, 1)
        applier = asyncio.ensure_future(disk.run_applier())
        try:
            data = encode_batch("d1", 1, 1, [Extent(0, MIB, os.urandom(MIB))], newest_write_ns=1)
            disk.append_batch(data, peek_batch_header(data))
            await disk.sync_cache()
            # Applied to the replica's page cache; recording it durable fails: the applier
            # stops with the error (process_server/server.py stops it for good).
            with pytest.raises(ReplicaSyncError):
                await asyncio.wait_for(applier, 10)
            assert failures == [disk.replica_fd]
            # The disk works again, but what the failed sync covered is not known durable:
            # the next sync fails too, and nothing is recorded or released.
            with pytest.raises(ReplicaSyncError, match="earlier fdatasync"):
                await disk.make_applied_durable()
            assert len(failures) == 1, "the second attempt must not even try"
            assert disk.applied_seq == 0 and disk.applying_seq == 1
            assert disk.cache.first_seq == 1, "the cache let go of a batch not durably applied"
            assert disk.status(0)["state"] == "error"
            with pytest.raises(ReplicaError, match="fdatasync failed"):
                await disk.digests(0, MIB, 64 << 10, 0)
            # So does every other way to sync it: a failback's swap, a failover's commit.
            with pytest.raises(ReplicaSyncError):
                await disk.restart_sequence()
            with pytest.raises(ReplicaSyncError):
                await asyncio.to_thread(disk.sync_replica_blocking)
            assert len(failures) == 1
        finally:
            applier.cancel()
            await asyncio.gather(applier, return_exceptions=True)
            disk.close()

    asyncio.run(main())
    # A process started on the replica again begins from the last durable applied seq, and
    # finds the batch still cached to apply.
    reopened = _open(tmp_path / "d", create=False)
    try:
        assert reopened.applied_seq == 0 and reopened.cached_seq == 1
    finally:
        reopened.close()


def test_the_server_stops_the_applier_for_good_instead_of_retrying(
    tmp_path: Path, failing_replica_sync: Callable[[ReplicaDisk, int], list[int]]
) -> None:
    """ProcessServer._applier retries an I/O error (a full disk) with backoff; a failed sync
    of the replica it must not retry: it returns, the disk in error."""

    async def main() -> None:
        disk = _open(tmp_path / "d")
        try:
            failures = failing_replica_sync(disk, 1)
            data = encode_batch("d1", 1, 1, [Extent(0, MIB, os.urandom(MIB))], newest_write_ns=1)
            disk.append_batch(data, peek_batch_header(data))
            await disk.sync_cache()
            # (the method uses nothing of the server but its argument)
            await asyncio.wait_for(ProcessServer._applier(cast(Any, None), disk), 10)
            assert failures == [disk.replica_fd]
            assert disk.applier_error and "fdatasync" in disk.applier_error
            assert disk.applied_seq == 0
        finally:
            disk.close()

    asyncio.run(main())


def _piece(bulk_id: int, offset: int, data: bytes) -> BulkData:
    return BulkData(
        "d1", bulk_id, offset, len(data), BULK_RAW, xxhash.xxh3_64_intdigest(data), data
    )


def test_a_failed_replica_sync_counts_no_piece_durable_and_keeps_the_fence(
    tmp_path: Path, failing_replica_sync: Callable[[ReplicaDisk, int], list[int]]
) -> None:
    async def main() -> None:
        disk = _open(tmp_path / "d")
        receiver = BulkReceiver(disk)
        try:
            await receiver.begin()
            assert disk.bulk_fence
            await receiver.receive(_piece(1, 0, os.urandom(MIB)))
            await receiver.receive(_piece(2, MIB, os.urandom(MIB)))
            failing_replica_sync(disk, 1)
            # Answered (the agent goes on without the copy), not a dropped link.
            state = await receiver.sync(2, end=False)
            assert not state.active and "fdatasync failed" in state.error, state
            assert receiver.written == 2 and state.synced == receiver.synced == 0
            # A piece after it is dropped; asked again, nothing is counted durable, and the
            # copy cannot end: its held writes stay held, the fence saved.
            await receiver.receive(_piece(3, 2 * MIB, os.urandom(MIB)))
            assert receiver.dropped == 1
            state = await receiver.sync(2, end=False)
            assert state.synced == 0 and not state.active
            state = await receiver.sync(3, end=True)
            assert state.synced == 0 and not state.active and "fdatasync" in state.error
            assert disk.bulk_fence
        finally:
            receiver.close()
            disk.close()

    asyncio.run(main())
    reopened = _open(tmp_path / "d", create=False)
    try:
        assert reopened.bulk_fence, "a restarted process server must still hold the writes"
    finally:
        reopened.close()


def test_zero_pieces_count_against_the_receive_backlog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zero pieces carry no payload; with the writers stuck, a flood of them waits for room
    once BACKLOG / PIECE_COST are queued instead of queueing without bound."""
    gate = threading.Event()
    real_zero_range = bulk_mod.zero_range

    def stuck_zero_range(fd: int, offset: int, length: int, *, punch: bool) -> None:
        gate.wait(30)
        real_zero_range(fd, offset, length, punch=punch)

    monkeypatch.setattr(bulk_mod, "zero_range", stuck_zero_range)
    bound = BACKLOG // PIECE_COST

    async def main() -> None:
        disk = _open(tmp_path / "d")
        receiver = BulkReceiver(disk)
        try:
            await receiver.begin()

            async def flood() -> None:
                for bulk_id in range(1, 4 * bound + 1):
                    offset = (bulk_id * 4096) % SIZE
                    await receiver.receive(BulkData("d1", bulk_id, offset, 4096, BULK_ZERO, 0, b""))

            sender = asyncio.ensure_future(flood())
            await asyncio.sleep(0.5)
            assert not sender.done(), "every zero piece was queued: nothing bounds them"
            queued = receiver.expected - 1
            assert bound - 2 <= queued <= bound + 1, (queued, bound)
            gate.set()
            await asyncio.wait_for(sender, 60)
            await receiver.drain()
            assert receiver.written == 4 * bound
        finally:
            gate.set()
            receiver.close()
            disk.close()

    asyncio.run(main())


def test_no_failback_delta_is_read_from_a_replica_whose_sync_failed(
    tmp_path: Path, failing_replica_sync: Callable[[ReplicaDisk, int], list[int]]
) -> None:
    """A failback's delta is read from the replica and journaled after the guest's writes,
    so it wins over them on the master target. After a failed fdatasync the replica may read
    back what the disk held before: the delta is refused until a restart on a fixed disk has
    written the failover journal back into the replica. (Only the disk and the failover's
    id are reached before the refusal; without it the manager would go on to read the
    replica for the reported ranges and append them to the failover's journal.)"""

    async def main() -> None:
        disk = _open(tmp_path / "d")
        try:
            failing_replica_sync(disk, 1)
            with pytest.raises(ReplicaSyncError):
                await disk.sync_replica()
            manager = FailbackManager(cast(Any, SimpleNamespace(disks={"d1": disk})))
            manager._ranges["d1"] = [
                FailbackRanges("d1", ranges=((0, MIB),), alternate=False, full_compare=False)
            ]
            failover = SimpleNamespace(disk_id="d1", overlay=None, record={})
            with pytest.raises(ProtocolError, match="whose fdatasync failed"):
                await manager._prepare_delta(cast(Any, failover))
            assert failover.record == {}  # no delta recorded as prepared
        finally:
            disk.close()

    asyncio.run(main())


def test_a_restart_writes_the_failover_journal_back_over_lost_replica_pages(
    tmp_path: Path, failing_replica_sync: Callable[[ReplicaDisk, int], list[int]]
) -> None:
    """A committed failover writes the guest's writes into the replica after its journal.
    When the replica's fdatasync fails, pages it failed to write back may read as what the
    disk held before; the journal still holds those writes (nothing is released after a
    failed sync), and the overlay of a restarted process server writes every record in it
    back into the replica before its export serves a read (OverlayDisk._replay)."""
    guest = os.urandom(3 * MIB)
    replica: list[Path] = []

    async def main() -> None:
        disk = _open(tmp_path / "d")
        replica.append(disk.replica_path)
        try:
            overlay = OverlayDisk(
                "d1", disk.open_view(0), tmp_path / "failover", direct_fd=disk.replica_fd
            )
            try:
                await overlay.write(MIB, guest)
                await overlay.flush()  # the guest's FLUSH: its journal is durable
                failing_replica_sync(disk, 1)
                with pytest.raises(ReplicaSyncError):
                    await disk.sync_replica()
            finally:
                overlay.close()
        finally:
            disk.close()
        # What the disk held before: the replica's pages lost (a fresh replica: zeros).
        fd = os.open(replica[0], os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(len(guest)), MIB)
        finally:
            os.close(fd)
        # The restart, on a fixed disk.
        again = _open(tmp_path / "d", create=False)
        try:
            OverlayDisk(
                "d1", again.open_view(0), tmp_path / "failover", direct_fd=again.replica_fd
            ).close()
        finally:
            again.close()

    asyncio.run(main())
    with open(replica[0], "rb") as f:  # read outside the code under test
        f.seek(MIB)
        assert xxhash.xxh3_128_digest(f.read(len(guest))) == xxhash.xxh3_128_digest(guest)
