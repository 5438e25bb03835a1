"""The crash matrix (issue #9): SIGKILL of the agent, the process server and the master target
at randomly chosen moments of every phase, then restart and byte-for-byte comparison.

Kills come two ways: a failpoint (``common/failpoints.py``: a random name of the phase, a random
hit count, armed through ``TIDEMARK_FAILPOINTS`` in the environment of the one process to kill)
and a timer (SIGKILL after a random delay while the phase runs). Phases: writing, shipping,
acknowledging, applying, undo logging, point insertion, test failover, failover commit,
failback (master target killed mid-stream; process server killed while preparing the delta and
during the planned swap).

After each kill what was killed is restarted, the pipeline drains and every comparison is made
outside tidemark, on sha256 of files read with plain file I/O (and ``qemu-img compare`` for a
failover export): the source image against the test's own model of acknowledged writes, the
replica against the source, and a sample of recovery points (written out with ``tidemark-ps
failover --to FILE``) against the source as it was at the point's seq, which the model rebuilds
from its log of acknowledged writes (each with the seq the agent returned). A write in flight
when the agent dies must be all there or not at all.

Default run: every failpoint once plus timer kills and one failover/failback cycle.
``-m slow``: ``TIDEMARK_CRASH_KILLS`` (200) kills, seed ``TIDEMARK_CRASH_SEED`` (printed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from benchmarks.deploy import PYTHON, Deployment, Driver
from benchmarks.driver import pattern
from common.failpoints import ENV, FAILPOINTS

DISK = "cm1"
AGENT = "cm01"
SIZE = 4 << 20
MAX_WRITE = 256 << 10

AGENT_POINTS = [
    "journal.after_append",
    "journal.before_sync",
    "journal.after_sync",
    "shipper.after_send",
    "shipper.after_ack",
]
PS_POINTS = [
    "cache.after_durable",
    "undo.after_record",
    "applier.after_undo_sync",
    "applier.after_replica_write",
    "applier.before_applied_saved",
    "points.before_insert",
    "points.after_insert",
]
FAILOVER_POINTS = ["failover.after_overlay"]
COMMIT_POINTS = ["failover.commit.before_merge", "failover.commit.after_merge"]
DELTA_POINTS = ["failback.delta.after_append", "failback.delta.after_sync"]
SWAP_POINTS = [
    "failback.swap.before_retire",
    "failback.swap.after_retire",
    "failback.swap.before_done",
]
# An initial sync's copy: killed there by tests/test_bulk_copy.py (the matrix's disk starts
# empty, so its one copy sends nothing).
BULK_POINTS = ["bulk.after_begin", "bulk.after_sync", "bulk.before_fence_lifted"]
MT_POINTS = [  # the master target applies with the process server's own ReplicaDisk
    "mt.cache.after_durable",
    "applier.after_replica_write",
    "applier.before_applied_saved",
    "mt.finish.before_reset",
]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_file(path: Path, length: int = SIZE) -> bytes:
    with open(path, "rb") as f:
        data = f.read(length)
    return data + bytes(length - len(data))


class ArmedDeployment(Deployment):
    """A Deployment whose next spawned process gets ``TIDEMARK_FAILPOINTS`` (once)."""

    arm: str | None = None

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.root / log_name, "ab")  # noqa: SIM115 - closed in stop_all
        self._logs.append(log)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop(ENV, None)
        if self.arm:
            env[ENV] = self.arm
            log.write(f"--- armed {self.arm}\n".encode())
            log.flush()
        self.arm = None
        return subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


@contextlib.contextmanager
def armed_env(spec: str | None) -> Iterator[None]:
    old = os.environ.pop(ENV, None)
    if spec:
        os.environ[ENV] = spec
    try:
        yield
    finally:
        os.environ.pop(ENV, None)
        if old is not None:
            os.environ[ENV] = old


@dataclass
class Model:
    """What the source holds (acknowledged writes) and how it got there, by seq."""

    data: bytearray = field(default_factory=lambda: bytearray(SIZE))
    base: bytes = bytes(SIZE)
    base_seq: int = 0
    ops: list[tuple[int, int, int, int]] = field(default_factory=list)  # seq, off, len, seed

    def apply(self, seq: int, offset: int, length: int, seed: int) -> None:
        assert seq > self.base_seq, (seq, self.base_seq)
        self.data[offset : offset + length] = op_bytes(seed, length)
        self.ops.append((seq, offset, length, seed))

    def at(self, seq: int) -> bytes:
        out = bytearray(self.base)
        for s, offset, length, seed in self.ops:
            if s <= seq:
                out[offset : offset + length] = op_bytes(seed, length)
        return bytes(out)

    def rebase(self, seq: int) -> None:
        self.base = bytes(self.data)
        self.base_seq = seq
        self.ops.clear()


def op_bytes(seed: int, length: int) -> bytes:
    return pattern(seed, length) if seed else bytes(length)


@dataclass
class Tally:
    kills: int = 0
    by_phase: dict[str, int] = field(default_factory=dict)
    points_checked: int = 0
    not_fired: int = 0

    def kill(self, phase: str) -> None:
        self.kills += 1
        self.by_phase[phase] = self.by_phase.get(phase, 0) + 1


class Rig:
    """One deployment (process server + agent run by a Driver) and the model of its disk."""

    def __init__(self, root: Path, rng: random.Random, tally: Tally) -> None:
        self.root = root
        self.rng = rng
        self.tally = tally
        self.dep = ArmedDeployment(root)
        self.dep.init_pki()
        self.dep.write_ps_config(failover_dir=str(root / "fx"), apply_sync_interval="20ms")
        self.dep.add_agent(
            AGENT, {DISK: SIZE}, disk_options={DISK: {"crash_consistent_interval": "200ms"}}
        )
        self.model = Model()
        self.seed = 0
        self.driver: Driver | None = None
        self.dep.start_ps()
        self.start_agent()

    # ----------------------------------------------------------------- processes
    @property
    def image(self) -> Path:
        return self.dep.agents[AGENT].disks[DISK]

    def start_agent(self, arm: str | None = None) -> bool:
        """Start the agent (the Driver); False when an armed failpoint killed it at once."""
        with armed_env(arm):
            try:
                self.driver = Driver(self.dep, AGENT)
            except (ConnectionError, RuntimeError):
                self.driver = None
                return False
        return True

    def agent_alive(self) -> bool:
        return self.driver is not None and self.driver.proc.poll() is None

    def ps_alive(self) -> bool:
        return self.dep.ps_proc is not None and self.dep.ps_proc.poll() is None

    def restart_ps(self, arm: str | None = None) -> bool:
        """Stop (or reap) the process server and start it again; True when it had been
        SIGKILLed (by a failpoint or a timer, possibly while stopping)."""
        rc = self.dep.stop_ps() if self.ps_alive() else self.dep.ps_proc and self.dep.ps_proc.wait()
        self.dep.arm = arm
        try:
            self.dep.start_ps()
        except RuntimeError:  # an armed failpoint fired while starting: restart clean
            self.dep.start_ps()
        return rc == -signal.SIGKILL

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.driver is not None
        reply = self.driver.call(**cmd)
        assert reply["ok"], reply
        return reply

    def journaled_seq(self) -> int:
        return int(self.call(op="status")["status"]["disks"][0]["journaled_seq"])

    def ps_cli(self, *args: str, ok: bool = True, timeout: float = 120) -> dict[str, Any]:
        reply = self.dep.ps_json(*args, timeout=timeout)
        if ok:
            assert reply["returncode"] == 0, f"tidemark-ps {args}: {reply}"
        return reply

    # ----------------------------------------------------------------- writing
    def one_op(self) -> tuple[str, int, int, int] | None:
        """A random write / zero / trim / flush; returns the op in flight if the agent died."""
        rng = self.rng
        kind = rng.choices(["write", "zero", "trim", "flush"], [10, 1, 1, 2])[0]
        if kind == "flush":
            pending = ("flush", 0, 0, 0)
            cmd: dict[str, Any] = {"op": "flush", "disk": DISK}
        else:
            length = rng.randint(1, MAX_WRITE if kind == "write" else 64 << 10)
            offset = rng.randrange(0, SIZE - length + 1)
            if kind == "write" and rng.random() < 0.5:
                offset &= ~4095
            self.seed += 1
            seed = self.seed if kind == "write" else 0
            pending = (kind, offset, length, seed)
            cmd = {"op": kind, "disk": DISK, "offset": offset, "length": length}
            if kind == "write":
                cmd.update(seed=seed, fua=rng.random() < 0.15)
        try:
            assert self.driver is not None
            reply = self.driver.call(**cmd)
        except (ConnectionError, BrokenPipeError, OSError):
            return pending
        assert reply["ok"], reply
        if kind != "flush":
            assert reply["seq"] > 0, reply
            self.model.apply(int(reply["seq"]), pending[1], pending[2], pending[3])
        return None

    def after_agent_death(self, pending: tuple[str, int, int, int] | None) -> None:
        """The agent died: restart it; the image holds every acknowledged write, and the write
        in flight entirely or not at all."""
        assert self.driver is not None
        self.driver.kill()
        assert self.start_agent(), "the agent did not restart"
        image = read_file(self.image)
        if pending is not None and pending[0] != "flush":
            _, offset, length, seed = pending
            got = image[offset : offset + length]
            old = bytes(self.model.data[offset : offset + length])
            new = op_bytes(seed, length)
            assert got in (old, new), f"write in flight at the kill torn: {pending}"
            if got == new and new != old:
                self.model.apply(self.journaled_seq(), offset, length, seed)
        assert sha(read_file(self.image)) == sha(bytes(self.model.data)), (
            "the source image lost an acknowledged write"
        )

    def workload(self, ops: int, stop: threading.Event | None = None) -> bool:
        """Run ``ops`` operations; True when the agent died (and was restarted)."""
        for _ in range(ops):
            pending = self.one_op()
            if pending is not None or not self.agent_alive():
                self.after_agent_death(pending)
                return True
            if stop is not None and stop.is_set():
                break
        return False

    # ----------------------------------------------------------------- checking
    def expected_at(self, seq: int) -> bytes:
        return self.model.at(seq)

    def drain_and_compare(self, sample: int = 1) -> None:
        """Drain, compare source with the model and the replica with the source, and check a
        sample of recovery points materialised by the process server."""
        if not self.ps_alive():
            self.restart_ps()
        if not self.agent_alive():
            self.after_agent_death(None)
        reply = self.call(op="drain", timeout=120)
        assert reply["drained"], "replication did not drain"
        journaled = self.journaled_seq()
        self.dep.wait_applied(DISK, journaled, timeout=120)
        source = read_file(self.image)
        assert sha(source) == sha(bytes(self.model.data)), "source image differs from the model"
        replica = read_file(self.dep.replica_path(DISK))
        assert sha(replica) == sha(source), "replica differs from source after drain"
        self.check_points(sample)

    def points(self) -> list[dict[str, Any]]:
        points = self.ps_cli("points", "list", DISK)["points"]
        return [p for p in points if p["seq"] >= self.model.base_seq]

    def check_points(self, sample: int) -> None:
        points = self.points()
        for point in self.rng.sample(points, min(sample, len(points))):
            out = self.root / "point.img"
            out.unlink(missing_ok=True)
            self.ps_cli("failover", DISK, "--point", point["id"], "--to", str(out))
            got = read_file(out)
            out.unlink()
            assert sha(got) == sha(self.expected_at(point["seq"])), (
                f"recovery point {point} differs from the source at its seq"
            )
            self.tally.points_checked += 1

    def create_point(self) -> dict[str, Any] | None:
        """A manual point (its catalog row, with its seq), or None when it was not taken."""
        reply = self.ps_cli("points", "create", DISK, ok=False, timeout=60)
        if not reply.get("ok"):
            return None
        return next(p for p in self.points() if p["id"] == reply["id"])

    def close(self) -> None:
        if self.driver is not None:
            self.driver.kill()
        self.dep.stop_all()


def kill_later(proc: subprocess.Popen[bytes], delay: float) -> threading.Timer:
    def fire() -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)

    timer = threading.Timer(delay, fire)
    timer.start()
    return timer


# --------------------------------------------------------------------- replication rounds
def agent_failpoint_round(rig: Rig, name: str, hit: int) -> bool:
    """Restart the agent armed at ``name``; write until it dies (or give up)."""
    assert rig.driver is not None
    rig.driver.quit()
    if not rig.start_agent(f"{name}={hit}"):
        rig.after_agent_death(None)
        return True
    died = rig.workload(60)
    if not died:  # not reached: restart it unarmed
        assert rig.driver is not None
        rig.driver.quit()
        rig.start_agent()
    return died


def ps_failpoint_round(rig: Rig, name: str, hit: int) -> bool:
    """Restart the process server armed at ``name``; write (and take points) until it dies."""
    rig.restart_ps(f"{name}={hit}")
    for _ in range(12):
        rig.workload(10)
        if name.startswith("points.") and rig.ps_alive():
            rig.create_point()
        if not rig.ps_alive():
            break
        time.sleep(0.1)
    return rig.restart_ps()


def timer_round(rig: Rig, target: str) -> None:
    """SIGKILL the agent or the process server after a random delay while writes go on."""
    delay = rig.rng.uniform(0.0, 1.0)
    if target == "agent":
        assert rig.driver is not None
        timer = kill_later(rig.driver.proc, delay)
        deadline = time.monotonic() + delay + 5
        while not rig.workload(5) and time.monotonic() < deadline:
            pass
        timer.join()
        if rig.agent_alive() is False and rig.driver is not None:
            rig.after_agent_death(None)
    else:
        assert rig.dep.ps_proc is not None
        timer = kill_later(rig.dep.ps_proc, delay)
        deadline = time.monotonic() + delay + 0.5
        while time.monotonic() < deadline:
            rig.workload(5)
        timer.join()
        rig.restart_ps()


def compare_export(root: Path, expected: bytes, uri: str) -> bool:
    """``qemu-img compare`` of an NBD export with ``expected``."""
    ref = root / "expected.img"
    ref.write_bytes(expected)
    out = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(ref), uri],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode in (0, 1), f"qemu-img compare failed: {out.stdout}{out.stderr}"
    return out.returncode == 0


def failover_round(rig: Rig, method: str, hit: int = 1) -> bool:
    """A test failover is killed (failpoint after its overlay is up, or a timer while the DR
    side writes); after restart, a restored failover shows its point plus the DR writes that
    were flushed, and nothing of it leaks into a later one."""
    points = rig.points()
    if not points:
        rig.create_point()
        points = rig.points()
    point = rig.rng.choice(points)
    expected = bytearray(rig.expected_at(point["seq"]))
    sock = rig.root / "tf.sock"
    if method == "failpoint":
        rig.restart_ps(f"failover.after_overlay={hit}")
    reply = rig.ps_cli(
        "failover", DISK, "--test", "--point", point["id"], "--nbd", f"unix:{sock}", ok=False
    )
    uri = f"nbd+unix:///{DISK}?socket={sock}"
    maybe: tuple[int, int] | None = None  # a write the kill interrupted: there or not
    if reply.get("ok") and method == "timer":
        assert rig.dep.ps_proc is not None
        timer = kill_later(rig.dep.ps_proc, rig.rng.uniform(0.0, 0.6))
        for i in range(20):
            offset = rig.rng.randrange(0, SIZE // 65536) * 65536
            out = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", f"write -f -P {0x21 + i} {offset} 65536", uri],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if out.returncode != 0 or "error" in (out.stdout + out.stderr).lower():
                maybe = (offset, 0x21 + i)
                break
            expected[offset : offset + 65536] = bytes([0x21 + i]) * 65536  # acknowledged (FUA)
        timer.join()
    if rig.ps_alive() and method == "failpoint":
        rig.ps_cli("failover", "cleanup", DISK, ok=False)  # did not fire: nothing to test
        return rig.restart_ps()
    killed = rig.restart_ps()
    listed = rig.ps_cli("failover", "list")["failovers"]
    if listed:  # restored after the restart: it must still be the point + the FUA writes
        candidates = [bytes(expected)]
        if maybe is not None:
            offset, byte = maybe
            expected[offset : offset + 65536] = bytes([byte]) * 65536
            candidates.append(bytes(expected))
        assert any(compare_export(rig.root, c, uri) for c in candidates), (
            "restored test failover differs from its point plus the acknowledged DR writes"
        )
        rig.ps_cli("failover", "cleanup", DISK)
    # A new test failover of the same point starts clean (no stale overlay writes).
    reply = rig.ps_cli("failover", DISK, "--test", "--point", point["id"], "--nbd", f"unix:{sock}")
    assert compare_export(rig.root, rig.expected_at(point["seq"]), uri), (
        "a new test failover does not show its point (stale overlay data?)"
    )
    rig.ps_cli("failover", "cleanup", DISK)
    return killed


def replication_round(rig: Rig, kind: str, name: str, hit: int) -> bool:
    """One kill of the given kind; then drain and compare. Returns whether a kill happened."""
    if kind == "agent-fp":
        died = agent_failpoint_round(rig, name, hit)
    elif kind == "ps-fp":
        died = ps_failpoint_round(rig, name, hit)
    elif kind == "failover-fp":
        died = failover_round(rig, "failpoint", hit)
    elif kind == "failover-timer":
        died = failover_round(rig, "timer")
    else:
        timer_round(rig, name)
        died = True
    rig.workload(5)
    rig.drain_and_compare(sample=1)
    if died:
        rig.tally.kill(f"{kind}:{name}")
    else:
        rig.tally.not_fired += 1
    return died


# --------------------------------------------------------------------- failover / failback
class Cycle:
    """Unplanned failover, DR writes, commit, failback to a master target, planned swap, then
    forward protection again; SIGKILLs at the chosen moments."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        dep = rig.dep
        bundle = dep.root / "mt01.bundle"
        if not bundle.exists():
            dep.cli(
                "process_server.cli", "pki", "issue", "--dir", str(dep.pki), "--name", "mt01",
                "--out", str(bundle), "--role", "master-target",
            )  # fmt: skip
        spec = dep.agents[AGENT]
        self.mt_config = dep.root / "mt.toml"
        self.mt_config.write_text(
            "[master_target]\n"
            'name = "mt01"\n'
            f'state_dir = "{dep.root / "mt"}"\n'
            f'process_server = "127.0.0.1:{dep.port}"\n'
            f'credentials = "{bundle}"\n'
            'reconnect_min = "50ms"\nreconnect_max = "300ms"\n'
            f'\n[[disk]]\nid = "{DISK}"\npath = "{spec.disks[DISK]}"\n'
            f'agent_state_dir = "{spec.state_dir / "disks" / DISK}"\n'
        )
        self.mt: subprocess.Popen[bytes] | None = None

    def start_mt(self, arm: str | None = None) -> None:
        self.rig.dep.arm = arm
        self.mt = self.rig.dep._spawn(
            [PYTHON, "-m", "master_target.cli", "run", "--config", str(self.mt_config)], "mt.log"
        )

    def failback_row(self) -> dict[str, Any] | None:
        status = self.rig.ps_cli("status", ok=False)  # offline (no "failbacks") when down
        rows = [r for r in status.get("failbacks", []) if r["disk"] == DISK]
        return rows[0] if rows else None

    def run(self, commit: str, delta: str | None, mt: str, swap: str) -> None:
        rig, rng, tally = self.rig, self.rig.rng, self.rig.tally
        dep = rig.dep
        shutil.rmtree(dep.root / "mt", ignore_errors=True)
        # Protected writes, a point, more writes the failover rolls back.
        rig.workload(15)
        rig.drain_and_compare(sample=0)
        point = rig.create_point()
        assert point is not None
        at_point = bytes(rig.model.data)
        assert sha(rig.expected_at(point["seq"])) == sha(at_point)
        rig.workload(15)
        rig.drain_and_compare(sample=0)
        assert rig.driver is not None
        rig.driver.quit()  # the source goes down (the agent is stopped for failback)
        rig.driver = None
        # Unplanned failover to the point; the DR side writes.
        sock = dep.root / "dr.sock"
        rig.ps_cli("failover", DISK, "--point", point["id"], "--nbd", f"unix:{sock}")
        uri = f"nbd+unix:///{DISK}?socket={sock}"
        dr = bytearray(at_point)
        for i in range(rng.randint(2, 6)):
            offset, length = rng.randrange(0, SIZE // 65536) * 65536, 65536
            subprocess.run(
                ["qemu-io", "-f", "raw", "-c", f"write -P {0x41 + i} {offset} {length}",
                 "-c", "flush", uri],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            dr[offset : offset + length] = bytes([0x41 + i]) * length
        # Commit, killed by a failpoint or a timer.
        if commit == "timer":
            assert dep.ps_proc is not None
            timer = kill_later(dep.ps_proc, rng.uniform(0.0, 0.4))
            rig.ps_cli("failover", "commit", DISK, ok=False)
            timer.join()
        else:
            rig.restart_ps(f"{commit}=1")
            rig.ps_cli("failover", "commit", DISK, ok=False)
        if not rig.ps_alive():
            tally.kill(f"commit:{commit}")
        rig.restart_ps()
        reply = rig.ps_cli("failover", "commit", DISK)
        assert reply["state"] == "committed", reply
        replica = read_file(dep.replica_path(DISK))
        assert sha(replica) == sha(bytes(dr)), "committed replica is not point + DR writes"
        # Failback: the process server may die preparing the delta, the master target mid-stream.
        if delta is not None:
            rig.restart_ps(f"{delta}=1")
        self.start_mt(mt if mt != "timer" else None)
        if mt == "timer":
            assert self.mt is not None
            timer = kill_later(self.mt, rng.uniform(0.3, 2.0))
        deadline = time.monotonic() + 60
        mt_killed = ps_killed = False
        while time.monotonic() < deadline:
            if delta is not None and not ps_killed and not rig.ps_alive():
                ps_killed = True
                tally.kill(f"failback-delta:{delta}")
                rig.restart_ps()
            assert self.mt is not None
            if self.mt.poll() is not None and not mt_killed:
                assert self.mt.returncode == -signal.SIGKILL, self.mt.returncode
                mt_killed = True
                tally.kill(f"failback-mt:{mt}")
                self.start_mt()
            row = self.failback_row() if rig.ps_alive() else None
            if (
                row
                and row["applied_seq"] >= row["journal_last_seq"] > 0
                and (mt_killed or mt == "mt.finish.before_reset")
            ):
                break
            time.sleep(0.1)
        if mt == "timer":
            timer.join()
        row = self.failback_row()
        assert row and row["applied_seq"] >= row["journal_last_seq"] > 0, row
        # Planned swap, the process server killed in the middle.
        rig.restart_ps(f"{swap}=1")
        deadline = time.monotonic() + 60
        while self.failback_row() is None:  # --planned needs the master target linked again
            assert time.monotonic() < deadline, "the master target did not reconnect"
            time.sleep(0.1)
        rig.ps_cli("failback", DISK, "--planned", ok=False, timeout=300)
        if not rig.ps_alive():
            tally.kill(f"failback-swap:{swap}")
        rig.restart_ps()
        report: dict[str, Any] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.mt is not None
            if self.mt.poll() is not None:  # done, or killed by mt.finish.before_reset
                if self.mt.returncode == 0:
                    break
                assert self.mt.returncode == -signal.SIGKILL, self.mt.returncode
                tally.kill(f"failback-mt:{mt}")
                self.start_mt()
            report = rig.ps_cli("failback", DISK, "--planned", ok=False, timeout=300)
            time.sleep(0.2)
        assert self.mt is not None and self.mt.wait(60) == 0, report
        source = read_file(rig.image)
        assert sha(source) == sha(bytes(dr)), (
            f"after failback the source is not the DR disk {report}"
        )
        replica = read_file(dep.replica_path(DISK))
        assert sha(replica) == sha(bytes(dr)), "after failback the replica is not the DR disk"
        # Forward protection resumes from source == replica.
        rig.model.data[:] = dr
        assert rig.start_agent()
        rig.model.rebase(rig.journaled_seq())
        rig.workload(10)
        rig.drain_and_compare(sample=0)
        rig.create_point()
        rig.check_points(1)


# --------------------------------------------------------------------- the tests
def _require_tools() -> None:
    missing = [t for t in ("qemu-io", "qemu-img") if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have {missing} (.ci/run installs them)")
        pytest.skip(f"missing {missing}")


def test_every_failpoint_is_in_the_code() -> None:
    """The catalogue in common/failpoints.py names exactly the calls placed in the product."""
    import re

    root = Path(__file__).resolve().parent.parent
    found: set[str] = set()
    for package in ("agent", "process_server", "master_target", "common"):
        for path in (root / package).glob("*.py"):
            found |= set(re.findall(r'failpoint\("([^"]+)"\)', path.read_text()))
    assert found == set(FAILPOINTS)
    used = AGENT_POINTS + PS_POINTS + FAILOVER_POINTS + COMMIT_POINTS + DELTA_POINTS
    assert set(used + SWAP_POINTS + MT_POINTS + BULK_POINTS) == set(FAILPOINTS)


def _short_plan(rng: random.Random) -> list[tuple[str, str, int]]:
    plan = [("agent-fp", n, rng.randint(1, 4)) for n in AGENT_POINTS]
    plan += [("ps-fp", n, rng.randint(1, 3)) for n in PS_POINTS]
    plan += [("failover-fp", "failover.after_overlay", 1), ("failover-timer", "ps", 0)]
    plan += [("timer", "agent", 0), ("timer", "ps", 0)]
    rng.shuffle(plan)
    return plan


def _random_round(rng: random.Random) -> tuple[str, str, int]:
    kind = rng.choices(
        ["agent-fp", "ps-fp", "timer", "failover-fp", "failover-timer"], [5, 7, 4, 1, 1]
    )[0]
    if kind == "agent-fp":
        return kind, rng.choice(AGENT_POINTS), rng.randint(1, 12)
    if kind == "ps-fp":
        return kind, rng.choice(PS_POINTS), rng.randint(1, 8)
    if kind == "timer":
        return kind, rng.choice(["agent", "ps"]), 0
    return kind, "failover.after_overlay" if kind == "failover-fp" else "ps", 1


def _cycle_plan(rng: random.Random) -> tuple[str, str | None, str, str]:
    return (
        rng.choice([*COMMIT_POINTS, "timer"]),
        rng.choice([*DELTA_POINTS, None]),
        rng.choice([*MT_POINTS, "timer"]),
        rng.choice(SWAP_POINTS),
    )


def _report(seed: int, tally: Tally, started: float) -> str:
    return (
        f"crash matrix: seed={seed} kills={tally.kills} not_fired={tally.not_fired} "
        f"points_checked={tally.points_checked} seconds={time.monotonic() - started:.0f} "
        f"by_phase={json.dumps(tally.by_phase, sort_keys=True)}"
    )


@pytest.mark.timeout(600)
def test_crash_matrix_short(tmp_path: Path) -> None:
    """Every failpoint once, timer kills of each process, and one failover/failback cycle
    with a kill in the commit, the delta, the reverse stream and the planned swap."""
    _require_tools()
    seed = int(os.environ.get("TIDEMARK_CRASH_SEED", random.randrange(1 << 30)))
    print(f"TIDEMARK_CRASH_SEED={seed}")
    rng = random.Random(seed)
    tally = Tally()
    started = time.monotonic()
    rig = Rig(tmp_path / "m", rng, tally)
    try:
        rig.workload(20)
        rig.create_point()
        for kind, name, hit in _short_plan(rng):
            replication_round(rig, kind, name, hit)
        Cycle(rig).run(
            rng.choice(COMMIT_POINTS), rng.choice(DELTA_POINTS), rng.choice(MT_POINTS),
            rng.choice(SWAP_POINTS),
        )  # fmt: skip
    finally:
        print(_report(seed, tally, started))
        rig.close()
    assert tally.kills >= 16, _report(seed, tally, started)
    phases = {p.split(":")[0] for p in tally.by_phase}
    assert {"agent-fp", "ps-fp", "timer", "commit", "failback-swap"} <= phases, tally.by_phase


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_crash_matrix_long(tmp_path: Path) -> None:
    """``TIDEMARK_CRASH_KILLS`` (200) random kills over every phase (seed printed)."""
    _require_tools()
    seed = int(os.environ.get("TIDEMARK_CRASH_SEED", random.randrange(1 << 30)))
    kills = int(os.environ.get("TIDEMARK_CRASH_KILLS", "200"))
    print(f"TIDEMARK_CRASH_SEED={seed} TIDEMARK_CRASH_KILLS={kills}")
    rng = random.Random(seed)
    tally = Tally()
    started = time.monotonic()
    rig = Rig(tmp_path / "m", rng, tally)
    try:
        rig.workload(20)
        rig.create_point()
        while tally.kills < kills:
            if rng.random() < 0.06:
                Cycle(rig).run(*_cycle_plan(rng))
            else:
                replication_round(rig, *_random_round(rng))
            if tally.kills and tally.kills % 20 == 0:
                print(_report(seed, tally, started), flush=True)
    finally:
        print(_report(seed, tally, started))
        rig.close()
