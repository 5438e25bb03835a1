"""Failovers across a process-server restart: the saved record always names a seq the restart
can open, and a record that cannot be brought back does not keep the server down."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from common.config import HostPort, ServerConfig
from common.errors import DiskError
from process_server.catalog import Catalog
from process_server.failover import FailoverError
from process_server.points import PointsService
from process_server.replica import ReplicaDisk
from process_server.server import ProcessServer
from protocol.batch import Extent, encode_batch, peek_batch_header
from protocol.control import PointMark

SIZE = 1 << 20


def make_ps(root: Path) -> ProcessServer:
    """A process server with its catalog and disks, not listening (what run() sets up)."""
    cfg = ServerConfig(
        path=root / "ps.toml",
        listen=HostPort("127.0.0.1", 0),
        state_dir=root,
        pki_dir=root,
        failover_dir=root / "fo",
    )
    ps = ProcessServer(cfg)
    ps.disks_dir.mkdir(parents=True, exist_ok=True)
    ps.catalog = Catalog(root / "catalog.sqlite")
    ps.points = PointsService(cfg, ps.catalog, ps.disks)
    for path in sorted(ps.disks_dir.iterdir()):
        if (path / "state.json").exists():
            ps._open_disk(path.name, None)
    return ps


async def put(disk: ReplicaDisk, seq: int, offset: int = 0, byte: int | None = None) -> None:
    fill = bytes([seq if byte is None else byte]) * 4096
    data = encode_batch(disk.disk_id, seq, seq, [Extent(offset, 4096, fill)], newest_write_ns=1)
    disk.append_batch(data, peek_batch_header(data))
    await disk.sync_cache()


async def close_ps(ps: ProcessServer) -> None:
    """Like a kill -9 as far as the replicas go: nothing more is recorded as applied."""
    await ps.failbacks.close()
    await ps.failovers.close()
    for disk in ps.disks.values():
        disk.close()
    assert ps.catalog is not None
    ps.catalog.close()


async def test_a_failover_record_names_a_durably_applied_seq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: the failover record was saved once the point was applied to the
    replica's page cache but before applied_seq was durable; a kill -9 then made every start
    fail with "seq N is not applied yet". The record is saved only after applied_seq is."""
    ps = make_ps(tmp_path)
    disk = ps._open_disk("r1", ("agent", SIZE))
    real = disk.make_applied_durable
    recording = asyncio.Event()  # held back until the failover runs (the window of the bug)

    async def held_back() -> None:
        if recording.is_set():
            await real()

    monkeypatch.setattr(disk, "make_applied_durable", held_back)
    applier = asyncio.ensure_future(disk.run_applier())
    for seq in (1, 2):
        await put(disk, seq)
        await disk.wait_applied(seq)
        ps.points.record_mark(
            disk, PointMark(f"p{seq}", "r1", seq, 1, "crash-consistent", "", "", 0)
        )
    applier.cancel()
    await asyncio.gather(applier, return_exceptions=True)
    assert disk.applying_seq == 2 and disk.applied_seq == 0
    recording.set()
    await ps.failovers.failover(["r1"], "p2", test=False, planned=False, nbd=None)
    record = json.loads((tmp_path / "failovers" / "r1.json").read_text())
    state = json.loads((tmp_path / "disks" / "r1" / "state.json").read_text())
    assert state["applied_seq"] >= record["point"]["seq"] == 2
    await close_ps(ps)

    again = make_ps(tmp_path)
    await again.failovers.restore()
    try:
        assert "r1" in again.failovers.active, again.failovers.broken
        view = again.failovers.active["r1"].view
        assert view.read(0, 1) == b"\x02"
    finally:
        await close_ps(again)


