# Network faults between a real agent and a real process server (both real processes, real TLS
# 1.3), through tests/faultproxy.py: cuts, refused connections, stalls, latency and jitter with
# fragmentation, byte corruption of the TLS stream, corruption of frames and of batch data inside
# them (the proxy terminates TLS with the deployment's own credentials to reach the plaintext),
# resets in the middle of a frame, half-closed and half-open (frozen) connections.
# Rule kept: every scenario ends with the pipeline drained and the replica equal, byte for byte,
# to the source image and to the test's own model (sha256 of the files, read with plain I/O);
# where corruption is continuous, the replica regions it targets are checked to still hold
# their old bytes, so nothing corrupt ever reaches the replica; and nothing but the proxy is
# touched to make the link recover: replication must heal by itself.
"""Replication recovers by itself from network faults, and corruption never reaches a replica."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from benchmarks.deploy import Deployment, Driver
from benchmarks.driver import pattern
from common.admin import admin_request
from common.tls import CLIENT_SERVER_HOSTNAME, client_context, server_context
from process_server.pki import issue_credentials, load_bundle
from tests.faultproxy import MSG_BATCH, FaultProxy, FrameFault

AGENT = "alice"
DISK = "alice-d"
SIZE = 16 << 20
BLOCK = 64 << 10
TIMEOUT = 40.0


@dataclass
class Env:
    dep: Deployment
    driver: Driver
    proxy: FaultProxy
    model: bytearray = field(default_factory=lambda: bytearray(SIZE))
    fresh: list[int] = field(default_factory=list)  # block numbers never written yet
    seed: int = 0

    @property
    def log_path(self) -> Path:
        return self.dep.root / "ps.log"

    def call(self, **cmd: Any) -> dict[str, Any]:
        reply = self.driver.call(**cmd)
        assert reply["ok"], reply
        return reply

    def write(self, offset: int, length: int = BLOCK) -> int:
        """One write through the agent's Python API; the model records what it must hold."""
        self.seed += 1
        reply = self.call(op="write", disk=DISK, offset=offset, length=length, seed=self.seed)
        self.model[offset : offset + length] = pattern(self.seed, length)
        return int(reply["seq"])

    def write_fresh(self, n: int) -> list[int]:
        """``n`` writes to blocks never written before (the replica holds zeros there)."""
        offsets = [self.fresh.pop() * BLOCK for _ in range(n)]
        for offset in offsets:
            self.write(offset)
        return offsets

    def write_random(self, n: int, rng: random.Random, max_len: int = BLOCK) -> None:
        """``n`` writes of random length anywhere in the first half (the second half is kept
        for :meth:`write_fresh`)."""
        for _ in range(n):
            length = rng.randint(1, max_len)
            self.write(rng.randrange(0, SIZE // 2 - length), length)

    def agent_status(self) -> dict[str, Any]:
        return dict(self.call(op="status")["status"])

    def connects(self) -> int:
        return int(self.agent_status()["link"]["connects"])

    def ps_row(self) -> dict[str, Any]:
        status = asyncio.run(
            admin_request(self.dep.ps_state / "admin.sock", {"cmd": "status"}, timeout=10)
        )
        for row in status["disks"]:
            if row["disk"] == DISK:
                return dict(row)
        raise AssertionError(f"the process server does not know {DISK}: {status}")

    def replica(self) -> bytes:
        return self.dep.replica_path(DISK).read_bytes()

    def source(self) -> bytes:
        return self.dep.agents[AGENT].disks[DISK].read_bytes()

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def settle(env: Env, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Flush, drain, wait until applied; the replica equals source and model. Returns the row."""
    started = time.monotonic()
    env.call(op="flush", disk=DISK)
    drained = env.call(op="drain", timeout=timeout)
    assert drained["drained"], f"replication did not recover within {timeout}s"
    journaled = env.agent_status()["disks"][0]["journaled_seq"]
    while (row := env.ps_row())["applied_seq"] < journaled:
        assert time.monotonic() - started < timeout, row
        time.sleep(0.02)
    assert row["error"] is None, row
    model = sha(env.model)
    assert sha(env.source()) == model, "the source image differs from the model"
    assert sha(env.replica()) == model, "the replica differs from the source"
    return row


def assert_untouched(env: Env, offsets: list[int]) -> None:
    """Blocks the replica has never been sent intact still hold zeros there."""
    replica = env.replica()
    zeros = sha(bytes(BLOCK))
    for offset in offsets:
        assert sha(replica[offset : offset + BLOCK]) == zeros, (
            f"bytes reached the replica at {offset} while every copy was corrupted"
        )


def assert_never_corrupt(env: Env, offsets: list[int]) -> int:
    """Each block of the replica holds its old bytes (zeros) or exactly the new ones, nothing
    else. Returns how many already hold the new ones."""
    replica = env.replica()
    zeros = sha(bytes(BLOCK))
    arrived = 0
    for offset in offsets:
        got = sha(replica[offset : offset + BLOCK])
        if got != zeros:
            assert got == sha(env.model[offset : offset + BLOCK]), (
                f"corrupt bytes reached the replica at {offset}"
            )
            arrived += 1
    return arrived


def session_reasons(env: Env, since: int) -> list[str]:
    return re.findall(
        rf"event=session_closed peer={AGENT} address=\(.*?\) reason=(.*)$",
        env.log_since(since),
        re.MULTILINE,
    )


def wait_for(predicate: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("faults")
    with Deployment(root) as dep:
        dep.init_pki()
        # A second bundle for the same agent name: what the proxy shows the process server when
        # it terminates TLS (the agent itself sees the real server certificate and key).
        issue_credentials(dep.pki, AGENT, root / "proxy-as-alice.bundle")
        terminate = (
            server_context(dep.pki),
            client_context(load_bundle(root / "proxy-as-alice.bundle")),
            CLIENT_SERVER_HOSTNAME,
        )
        with FaultProxy(dep.port, terminate=terminate, seed=9) as proxy:
            dep.add_agent(
                AGENT,
                {DISK: SIZE},
                # Short backoff: each scenario breaks the link several times on purpose.
                options={"process_server": f"127.0.0.1:{proxy.port}", "reconnect_max": "200ms"},
            )
            dep.start_ps()
            driver = Driver(dep, AGENT)
            try:
                fresh = list(range(SIZE // BLOCK // 2, SIZE // BLOCK))
                random.Random(3).shuffle(fresh)
                e = Env(dep, driver, proxy, fresh=fresh)
                settle(e)  # the initial sync is done before any fault
                yield e
            finally:
                driver.quit()


@pytest.fixture(autouse=True)
def clean_link(env: Env) -> Iterator[None]:
    env.proxy.clear_faults()
    env.proxy.set_mode("passthrough")
    yield
    env.proxy.clear_faults()
    env.proxy.set_mode("passthrough")


# --------------------------------------------------------------------------- cuts and outages


def test_repeated_cuts_and_refused_reconnects_heal(env: Env) -> None:
    rng = random.Random(11)
    before = env.connects()
    for i in range(3):
        env.write_random(6, rng)
        env.proxy.cut()
        env.write_random(6, rng)
        wait_for(lambda i=i: env.connects() > before + i, "the agent to reconnect after a cut")
    # The process server "goes away": connections are refused for a while, then it is back.
    env.proxy.refuse(True)
    env.proxy.cut()
    env.write_random(10, rng)
    wait_for(lambda: env.proxy.stats.refused >= 2, "the agent to retry while refused")
    env.proxy.refuse(False)
    settle(env)
    assert env.connects() >= before + 4


def test_stall_shorter_than_the_timeouts_is_ridden_out(env: Env) -> None:
    settle(env)
    before, applied = env.connects(), env.ps_row()["applied_seq"]
    env.proxy.stall()
    try:
        env.write_fresh(8)
        time.sleep(1.5)
        assert env.ps_row()["applied_seq"] == applied, "data crossed a stalled link"
    finally:
        env.proxy.resume()
    settle(env)
    assert env.connects() == before, "a short stall should not cost a reconnection"


def test_latency_jitter_and_fragmentation(env: Env) -> None:
    rng = random.Random(12)
    before = env.connects()
    env.proxy.set_delay(latency=0.01, jitter=0.01, fragment=1400)
    env.write_random(40, rng, max_len=3 * BLOCK)
    for _ in range(10):  # overlapping rewrites of the same blocks: later ones must win
        env.write(rng.randrange(4) * BLOCK, BLOCK)
    settle(env)
    assert env.connects() == before, "delay and fragmentation alone must not break the link"


# --------------------------------------------------------------------------- corruption


def test_tls_stream_corruption_is_refused_and_resent(env: Env) -> None:
    settle(env)
    since = env.log_offset()
    # Every chunk the agent sends has a flipped byte. TLS records before the flipped one in a
    # chunk arrive intact (and may carry whole batches); the one holding it fails its AEAD tag.
    env.proxy.corrupt("up", None)
    env.proxy.cut()
    offsets = env.write_fresh(6)
    deadline = time.monotonic() + TIMEOUT
    while env.proxy.stats.corrupted_chunks < 3:  # the agent backs off between attempts
        assert time.monotonic() < deadline, env.proxy.stats
        assert_never_corrupt(env, offsets)
        time.sleep(0.05)
    assert_never_corrupt(env, offsets)
    env.proxy.corrupt("up", 0)
    settle(env)
    # One flipped byte at a time, each way, on a live connection: TLS refuses the record, the
    # connection drops, the agent reconnects and resends from the server's durable seq.
    for direction in ("up", "down", "up"):
        flipped, connects = env.proxy.stats.corrupted_chunks, env.connects()
        env.proxy.corrupt(direction, 1)  # type: ignore[arg-type]
        env.write_fresh(4)
        settle(env)
        assert env.proxy.stats.corrupted_chunks == flipped + 1
        assert env.connects() > connects, "a corrupted TLS record went unnoticed"
    assert "bad record mac" in env.log_since(since).lower()


def test_frame_checksums_catch_corruption(env: Env) -> None:
    env.proxy.set_mode("terminate")
    env.proxy.cut()
    settle(env)
    for action, code in (("header", "BAD_CHECKSUM"), ("payload", "BAD_CHECKSUM")):
        since = env.log_offset()
        fault = env.proxy.add_frame_fault(FrameFault(MSG_BATCH, action))  # type: ignore[arg-type]
        env.write_fresh(3)
        settle(env)
        assert fault.fired == 1, fault
        reasons = session_reasons(env, since)
        assert any(code in r for r in reasons), reasons


def test_batch_digest_catches_corrupt_data_and_the_batch_is_resent(env: Env) -> None:
    """The frame checksums are recomputed after the flip: only the batch's per-extent XXH3-128
    can see it. Every copy is corrupted for a while: none may reach the replica."""
    env.proxy.set_mode("terminate")
    env.proxy.cut()
    settle(env)
    since = env.log_offset()
    fault = env.proxy.add_frame_fault(FrameFault(MSG_BATCH, "batch-data", count=None))
    offsets = env.write_fresh(4)
    wait_for(lambda: fault.fired >= 3, "three corrupted copies of the batch")
    time.sleep(0.2)
    assert_untouched(env, offsets)
    assert env.ps_row()["error"] is None
    env.proxy.clear_faults()
    settle(env)
    reasons = session_reasons(env, since)
    assert sum("DIGEST" in r for r in reasons) >= 3, reasons


def test_reset_in_the_middle_of_a_frame(env: Env) -> None:
    env.proxy.set_mode("terminate")
    env.proxy.cut()
    settle(env)
    fault = env.proxy.add_frame_fault(FrameFault(MSG_BATCH, "reset", count=3, fraction=0.5))
    rng = random.Random(13)
    env.write_random(12, rng, max_len=1 << 20)
    settle(env)
    assert fault.fired == 3, fault
    # Passthrough: a reset after an arbitrary number of TLS bytes, several times.
    env.proxy.set_mode("passthrough")
    for n in (37, 700, 5000, 90_000):
        env.proxy.reset_after(n)
        env.proxy.cut()
        env.write_random(8, rng, max_len=256 << 10)
        settle(env)


# --------------------------------------------------------------------------- half-closed / half-open


@pytest.mark.parametrize("direction", ["up", "down"])
def test_half_closed_connection(env: Env, direction: str) -> None:
    settle(env)
    before = env.connects()
    assert env.proxy.half_close(direction) >= 1  # type: ignore[arg-type]
    env.write_fresh(4)
    settle(env)
    assert env.connects() > before


def test_half_open_connection_is_detected_and_replaced(env: Env) -> None:
    """The peer vanishes without FIN or RST: the agent must notice by its own timeout."""
    settle(env)
    before = env.connects()
    assert env.proxy.freeze() >= 1
    started = time.monotonic()
    env.write_fresh(4)
    settle(env, timeout=TIMEOUT)
    assert env.connects() > before
    assert time.monotonic() - started < 30, "a dead link went unnoticed for too long"


# --------------------------------------------------------------------------- soak (slow)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_random_fault_schedule_soak(env: Env) -> None:
    """Many rounds of randomly chosen faults under writes; the replica is checked against the
    model after every few rounds. Rounds: TIDEMARK_FAULT_ROUNDS (default 200)."""
    rng = random.Random(int(os.environ.get("TIDEMARK_FAULT_SEED", "20")))
    rounds = int(os.environ.get("TIDEMARK_FAULT_ROUNDS", "200"))
    proxy = env.proxy
    for i in range(rounds):
        fault = rng.choice(
            ["cut", "refuse", "stall", "delay", "corrupt", "frame", "reset", "half", "freeze"]
        )
        if fault == "freeze" and rng.random() < 0.7:
            fault = "cut"  # each freeze costs the agent's ~10 s receive timeout
        proxy.set_mode("terminate" if fault in ("frame", "reset") else "passthrough")
        proxy.cut()
        if fault == "refuse":
            proxy.refuse(True)
        elif fault == "stall":
            proxy.stall()
        elif fault == "delay":
            proxy.set_delay(rng.uniform(0, 0.03), rng.uniform(0, 0.02), rng.choice([0, 1, 500]))
        elif fault == "corrupt":
            proxy.corrupt(rng.choice(["up", "down"]), rng.randint(1, 3))
        elif fault == "frame":
            action = rng.choice(["header", "payload", "batch-data"])
            proxy.add_frame_fault(FrameFault(MSG_BATCH, action, count=rng.randint(1, 3)))  # type: ignore[arg-type]
        elif fault == "reset":
            proxy.add_frame_fault(FrameFault(MSG_BATCH, "reset", fraction=rng.random()))
        env.write_random(rng.randint(1, 12), rng, max_len=rng.choice([4096, BLOCK, 1 << 20]))
        if fault == "half":
            proxy.half_close(rng.choice(["up", "down"]))  # type: ignore[arg-type]
        elif fault == "freeze":
            proxy.freeze()
        time.sleep(rng.uniform(0, 0.5))
        proxy.clear_faults()
        if i % 5 == 4 or i == rounds - 1:
            settle(env, timeout=60)
