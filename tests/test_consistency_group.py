"""A consistency group of three disks on two agents: every group point is one consistent cut.

The writer makes a causal chain across the disks: counter k goes to g1, then (after its
acknowledgement) to g2, then to g3, all through the agents' NBD exports with qemu-io. In any
consistent cut, g1 >= g2 >= g3. Group points are materialised with ``failover --to`` and the
counters read back here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from benchmarks.deploy import Deployment
from tests.test_failover import _require_tools, nbd_uri, ps, run, wait_replicating

pytestmark = pytest.mark.interop
SIZE = 4 << 20
DISKS = ("g1", "g2", "g3")


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    _require_tools()
    d = Deployment(tmp_path_factory.mktemp("grp"))
    d.init_pki()
    d.write_ps_config(
        apply_sync_interval="10ms",
        groups={"app": {"disks": list(DISKS), "interval": "150ms", "hold_timeout": "2s"}},
    )
    no_own_points = {"crash_consistent_interval": 0}
    d.add_agent(
        "db01",
        {"g1": SIZE, "g2": SIZE},
        nbd=True,
        disk_options={k: no_own_points for k in ("g1", "g2")},
    )
    d.add_agent("app01", {"g3": SIZE}, nbd=True, disk_options={"g3": no_own_points})
    d.start_ps()
    d.start_agent("db01")
    d.start_agent("app01")
    wait_replicating(d, "db01")
    wait_replicating(d, "app01")
    yield d
    d.stop_all()


def _counter_write(uri: str, k: int) -> None:
    """Counter ``k`` (1..250) as the byte filling sector 0; returns once acknowledged."""
    run("qemu-io", "-f", "raw", "-c", f"write -P {k} 0 512", uri)


def _counter(image: bytes) -> int:
    return image[0]


def test_every_group_point_is_consistent_across_agents(dep: Deployment):
    uris = {
        "g1": nbd_uri("g1", dep.agents["db01"].nbd["g1"]),
        "g2": nbd_uri("g2", dep.agents["db01"].nbd["g2"]),
        "g3": nbd_uri("g3", dep.agents["app01"].nbd["g3"]),
    }
    deadline = time.monotonic() + 60
    while len(ps(dep, "points", "list", "--group", "app")["points"]) < 1:
        assert time.monotonic() < deadline, "no group point"
        time.sleep(0.1)
    for k in range(1, 61):  # stays below 251: the counter byte never wraps
        for disk in DISKS:
            _counter_write(uris[disk], k)
    points = ps(dep, "points", "list", "--group", "app")["points"]
    assert len(points) >= 5
    for p in points:
        assert sorted(p["seqs"]) == sorted(DISKS)
    status = ps(dep, "status")
    assert status["groups"]["app"]["points"] >= len(points) - 1
    assert status["groups"]["app"]["last_hold_ms"] < 2000
    cuts = []
    step = max(1, len(points) // 8)
    for p in points[::step]:
        counters = []
        for disk in DISKS:
            image = dep.root / f"{p['id']}-{disk}.img"
            ps(dep, "failover", disk, "--point", p["id"], "--to", str(image))
            counters.append(_counter(image.read_bytes()[:512]))
        cuts.append(counters)
        assert counters[0] >= counters[1] >= counters[2], f"point {p['id']}: {counters}"
    assert any(c[0] > 0 for c in cuts), cuts  # some point caught the chain mid-way or after
