"""An initial sync's copy (agent/bulk_copy.py, process_server/bulk.py), with real agent and
process-server processes: the copy with writes going on, the fence that holds those writes
back, every way the copy stops early (a full cache, a journal overflow, a refusal) and goes on
in journal order, kills at its failpoints, and what is refused while it runs. Source and
replica are compared with `cmp` and with SEEK_DATA maps (holes must stay holes); the pieces'
zero-block split is checked against a plain per-block scan (Hypothesis)."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.bulk_copy import _PieceReader
from benchmarks.deploy import Deployment, Driver
from common.digests import zero_block_runs
from protocol.frames import BULK_RAW, BULK_ZERO
from tests.test_crash_matrix import ArmedDeployment, armed_env
from tests.test_resync import cmp, data_ranges, make_image, wait_in_sync

MiB = 1 << 20


# ----------------------------------------------------------------------------- pure
@st.composite
def blocky(draw: st.DrawFn) -> bytes:
    """Runs of zero and non-zero 4 KiB blocks (some with a lone non-zero byte), maybe a short
    tail block."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["zero", "data", "one"]))
        n = draw(st.integers(1, 3)) * 4096
        if kind == "zero":
            out += bytes(n)
        elif kind == "data":
            out += draw(st.binary(min_size=n, max_size=n))
        else:
            block = bytearray(n)
            block[draw(st.integers(0, n - 1))] = draw(st.integers(1, 255))
            out += block
    out += draw(st.binary(max_size=4095))
    return bytes(out)


def _lone_byte(position: int, size: int = 4096) -> bytes:
    block = bytearray(size)
    block[position] = 1
    return bytes(block)


@settings(max_examples=300, deadline=None)
@given(blocky(), blocky())
# Blocks the screen (first and last bytes) passes but that are not zero, and a short tail.
@example(bytes(4096) + _lone_byte(2048) + bytes(4096) + _lone_byte(1000, 3000), b"")
@example(_lone_byte(1) + _lone_byte(4094) + bytes(100), bytes(4096))
def test_block_runs_split_exactly_at_zero_blocks(data: bytes, after: bytes) -> None:
    """Also over the first bytes of a longer buffer (the readers' kept buffer): what lies
    beyond ``end`` is never looked at."""
    runs = zero_block_runs(data)
    assert zero_block_runs(bytearray(data + after), len(data)) == runs
    if not data:
        assert runs == []
        return
    assert [r[0] for r in runs] == [0, *[r[1] for r in runs[:-1]]], "runs must tile the data"
    assert runs[-1][1] == len(data)
    for start, end, zero in runs:
        for pos in range(start, end, 4096):
            block = data[pos : min(pos + 4096, end)]
            assert (block.count(0) == len(block)) == zero, (start, end, zero, pos)
    for a, b in itertools.pairwise(runs):
        assert a[2] != b[2], "neighbouring runs of one kind must be merged"


def test_block_runs_refuse_an_end_past_the_buffer() -> None:
    with pytest.raises(ValueError, match="outside"):
        zero_block_runs(bytes(5000), 8192)
    with pytest.raises(ValueError, match="outside"):
        zero_block_runs(bytes(10), -1)


def test_a_reader_keeps_its_buffer_but_not_the_pieces_it_returned(tmp_path: Path) -> None:
    """Each reader thread reads into one buffer, kept from read to read: a raw piece (here
    incompressible bytes, or compression off) must not be a view into it, or the next read
    would change the bytes of a piece still waiting to be sent."""
    path = tmp_path / "img"
    rnd = random.Random(3)
    content = rnd.randbytes(2 * MiB) + bytes(64 << 10) + rnd.randbytes(MiB)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = _PieceReader(fd, MiB)
        for level in (0, 1):
            first = reader.read(0, MiB, True, level)
            second = reader.read(MiB, 2 * MiB, True, level)
            zeros = reader.read(2 * MiB, 2 * MiB + (64 << 10), False, level)
            for piece in [*first, *second]:
                assert piece.codec == BULK_RAW  # random bytes do not shrink
                end = piece.offset + piece.length
                assert bytes(piece.payload) == content[piece.offset : end], piece.offset
            assert [(p.offset, p.length, p.codec) for p in zeros] == [
                (2 * MiB, 64 << 10, BULK_ZERO)
            ]
        with pytest.raises(ValueError, match="longer than the read buffer"):
            reader.read(0, MiB + 4096, True, 0)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def dep(tmp_path: Path) -> Iterator[ArmedDeployment]:
    d = ArmedDeployment(tmp_path / "d")
    d.init_pki()
    yield d
    d.stop_all()