async def test_a_failover_that_cannot_be_restored_leaves_the_others_and_the_server_up(
    tmp_path: Path,
) -> None:
    """Found in review: restore() let one unopenable failover record (a seq not applied, a
    history cut) fail every start. It is now kept, its disk stays fenced, status says why,
    the other failovers come back, and ``failover cleanup`` removes it."""
    ps = make_ps(tmp_path)
    disks = {name: ps._open_disk(name, ("agent", SIZE)) for name in ("a1", "b1")}
    appliers = [asyncio.ensure_future(d.run_applier()) for d in disks.values()]
    for disk in disks.values():
        for seq in (1, 2):
            await put(disk, seq)
        await disk.wait_applied(2)
        await disk.make_applied_durable()
    for name in disks:
        await ps.failovers.failover([name], "latest", test=False, planned=False, nbd=None)
    for applier in appliers:
        applier.cancel()
    await asyncio.gather(*appliers, return_exceptions=True)
    await close_ps(ps)
    path = tmp_path / "failovers" / "a1.json"
    record: dict[str, Any] = json.loads(path.read_text())
    record["point"]["seq"] = 7  # a seq the replica never reached
    path.write_text(json.dumps(record))

    again = make_ps(tmp_path)
    try:
        await again.failovers.restore()  # does not raise
        assert "b1" in again.failovers.active
        assert "a1" not in again.failovers.active and "a1" in again.failovers.broken
        assert again.disks["a1"].fenced  # nothing applied past the failover meanwhile
        listed = {f["disk"]: f for f in again.failovers.status()}
        assert listed["a1"]["state"] == "broken" and "not applied" in listed["a1"]["error"]
        reply = await again.failovers.cleanup("a1")
        assert reply["ok"] and not path.exists()
        assert not again.disks["a1"].fenced and "a1" not in again.failovers.broken
    finally:
        await close_ps(again)


async def test_to_file_with_the_undo_log_off_copies_a_still_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: with the undo log off, ``--to FILE`` copied the replica while the
    applier went on writing it: a torn image, labelled with a seq it never was at. The
    applier is now held for the copy and resumes after it."""
    import process_server.failover as failover_mod

    ps = make_ps(tmp_path)
    ps.cfg = replace(ps.cfg, undo=False)
    disk = ps._open_disk("u1", ("agent", SIZE))
    assert disk.undo is None
    applier = asyncio.ensure_future(disk.run_applier())
    copying, go_on = threading.Event(), threading.Event()
    real = failover_mod.materialise

    def held_copy(view: Any, path: Path) -> int:
        copying.set()
        go_on.wait(10)  # batch 2 arrives while the copy is under way
        return real(view, path)

    monkeypatch.setattr(failover_mod, "materialise", held_copy)
    try:
        await put(disk, 1, 0)
        await disk.wait_applied(1)
        out = tmp_path / "u1.img"
        writing = asyncio.ensure_future(ps.failovers.to_file("u1", "latest", out))
        assert await asyncio.to_thread(copying.wait, 10)
        await put(disk, 2, 0)
        await asyncio.sleep(0.3)  # an applier still running applies batch 2 meanwhile
        go_on.set()
        reply = await asyncio.wait_for(writing, 10)
        assert reply["point"]["seq"] == 1
        assert out.read_bytes()[:4096] == b"\x01" * 4096, "the image holds a later batch"
        await asyncio.wait_for(disk.wait_applied(2), 10)  # and applying resumed after
        assert not disk.fenced
    finally:
        go_on.set()
        applier.cancel()
        await asyncio.gather(applier, return_exceptions=True)
        await close_ps(ps)


async def test_a_cut_breaks_older_views_without_stopping_the_applier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a batch whose old contents exceed the undo record limit (mkfs or
    blkdiscard on the source) is recorded as a cut; with a test failover open, the applier
    raised ValueError and took the whole process server down, and every later start failed
    reopening that failover. Now the view is marked broken (reads fail with EIO, status says
    why), the applier goes on, and a restart keeps the failover as broken."""
    import process_server.undo as undo_mod

    monkeypatch.setattr(undo_mod, "RECORD_MAX", 128 << 10)  # stands for 256 MiB
    ps = make_ps(tmp_path)
    disk = ps._open_disk("c1", ("agent", SIZE))
    applier = asyncio.ensure_future(disk.run_applier())
    try:
        data = encode_batch(
            "c1", 1, 1, [Extent(0, 512 << 10, b"\x07" * (512 << 10))], newest_write_ns=1
        )
        disk.append_batch(data, peek_batch_header(data))
        await disk.sync_cache()
        await disk.wait_applied(1)
        await disk.make_applied_durable()
        await ps.failovers.failover(["c1"], "latest", test=True, planned=False, nbd=None)
        failover = ps.failovers.active["c1"]
        data = encode_batch(
            "c1", 2, 2, [Extent(0, SIZE, None)], newest_write_ns=1
        )  # the guest discards it all
        disk.append_batch(data, peek_batch_header(data))
        await disk.sync_cache()
        await asyncio.wait_for(disk.wait_applied(2), 10)
        await put(disk, 3, 0)
        await asyncio.wait_for(disk.wait_applied(3), 10)  # the applier is still running
        assert not applier.done()
        with pytest.raises(DiskError) as caught:
            await failover.overlay.read(0, 4096)
        assert caught.value.errno == errno.EIO
        listed = {f["disk"]: f for f in ps.failovers.status()}
        assert "cut" in (listed["c1"]["error"] or "")
        await disk.make_applied_durable()
    finally:
        applier.cancel()
        await asyncio.gather(applier, return_exceptions=True)
        await close_ps(ps)

    again = make_ps(tmp_path)
    try:
        await again.failovers.restore()  # the start goes on
        assert "c1" in again.failovers.broken
        assert "history" in again.failovers.broken["c1"][1]
        assert (await again.failovers.cleanup("c1"))["ok"]
    finally:
        await close_ps(again)


