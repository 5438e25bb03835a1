"""The process server's per-disk replica: applied_seq only grows, whoever records it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import threading
from pathlib import Path

import pytest

from common.at_rest import Keyring, Sealer
from common.durable import read_json
from process_server.replica import TAG_BATCH, ReplicaDisk, recycle_count
from protocol.batch import (
    CODEC_RAW,
    Extent,
    Limits,
    decode_batch,
    encode_batch,
    peek_batch_header,
)
from tests.page_cache import resident_bytes


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


async def test_a_view_being_opened_learns_of_a_batch_applied_meanwhile(tmp_path: Path) -> None:
    """open_view reads the undo history while holding view_lock; a batch the applier records
    right then must reach the new view before the replica is overwritten (the soak found the
    applier looking at the list of views without the lock: the view then read bytes newer
    than its point). Made deterministic by holding open_view inside its read of the history
    while batch 2 arrives."""
    disk = ReplicaDisk.open(
        tmp_path,
        "v1",
        limits=Limits(),
        apply_sync_interval=0.0,
        cache_quota=1 << 30,
        cache_segment=64 << 10,
        create=("agent", 1 << 20),
        undo=True,
        undo_segment=64 << 10,
    )
    old, new = b"\x11" * 8192, b"\x22" * 8192
    applier = asyncio.ensure_future(disk.run_applier())
    try:
        data = encode_batch("v1", 1, 1, [Extent(0, len(old), old)], newest_write_ns=1)
        disk.append_batch(data, peek_batch_header(data))
        await disk.sync_cache()
        await disk.wait_applied(1)
        undo = disk.undo
        assert undo is not None
        reading, proceed = threading.Event(), threading.Event()
        original = undo.pieces_after

        def slow_pieces_after(seq: int) -> list:
            pieces = original(seq)  # the history as it is now: batch 2 not recorded yet
            reading.set()
            proceed.wait(10)
            return pieces

        undo.pieces_after = slow_pieces_after  # type: ignore[method-assign]
        opening = asyncio.ensure_future(asyncio.to_thread(disk.open_view, 1))
        assert await asyncio.to_thread(reading.wait, 10)
        data = encode_batch("v1", 2, 2, [Extent(0, len(new), new)], newest_write_ns=2)
        disk.append_batch(data, peek_batch_header(data))
        await disk.sync_cache()
        await asyncio.sleep(0.3)  # the applier records batch 2 meanwhile (and must then wait)
        proceed.set()
        view = await opening
        await disk.wait_applied(2)
        with open(disk.replica_path, "rb") as f:
            assert f.read(len(new)) == new  # the replica moved on ...
        assert view.read(0, len(old)) == old  # ... the view stayed at its point
        disk.close_view(view)
    finally:
        applier.cancel()
        await asyncio.gather(applier, return_exceptions=True)
        disk.close()


@pytest.mark.parametrize("sealed", [False, True])
async def test_batches_from_memory_and_from_the_cache_apply_alike(
    tmp_path: Path, sealed: bool
) -> None:
    """The applier takes batches verified on receipt from memory and moves its cache cursor
    past them; batches that arrive undecoded (as after a restart) are read back from the
    cache at that cursor. Alternating, across segment rolls, sealed or not, with the applier
    started late (a backlog) and then running alongside, the replica ends equal to the
    writes applied in order (the expected image is built here with plain bytes)."""
    sealer = None
    if sealed:
        key_file = tmp_path / "keys"
        key_file.write_text(f"1 {base64.b64encode(os.urandom(32)).decode()}\n")
        key_file.chmod(0o600)
        sealer = Sealer(Keyring.load(key_file), b"cache:m1")
    size = 1 << 20
    disk = ReplicaDisk.open(
        tmp_path / "ps",
        "m1",
        limits=Limits(),
        apply_sync_interval=0.0,
        cache_quota=1 << 30,
        cache_segment=32 << 10,  # a roll every few batches
        create=("agent", size),
        sealer=sealer,
    )
    rng = random.Random(7)
    expected = bytearray(size)

    async def send(seqs: range) -> None:
        for seq in seqs:
            n = rng.choice([4096, 8192, 12288])
            offset = rng.randrange(0, size - n, 4096)
            data = rng.randbytes(n)
            expected[offset : offset + n] = data
            encoded = encode_batch("m1", seq, seq, [Extent(offset, n, data)], newest_write_ns=seq)
            # Every seventh batch arrives undecoded: the applier must read it back.
            decoded = decode_batch(encoded, Limits()) if seq % 7 else None
            disk.append_batch(encoded, peek_batch_header(encoded), decoded)
            if seq % 5 == 0:
                await disk.sync_cache()
        await disk.sync_cache()

    await send(range(1, 61))  # a backlog: memory, cache, memory, ... in one pass
    applier = asyncio.ensure_future(disk.run_applier())
    try:
        async with asyncio.timeout(60):  # an applier that fails stops applying: no hang
            await disk.wait_applied(60)
            await send(range(61, 121))  # and while the applier runs
            await disk.wait_applied(120)
        await disk.make_applied_durable()
    finally:
        applier.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await applier
    replica = (tmp_path / "ps" / "m1" / "replica.img").read_bytes()
    disk.close()
    assert replica == bytes(expected)


async def test_a_cancelled_applier_returns_only_after_its_group_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping the server cancels the applier while a worker thread writes a group: the
    replica (and the O_DIRECT buffer) is closed right after, so the cancelled applier must
    wait for that thread rather than leave it writing into a closed descriptor."""
    disk = ReplicaDisk.open(
        tmp_path,
        "c1",
        limits=Limits(),
        apply_sync_interval=0.0,
        cache_quota=1 << 30,
        cache_segment=64 << 10,
        create=("agent", 1 << 20),
    )
    data = encode_batch("c1", 1, 1, [Extent(0, 4096, b"c" * 4096)], newest_write_ns=1)
    disk.append_batch(data, peek_batch_header(data))
    await disk.sync_cache()
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()
    real = disk._apply_records

    def slow_apply(items):  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(10)
        try:
            return real(items)
        finally:
            finished.set()

    monkeypatch.setattr(disk, "_apply_records", slow_apply)
    applier = asyncio.ensure_future(disk.run_applier())
    assert await asyncio.to_thread(entered.wait, 10)
    applier.cancel()
    await asyncio.sleep(0.1)
    assert not applier.done(), "the applier returned while its thread was still writing"
    release.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(applier, 10)
    assert finished.is_set()
    disk.close()
    with open(tmp_path / "c1" / "replica.img", "rb") as replica:
        assert replica.read(4096) == b"c" * 4096


