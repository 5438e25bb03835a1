"""The process server's per-disk replica: applied_seq only grows, whoever records it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from common.durable import read_json
from process_server.replica import TAG_BATCH, ReplicaDisk
from protocol.batch import Extent, Limits, encode_batch, peek_batch_header


async def test_applied_seq_is_monotonic_under_concurrent_recording(tmp_path: Path) -> None:
    disk = ReplicaDisk.open(
        tmp_path,
        "r1",
        limits=Limits(),
        apply_sync_interval=0.0,
        cache_quota=1 << 30,
        cache_segment=64 << 10,
        create=("agent", 1 << 20),
    )
    for seq in range(1, 41):
        data = encode_batch(
            "r1",
            seq,
            seq,
            [Extent((seq % 16) * 4096, 4096, bytes([seq]) * 4096)],
            newest_write_ns=seq,
        )
        disk.append_batch(data, peek_batch_header(data))
    await disk.sync_cache()
    applier = asyncio.ensure_future(disk.run_applier())
    for _ in range(20):  # the stop path records applied_seq while the applier does too
        await asyncio.gather(disk.make_applied_durable(), asyncio.sleep(0.001))
    await disk.wait_applied(40)
    await disk.make_applied_durable()
    applier.cancel()
    assert read_json(tmp_path / "r1" / "state.json")["applied_seq"] == 40
    disk.close()
    reopened = ReplicaDisk.open(
        tmp_path,
        "r1",
        limits=Limits(),
        apply_sync_interval=0.0,
        cache_quota=1 << 30,
        cache_segment=64 << 10,
    )
    assert reopened.applied_seq == 40 and reopened.cache.first_seq == 41
    reopened.close()
    assert TAG_BATCH == 1