def disk_row(driver: Driver) -> dict[str, Any]:
    return dict(driver.call(op="status")["status"]["disks"][0])


def ps_row(dep: Deployment, disk: str = "d1") -> dict[str, Any] | None:
    rows = dep.ps_status().get("disks", [])
    return next((r for r in rows if r["disk"] == disk), None)


def wait_copy_on(dep: Deployment, timeout: float = 30) -> None:
    """Until the process server holds the disk's batches for a copy."""
    deadline = time.monotonic() + timeout
    while not (ps_row(dep) or {}).get("bulk_copy"):
        assert time.monotonic() < deadline, "the copy never began"
        time.sleep(0.02)


def write_until_synced(
    dep: Deployment, driver: Driver, size: int, seed: int, timeout: float = 120
) -> dict[str, Any]:
    """Random writes, zero-writes and trims (some over the copy's regions, before and after
    it reaches them) until the disk replicates; then the replica is drained. Returns what
    was seen of the process server meanwhile: whether the copy was on, and whether its
    applied seq moved while it was (the fence)."""
    rnd = random.Random(seed)
    seen: dict[str, Any] = {"copying": 0, "applied_moved": False, "writes": 0}
    fenced_applied: int | None = None
    deadline = time.monotonic() + timeout
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for _ in range(20):
            length = rnd.choice([512, 4096, 65536, 256 << 10])
            offset = rnd.randrange(0, size - length)
            op = rnd.choices(["write", "zero", "trim"], [8, 1, 1])[0]
            reply = driver.call(
                op=op, disk="d1", offset=offset, length=length, seed=rnd.randrange(1 << 30)
            )
            assert reply["ok"], reply
            seen["writes"] += 1
        assert driver.call(op="flush", disk="d1")["ok"]
        ps = ps_row(dep)
        if ps is not None and ps.get("bulk_copy"):
            seen["copying"] += 1
            if fenced_applied is None:
                fenced_applied = ps["applying_seq"]
            elif ps["applying_seq"] != fenced_applied:
                seen["applied_moved"] = True
        row = disk_row(driver)
        if row["state"] == "replicating" and row["acked_seq"] >= row["journaled_seq"]:
            dep.wait_applied("d1", row["journaled_seq"])
            seen["row"] = row
            return seen
        time.sleep(0.05)
    raise TimeoutError(f"d1 did not reach sync: {row}")


def assert_replica_equal(dep: Deployment, image: Path) -> None:
    replica = dep.replica_path("d1")
    assert cmp(image, replica), "the replica differs from the source"
    source = data_ranges(image)
    for start, end in data_ranges(replica):
        assert any(s <= start and end <= e for s, e in source), (
            f"replica data where the source has a hole: {start}-{end}"
        )


