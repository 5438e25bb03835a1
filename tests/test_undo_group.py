"""A group's undo records, made before any of its batches is written, hold what each batch
overwrites, as if the group were applied one batch at a time.

The applier makes the undo records of a whole group durable with one sync, then writes the
group. Where batches of the group overlap, a later batch's old contents must be the earlier
batch's new contents (from memory, ``overlay``), not the replica's bytes. Sources of truth
kept here: a byte model of the replica (``old_contents`` on a real file with holes), and a
copy of the source at every seq, compared by SHA-256 with each recovery point of a real
replica (cache, applier, undo log), also after a crash between the undo sync and the replica
writes followed by a restart that groups the batches differently.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import process_server.replica as replica_module
from process_server.extent_map import ExtentMap
from process_server.replica import ReplicaDisk
from process_server.undo import PIECE_MAX, UndoLog, old_contents
from protocol.batch import (
    CODEC_RAW,
    Extent,
    Limits,
    encode_batch,
    encode_batch_parts,
    peek_batch_header,
)

SIZE = 3 << 20  # a trim over 1 MiB reads the replica through data_ranges
UNIT = 4096

# (first unit, units, fill): fill None is a zero extent (a trim), 0 data of zero bytes, else
# random bytes seeded by fill (every byte differs, so a slice taken at a wrong offset shows)
write = st.tuples(
    st.integers(0, SIZE // UNIT - 1),
    st.integers(1, 320),
    st.one_of(st.none(), st.just(0), st.integers(1, 1 << 30)),
)
batch_writes = st.lists(write, min_size=1, max_size=5)


def _extents(writes: list[tuple[int, int, int | None]]) -> list[Extent]:
    """One batch: disjoint extents in disk order, the last write over a unit winning."""
    units: dict[int, tuple[int | None, int]] = {}
    for unit, count, fill in writes:
        for u in range(unit, min(SIZE // UNIT, unit + count)):
            units[u] = (fill, u)
    extents: list[Extent] = []
    for u in sorted(units):
        fill, _ = units[u]
        if fill is None:
            data = None
        elif fill == 0:
            data = bytes(UNIT)
        else:
            data = random.Random(fill * 7919 + u).randbytes(UNIT)
        prev = extents[-1] if extents else None
        if (
            prev is not None
            and prev.offset + prev.length == u * UNIT
            and (prev.data is None) == (data is None)
        ):
            joined = None if data is None else bytes(prev.data) + data  # type: ignore[arg-type]
            extents[-1] = Extent(prev.offset, prev.length + UNIT, joined)
        else:
            extents.append(Extent(u * UNIT, UNIT, data))
    return extents


def _check_old(old: list[Extent], extents: list[Extent], model: bytearray) -> None:
    """``old`` covers exactly ``extents``, in order, without overlap, with the model's bytes,
    and is a valid undo record."""
    covered = [(e.offset, e.offset + e.length) for e in old]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(covered))  # in order, disjoint
    wanted = {(e.offset, e.offset + e.length) for e in extents}
    assert _merged(covered) == _merged(sorted(wanted))
    for e in old:
        got = bytes(e.length) if e.data is None else bytes(e.data)
        assert len(got) == e.length
        assert got == model[e.offset : e.offset + e.length], f"old contents at {e.offset}"
    encode_batch_parts("u1", 1, 1, old, newest_write_ns=0, codec=CODEC_RAW)


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


@given(
    st.lists(st.tuples(st.integers(0, SIZE // UNIT - 1), st.integers(1, 255)), max_size=60),
    st.lists(batch_writes, min_size=1, max_size=6),
)
@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_groups_old_contents_equal_those_of_applying_it_batch_by_batch(
    tmp_path: Path,
    replica_writes: list[tuple[int, int]],
    group: list[list[tuple[int, int, int | None]]],
) -> None:
    path = tmp_path / "replica.img"
    path.unlink(missing_ok=True)
    model = bytearray(SIZE)  # holes read as zeros
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, SIZE)
        for unit, seed in replica_writes:
            block = random.Random(seed).randbytes(UNIT)
            os.pwrite(fd, block, unit * UNIT)
            model[unit * UNIT : (unit + 1) * UNIT] = block
        before = hashlib.sha256(os.pread(fd, SIZE, 0)).digest()
        overlay: ExtentMap[Extent] = ExtentMap()
        for writes in group:
            extents = _extents(writes)
            old = old_contents(fd, tuple(extents), 1 << 30, overlay)
            assert old is not None
            _check_old(old, extents, model)
            for e in extents:
                overlay.assign(e.offset, e.offset + e.length, e)
                model[e.offset : e.offset + e.length] = (
                    bytes(e.length) if e.data is None else e.data
                )
        assert hashlib.sha256(os.pread(fd, SIZE, 0)).digest() == before  # nothing written
    finally:
        os.close(fd)


def test_old_contents_past_the_limit_are_refused_even_from_the_overlay(tmp_path: Path) -> None:
    """The record's size limit (a cut beyond it) counts bytes from memory too."""
    fd = os.open(tmp_path / "r.img", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, SIZE)
        overlay: ExtentMap[Extent] = ExtentMap()
        overlay.assign(0, 8192, Extent(0, 8192, b"\x01" * 8192))
        assert old_contents(fd, (Extent(0, 8192, None),), 8191, overlay) is None
        old = old_contents(fd, (Extent(0, 8192, None),), 8192, overlay)
        assert old is not None and b"".join(bytes(e.data or b"") for e in old) == b"\x01" * 8192
    finally:
        os.close(fd)


