"""The undo log is used by one side at a time: a release (pruning) never rolls or deletes a
segment while the applier's worker thread is appending an undo record to it."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from common.config import HostPort, ServerConfig
from process_server.catalog import Catalog, Point
from process_server.points import PointsService
from process_server.replica import ReplicaDisk
from protocol.batch import Extent, Limits, encode_batch, peek_batch_header

K64 = 64 << 10


def _open(root: Path) -> ReplicaDisk:
    return ReplicaDisk.open(
        root,
        "r1",
        limits=Limits(),
        apply_sync_interval=0.0,
        cache_quota=1 << 30,
        cache_segment=K64,
        create=("agent", 1 << 20),
        undo=True,
        undo_segment=1 << 20,
    )


async def _put(disk: ReplicaDisk, seq: int) -> None:
    data = encode_batch("r1", seq, seq, [Extent(0, K64, bytes([seq]) * K64)], newest_write_ns=1)
    disk.append_batch(data, peek_batch_header(data))
    await disk.sync_cache()


async def test_prune_waits_for_the_undo_record_being_appended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: the 5 s prune released the undo log from the event loop while the
    applier's thread was inside the pwritev of the next batch's record. The open segment's
    last seq was still the release seq, so the release rolled a new segment and deleted the
    file being written: the record was lost, a view at the point read newer bytes and a
    restart reset the history. The prune must wait for the group in flight."""
    real_pwritev = os.pwritev
    in_append, go_on = threading.Event(), threading.Event()
    armed = [False]

    def hooked(fd: int, buffers: list[bytes], offset: int, *rest: int) -> int:
        if (
            armed[0]
            and threading.current_thread() is not threading.main_thread()
            and "/undo/" in os.readlink(f"/proc/self/fd/{fd}")
        ):
            armed[0] = False
            written = real_pwritev(fd, buffers, offset, *rest)  # in the kernel ...
            in_append.set()
            go_on.wait(10)  # ... while the event loop prunes
            return written
        return real_pwritev(fd, buffers, offset, *rest)

    monkeypatch.setattr(os, "pwritev", hooked)
    disk = _open(tmp_path)
    catalog = Catalog(tmp_path / "catalog.sqlite")
    cfg = ServerConfig(
        path=tmp_path / "ps.toml",
        listen=HostPort("127.0.0.1", 0),
        state_dir=tmp_path,
        pki_dir=tmp_path,
    )
    points = PointsService(cfg, catalog, {"r1": disk})
    applier = asyncio.ensure_future(disk.run_applier())
    try:
        for seq in (1, 2, 3):
            await _put(disk, seq)
            await disk.wait_applied(seq)
        await disk.make_applied_durable()
        catalog.add(Point("p3", "r1", 3, time.time_ns(), "manual"), time.time_ns())
        armed[0] = True
        await _put(disk, 4)  # the applier's thread starts the undo record of batch 4
        assert await asyncio.to_thread(in_append.wait, 10)
        pruning = asyncio.ensure_future(points.prune(disk))  # keeps history after point p3
        await asyncio.sleep(0.3)
        go_on.set()
        await asyncio.wait_for(pruning, 10)
        await disk.wait_applied(4)
        await _put(disk, 5)
        await disk.wait_applied(5)
        await disk.make_applied_durable()
        view = disk.open_view(3)
        try:
            assert view.read(0, 1) == b"\x03", "the view at seq 3 reads bytes of a later batch"
        finally:
            disk.close_view(view)
    finally:
        go_on.set()
        applier.cancel()
        await asyncio.gather(applier, return_exceptions=True)
        disk.close()
    reopened = _open(tmp_path)
    try:
        assert reopened.undo is not None
        assert reopened.undo.oldest_restorable() <= 3, "the history was reset by the restart"
        view = reopened.open_view(3)
        assert view.read(0, 1) == b"\x03"
        reopened.close_view(view)
    finally:
        reopened.close()
        catalog.close()
