"""An agent with nothing to do sleeps: a real agent, connected and level, wakes its event loop
a few times a second (heartbeats), not fifty (its point sender used to poll every 20 ms
with no point to send: 1.2% of a core on every protected server, doing nothing).

Measured from outside the code under test: the main thread's voluntary context switches in
``/proc/PID/status``, which count every time the event loop went to sleep."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.deploy import Deployment
from tests.test_failover import drain, wait_replicating

IDLE_SECONDS = 3.0
MAX_WAKEUPS_PER_SECOND = 15  # heartbeats at 1 s and status polls; 53/s before


def _voluntary_switches(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for {pid}")


def test_an_idle_agent_sleeps(tmp_path: Path) -> None:
    with Deployment(tmp_path) as dep:
        dep.init_pki()
        dep.add_agent("idle01", {"idle01-d": 64 << 20})
        dep.start_ps()
        pid = dep.start_agent("idle01").pid
        wait_replicating(dep, "idle01")
        drain(dep, "idle01", "idle01-d")
        time.sleep(0.5)  # the first sync's last messages
        before = _voluntary_switches(pid)
        time.sleep(IDLE_SECONDS)
        rate = (_voluntary_switches(pid) - before) / IDLE_SECONDS
        assert rate < MAX_WAKEUPS_PER_SECOND, f"an idle agent woke {rate:.0f} times a second"