def test_old_contents_from_the_overlay_come_in_pieces_a_view_can_read(tmp_path: Path) -> None:
    """A long extent of the group is kept in pieces of at most PIECE_MAX, as from the replica
    (a view reads and checks a whole piece for any read inside it)."""
    length = 2 * PIECE_MAX + 12345
    data = random.Random(3).randbytes(length)
    fd = os.open(tmp_path / "r.img", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, length + UNIT)
        overlay: ExtentMap[Extent] = ExtentMap()
        overlay.assign(UNIT, UNIT + length, Extent(UNIT, length, data))
        old = old_contents(fd, (Extent(0, UNIT + length, None),), 1 << 30, overlay)
        assert old is not None
        assert max(e.length for e in old if e.data is not None) <= PIECE_MAX
        assert b"".join(bytes(e.data) for e in old if e.data is not None) == data
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- real replica
DISK = 1 << 20


def _open(root: Path, create: bool = False) -> ReplicaDisk:
    return ReplicaDisk.open(
        root,
        "g1",
        limits=Limits(),
        apply_sync_interval=0.0,
        cache_quota=1 << 30,
        cache_segment=256 << 10,
        create=("agent", DISK) if create else None,
        undo=True,
        undo_segment=256 << 10,
    )


def _overlapping_batches(
    first_seq: int, count: int, source: bytearray, seed: int
) -> list[tuple[bytes, str]]:
    """``count`` batches of random writes and zeroes crowded into the first 256 KiB of the
    disk (so they overlap one another), applied to ``source`` as they are made; each with the
    SHA-256 of ``source`` after it."""
    rng = random.Random(seed)
    out = []
    for seq in range(first_seq, first_seq + count):
        units: dict[int, bytes | None] = {}
        for _ in range(rng.randrange(1, 7)):
            start = rng.randrange(0, 64)
            for u in range(start, start + rng.randrange(1, 9)):
                units[u] = None if rng.random() < 0.2 else rng.randbytes(UNIT)
        extents = [Extent(u * UNIT, UNIT, d) for u, d in sorted(units.items())]
        for e in extents:
            source[e.offset : e.offset + e.length] = bytes(e.length) if e.data is None else e.data
        out.append((encode_batch("g1", seq, seq, extents, newest_write_ns=seq), _sha(source)))
    return out


def _sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def _count_undo_syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    syncs: list[int] = []
    real = UndoLog.sync_blocking

    def counted(self: UndoLog) -> None:
        syncs.append(self.last_seq)
        real(self)

    monkeypatch.setattr(UndoLog, "sync_blocking", counted)
    return syncs


