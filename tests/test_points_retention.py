"""Retention of recovery points: by age, by undo quota, never past an open view, and thinning.
What is kept still materialises to the source as it was (SHA-256 computed here)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from common.config import HostPort, ServerConfig
from process_server.catalog import Catalog, Point
from process_server.points import PointsService
from process_server.replica import ReplicaDisk
from protocol.batch import Extent, Limits, encode_batch, peek_batch_header

SIZE = 1 << 20
HOUR = 3600 * 10**9
BASE = 1_700_000_000 * 10**9


def _cfg(tmp: Path, **kw) -> ServerConfig:
    return ServerConfig(
        path=tmp / "ps.toml",
        listen=HostPort("127.0.0.1", 0),
        state_dir=tmp,
        pki_dir=tmp,
        **kw,
    )


async def _history(tmp: Path, n: int) -> tuple[ReplicaDisk, Catalog, dict[int, str], asyncio.Task]:
    """A replica with ``n`` batches, each overwriting 64 KiB (so every undo record holds data),
    a point after each one, an hour apart (point i at BASE + i hours)."""
    disk = ReplicaDisk.open(
        tmp,
        "r1",
        limits=Limits(),
        apply_sync_interval=0.0,
        cache_quota=1 << 30,
        cache_segment=64 << 10,
        create=("agent", SIZE),
        undo=True,
        undo_segment=64 << 10,
    )
    catalog = Catalog(tmp / "catalog.sqlite")
    applier = asyncio.ensure_future(disk.run_applier())
    source = bytearray(SIZE)
    expected: dict[int, str] = {}
    for seq in range(1, n + 1):
        offset = (seq % 4) * (64 << 10)
        source[offset : offset + (64 << 10)] = bytes([seq]) * (64 << 10)
        data = encode_batch(
            "r1", seq, seq, [Extent(offset, 64 << 10, bytes([seq]) * (64 << 10))], newest_write_ns=1
        )
        disk.append_batch(data, peek_batch_header(data))
        await disk.sync_cache()
        await disk.wait_applied(seq)
        catalog.add(Point(f"p{seq}", "r1", seq, BASE + seq * HOUR, "crash-consistent"), 0)
        expected[seq] = hashlib.sha256(source).hexdigest()
    await disk.make_applied_durable()
    return disk, catalog, expected, applier


def _check_kept(disk: ReplicaDisk, catalog: Catalog, expected: dict[int, str]) -> list[int]:
    kept = [p.seq for p in catalog.points("r1")]
    for seq in kept:
        view = disk.open_view(seq)
        assert hashlib.sha256(view.read(0, SIZE)).hexdigest() == expected[seq], seq
        disk.close_view(view)
    return kept


async def test_age_quota_and_pins(tmp_path: Path) -> None:
    disk, catalog, expected, applier = await _history(tmp_path, 40)
    try:
        service = PointsService(
            _cfg(tmp_path, retention=10 * 3600.0, undo_quota=1 << 30), catalog, {"r1": disk}
        )
        before = disk.undo.bytes_used
        pinned = disk.open_view(5)  # a test failover at an old point
        await service.prune(disk, now_ns=BASE + 40 * HOUR)
        assert disk.undo.oldest_restorable() <= 5  # not released past the open view
        assert hashlib.sha256(pinned.read(0, SIZE)).hexdigest() == expected[5]
        disk.close_view(pinned)
        await service.prune(disk, now_ns=BASE + 40 * HOUR)
        kept = _check_kept(disk, catalog, expected)
        assert kept == list(range(30, 41))  # ten hours back, and the point at the horizon
        assert disk.undo.bytes_used < before

        service.cfg = _cfg(tmp_path, retention=100 * 3600.0, undo_quota=4 * (64 << 10))
        await service.prune(disk, now_ns=BASE + 40 * HOUR)
        kept = _check_kept(disk, catalog, expected)
        assert kept and kept[0] > 30 and kept[-1] == 40
        assert "undo quota" in (service.status(disk)["retention_note"] or "")
    finally:
        applier.cancel()
        await asyncio.gather(applier, return_exceptions=True)
        disk.close()
        catalog.close()


async def test_thinning_keeps_one_point_an_hour_and_every_manual_one(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "c.sqlite")
    minute = 60 * 10**9
    for i in range(180):  # three hours of one point a minute
        catalog.add(Point(f"c{i}", "d", i + 1, BASE + i * minute, "crash-consistent"), 0)
    catalog.add(Point("m", "d", 500, BASE + 5 * minute + 1, "manual", "keep me"), 0)
    dropped = catalog.thin("d", keep_all_after_ns=BASE + 120 * minute, bucket_ns=HOUR)
    left = catalog.points("d")
    old = [p for p in left if p.time_ns < BASE + 120 * minute and p.kind == "crash-consistent"]
    assert len(old) == len({p.time_ns // HOUR for p in old}) <= 3
    assert any(p.id == "m" for p in left)
    assert len([p for p in left if p.time_ns >= BASE + 120 * minute]) == 60
    assert dropped == 180 - 60 - len(old)
    catalog.close()
