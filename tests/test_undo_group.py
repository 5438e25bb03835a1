"""The old contents of a group's batches, taken before any of them is written, are what each
batch overwrites when the group is applied one batch at a time.

The applier makes the undo records of a whole group durable with one sync, then writes the
group. Where batches of the group overlap, a later batch's old contents must be the earlier
batch's new contents (from memory, ``overlay``), not the replica's bytes. A byte-per-byte model
of the replica, kept here, is the source of truth; the replica is a real file with holes.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from process_server.extent_map import ExtentMap
from process_server.undo import old_contents
from protocol.batch import Extent

SIZE = 64 << 10
UNIT = 512

span = st.tuples(st.integers(0, SIZE // UNIT - 1), st.integers(1, 24))
batch_ops = st.lists(st.tuples(span, st.sampled_from([None, 0, 1, 7, 200])), min_size=1, max_size=5)


def _extents(ops: list[tuple[tuple[int, int], int | None]]) -> list[Extent]:
    """Disjoint, sorted extents of one batch (the last op over a unit wins, as on the agent);
    fill None is a zero extent, 0 a data extent of zero bytes."""
    units: dict[int, int | None] = {}
    for (unit, count), fill in ops:
        for u in range(unit, min(SIZE // UNIT, unit + count)):
            units[u] = fill
    extents: list[Extent] = []
    for u in sorted(units):
        fill = units[u]
        data = None if fill is None else bytes([(fill + u) % 256 if fill else 0]) * UNIT
        extents.append(Extent(u * UNIT, UNIT, data))
    return extents


def _bytes_of(extents: list[Extent]) -> dict[int, int]:
    out: dict[int, int] = {}
    for e in extents:
        data = bytes(e.length) if e.data is None else bytes(e.data)
        assert len(data) == e.length
        for i, b in enumerate(data):
            out[e.offset + i] = b
    return out


@given(
    st.lists(st.tuples(st.integers(0, SIZE // UNIT - 1), st.integers(1, 255)), max_size=40),
    st.lists(batch_ops, min_size=1, max_size=6),
)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_groups_old_contents_equal_those_of_applying_it_batch_by_batch(
    tmp_path: Path, replica_writes: list[tuple[int, int]], group: list[list]
) -> None:
    path = tmp_path / "replica.img"
    path.unlink(missing_ok=True)
    model = bytearray(SIZE)  # holes read as zeros
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, SIZE)
        for unit, fill in replica_writes:
            block = bytes([fill]) * UNIT
            os.pwrite(fd, block, unit * UNIT)
            model[unit * UNIT : (unit + 1) * UNIT] = block
        before = os.pread(fd, SIZE, 0)
        overlay: ExtentMap[Extent] = ExtentMap()
        for ops in group:
            extents = _extents(ops)
            old = old_contents(fd, tuple(extents), 1 << 30, overlay)
            assert old is not None
            got = _bytes_of(old)
            expected = {e.offset + i: model[e.offset + i] for e in extents for i in range(e.length)}
            assert got == expected  # the same bytes, over exactly the batch's extents
            for e in extents:
                overlay.assign(e.offset, e.offset + e.length, e)
                model[e.offset : e.offset + e.length] = (
                    bytes(e.length) if e.data is None else e.data
                )
        assert os.pread(fd, SIZE, 0) == before  # nothing was written to the replica
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
        assert old is not None and _bytes_of(old) == {i: 1 for i in range(8192)}
    finally:
        os.close(fd)
