"""Every recovery point, materialised, equals the source as it was at that seq.

Hypothesis drives random writes, zeroes and overlapping rewrites through a real replica (cache,
applier, undo log, fdatasync'ed files) and takes a copy of the "source" itself at random batch
boundaries (the markers). Each point is then read back two ways (a point-in-time view, and an
image written by ``materialise``) and compared, by SHA-256 computed here, with that copy. Views
opened mid-run must not move while the applier goes on (test failover), and the undo history
survives a reopen of the replica (a restarted process server).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.at_rest import Keyring, Sealer, new_key_file
from process_server.failover import materialise
from process_server.replica import ReplicaDisk
from protocol.batch import Extent, Limits, encode_batch, peek_batch_header

SIZE = 256 << 10
UNIT = 512

write_op = st.tuples(
    st.sampled_from(["data", "data", "data", "zero"]),
    st.integers(0, SIZE // UNIT - 1),
    st.integers(1, 64),
    st.integers(0, 255),
)
batch = st.lists(write_op, min_size=1, max_size=6)
# (writes, marker after, open a view, make the cache durable now: batches that wait are applied
# together, so groups whose batches overlap each other are exercised)
step = st.tuples(batch, st.booleans(), st.booleans(), st.booleans())


def _open(root: Path, create: bool = False, sealer: Sealer | None = None) -> ReplicaDisk:
    return ReplicaDisk.open(
        root,
        "p1",
        limits=Limits(),
        apply_sync_interval=0.0,
        cache_quota=1 << 30,
        cache_segment=64 << 10,
        create=("agent", SIZE) if create else None,
        undo=True,
        undo_segment=64 << 10,
        sealer=sealer,
    )


def _coalesce(ops: list[tuple[str, int, int, int]], source: bytearray) -> list[Extent]:
    """Apply ``ops`` to ``source`` and return the batch extents (final contents of the bytes
    the ops touched, as the agent's coalescer would send them)."""
    touched = bytearray(SIZE // UNIT)
    zeroed = bytearray(SIZE // UNIT)
    for kind, unit, count, fill in ops:
        start, end = unit * UNIT, min(SIZE, (unit + count) * UNIT)
        if kind == "data":
            source[start:end] = bytes([fill or 1]) * (end - start)
            value = 0
        else:
            source[start:end] = bytes(end - start)
            value = 1
        for u in range(start // UNIT, end // UNIT):
            touched[u] = 1
            zeroed[u] = value
    extents: list[Extent] = []
    u = 0
    while u < len(touched):
        if not touched[u]:
            u += 1
            continue
        v = u
        while v < len(touched) and touched[v] and zeroed[v] == zeroed[u]:
            v += 1
        start, end = u * UNIT, v * UNIT
        extents.append(Extent(start, end - start, None if zeroed[u] else bytes(source[start:end])))
        u = v
    return extents


def _sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


@given(st.lists(step, min_size=1, max_size=14))
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_point_equals_the_source_at_its_seq(tmp_path_factory, steps) -> None:
    root = tmp_path_factory.mktemp("points")
    asyncio.run(_scenario(root, steps))


@given(st.lists(step, min_size=1, max_size=14))
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_point_equals_the_source_with_the_undo_log_sealed(tmp_path_factory, steps) -> None:
    """The same with cache and undo log encrypted at rest (views open sealed records)."""
    root = tmp_path_factory.mktemp("points-sealed")
    key_file = root.parent / f"{root.name}.keys"
    new_key_file(key_file)
    asyncio.run(_scenario(root, steps, Sealer(Keyring.load(key_file))))


async def _scenario(root: Path, steps, sealer: Sealer | None = None) -> None:
    disk = _open(root, create=True, sealer=sealer)
    applier = asyncio.ensure_future(disk.run_applier())
    source = bytearray(SIZE)
    expected: dict[int, str] = {0: _sha(source)}  # seq -> SHA-256 of the source at that seq
    views = []
    seq = 0
    try:
        for ops, marker, open_view, sync_now in steps:
            extents = _coalesce(ops, source)
            seq += 1
            data = encode_batch("p1", seq, seq, extents, newest_write_ns=seq)
            disk.append_batch(data, peek_batch_header(data))
            if sync_now or open_view:
                await disk.sync_cache()
            if marker:
                expected[seq] = _sha(source)
            if open_view:
                await disk.wait_applied(seq)
                point = max(expected)  # a test failover at the newest point, applier still going
                views.append((disk.open_view(point), expected[point]))
        await disk.sync_cache()
        await disk.wait_applied(seq)
        await disk.make_applied_durable()
        assert _sha(await asyncio.to_thread(disk.replica_path.read_bytes)) == _sha(source)
        for view, digest in views:  # the applier moved on; every view stayed at its point
            assert _sha(view.read(0, SIZE)) == digest
        applier.cancel()
        await asyncio.gather(applier, return_exceptions=True)
        disk.close()
        disk = _open(root, sealer=sealer)  # a restarted process server rebuilds the history
        for point, digest in expected.items():
            view = disk.open_view(point)
            assert _sha(view.read(0, SIZE)) == digest, f"point at seq {point}"
            image = root / f"point-{point}.img"
            materialise(view, image)
            assert _sha(image.read_bytes()) == digest, f"materialised point at seq {point}"
            disk.close_view(view)
    finally:
        applier.cancel()
        await asyncio.gather(applier, return_exceptions=True)
        disk.close()
