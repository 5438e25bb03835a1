"""DirtyBitmap's byte-at-once marking and region scan against a chunk-by-chunk model.

The bitmap decides what a resync compares, so a chunk it loses is a difference nobody looks
at again. Hypothesis drives random sizes, granularities and mark/clear sequences through
both, and a save/load round trip; a corrupt file is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dirty_bitmap import DirtyBitmap
from common.errors import IntegrityError


class Model:
    """One bool per chunk: the rules of mark, clear and regions spelled out plainly."""

    def __init__(self, size: int, granularity: int) -> None:
        self.size, self.granularity = size, granularity
        self.chunks = -(-size // granularity)
        self.dirty = [False] * self.chunks

    def mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        last = min((offset + length - 1) // self.granularity, self.chunks - 1)
        for c in range(offset // self.granularity, last + 1):
            self.dirty[c] = True

    def clear(self, offset: int, length: int) -> None:
        end = offset + length
        last = (end // self.granularity if end < self.size else self.chunks) - 1
        for c in range(-(-offset // self.granularity), last + 1):
            self.dirty[c] = False

    def regions(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for c, d in enumerate(self.dirty):
            if not d:
                continue
            begin = c * self.granularity
            stop = min(begin + self.granularity, self.size)
            if out and out[-1][0] + out[-1][1] == begin:
                out[-1] = (out[-1][0], stop - out[-1][0])
            else:
                out.append((begin, stop - begin))
        return out


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, list[tuple[str, int, int]]]:
    granularity = draw(st.sampled_from([512, 4096, 65536]))
    chunks = draw(st.integers(1, 300))
    size = chunks * granularity - draw(st.integers(0, granularity - 1))
    # Anywhere, and on or next to a chunk boundary (where whole and partial chunks meet);
    # a range may run past the end of the disk.
    near_boundary = st.builds(
        lambda chunk, delta: max(0, chunk * granularity + delta),
        st.integers(0, chunks),
        st.sampled_from([-1, 0, 1, granularity - 1]),
    )
    position = st.one_of(st.integers(0, size + granularity), near_boundary)
    op = st.tuples(st.sampled_from(["mark", "clear", "mark_all"]), position, position)
    return size, granularity, draw(st.lists(op, max_size=25))


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_marks_clears_and_regions_match_the_model(scenario) -> None:
    size, granularity, ops = scenario
    bitmap, model = DirtyBitmap(size, granularity), Model(size, granularity)
    for name, offset, length in ops:
        if name == "mark_all":
            bitmap.mark_all()
            model.mark(0, size)
        else:
            getattr(bitmap, name)(offset, length)
            getattr(model, name)(offset, length)
        assert [bitmap.is_dirty(c) for c in range(model.chunks)] == model.dirty
    assert bitmap.regions() == model.regions()
    assert bitmap.empty == (not any(model.dirty))
    assert bitmap.dirty_bytes == min(sum(model.dirty) * granularity, size)
    # No bit past the last chunk is ever set (regions and dirty_bytes would count it).
    spare = len(bitmap.bits) * 8 - model.chunks
    if spare:
        assert bitmap.bits[-1] >> (8 - spare) == 0


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_save_and_load_keep_every_bit(tmp_path_factory: pytest.TempPathFactory, scenario) -> None:
    size, granularity, ops = scenario
    bitmap = DirtyBitmap(size, granularity)
    for name, offset, length in ops:
        if name != "mark_all":
            bitmap.mark(offset, length)
    path = tmp_path_factory.mktemp("bm") / "dirty.bitmap"
    bitmap.save(path)
    loaded = DirtyBitmap.load(path)
    assert bytes(loaded.bits) == bytes(bitmap.bits)
    assert loaded.regions() == bitmap.regions()


def test_a_flipped_bit_on_disk_is_refused(tmp_path: Path) -> None:
    bitmap = DirtyBitmap(1 << 30)
    bitmap.mark(5 << 20, 3 << 20)
    path = tmp_path / "dirty.bitmap"
    bitmap.save(path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        DirtyBitmap.load(path)


def test_a_two_tib_disk_is_marked_and_scanned_whole() -> None:
    """Whole bytes at once: 32 Mi chunks in one region, both ends exact."""
    size = (2 << 40) - 4096  # the last chunk is partial
    bitmap = DirtyBitmap(size)
    bitmap.mark_all()
    assert bitmap.regions() == [(0, size)]
    bitmap.clear(64 << 10, size)  # keeps chunk 0, clears the partial last chunk too
    assert bitmap.regions() == [(0, 64 << 10)]
    bitmap.mark(size - 1, 1)
    assert bitmap.regions() == [(0, 64 << 10), (size - (64 << 10) + 4096, (64 << 10) - 4096)]