# ----------------------------------------------------------------------------- the copy
def test_copy_with_writes_going_on_is_byte_identical_and_keeps_holes(
    dep: ArmedDeployment, tmp_path: Path
) -> None:
    """The copy runs while writes go on; the process server holds them back (its applied
    seq does not move while the copy is on) and applies them after it: the replica ends
    equal to the source, holes included, and no write needed the journal's order."""
    size = 64 * MiB
    image = tmp_path / "src.img"
    make_image(image, size, seed=11)
    dep.add_agent("a1", {"d1": image}, options={"bandwidth_limit": "12MiB"})
    dep.start_ps()
    driver = Driver(dep, "a1")
    try:
        seen = write_until_synced(dep, driver, size, seed=12)
        bulk = seen["row"]["bulk_copy"]
        assert bulk["copies"] == 1 and bulk["fallbacks"] == 0, bulk
        assert not bulk["open"]
        assert seen["copying"] >= 2, f"no writes were made during the copy: {seen}"
        assert not seen["applied_moved"], "a held write was applied during the copy"
        row = ps_row(dep)
        assert row is not None and not row["bulk_copy"]
        # One link all along: no checkpoint overtook the piece it counts (under a bandwidth
        # limit, a piece's send waits for the limiter after its id is taken).
        assert dep.agent_status("a1")["link"]["connects"] == 1, dep.agent_status("a1")["link"]
        # Nothing of the copy went through the journal: its seqs are the writes' alone.
        assert seen["row"]["journaled_seq"] <= 2 * seen["writes"]
        assert_replica_equal(dep, image)
    finally:
        driver.quit()


def test_checkpoints_under_a_bandwidth_limit_never_overtake_their_pieces(
    dep: ArmedDeployment, tmp_path: Path
) -> None:
    """A checkpoint is asked for at a range's end; the next piece's send then waits for the
    bandwidth limiter after its id is taken. The checkpoint counts the pieces sent when it
    was asked for, not when it runs: one counting the waiting piece reached the process
    server before it, which dropped the connection ("bulk-sync through N, but only N-1
    sent") at nearly every checkpoint."""
    size = 48 * MiB  # three ranges of random bytes, ~7 s at 6 MiB/s: a checkpoint falls due
    image = tmp_path / "src.img"
    make_image(image, size, seed=21, data_fraction=1.0)
    dep.add_agent("a1", {"d1": image}, options={"bandwidth_limit": "6MiB"})
    dep.start_ps()
    dep.start_agent("a1")
    row = wait_in_sync(dep, "a1", "d1", timeout=60)
    bulk = row["bulk_copy"]
    assert bulk["copies"] == 1 and bulk["fallbacks"] == 0, bulk
    assert bulk["checkpoints"] >= 2, f"no checkpoint before the last: {bulk}"
    link = dep.agent_status("a1")["link"]
    assert link["connects"] == 1, link
    assert "bulk-sync through" not in (dep.root / "ps.log").read_text()
    assert cmp(image, dep.replica_path("d1"))


def test_a_half_full_cache_ends_the_copy_and_the_sync_goes_on_in_journal_order(
    dep: ArmedDeployment, tmp_path: Path
) -> None:
    """Held writes fill the cache (16 MiB, its least): at half of it the process server ends
    the copy itself, applies what it held, and the agent sends the rest in journal order."""
    size = 64 * MiB
    image = tmp_path / "src.img"
    make_image(image, size, seed=13, data_fraction=0.8)
    dep.write_ps_config(cache_quota="16MiB")
    # A window smaller than what is in flight when the server ends the copy: the copy must
    # not wait for pieces the server now drops.
    dep.add_agent(
        "a1",
        {"d1": image},
        options={
            "bandwidth_limit": "12MiB",
            "max_batch_bytes": "256KiB",
            "window_bytes": "256KiB",
        },
    )
    dep.start_ps()
    driver = Driver(dep, "a1")
    try:
        # The writes go once the copy is on: made before it, they would be cached when the
        # agent asks, and the server would refuse the copy (a quarter-full cache) instead.
        wait_copy_on(dep)
        rnd = random.Random(14)
        for i in range(160):  # ~10 MiB of writes at once: more than half the cache
            offset = rnd.randrange(0, size - (64 << 10))
            assert driver.call(op="write", disk="d1", offset=offset, length=64 << 10, seed=i)["ok"]
        seen = write_until_synced(dep, driver, size, seed=15)
        bulk = seen["row"]["bulk_copy"]
        assert bulk["fallbacks"] >= 1, bulk
        log = (dep.root / "ps.log").read_text()
        assert "the cache is half full" in log
        assert_replica_equal(dep, image)
    finally:
        driver.quit()


