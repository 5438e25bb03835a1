"""Resync against a fresh replica, on a real ProtectedDisk: what the agent reads and how far
it runs ahead of the replica.

The process server's side is a stand-in that answers digest requests as a fresh (all-holes)
replica would and records, for each request, the seq it asked the replica to have applied
and how far the journal had got. Two properties (agent/resync.py, steps 1 and 3):

- the source is not read for chunks the replica holds as zeros: a fresh replica costs the
  agent no hashing pass, only the shipper's one read of each reference;
- a range asks for digests only once the replica has applied all but the last ``APPLY_LAG``
  bytes (and one range) of resync data, so the journal never runs further ahead of the
  applier (without it, references, which cost the journal nothing, ran the whole disk ahead).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

from agent.disk import ProtectedDisk
from agent.resync import APPLY_LAG, CHUNK, RANGE, REF_MAX, Resyncer, _Pacer
from common.digests import zero_digest
from protocol.frames import DigestReply

MiB = 1 << 20


class FreshReplica:
    """Answers level-1 digest requests with the digests of zeros; records each request."""

    def __init__(self, disk: ProtectedDisk) -> None:
        self.disk = disk
        self.linked = {disk.disk_id}
        self.requests: list[tuple[int, int, int]] = []  # (offset, min_seq, journaled seq)

    async def request_digests(
        self,
        disk_id: str,
        offset: int,
        length: int,
        chunk: int,
        min_seq: int,
        **_: object,
    ) -> DigestReply:
        assert chunk == CHUNK, "a fresh replica needs no block digests"
        self.requests.append((offset, min_seq, self.disk.journaled_seq))
        end = min(offset + length, self.disk.size)
        digests = b"".join(zero_digest(min(chunk, end - pos)) for pos in range(offset, end, chunk))
        return DigestReply(disk_id, len(self.requests), offset, chunk, min_seq, digests)


async def test_fresh_replica_resync_reads_nothing_and_stays_within_the_apply_lag(
    tmp_path: Path,
) -> None:
    size = 24 * RANGE
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(size)
        for pos in range(0, size, 2 * MiB):  # 1 MiB of data in every 2 MiB, holes between
            f.seek(pos)
            f.write(os.urandom(MiB))
    disk = await ProtectedDisk.open("d0", image, tmp_path / "state", journal_quota=4 << 30)
    disk.copy_in_bulk = False  # the journal's order, and its pacing, are what is tested here
    try:
        replica = FreshReplica(disk)
        resyncer = Resyncer(disk, replica)  # type: ignore[arg-type]
        first_seq = disk.journaled_seq

        async def acknowledge() -> None:  # the shipper and the cache: everything, promptly
            while True:
                await disk.acknowledge(disk.journaled_seq)
                await asyncio.sleep(0.01)

        acks = asyncio.create_task(acknowledge())
        try:
            stats = await asyncio.wait_for(resyncer.resync_pass(), 60)
        finally:
            acks.cancel()

        assert stats.hashed_bytes == 0, stats  # nothing read to compare with zeros
        assert stats.sent_bytes == size // 2  # every data MiB journaled as a reference
        assert len(replica.requests) == size // RANGE
        assert disk.journaled_seq - first_seq == size // REF_MAX // 2  # 1 MiB references
        for offset, min_seq, journaled in replica.requests:
            assert min_seq <= journaled  # never a seq the journal does not hold (a hang)
            sent = (journaled - first_seq) * REF_MAX  # resync data journaled before the request
            # The replica must have applied all but the last APPLY_LAG bytes (+ one range).
            unapplied = (journaled - max(min_seq, first_seq)) * REF_MAX
            assert unapplied <= APPLY_LAG + RANGE // 2, (offset, min_seq, journaled)
            if sent >= APPLY_LAG + RANGE:  # so some range had finished that far back
                assert min_seq > first_seq, (offset, min_seq, journaled)
    finally:
        await disk.close()


def test_the_pacer_forgets_seqs_a_rebase_restarted() -> None:
    """After a rebase (seq numbering restarted, ``epoch`` bumped) no older seq is asked for:
    the replica will never apply it, and the digest request would wait until its timeout."""
    disk = SimpleNamespace(epoch=0, journaled_seq=0)
    pacer = _Pacer(disk)  # type: ignore[arg-type]
    for n in range(1, 9):  # eight ranges of 16 MiB each: seqs 100, 200, ...
        disk.journaled_seq = 100 * n
        pacer.range_done(n * RANGE)
    # APPLY_LAG bytes back from 8 ranges' worth: the range that finished at 8 * RANGE - LAG.
    assert pacer.applied_first(8 * RANGE) == 100 * ((8 * RANGE - APPLY_LAG) // RANGE)
    disk.epoch, disk.journaled_seq = 1, 5  # rebased: the journal restarts lower
    assert pacer.applied_first(8 * RANGE) == 0
    pacer.range_done(9 * RANGE)
    assert pacer.applied_first(9 * RANGE + APPLY_LAG) == 5
