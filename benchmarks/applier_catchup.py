"""How fast the process server's applier works off a backlog (not a ``tidemark-bench`` scenario).

A replica that is all data (so every write has old contents for the undo log), a cache holding
``--batches`` batches of 4 MiB of random 4-64 KiB writes, made durable; then the applier is
started and timed until it has applied them all. This is the rate at which a replica that fell
behind catches up, without the NBD front, the network or the agent. Compare trees with
``PYTHONPATH=TREE python -m benchmarks.applier_catchup``; numbers in docs/benchmarks.md (rpo).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import tempfile
import time
from pathlib import Path

from process_server.replica import ReplicaDisk
from protocol.batch import Extent, Limits, encode_batch, peek_batch_header

DISK_ID = "c1"
BATCH_BYTES = 4 << 20
BLOCK = 4096


def batch_extents(rng: random.Random, disk_size: int) -> list[Extent]:
    """Disjoint random writes of 4-64 KiB adding up to about BATCH_BYTES, in disk order."""
    taken: dict[int, int] = {}
    total = 0
    while total < BATCH_BYTES:
        length = rng.randrange(1, 17) * BLOCK
        offset = rng.randrange(0, (disk_size - length) // BLOCK) * BLOCK
        if any(offset < end and start < offset + length for start, end in taken.items()):
            continue
        taken[offset] = offset + length
        total += length
    return [Extent(s, e - s, rng.randbytes(e - s)) for s, e in sorted(taken.items())]


async def catch_up(root: Path, disk_size: int, batches: int, seed: int) -> float:
    """Seconds the applier takes to apply ``batches`` durable cached batches."""
    disk = ReplicaDisk.open(
        root,
        DISK_ID,
        limits=Limits(),
        apply_sync_interval=1.0,
        cache_quota=batches * BATCH_BYTES * 2,
        cache_segment=64 << 20,
        create=("bench", disk_size),
        undo=True,
        undo_segment=64 << 20,
    )
    try:
        fd = os.open(disk.replica_path, os.O_WRONLY)
        try:
            fill = os.urandom(8 << 20)
            for offset in range(0, disk_size, len(fill)):
                os.pwrite(fd, fill[: disk_size - offset], offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        rng = random.Random(seed)
        for seq in range(1, batches + 1):
            data = encode_batch(
                DISK_ID, seq, seq, batch_extents(rng, disk_size), newest_write_ns=seq
            )
            disk.append_batch(data, peek_batch_header(data))  # not held decoded: read back
        await disk.sync_cache()
        start = time.perf_counter()
        applier = asyncio.ensure_future(disk.run_applier())
        await disk.wait_applied(batches)
        seconds = time.perf_counter() - start
        applier.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await applier
        return seconds
    finally:
        disk.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200, help="4 MiB batches (default 200)")
    parser.add_argument("--disk-gib", type=int, default=1, help="replica size (default 1 GiB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tmpdir", default=None)
    args = parser.parse_args()
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="tm-catchup-", dir=args.tmpdir) as tmp:
            seconds = asyncio.run(catch_up(Path(tmp), args.disk_gib << 30, args.batches, run))
        mb = args.batches * BATCH_BYTES / 1e6
        print(
            f"run {run + 1}: {args.batches} batches ({mb:.0f} MB) in {seconds:.2f} s: "
            f"{mb / seconds:.0f} MB/s"
        )


if __name__ == "__main__":
    main()
