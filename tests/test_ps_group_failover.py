"""Group failover: every member at the group point (waiting for a member's applier to reach
it), all or nothing, and ``--planned`` loses no acknowledged write of any member."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from common.config import GroupConfig, HostPort, ServerConfig
from process_server.catalog import Catalog
from process_server.points import PointsService
from process_server.replica import ReplicaDisk, ReplicaError
from process_server.server import ProcessServer
from protocol.batch import Extent, encode_batch, peek_batch_header
from protocol.control import Freeze, Frozen, PointMark, Unfreeze

SIZE = 1 << 20


def make_ps(root: Path) -> ProcessServer:
    cfg = ServerConfig(
        path=root / "ps.toml",
        listen=HostPort("127.0.0.1", 0),
        state_dir=root,
        pki_dir=root,
        failover_dir=root / "fo",
        groups=(GroupConfig("g", ("a", "b")),),
    )
    ps = ProcessServer(cfg)
    ps.disks_dir.mkdir(parents=True)
    ps.catalog = Catalog(root / "catalog.sqlite")
    ps.points = PointsService(cfg, ps.catalog, ps.disks)
    return ps


async def put(disk: ReplicaDisk, seq: int) -> None:
    data = encode_batch(
        disk.disk_id, seq, seq, [Extent(0, 4096, bytes([seq]) * 4096)], newest_write_ns=1
    )
    disk.append_batch(data, peek_batch_header(data))
    await disk.sync_cache()


def group_point(ps: ProcessServer, disk: ReplicaDisk, seq: int) -> None:
    ps.points.record_mark(disk, PointMark("g-1", disk.disk_id, seq, 1, "crash-consistent", "", "g"))


async def stop(ps: ProcessServer, appliers: list[asyncio.Future[None]]) -> None:
    for applier in appliers:
        applier.cancel()
    await asyncio.gather(*appliers, return_exceptions=True)
    await ps.failbacks.close()
    await ps.failovers.close()
    for disk in ps.disks.values():
        disk.close()
    assert ps.catalog is not None
    ps.catalog.close()


async def test_group_failover_waits_for_a_member_behind_the_point(tmp_path: Path) -> None:
    """Found in review: resolve fenced a member at its current applying_seq, so a listed group
    point its applier had not reached yet could never be opened (and the members already
    failed over stayed up). The failover now waits for the applier to reach the point."""
    ps = make_ps(tmp_path)
    a, b = ps._open_disk("a", ("agent", SIZE)), ps._open_disk("b", ("agent", SIZE))
    appliers = [asyncio.ensure_future(a.run_applier())]  # b's applier is behind
    try:
        for disk in (a, b):
            await put(disk, 1)
            group_point(ps, disk, 1)
        await a.wait_applied(1)
        failing_over = asyncio.ensure_future(
            ps.failovers.failover(
                ["a", "b"], "latest", test=False, planned=False, nbd=None, group="g"
            )
        )
        await asyncio.sleep(0.2)
        assert not failing_over.done() or failing_over.exception() is None
        assert not ps.failovers.active, "an export came up before every view was open"
        appliers.append(asyncio.ensure_future(b.run_applier()))  # b catches up
        reply = await asyncio.wait_for(failing_over, 10)
        assert [f["point"]["seq"] for f in reply["failovers"]] == [1, 1]
        assert await ps.failovers.active["b"].overlay.read(0, 1) == b"\x01"
    finally:
        await stop(ps, appliers)


async def test_group_failover_is_undone_when_a_later_member_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: when a later member failed, the members already failed over stayed
    up (exported, fenced, recorded). Now nothing of the group failover stays behind."""
    ps = make_ps(tmp_path)
    a, b = ps._open_disk("a", ("agent", SIZE)), ps._open_disk("b", ("agent", SIZE))
    appliers = [asyncio.ensure_future(d.run_applier()) for d in (a, b)]
    try:
        for disk in (a, b):
            await put(disk, 1)
            await disk.wait_applied(1)
            group_point(ps, disk, 1)

        async def refuse(seq: int) -> Any:
            raise ReplicaError("disk b: cannot open")

        monkeypatch.setattr(b, "open_view_async", refuse)
        with pytest.raises(ReplicaError):
            await ps.failovers.failover(
                ["a", "b"], "g-1", test=False, planned=False, nbd=None, group="g"
            )
        assert not ps.failovers.active
        assert not a.fenced and not b.fenced and not a.views
        assert not list((tmp_path / "failovers").glob("*.json"))
    finally:
        await stop(ps, appliers)


async def test_planned_group_failover_freezes_every_member_before_choosing(
    tmp_path: Path,
) -> None:
    """Found by reading: a planned group failover picked the newest group point before
    freezing the members, so writes acknowledged after that point were rolled back, breaking
    "--planned loses nothing". Every member is now frozen and drained first, then failed over
    at its newest durable seq."""
    ps = make_ps(tmp_path)
    a, b = ps._open_disk("a", ("agent", SIZE)), ps._open_disk("b", ("agent", SIZE))
    appliers = [asyncio.ensure_future(d.run_applier()) for d in (a, b)]
    told: list[Any] = []

    async def ask(disk_id: str, body: Any, timeout: float) -> Any:
        assert isinstance(body, Freeze)
        told.append(body)
        return Frozen(disk_id, True, ps.disks[disk_id].durable_seq)

    async def tell(disk_id: str, body: Any) -> None:
        told.append(body)

    ps.ask = ask  # type: ignore[method-assign]
    ps.tell = tell  # type: ignore[method-assign]
    try:
        for disk in (a, b):
            disk.session = object()  # the agents are connected
            await put(disk, 1)
            await disk.wait_applied(1)
            group_point(ps, disk, 1)
        await put(b, 2)  # acknowledged after the newest group point
        reply = await ps.failovers.failover(
            ["a", "b"], "latest", test=False, planned=True, nbd=None, group="g"
        )
        assert {f["disk"]: f["point"]["seq"] for f in reply["failovers"]} == {"a": 1, "b": 2}
        assert await ps.failovers.active["b"].overlay.read(0, 1) == b"\x02"
        assert [type(m) for m in told] == [Freeze, Freeze]  # both frozen, none released
        assert not any(isinstance(m, Unfreeze) for m in told)
    finally:
        await stop(ps, appliers)
