"""``materialise`` (``failover --to FILE``) writes a point out byte for byte, keeps its holes,
and leaves the image out of the page cache; where ``O_DIRECT`` is refused it falls back to the
page cache and writes the same image.

A real replica with its undo log (cache, applier, fdatasync'ed files) of an odd-sized disk
(not whole 4 KiB blocks) gets a base, a point, then overwrites: unaligned 512-byte writes,
zeroes over data, data over holes, the unaligned tail. The chunk size is made small so an
image spans many chunks and runs are cut. Checks are made here: SHA-256 of an expected image
built by the test, allocated ranges by ``SEEK_DATA``/``SEEK_HOLE``, residency by ``fincore``.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
from pathlib import Path

import pytest

import process_server.materialise as materialise_mod
from process_server.materialise import materialise
from process_server.replica import ReplicaDisk
from protocol.batch import Extent, Limits, encode_batch, peek_batch_header
from tests.page_cache import resident_bytes

KIB, MIB = 1 << 10, 1 << 20
SIZE = 3 * MIB + 4 * KIB + 1536  # a partial last block
TAIL = SIZE - SIZE % 4096


def _allocated(path: Path) -> list[tuple[int, int]]:
    """``(start, end)`` of every data range of ``path`` (SEEK_DATA / SEEK_HOLE), found here
    rather than by ``common.digests.data_ranges``, which the code under test uses."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out, pos, size = [], 0, os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
        return out
    finally:
        os.close(fd)


def _overlaps(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(s < end and start < e for s, e in ranges)


def _apply(source: bytearray, extents: list[Extent]) -> None:
    for e in extents:
        source[e.offset : e.offset + e.length] = e.data if e.data is not None else bytes(e.length)


async def _point_and_after(root: Path) -> tuple[ReplicaDisk, bytes]:
    """A replica whose point (seq 1) differs from its latest (seq 2); returns the point."""
    rng = random.Random(7)
    disk = ReplicaDisk.open(
        root,
        "m1",
        limits=Limits(),
        apply_sync_interval=0.0,
        cache_quota=1 << 30,
        cache_segment=1 * MIB,
        create=("agent", SIZE),
        undo=True,
        undo_segment=1 * MIB,
    )
    applier = asyncio.ensure_future(disk.run_applier())
    source = bytearray(SIZE)
    base = [
        Extent(0, MIB, rng.randbytes(MIB)),  # data, overwritten below in places
        Extent(2 * MIB, 64 * KIB, rng.randbytes(64 * KIB)),
        Extent(2 * MIB + 512 * KIB, 64 * KIB, None),  # zeros at the point, data after
        Extent(SIZE - 5 * KIB, 5 * KIB, rng.randbytes(5 * KIB)),  # into the partial block
    ]
    after = [
        Extent(512, 1536, rng.randbytes(1536)),  # unaligned, over data
        Extent(256 * KIB, 64 * KIB, None),  # zeros over data
        Extent(MIB + 512 * KIB, 100 * KIB, rng.randbytes(100 * KIB)),  # data over a hole
        Extent(2 * MIB + 512 * KIB, 64 * KIB, rng.randbytes(64 * KIB)),
        Extent(SIZE - 1024, 1024, rng.randbytes(1024)),  # the partial block again
    ]
    try:
        for seq, extents in ((1, base), (2, after)):
            data = encode_batch("m1", seq, seq, extents, newest_write_ns=seq)
            disk.append_batch(data, peek_batch_header(data))
            await disk.sync_cache()
            await disk.wait_applied(seq)
            _apply(source, extents)
            if seq == 1:
                point = bytes(source)
        await disk.make_applied_durable()
    finally:
        applier.cancel()
        await asyncio.gather(applier, return_exceptions=True)
    assert disk.replica_path.read_bytes() == bytes(source)  # the replica moved on
    assert source != point
    return disk, point


def _written_out(disk: ReplicaDisk, tmp_path: Path) -> tuple[Path, int]:
    """The point (seq 1) written out by ``materialise``: the image and its data bytes."""
    view = disk.open_view(1)
    try:
        image = tmp_path / "point.img"
        return image, materialise(view, image)
    finally:
        disk.close_view(view)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many chunks and cut runs in a 3 MiB image."""
    monkeypatch.setattr(materialise_mod, "CHUNK", 256 * KIB)
    monkeypatch.setattr(materialise_mod, "WRITE_MAX", 64 * KIB)


def _check_image(image: Path, point: bytes, written: int) -> None:
    assert hashlib.sha256(image.read_bytes()).digest() == hashlib.sha256(point).digest()
    allocated = _allocated(image)
    assert written == sum(e - s for s, e in allocated)
    # holes at the point stay holes: never written, and zeros at the point (the zeroed range
    # and the data written over a hole are interior, whole blocks)
    assert not _overlaps(allocated, MIB + 4 * KIB, MIB + 512 * KIB + 100 * KIB - 4 * KIB)
    assert not _overlaps(allocated, 2 * MIB + 512 * KIB, 2 * MIB + 576 * KIB)
    assert not _overlaps(allocated, 2 * MIB + 64 * KIB, 2 * MIB + 512 * KIB)
    # the data the point holds is allocated, the unaligned tail included
    assert _overlaps(allocated, 0, 4 * KIB) and _overlaps(allocated, TAIL, SIZE)


def test_point_written_out_byte_for_byte_with_its_holes_and_out_of_the_page_cache(
    tmp_path: Path, small_chunks: None
) -> None:
    disk, point = asyncio.run(_point_and_after(tmp_path / "replica"))
    try:
        image, written = _written_out(disk, tmp_path)
    finally:
        disk.close()
    # O_DIRECT: only the partial last block went through the page cache (checked before
    # anything reads the image)
    assert resident_bytes(image) <= 4096
    _check_image(image, point, written)
    assert not list(tmp_path.glob(".point.img.tmp"))


def test_without_o_direct_the_page_cache_path_writes_the_same_image(
    tmp_path: Path, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that refuses ``O_DIRECT`` at open (``EINVAL``)."""
    real_open = os.open

    def no_direct(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    disk, point = asyncio.run(_point_and_after(tmp_path / "replica"))
    monkeypatch.setattr(materialise_mod.os, "open", no_direct)
    try:
        image, written = _written_out(disk, tmp_path)
    finally:
        monkeypatch.undo()
        disk.close()
    _check_image(image, point, written)


def test_a_direct_write_refused_midway_is_redone_through_the_page_cache(
    tmp_path: Path, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that refuses a direct write's alignment (``EINVAL``) after some went
    through: the whole image is written again, buffered, and is whole."""
    real_write_run = materialise_mod._write_run
    calls = 0

    def refused_later(direct: int, data: memoryview, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 6:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write_run(direct, data, offset)

    disk, point = asyncio.run(_point_and_after(tmp_path / "replica"))
    monkeypatch.setattr(materialise_mod, "_write_run", refused_later)
    try:
        image, written = _written_out(disk, tmp_path)
    finally:
        disk.close()
    assert calls >= 6  # the refusal came after writes that went through
    _check_image(image, point, written)
