"""The activity log's eviction never drops an extent that the write being activated uses:
the log saved before that write reaches the image must cover every extent of it, or an
unclean stop would leave part of the write unverified."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.activity_log import EXTENT_BYTES, ActivityLog
from agent.disk import ProtectedDisk


async def _nothing() -> None:
    return None


async def test_activate_keeps_the_writes_own_extents_when_it_evicts(tmp_path: Path) -> None:
    al = ActivityLog(tmp_path / "al", 200 * EXTENT_BYTES, capacity=128)
    try:
        for extent in range(1, 129):  # full; extent 1 is the least recently used
            await al.activate(extent * EXTENT_BYTES + 8192, 4096, _nothing)
        # One write straddling extent 0 (new) and extent 1 (active, about to be evicted).
        await al.activate(EXTENT_BYTES - 4096, 8192, _nothing)
        assert al.evictions > 0
        assert {0, 1} <= set(al.load()), "the saved log does not cover the whole write"
        assert al.covers(EXTENT_BYTES - 4096, 8192)
        assert len(al.load()) <= al.capacity
    finally:
        al.close()


async def test_an_unclean_stop_reverifies_every_extent_of_the_last_write(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(200 * EXTENT_BYTES)
    disk = await ProtectedDisk.open("d0", image, tmp_path / "state", activity_extents=128)
    for extent in range(1, 129):
        await disk.write(extent * EXTENT_BYTES + 8192, b"x" * 4096)
    await disk.write(EXTENT_BYTES - 4096, b"W" * 8192)  # extents 0 (new) and 1 (LRU)
    disk.journal.close()  # SIGKILL
    assert disk.activity_log is not None
    disk.activity_log.close()
    os.close(disk.image_fd)
    again = await ProtectedDisk.open("d0", image, tmp_path / "state", activity_extents=128)
    try:
        starts = {offset for offset, _ in again.unclean_regions}
        assert {0, EXTENT_BYTES} <= starts
    finally:
        await again.close()


async def test_writers_waiting_to_activate_are_persisted_together(tmp_path: Path) -> None:
    """Sixteen writes to sixteen fresh extents, all waiting at once: the log is persisted
    twice (the first writer's, then one for the fifteen that waited behind it), not sixteen
    times, and the saved log holds every extent before any of those writers goes on. When
    the log is full, waiting writers' extents are added only as far as they fit."""
    al = ActivityLog(tmp_path / "al", 200 * EXTENT_BYTES, capacity=128)
    try:
        saved_when_done: dict[int, list[int]] = {}

        async def write(extent: int) -> None:
            await al.activate(extent * EXTENT_BYTES, 4096, _nothing)
            saved_when_done[extent] = al.load()

        await asyncio.gather(*(write(extent) for extent in range(16)))
        assert al.persists == 2
        for extent, saved in saved_when_done.items():
            assert extent in saved, f"extent {extent} went on before the log held it"
        assert sorted(al.load()) == list(range(16))

        for extent in range(16, 128):  # fill it up
            await al.activate(extent * EXTENT_BYTES, 4096, _nothing)
        before = al.persists
        await asyncio.gather(*(write(extent) for extent in range(128, 140)))
        assert len(al.load()) <= al.capacity
        assert all(extent in saved_when_done[extent] for extent in range(128, 140))
        assert al.persists - before == 2, "one eviction and persist, then one for the rest"
    finally:
        al.close()


async def test_a_cancelled_activation_holds_the_log_until_its_persist_is_done(
    tmp_path: Path,
) -> None:
    """A writer cancelled while its persist runs in a thread gives the log up only once that
    thread is done: two persists never write the log's slots at the same time."""
    al = ActivityLog(tmp_path / "al", 200 * EXTENT_BYTES, capacity=128)
    running = 0
    overlapped = False
    persist = al._persist

    def slow_persist(extents: list[int] | None = None) -> None:
        nonlocal running, overlapped
        running += 1
        overlapped |= running > 1
        time.sleep(0.2)
        persist(extents)
        running -= 1

    al._persist = slow_persist  # type: ignore[method-assign]
    try:
        first = asyncio.ensure_future(al.activate(0, 4096, _nothing))
        await asyncio.sleep(0.05)  # its persist is running
        first.cancel()
        await al.activate(EXTENT_BYTES, 4096, _nothing)
        assert not overlapped, "a second persist ran beside the cancelled one"
        assert first.cancelled()
        assert 1 in al.load()
    finally:
        al.close()


@settings(max_examples=200, deadline=None)
@given(
    active=st.lists(st.integers(0, 15), max_size=12),
    ranges=st.lists(st.tuples(st.integers(0, 16 * 4096 - 1), st.integers(0, 3 * 4096)), min_size=1),
)
def test_covers_is_every_extent_active_and_refreshes_them_in_order(
    tmp_path_factory: pytest.TempPathFactory, active: list[int], ranges: list[tuple[int, int]]
) -> None:
    """``covers`` (one-extent fast path or not) says yes exactly when every extent of the
    range is active, and then makes them the most recently used, in range order: eviction
    order is the same as marking them one by one."""
    path = tmp_path_factory.mktemp("al") / "al"
    al = ActivityLog(path, 16 * 4096, capacity=16, extent_bytes=4096)
    try:
        for extent in active:
            al._active[extent] = 0
            al._active.move_to_end(extent)
        model = list(dict.fromkeys(reversed(active)))[::-1]  # LRU order, oldest first
        for offset, length in ranges:
            wanted = list(range(offset // 4096, (offset + max(length, 1) - 1) // 4096 + 1))
            expected = all(extent in model for extent in wanted)
            assert al.covers(offset, length) is expected
            if expected:
                model = [e for e in model if e not in wanted] + wanted
            assert list(al._active) == model
    finally:
        al.close()
