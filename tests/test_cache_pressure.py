"""Backpressure against real processes: a fenced disk (an unplanned failover stops its applier)
fills the process server's cache; the 70% and 75% alerts are raised, the agent is slowed past
the quota but never dropped (its journal absorbs the backlog), and once the pressure ends
(failover cleanup) the alerts clear by themselves and the replica equals the source (cmp)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from benchmarks.deploy import Deployment
from tests.test_failback import write_random
from tests.test_failover import _require_tools, drain, nbd_uri, ps, run, wait_replicating

pytestmark = pytest.mark.interop
MIB = 1 << 20


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    _require_tools()
    d = Deployment(tmp_path_factory.mktemp("press"))
    d.init_pki()
    d.write_ps_config(cache_quota="16MiB", cache_segment="256KiB", failover_dir=str(d.root / "fx"))
    d.add_agent("w1", {"cp1": 64 * MIB}, nbd=True, options={"max_batch_bytes": "1MiB"})
    d.start_ps()
    d.start_agent("w1")
    wait_replicating(d, "w1")
    yield d
    d.stop_all()


def _alerts(dep: Deployment) -> dict[str, str]:
    status = ps(dep, "status")
    return {a["kind"]: a["severity"] for a in status.get("alerts", []) if a.get("disk") == "cp1"}


def _wait(predicate, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_cache_pressure_warns_slows_and_recovers(dep: Deployment) -> None:
    uri = nbd_uri("cp1", dep.agents["w1"].nbd["cp1"])
    sock = dep.root / "f.sock"
    ps(dep, "failover", "cp1", "--point", "latest-processed", "--nbd", f"unix:{sock}")
    write_random(dep, uri, 0, 12 * MIB, "a")  # 75% of the 16 MiB cache
    _wait(lambda: _alerts(dep).get("cache_fill") == "critical", what="no 75% cache alert")
    rejected = ps(dep, "status")["rejected_connections"]
    write_random(dep, uri, 12 * MIB, 12 * MIB, "b")  # past the quota: acknowledged all the same
    agent = next(r for r in dep.agent_status("w1")["disks"] if r["disk"] == "cp1")
    assert agent["journaled_seq"] > agent["acked_seq"]  # the agent's journal holds the backlog
    status = ps(dep, "status")
    assert status["rejected_connections"] == rejected and status["sessions"]  # never dropped
    row = next(r for r in status["disks"] if r["disk"] == "cp1")
    assert row["cache_bytes"] <= row["cache_quota"] + 2 * MIB

    ps(dep, "failover", "cleanup", "cp1")  # the pressure ends
    drain(dep, "w1", "cp1", timeout=120)
    _wait(lambda: "cache_fill" not in _alerts(dep), what="the cache alert did not clear")
    run("cmp", str(dep.agents["w1"].disks["cp1"]), str(dep.replica_path("cp1")))