def test_the_cache_keeps_an_eighth_of_its_quota_in_segments_for_reuse() -> None:
    """docs/operations.md, "Disk space: reused log segments"."""
    mib = 1 << 20
    assert recycle_count(16 << 30, 64 * mib) == 16  # the defaults: 1 GiB kept at most
    assert recycle_count(4 << 30, 64 * mib) == 8
    assert recycle_count(1 << 30, 64 * mib) == 2
    assert recycle_count(16 * mib, 64 * mib) == 2  # a quota under one segment
    assert recycle_count(1 << 40, 64 * mib) == 16


async def test_cache_and_undo_leave_the_page_cache_and_still_serve_their_readers(
    tmp_path: Path,
) -> None:
    """The cache's batches and the undo log's records are out of the page cache once durable
    (checked with util-linux's ``fincore``); the applier still reads the batches back (here
    none is held in memory) and a view at the first point still reads that point's bytes,
    both from the disk."""
    disk = ReplicaDisk.open(
        tmp_path,
        "u1",
        limits=Limits(),
        apply_sync_interval=0.0,
        cache_quota=1 << 30,
        cache_segment=1 << 20,
        create=("agent", 4 << 20),
        undo=True,
        undo_segment=1 << 20,
    )
    page = os.sysconf("SC_PAGESIZE")

    rng = random.Random(7)
    first = rng.randbytes(4 << 20)
    for seq in range(1, 41):
        data = first if seq == 1 else rng.randbytes(64 << 10)
        offset = 0 if seq == 1 else rng.randrange(64) * (64 << 10)
        batch = encode_batch(
            "u1", seq, seq, [Extent(offset, len(data), data)], newest_write_ns=seq, codec=CODEC_RAW
        )
        disk.append_batch(batch, peek_batch_header(batch))  # not decoded: read back
        await disk.sync_cache()
    cached = sorted((tmp_path / "u1" / "cache").glob("*.seg"))
    assert sum(p.stat().st_size for p in cached) > 6 << 20
    assert all(resident_bytes(p) <= page for p in cached)
    applier = asyncio.ensure_future(disk.run_applier())
    try:
        await disk.wait_applied(40)
        await disk.make_applied_durable()
        segments = sorted((tmp_path / "u1" / "undo").glob("*.seg"))
        assert sum(p.stat().st_size for p in segments) > 2 << 20  # 39 records of old data
        assert all(resident_bytes(p) <= page for p in segments)
        view = await disk.open_view_async(1)
        assert view.read(0, 4 << 20) == first
        disk.close_view(view)
        with open(disk.replica_path, "rb") as f:
            replica = f.read()
    finally:
        applier.cancel()
        await asyncio.gather(applier, return_exceptions=True)
        disk.close()
    expected = bytearray(first)
    rng = random.Random(7)
    rng.randbytes(4 << 20)
    for _ in range(2, 41):
        data = rng.randbytes(64 << 10)
        offset = rng.randrange(64) * (64 << 10)
        expected[offset : offset + len(data)] = data
    assert replica == expected