def test_an_overflow_during_the_copy_turns_it_off_for_good(
    dep: ArmedDeployment, tmp_path: Path
) -> None:
    """Writes overflow the journal during the copy: they are in the image and the bitmap
    only, so a copy from then on could land under older held writes of their regions. The
    copy stops, is ended, never runs again for this disk, and the sync converges in journal
    order."""
    size = 64 * MiB
    image = tmp_path / "src.img"
    make_image(image, size, seed=16, data_fraction=0.7)
    dep.add_agent(
        "a1",
        {"d1": image},
        options={"bandwidth_limit": "8MiB", "journal_quota": "2MiB", "max_batch_bytes": "256KiB"},
    )
    dep.start_ps()
    driver = Driver(dep, "a1")
    try:
        wait_copy_on(dep)  # else the overflow could come first, and no copy would begin
        rnd = random.Random(17)
        deadline = time.monotonic() + 30
        overflowed = False
        while not overflowed and time.monotonic() < deadline:
            for i in range(40):  # the same few regions again and again
                offset = rnd.randrange(0, 16) * MiB + rnd.randrange(0, 15) * (64 << 10)
                assert driver.call(op="write", disk="d1", offset=offset, length=64 << 10, seed=i)[
                    "ok"
                ]
            overflowed = disk_row(driver)["resync_reason"] == "journal-overflow"
        assert overflowed, "the journal did not overflow during the copy"
        seen = write_until_synced(dep, driver, size, seed=18)
        assert_replica_equal(dep, image)
        bulk = seen["row"]["bulk_copy"]
        assert not bulk["allowed"] and not bulk["open"], bulk
        assert bulk["fallbacks"] == 1 and bulk["copies"] == 0, bulk  # stopped, not finished
        row = ps_row(dep)
        assert row is not None and not row["bulk_copy"]
    finally:
        driver.quit()


def test_agent_killed_right_after_begin_ends_the_copy_on_restart(
    dep: ArmedDeployment, tmp_path: Path
) -> None:
    """SIGKILL once the process server holds the disk's batches: the restarted agent (an
    unclean stop: its image may be ahead of its journal) may not copy any more; it ends the
    copy the server still holds and syncs in journal order."""
    size = 48 * MiB
    image = tmp_path / "src.img"
    make_image(image, size, seed=19)
    dep.add_agent("a1", {"d1": image})
    dep.start_ps()
    with armed_env("bulk.after_begin=1"):
        doomed = Driver(dep, "a1")
    try:
        assert doomed.proc.wait(30) == -9, "the failpoint did not fire"
    finally:
        doomed.close()
    row = ps_row(dep)
    assert row is not None and row["bulk_copy"], "the copy had not begun"
    driver = Driver(dep, "a1")
    try:
        seen = write_until_synced(dep, driver, size, seed=20)
        bulk = seen["row"]["bulk_copy"]
        assert not bulk["allowed"] and not bulk["open"] and bulk["copies"] == 0, bulk
        assert not ps_row(dep)["bulk_copy"]  # type: ignore[index]
        assert_replica_equal(dep, image)
    finally:
        driver.quit()


