"""Hypothesis state machine: random writes, zeroes, trims and flushes interleaved with SIGKILL
and restart of the agent process and of the process-server process.

Properties (DESIGN.md invariants 1-3):
- after a SIGKILL of the agent, the source image holds every acknowledged write
  (the test's own model is the source of truth; the image is read with plain file I/O);
- a write in flight when the agent is killed is all-or-nothing;
- after drain, the replica file equals the source byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from benchmarks.deploy import Deployment, Driver
from benchmarks.driver import pattern

DISK = "crashdisk"
SIZE = 8 << 20


def _read(path: Path, offset: int = 0, length: int = SIZE) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    return data + bytes(length - len(data))


class ReplicationUnderCrashes(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="tidemark-crash-")
        self.dep = Deployment(Path(self.tmp.name))
        self.model = bytearray(SIZE)
        self.driver: Driver | None = None
        self.ps_up = False
        self.seed = 0

    @initialize()
    def start(self) -> None:
        self.dep.init_pki()
        self.dep.add_agent("crash01", {DISK: SIZE})
        self.dep.start_ps()
        self.ps_up = True
        self.driver = Driver(self.dep, "crash01")

    @property
    def image(self) -> Path:
        return self.dep.agents["crash01"].disks[DISK]

    def _call(self, **cmd: object) -> dict[str, object]:
        assert self.driver is not None
        reply = self.driver.call(**cmd)
        assert reply["ok"], reply
        return reply

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 256 << 10), fua=st.booleans())
    def write(self, offset: int, length: int, fua: bool) -> None:
        length = min(length, SIZE - offset)
        self.seed += 1
        self._call(op="write", disk=DISK, offset=offset, length=length, seed=self.seed, fua=fua)
        self.model[offset : offset + length] = pattern(self.seed, length)

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 2 << 20), trim=st.booleans())
    def zero(self, offset: int, length: int, trim: bool) -> None:
        length = min(length, SIZE - offset)
        self._call(op="trim" if trim else "zero", disk=DISK, offset=offset, length=length)
        self.model[offset : offset + length] = bytes(length)

    @rule()
    def flush(self) -> None:
        self._call(op="flush", disk=DISK)

    @rule()
    def kill_agent(self) -> None:
        """SIGKILL between writes: every acknowledged write must be in the image."""
        assert self.driver is not None
        self.driver.kill()
        assert _read(self.image) == bytes(self.model), "source image lost an acknowledged write"
        self.driver = Driver(self.dep, "crash01")

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 1 << 20), delay=st.floats(0, 0.01))
    def kill_agent_mid_write(self, offset: int, length: int, delay: float) -> None:
        """SIGKILL while a write is in flight: after restart it is all there or not at all."""
        assert self.driver is not None and self.driver.proc.stdin is not None
        length = min(length, SIZE - offset)
        self.seed += 1
        new = pattern(self.seed, length)
        old = bytes(self.model[offset : offset + length])
        self.driver.proc.stdin.write(
            f'{{"op":"write","disk":"{DISK}","offset":{offset},"length":{length},"seed":{self.seed}}}\n'.encode()
        )
        self.driver.proc.stdin.flush()
        time.sleep(delay)
        self.driver.kill()
        self.driver = Driver(self.dep, "crash01")  # restart replays the journal onto the image
        got = _read(self.image, offset, length)
        assert got in (old, new), "a write torn by SIGKILL was half applied"
        self.model[offset : offset + length] = got

    @precondition(lambda self: self.ps_up)
    @rule()
    def kill_ps(self) -> None:
        self.dep.kill_ps()
        self.ps_up = False

    @precondition(lambda self: not self.ps_up)
    @rule()
    def start_ps(self) -> None:
        self.dep.start_ps()
        self.ps_up = True

    def teardown(self) -> None:
        try:
            if self.driver is not None and self.driver.proc.poll() is None:
                if not self.ps_up:
                    self.dep.start_ps()
                    self.ps_up = True
                reply = self._call(op="drain", timeout=60)
                assert reply["drained"], "replication did not drain"
                status = self._call(op="status")["status"]
                journaled = status["disks"][0]["journaled_seq"]  # type: ignore[index]
                self.dep.wait_applied(DISK, journaled, timeout=60)
                source = _read(self.image)
                assert source == bytes(self.model), "source image differs from the model"
                replica = _read(self.dep.replica_path(DISK))
                assert hashlib.sha256(replica).digest() == hashlib.sha256(source).digest(), (
                    "replica differs from source after drain"
                )
        finally:
            if self.driver is not None:
                self.driver.kill()
            self.dep.stop_all()
            self.tmp.cleanup()


TestReplicationUnderCrashes = ReplicationUnderCrashes.TestCase
TestReplicationUnderCrashes.settings = settings(
    max_examples=int(os.environ.get("TIDEMARK_CRASH_EXAMPLES", "6")),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_crash_state_machine_long() -> None:
    """The same machine with many more examples (outside the default run)."""
    os.environ.setdefault("TIDEMARK_CRASH_EXAMPLES", "60")
    random.seed(0)
    state = ReplicationUnderCrashes.TestCase("runTest")
    state.settings = settings(
        TestReplicationUnderCrashes.settings, max_examples=60, stateful_step_count=40
    )
    state.runTest()
