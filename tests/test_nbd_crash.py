"""SIGKILL of the agent while an NBD client pipelines writes: nothing acknowledged is lost.

The NBD front journals the plain writes that arrive together with one system call, then
writes them into the image, then replies (agent/nbd_server.py). A kill can land anywhere in
that: before the group's journal write, between it and the image writes, among the image
writes, among the replies. Whatever it hits, every write the client saw acknowledged is in
the image after the restart (journal redo), every block holds either its old contents or
the write sent to it, and the replica equals the source once the agent is level again.
"""

from __future__ import annotations

import asyncio
import struct
import types
from pathlib import Path

from agent.nbd_server import parse_endpoint
from benchmarks.deploy import Deployment
from protocol import nbd
from tests.test_nbd_server import Client
from tests.test_resync import cmp, wait_in_sync

MiB = 1 << 20
SIZE = 64 * MiB
BLOCK = 4096
BURST = 48  # writes sent before replies are read: several groups, the budget cut included


def _data(block: int, round_: int) -> bytes:
    return struct.pack(">QQ", block, round_) * (BLOCK // 16)


async def _write_until_killed(dep: Deployment, sock: str, round_: int, kill_after: int) -> set[int]:
    """Pipeline writes to distinct blocks; kill the agent (SIGKILL) once ``kill_after`` are
    acknowledged, with a burst still in flight. Returns the blocks acknowledged."""
    export = types.SimpleNamespace(endpoint=parse_endpoint(f"unix:{sock}"), address="")
    c = await Client.connect(export, name=b"d1")  # type: ignore[arg-type]
    acked: set[int] = set()
    block = 0
    try:
        while True:
            for _ in range(BURST):
                c.send(
                    nbd.CMD_WRITE, block * BLOCK, BLOCK, handle=block, payload=_data(block, round_)
                )
                block = (block + 1) % (SIZE // BLOCK)
            await c.writer.drain()
            for _ in range(BURST // 2):  # the other half stays in flight
                handle, error, _ = await c.reply()
                assert error == 0
                acked.add(handle)
            if len(acked) >= kill_after:
                dep.kill_agent("a1")
                break
        # Replies the agent sent before it died still count as acknowledged.
        while True:
            handle, error, _ = await c.reply()
            assert error == 0
            acked.add(handle)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        c.writer.transport.abort()
    return acked


def test_agent_killed_amid_nbd_write_groups_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    with Deployment(tmp_path / "d") as dep:
        dep.init_pki()
        spec = dep.add_agent("a1", {"d1": SIZE}, nbd=True)
        dep.start_ps()
        dep.start_agent("a1")
        wait_in_sync(dep, "a1", "d1")
        image = spec.disks["d1"]
        latest: dict[int, int] = {}  # block -> newest round acknowledged
        for round_, kill_after in enumerate((300, 1500, 5000), start=1):
            acked = asyncio.run(_write_until_killed(dep, spec.nbd["d1"], round_, kill_after))
            assert len(acked) >= kill_after
            dep.start_agent(
                "a1"
            )  # journal redo, then re-verification of the activity log's extents
            row = wait_in_sync(dep, "a1", "d1")
            assert row["state"] == "replicating"
            with open(image, "rb") as f:
                for block in sorted(acked):
                    f.seek(block * BLOCK)
                    assert f.read(BLOCK) == _data(block, round_), f"acknowledged block {block} lost"
                for block in range(SIZE // BLOCK):  # unacknowledged: old contents or the new write
                    f.seek(block * BLOCK)
                    got = f.read(BLOCK)
                    old = _data(block, latest[block]) if block in latest else bytes(BLOCK)
                    assert got in (old, _data(block, round_)), f"block {block} holds neither"
            for block in acked:
                latest[block] = round_
            with open(image, "rb") as f:  # what an unacknowledged write left counts as the new old
                for block in range(SIZE // BLOCK):
                    f.seek(block * BLOCK)
                    if f.read(BLOCK) == _data(block, round_):
                        latest[block] = round_
            assert cmp(image, dep.replica_path("d1")), "replica differs from the source"
