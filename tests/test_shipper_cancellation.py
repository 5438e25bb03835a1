# Regression tests for a stalled agent (the soak of tests/test_faults_network.py, about one run
# in three): when a replication session dies, its task group cancels the shipper's tasks and
# waits for them to end. On Python 3.11, `asyncio.wait_for(event.wait(), t)` returns instead of
# raising when the cancellation arrives just after the event was set (an ACK, a disk state
# change), so the batch producer went on, blocked on its full queue (the sender was gone) and the
# session never ended: no log line, no reconnection. Each test sets the event and cancels the
# task in that window; the task must end cancelled.
"""A shipper task cancelled just as its wake-up event fires still ends (the session can close);
the producer's batching policy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import agent.shipper as shipper_module
from agent.disk import ProtectedDisk
from agent.shipper import Shipper, _DiskLink
from common.aio import wait_event
from common.config import AgentConfig, HostPort
from process_server.pki import init_pki, issue_credentials, load_bundle

SIZE = 1 << 20


@pytest.fixture
async def shipper(tmp_path: Path) -> AsyncIterator[Shipper]:
    init_pki(tmp_path / "pki")
    issue_credentials(tmp_path / "pki", "a", tmp_path / "a.bundle")
    image = tmp_path / "d.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    disk = await ProtectedDisk.open("d", image, tmp_path / "state")
    cfg = AgentConfig(
        path=tmp_path / "a.toml",
        name="a",
        state_dir=tmp_path,
        process_server=HostPort("127.0.0.1", 9),
        credentials=tmp_path / "a.bundle",
        disks=(),
        heartbeat_interval=30.0,  # the heartbeat task waits for a state change, not the timer
    )
    try:
        yield Shipper(cfg, load_bundle(tmp_path / "a.bundle"), {"d": disk})
    finally:
        await disk.close()


async def _cancel_as_it_wakes(task: asyncio.Task[None], event: asyncio.Event) -> None:
    """Set ``event`` and let its waiter wake, then cancel ``task`` before it resumes (what a task
    group does when a sibling fails in the same loop iteration as an ACK arrives)."""
    await asyncio.sleep(0.05)  # the task is now waiting for the event
    assert not task.done()
    event.set()
    await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    if not done:
        task.cancel()  # do not leave it behind, whatever happens
        await asyncio.wait({task}, timeout=5)
    assert task in done, "the cancellation was lost: the task went on and the session hangs"
    assert task.cancelled()


async def test_producer_cancelled_as_an_ack_arrives_ends(shipper: Shipper) -> None:
    # The producer waits for an ACK: its window of unacknowledged batches is full.
    disk = shipper.disks["d"]
    for i in range(3):
        await disk.write(i * 4096, bytes([i + 1]) * 4096)
    link = _DiskLink(disk, next_seq=2)
    for _ in range(shipper.cfg.window_batches):
        link.inflight.append((1, 4096))
    link.inflight_bytes = 4096
    queue: asyncio.Queue[tuple[bytes, int, int]] = asyncio.Queue(maxsize=1)
    task = asyncio.create_task(shipper._produce(link, queue, 1 << 20))
    await _cancel_as_it_wakes(task, link.acked)


async def test_producer_waiting_to_grow_a_batch_is_cancelled(
    shipper: Shipper, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch went out a moment ago and a few records wait: the producer sleeps up to
    # NAGLE_DELAY for more (a long one here), and a cancellation ends it there.
    monkeypatch.setattr(shipper_module, "NAGLE_DELAY", 30.0)
    disk = shipper.disks["d"]
    for i in range(3):
        await disk.write(i * 4096, bytes([i + 1]) * 4096)
    link = _DiskLink(disk, next_seq=2)
    link.last_batch = asyncio.get_running_loop().time()
    queue: asyncio.Queue[tuple[bytes, int, int]] = asyncio.Queue(maxsize=1)
    task = asyncio.create_task(shipper._produce(link, queue, 1 << 20))
    await asyncio.sleep(0.05)
    assert queue.empty(), "the producer did not wait for the batch to grow"
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done and task.cancelled()


async def test_heartbeats_cancelled_as_the_disk_state_changes_end(shipper: Shipper) -> None:
    class Stream:
        def __init__(self) -> None:
            self.sent: list[Any] = []

        async def send(self, msg: Any) -> None:
            self.sent.append(msg)

    stream = Stream()
    task = asyncio.create_task(shipper._heartbeats(stream))  # type: ignore[arg-type]
    await _cancel_as_it_wakes(task, shipper._state_changed)
    assert len(stream.sent) <= 2


async def test_wait_event() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5) is True
    assert await wait_event(event, 0) is True  # already set


# The batching policy (agent/shipper.py, NAGLE_DELAY): one write after a quiet spell goes at
# once; under load, records wait to grow into one batch; a full batch never waits.


@contextlib.asynccontextmanager
async def _producing(
    shipper: Shipper, link: _DiskLink, max_batch: int = 1 << 20
) -> AsyncIterator[asyncio.Queue[tuple[bytes, int, int]]]:
    """The producer of ``link`` running; yields the queue its batches go to."""
    queue: asyncio.Queue[tuple[bytes, int, int]] = asyncio.Queue(maxsize=1)
    task = asyncio.create_task(shipper._produce(link, queue, max_batch))
    try:
        yield queue
    finally:
        task.cancel()
        await asyncio.wait({task})


async def _next_batch(queue: asyncio.Queue[tuple[bytes, int, int]], timeout: float) -> int:
    _, last, _ = await asyncio.wait_for(queue.get(), timeout)
    return last


async def _writes(disk: ProtectedDisk, first: int, count: int, size: int = 4096) -> None:
    for i in range(first, first + count):
        await disk.write(i * size, bytes([i % 255 + 1]) * size)


async def test_a_write_after_a_quiet_spell_is_sent_at_once(
    shipper: Shipper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shipper_module, "NAGLE_DELAY", 30.0)
    disk = shipper.disks["d"]
    await _writes(disk, 0, 1)
    link = _DiskLink(disk, next_seq=1)  # no batch for a long time (last_batch: never)
    async with _producing(shipper, link) as queue:
        assert await _next_batch(queue, 5) == 1


async def test_records_under_load_grow_into_one_batch(
    shipper: Shipper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shipper_module, "NAGLE_DELAY", 0.3)
    disk = shipper.disks["d"]
    await _writes(disk, 0, 1)  # the activity log's extent is persisted before the clock starts
    link = _DiskLink(disk, next_seq=2)
    link.last_batch = asyncio.get_running_loop().time()  # a batch just went
    async with _producing(shipper, link) as queue:
        for i in range(1, 4):
            await _writes(disk, i, 1)
            await asyncio.sleep(0.02)
        assert queue.empty(), "a batch left before the interval ended"
        await _writes(disk, 4, 3)
        assert await _next_batch(queue, 5) == 7  # the six writes in one batch


@pytest.mark.parametrize("waiting", [3, 4])
async def test_a_batch_of_nagle_records_does_not_wait(
    shipper: Shipper, monkeypatch: pytest.MonkeyPatch, waiting: int
) -> None:
    monkeypatch.setattr(shipper_module, "NAGLE_DELAY", 30.0)
    monkeypatch.setattr(shipper_module, "NAGLE_RECORDS", 4)
    disk = shipper.disks["d"]
    await _writes(disk, 0, waiting)
    link = _DiskLink(disk, next_seq=1)
    link.last_batch = asyncio.get_running_loop().time()
    async with _producing(shipper, link) as queue:
        if waiting < 4:
            await asyncio.sleep(0.05)
            assert queue.empty(), "3 records of 4 left at once"
        else:
            assert await _next_batch(queue, 5) == 4


async def test_a_batch_of_bytes_does_not_wait_even_after_overwrites(
    shipper: Shipper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_batch`` bytes waiting (counted before coalescing, as the batch counts them) go at
    once, whatever the batches in flight held; and so do bytes that pile up while waiting."""
    monkeypatch.setattr(shipper_module, "NAGLE_DELAY", 30.0)
    disk = shipper.disks["d"]
    for _ in range(32):  # 32 overwrites of one block, in flight: 8 KiB after coalescing
        await disk.write(0, b"\7" * 4096)
    link = _DiskLink(disk, next_seq=33)
    link.inflight.append((32, 4096))
    link.inflight_bytes = 4096
    link.last_batch = asyncio.get_running_loop().time()
    async with _producing(shipper, link, max_batch=64 << 10) as queue:
        await _writes(disk, 1, 1)
        await asyncio.sleep(0.05)
        assert queue.empty(), "one 4 KiB write of a 64 KiB batch left at once"
        await _writes(disk, 2, 15)  # 64 KiB now wait: within a NAGLE_STEP or so
        assert await _next_batch(queue, 1) == 48