async def test_a_committed_failover_leaves_no_point_to_write_out(tmp_path: Path) -> None:
    """Found in review: after ``failover commit`` the failed-over point's catalog row was
    kept; with its seq equal to applying_seq it was still listed, and ``--to FILE`` of it
    wrote out the DR disk's contents (the DR VM's writes) as if they were the point."""
    ps = make_ps(tmp_path)
    disk = ps._open_disk("k1", ("agent", SIZE))
    applier = asyncio.ensure_future(disk.run_applier())
    try:
        for seq in (1, 2):
            await put(disk, seq)
            await disk.wait_applied(seq)
            ps.points.record_mark(
                disk, PointMark(f"p{seq}", "k1", seq, 1, "crash-consistent", "", "", 0)
            )
        await ps.failovers.failover(["k1"], "p2", test=False, planned=False, nbd=None)
        await ps.failovers.active["k1"].overlay.write(0, b"\xdd" * 4096, fua=True)  # DR VM
        await ps.failovers.commit("k1")
        assert ps.points.list_points("k1") == []
        for spec in ("p2", "latest"):
            with pytest.raises(FailoverError, match="committed"):
                await ps.failovers.to_file("k1", spec, tmp_path / f"{spec}.img")
            assert not (tmp_path / f"{spec}.img").exists()
    finally:
        applier.cancel()
        await asyncio.gather(applier, return_exceptions=True)
        await close_ps(ps)


async def test_a_dr_write_during_the_commit_merge_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: ``failover commit`` merged the overlay into the replica in a worker
    thread while the export kept taking writes; a write landing after its range was merged
    went to the old overlay, which was then emptied and deleted: an acknowledged (FUA) DR
    write vanished. The export's reads and writes now wait for the merge."""
    ps = make_ps(tmp_path)
    disk = ps._open_disk("m1", ("agent", SIZE))
    applier = asyncio.ensure_future(disk.run_applier())
    real_fdatasync = os.fdatasync
    in_sync, go_on = threading.Event(), threading.Event()

    def held_fdatasync(fd: int) -> None:
        if fd == disk.replica_fd and threading.current_thread() is not threading.main_thread():
            in_sync.set()
            go_on.wait(10)  # merge_into is at its fdatasync, the overlay still in use
        real_fdatasync(fd)

    try:
        for seq in (1, 2):
            await put(disk, seq)
            await disk.wait_applied(seq)
            ps.points.record_mark(
                disk, PointMark(f"p{seq}", "m1", seq, 1, "crash-consistent", "", "", 0)
            )
        await ps.failovers.failover(["m1"], "p1", test=False, planned=False, nbd=None)
        overlay = ps.failovers.active["m1"].overlay
        await overlay.write(8192, b"\xaa" * 4096, fua=True)
        monkeypatch.setattr(os, "fdatasync", held_fdatasync)
        commit = asyncio.ensure_future(ps.failovers.commit("m1"))
        assert await asyncio.to_thread(in_sync.wait, 10)
        writing = asyncio.ensure_future(overlay.write(8192, b"\xbb" * 4096, fua=True))
        await asyncio.sleep(0.2)
        go_on.set()
        await asyncio.wait_for(asyncio.gather(commit, writing), 10)
        assert await overlay.read(8192, 4096) == b"\xbb" * 4096, "the DR write was lost"
        assert os.pread(disk.replica_fd, 4096, 8192) == b"\xbb" * 4096
    finally:
        go_on.set()
        applier.cancel()
        await asyncio.gather(applier, return_exceptions=True)
        await close_ps(ps)
