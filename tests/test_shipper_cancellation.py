# Regression tests for a stalled agent (the soak of tests/test_faults_network.py, about one run
# in three): when a replication session dies, its task group cancels the shipper's tasks and
# waits for them to end. On Python 3.11, `asyncio.wait_for(event.wait(), t)` returns instead of
# raising when the cancellation arrives just after the event was set (an ACK, a disk state
# change), so the batch producer went on, blocked on its full queue (the sender was gone) and the
# session never ended: no log line, no reconnection. Each test sets the event and cancels the
# task in that window; the task must end cancelled.
"""A shipper task cancelled just as its wake-up event fires still ends (the session can close)."""

from __future__ import annotations

import asyncio
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


async def test_producer_cancelled_as_an_ack_arrives_ends(
    shipper: Shipper, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The producer waits for an ACK (a batch in flight, few records waiting); a long delay keeps
    # it there until the test sets the event.
    monkeypatch.setattr(shipper_module, "NAGLE_DELAY", 30.0)
    disk = shipper.disks["d"]
    for i in range(3):
        await disk.write(i * 4096, bytes([i + 1]) * 4096)
    link = _DiskLink(disk, next_seq=2)
    link.inflight.append((1, 4096))
    link.inflight_bytes = 4096
    queue: asyncio.Queue[tuple[bytes, int, int]] = asyncio.Queue(maxsize=1)
    task = asyncio.create_task(shipper._produce(link, queue, 1 << 20))
    await _cancel_as_it_wakes(task, link.acked)


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