@pytest.mark.parametrize("point", ["bulk.after_sync", "bulk.before_fence_lifted"])
def test_process_server_killed_in_the_copy_loses_nothing(
    dep: ArmedDeployment, tmp_path: Path, point: str
) -> None:
    """SIGKILL of the process server once the copy's pieces are durable but before the agent
    hears so, and once the copy's last pieces are durable but before the fence is lifted:
    restarted, it keeps the fence, the agent copies what is not yet confirmed again (the
    pieces already there compare equal and are not sent), and the replica ends equal."""
    size = 48 * MiB
    image = tmp_path / "src.img"
    make_image(image, size, seed=21)
    # The copy lasts over 2 s, so a checkpoint (bulk.after_sync) comes before its end.
    dep.add_agent("a1", {"d1": image}, options={"bandwidth_limit": "8MiB"})
    dep.arm = f"{point}=1"
    dep.start_ps()
    driver = Driver(dep, "a1")
    try:
        deadline = time.monotonic() + 60
        assert dep.ps_proc is not None
        while dep.ps_proc.poll() is None:
            assert time.monotonic() < deadline, f"{point} was not reached"
            assert driver.call(op="write", disk="d1", offset=4 * MiB, length=4096, seed=1)["ok"]
            time.sleep(0.05)
        assert dep.ps_proc.returncode == -9
        dep.start_ps()
        seen = write_until_synced(dep, driver, size, seed=22)
        # Resumed and finished (copies 1), or, when its last checkpoint had cleared every
        # range before the kill, only ended (copies 0): either way no longer held.
        assert not seen["row"]["bulk_copy"]["open"], seen["row"]["bulk_copy"]
        assert not ps_row(dep)["bulk_copy"]  # type: ignore[index]
        assert_replica_equal(dep, image)
    finally:
        driver.quit()


def test_failover_and_points_are_refused_while_copying(
    dep: ArmedDeployment, tmp_path: Path
) -> None:
    """While the copy runs the replica is neither consistent nor has a point: a failover
    (test or not) is refused with the reason, and so is a manual point."""
    size = 64 * MiB
    image = tmp_path / "src.img"
    make_image(image, size, seed=23, data_fraction=0.8)
    dep.add_agent("a1", {"d1": image}, options={"bandwidth_limit": "4MiB"})
    dep.start_ps()
    dep.start_agent("a1")
    deadline = time.monotonic() + 30
    while not (ps_row(dep) or {}).get("bulk_copy"):
        assert time.monotonic() < deadline, "the copy did not begin"
        time.sleep(0.1)
    for args in (
        ("failover", "d1", "--test", "--point", "latest"),
        ("failover", "d1", "--point", "latest"),
    ):
        reply = dep.ps_json(*args)
        assert reply["returncode"] != 0, reply
        assert "initial sync is still copying" in str(reply), reply
    reply = dep.ps_json("points", "create", "d1")
    assert reply["returncode"] != 0, reply
    assert (ps_row(dep) or {}).get("bulk_copy"), "the copy ended before the checks ran"


def test_a_lost_agent_state_is_resynced_in_journal_order(
    dep: ArmedDeployment, tmp_path: Path
) -> None:
    """The source host is rebuilt after a first sync (state and journal gone) and the image
    changed meanwhile: the process server is ahead of the fresh journal, which is rebased,
    and the whole disk is compared again in journal order (a copy would rewrite the replica
    under its recovery points). The replica ends equal."""
    size = 32 * MiB
    image = tmp_path / "src.img"
    make_image(image, size, seed=24)
    spec = dep.add_agent("a1", {"d1": image})
    dep.start_ps()
    driver = Driver(dep, "a1")
    try:
        seen = write_until_synced(dep, driver, size, seed=25)
        assert seen["row"]["bulk_copy"]["copies"] == 1
    finally:
        driver.quit()
    subprocess.run(["rm", "-rf", str(spec.state_dir)], check=True)
    with open(image, "r+b") as f:
        f.seek(5 * MiB)
        f.write(os.urandom(2 * MiB))
    driver = Driver(dep, "a1")
    try:
        seen = write_until_synced(dep, driver, size, seed=26)
        bulk = seen["row"]["bulk_copy"]
        assert not bulk["allowed"] and bulk["copies"] == 0 and bulk["fallbacks"] == 0, bulk
        assert seen["row"]["resync_totals"]["hashed_bytes"] > 0  # compared, not copied
        assert_replica_equal(dep, image)
    finally:
        driver.quit()