async def _append_all(
    disk: ReplicaDisk, batches: list[tuple[bytes, str]], expected: dict[int, str]
) -> None:
    """Cache ``batches`` durably, noting the SHA-256 of the source after each in ``expected``."""
    for data, digest in batches:
        header = peek_batch_header(data)
        disk.append_batch(data, header)
        expected[header.last_seq] = digest
    await disk.sync_cache()


async def _apply_through(disk: ReplicaDisk, seq: int) -> None:
    applier = asyncio.ensure_future(disk.run_applier())
    try:
        await disk.wait_applied(seq)
        await disk.make_applied_durable()
    finally:
        applier.cancel()
        await asyncio.gather(applier, return_exceptions=True)


def _check_points(disk: ReplicaDisk, expected: dict[int, str]) -> None:
    for point, digest in expected.items():
        view = disk.open_view(point)
        try:
            assert _sha(view.read(0, DISK)) == digest, f"point at seq {point}"
        finally:
            disk.close_view(view)


@pytest.mark.parametrize("extents_max", [None, 12])
def test_overlapping_batches_made_durable_together_are_one_group_and_every_point_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extents_max: int | None
) -> None:
    """Twelve overlapping batches, durable before the applier starts: one undo sync covers
    them all (with GROUP_EXTENTS_MAX lowered, the group is cut where it says), and every
    point, 0 to 12, equals the source at that seq, before and after a restart."""
    if extents_max is not None:
        monkeypatch.setattr(replica_module, "GROUP_EXTENTS_MAX", extents_max)
    syncs = _count_undo_syncs(monkeypatch)

    async def scenario() -> None:
        source = bytearray(DISK)
        expected = {0: _sha(source)}
        disk = _open(tmp_path, create=True)
        try:
            batches = _overlapping_batches(1, 12, source, seed=5)
            await _append_all(disk, batches, expected)
            await _apply_through(disk, 12)
            assert _sha(disk.replica_path.read_bytes()) == _sha(source)
            _check_points(disk, expected)
        finally:
            disk.close()
        disk = _open(tmp_path)
        try:
            _check_points(disk, expected)
        finally:
            disk.close()

    asyncio.run(scenario())
    if extents_max is None:
        assert syncs == [12]
    else:
        assert len(syncs) > 1 and syncs[-1] == 12


def test_a_crash_between_the_undo_sync_and_the_replica_writes_regrouped_on_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group of eight overlapping batches is recorded and synced, then only three of them
    reach the replica before the applier dies. Restarted with groups of at most three batches,
    the applier writes the eight again (their records stay as they were) and records eight new
    overlapping batches; every point, 0 to 16, equals the source."""
    syncs = _count_undo_syncs(monkeypatch)
    real_write = ReplicaDisk._write_group

    def dies_after_three(self: ReplicaDisk, group: list) -> None:
        real_write(self, group[:3])
        raise RuntimeError("the process server dies here")

    async def first_run(source: bytearray, expected: dict[int, str]) -> None:
        disk = _open(tmp_path, create=True)
        try:
            batches = _overlapping_batches(1, 8, source, seed=11)
            await _append_all(disk, batches, expected)
            with pytest.raises(RuntimeError, match="dies here"):
                await disk.run_applier()
            assert disk.applied_seq == 0
        finally:
            disk.close()

    async def second_run(source: bytearray, expected: dict[int, str]) -> None:
        disk = _open(tmp_path)
        try:
            batches = _overlapping_batches(9, 8, source, seed=12)
            await _append_all(disk, batches, expected)
            await _apply_through(disk, 16)
            assert _sha(disk.replica_path.read_bytes()) == _sha(source)
            _check_points(disk, expected)
        finally:
            disk.close()

    source = bytearray(DISK)
    expected = {0: _sha(source)}
    monkeypatch.setattr(ReplicaDisk, "_write_group", dies_after_three)
    asyncio.run(first_run(source, expected))
    assert syncs == [8]
    monkeypatch.setattr(ReplicaDisk, "_write_group", real_write)
    monkeypatch.setattr(replica_module, "APPLY_GROUP_RECORDS", 3)
    asyncio.run(second_run(source, expected))
    assert len(syncs) > 2  # regrouped: more than one group after the restart
