# Scenario `soak` (issue #9): a long mixed workload against a real deployment while the harness
# breaks things on a schedule: SIGKILL of the agent or of the process server (then a restart),
# faults on the agent -> process server link (benchmarks/faultproxy.py), test failovers to
# recovery points whose source content was recorded when they were made, and whole-disk verifies
# at quiet moments. The harness's own model of acknowledged writes is the source of truth: every
# comparison is made against it (sha256 of the source image, the replica file and each point read
# out of its failover export with nbdcopy), and `tidemark-ps verify` must agree. Anything that
# differs is a divergence; one divergence (or a pipeline that never drains again) makes the run
# FAILED (exit status 1).
"""Scenario ``soak``: mixed workload with kills, network faults, test failovers and verifies.

A real deployment on loopback (``python -m process_server.cli serve`` with the undo log on, one
agent run by :class:`benchmarks.deploy.Driver` through the Python API with a unix-socket NBD
export, mutual TLS 1.3), the agent's link to the process server through
:class:`benchmarks.faultproxy.FaultProxy`. One 128 MiB disk.

- **Workload** (a thread): random 4-64 KiB writes (half of them in a hot 16 MiB region, so
  points have history to roll back), some with FUA, write-zeroes and trims of 4-256 KiB,
  flushes, all through the Driver (the agent's Python API), and every 25th write through a
  real NBD client (``qemu-io -c 'write -P ...'``) on the agent's export; paced to
  ``TIDEMARK_BENCH_SOAK_MBS`` (default 4 MB/s). A write is put in the model when it is
  acknowledged. A write in flight when the agent is killed is *uncertain*: after the restart
  its range of the source image must hold either all the old or all the new bytes (the model
  takes whichever; anything else is a divergence, a torn write).
- **Events**, one at a time, 1.5-4 s apart, in rounds of: network fault, recovery point,
  agent SIGKILL + restart, network fault, test failover, process-server SIGKILL + restart,
  network fault, verify (the order inside a round after the first is shuffled):

  - *fault*: one of cut, refused reconnects, stall, latency + jitter + fragmentation, TLS byte
    flips (either way), frame header / payload flips, batch-data flips with checksums resealed,
    a reset in the middle of a BATCH frame, a reset after N bytes, half-close (either way),
    half-open (freeze); passthrough or TLS-terminating mode as the fault needs;
  - *point*: writes paused, ``tidemark-ps points create DISK``; the sha256 of the model is the
    point's expected content;
  - *failover*: ``tidemark-ps failover DISK --test --point ID --nbd unix:SOCK`` for a recorded
    point (younger than the retention minus a margin), ``nbdcopy`` of the export to a file,
    sha256 against the recorded one; a 64 KiB write into the overlay read back by ``qemu-io``;
    ``tidemark-ps failover cleanup DISK`` (the next verify proves nothing leaked);
  - *verify*: writes paused, flush, drain until the process server applied everything the
    agent journaled; sha256 of model, source image and replica file must agree, and
    ``tidemark-ps verify DISK`` must say equal.

The run ends with a final verify. Report: bytes written, operations, kills survived, faults
injected, points created and verified, verifies run and divergences found (must be 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.deploy import Deployment, Driver
from benchmarks.driver import pattern
from benchmarks.faultproxy import MSG_BATCH, FaultProxy, FrameFault
from benchmarks.metrics import MIB, Figure, Params, ScenarioResult

NAME = "soak"
SUMMARY = (
    "mixed workload with agent / process-server kills, network faults, test failovers and "
    "verifies; every divergence from the model of acknowledged writes is counted (must be 0)"
)

AGENT = "soak"
DISK = "soak-d"
SIZE = 128 * MIB
HOT = 16 * MIB  # half of the writes land here: overwrites give the undo log history
RETENTION = 180.0  # seconds; points used by a failover are younger than this minus a margin
POINT_MARGIN = 60.0
DRAIN_TIMEOUT = 120.0
MIN_DURATION = 30.0
QUICK_MIN_DURATION = 12.0  # ``--quick`` (a smoke run of every scenario in under 2 minutes)
PAUSE = (1.5, 4.0)  # seconds of workload alone between two scheduled events
QUICK_PAUSE = (0.3, 1.0)  # ``--quick``: the first round's eight events still fit
DEFAULT_MBS = 4.0
NBD_EVERY = 25  # every Nth data write goes through qemu-io on the agent's NBD export
FIRST_ROUND = ["fault", "point", "kill-agent", "fault", "failover", "kill-ps", "fault", "verify"]
FAULTS = [
    "cut",
    "refuse",
    "stall",
    "delay",
    "corrupt-tls",
    "frame-header",
    "frame-payload",
    "batch-data",
    "frame-reset",
    "reset-after",
    "half-close",
    "freeze",
]


class Stuck(Exception):
    """Replication did not recover (or a command failed): the run stops, FAILED."""


@dataclass
class Op:
    kind: str  # write | fua | zero | trim | nbd-write | flush
    offset: int = 0
    length: int = 0
    seed: int = 0

    def data(self) -> bytes:
        if self.kind in ("write", "fua"):
            return pattern(self.seed, self.length)
        if self.kind == "nbd-write":
            return bytes([self.seed & 0xFF]) * self.length
        return bytes(self.length)


@dataclass
class Tally:
    bytes_written: int = 0  # data bytes of acknowledged writes (Driver + NBD)
    bytes_zeroed: int = 0  # acknowledged write-zeroes and trims
    ops: Counter[str] = field(default_factory=Counter)
    uncertain: int = 0  # writes in flight at an agent kill (resolved against the source)
    uncertain_applied: int = 0  # ... of which the restarted agent holds the new bytes
    kills: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    points_created: int = 0
    points_refused: int = 0
    points_verified: int = 0
    verifies: int = 0
    divergences: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def sha(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def differing_ranges(
    a: bytes | bytearray, b: bytes | bytearray, block: int = 4096
) -> list[list[int]]:
    """Up to 16 ``[offset, length]`` runs of differing ``block``s (for the report)."""
    out: list[list[int]] = []
    n = max(len(a), len(b))
    for off in range(0, n, block):
        if a[off : off + block] != b[off : off + block]:
            if out and out[-1][0] + out[-1][1] == off:
                out[-1][1] += block
            elif len(out) < 16:
                out.append([off, block])
            else:
                break
    return out


def soak_duration(params: Params) -> float:
    """``--duration`` (or ``--seconds``), at least :data:`MIN_DURATION`
    (:data:`QUICK_MIN_DURATION` with ``--quick``)."""
    return max(QUICK_MIN_DURATION if params.quick else MIN_DURATION, params.seconds)


class Soak:
    """One soak run: the deployment, the model, the workload thread and the schedule."""

    def __init__(
        self, root: Path, duration: float, seed: int, pause: tuple[float, float] = PAUSE
    ) -> None:
        self.root = root
        self.duration = duration
        self.pause = pause
        self.rng = random.Random(seed)  # the schedule's
        self.wrng = random.Random(seed + 1)  # the workload thread's
        self.mbs = float(os.environ.get("TIDEMARK_BENCH_SOAK_MBS", DEFAULT_MBS))
        self.tally = Tally()
        self.events: list[dict[str, Any]] = []
        self.points: list[dict[str, Any]] = []
        self.model = bytearray(SIZE)
        self.op_lock = threading.Lock()  # one operation at a time; held to pause writes
        self.stop = threading.Event()
        self.worker_error: BaseException | None = None
        self.uncertain: list[Op] = []
        self.driver: Driver | None = None
        self.driver_dead = False
        self.t0 = time.monotonic()
        self.dep = Deployment(root / "d")
        self.proxy: FaultProxy | None = None
        self.source = Path()
        self.nbd_sock = ""
        self.pids: dict[str, int] = {}
        debug = os.environ.get("TIDEMARK_BENCH_SOAK_DEBUG_DIR")
        self.debug_dir = Path(debug) if debug else None  # model at each point, bad exports

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from common.tls import CLIENT_SERVER_HOSTNAME, client_context, server_context
        from process_server.pki import issue_credentials, load_bundle

        dep = self.dep
        dep.init_pki()
        dep.write_ps_config(retention=f"{RETENTION:g}s", undo_quota="4GiB")
        # What the proxy shows the process server when it terminates TLS (frame faults).
        bundle = dep.root / "proxy-as-agent.bundle"
        issue_credentials(dep.pki, AGENT, bundle)
        terminate = (
            server_context(dep.pki),
            client_context(load_bundle(bundle)),
            CLIENT_SERVER_HOSTNAME,
        )
        self.proxy = FaultProxy(dep.port, terminate=terminate, seed=self.rng.randrange(1 << 30))
        spec = dep.add_agent(
            AGENT,
            {DISK: SIZE},
            nbd=True,
            options={"process_server": f"127.0.0.1:{self.proxy.port}", "reconnect_max": "300ms"},
        )
        self.source = spec.disks[DISK]
        self.nbd_sock = spec.nbd[DISK]
        dep.start_ps()
        self.driver = Driver(dep, AGENT)
        self._note_pids()
        self.quiet_check("initial sync")

    def _note_pids(self) -> None:
        if self.dep.ps_proc is not None:
            self.pids[f"process-server-{len(self.pids)}"] = self.dep.ps_proc.pid
        if self.driver is not None:
            self.pids[f"agent-{len(self.pids)}"] = self.driver.pid

    def close(self) -> None:
        self.stop.set()
        if self.driver is not None:
            with contextlib.suppress(Exception):
                self.driver.quit(timeout=30)
        self.dep.stop_all()
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.close()

    # ------------------------------------------------------------------ helpers
    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def ps(self, *args: str, ok: bool = True, timeout: float = 120) -> dict[str, Any]:
        reply = self.dep.ps_json(*args, timeout=timeout)
        if ok and reply["returncode"] != 0:
            raise Stuck(f"tidemark-ps {' '.join(args)} failed: {reply}")
        return reply

    def ps_row(self) -> dict[str, Any]:
        from common.admin import admin_request

        status = asyncio.run(
            admin_request(self.dep.ps_state / "admin.sock", {"cmd": "status"}, timeout=10)
        )
        for row in status.get("disks", []):
            if row["disk"] == DISK:
                return dict(row)
        return {}

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.driver is not None
        reply = self.driver.call(**cmd)
        if not reply.get("ok"):
            raise Stuck(f"driver {cmd.get('op')}: {reply}")
        return reply

    def diverged(self, what: str, **detail: Any) -> None:
        entry = {"at": self.now(), "what": what, **detail}
        self.tally.divergences.append(entry)
        print(f"#   DIVERGENCE at {entry['at']}s: {what} {detail}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ workload
    def next_op(self, n: int) -> Op:
        r = self.wrng.random()
        if r < 0.10:
            return Op("flush")
        if r < 0.24:
            kind = "zero" if r < 0.17 else "trim"
            length = self.wrng.randrange(8, 513) * 512
            return Op(kind, self.wrng.randrange(0, (SIZE - length) // 512) * 512, length)
        length = self.wrng.randrange(8, 129) * 512  # 4-64 KiB
        span = HOT if self.wrng.random() < 0.5 else SIZE
        offset = self.wrng.randrange(0, (span - length) // 512) * 512
        seed = self.wrng.randrange(1 << 40)
        if n % NBD_EVERY == 0 and shutil.which("qemu-io"):
            return Op("nbd-write", offset, length, seed % 255 + 1)
        return Op("fua" if r > 0.95 else "write", offset, length, seed)

    def perform(self, op: Op) -> None:
        """Send one operation; on acknowledgement, put it in the model. Raises ConnectionError
        (the agent is gone: the operation is uncertain) or Stuck."""
        if op.kind == "flush":
            self.call(op="flush", disk=DISK)
        elif op.kind == "nbd-write":
            uri = f"nbd+unix:///{DISK}?socket={self.nbd_sock}"
            out = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", f"write -P {op.seed} {op.offset} {op.length}", uri],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if out.returncode != 0 or "wrote" not in out.stdout:
                raise ConnectionError(f"qemu-io: {out.stdout.strip()} {out.stderr.strip()}")
        elif op.kind in ("write", "fua"):
            self.call(
                op="write",
                disk=DISK,
                offset=op.offset,
                length=op.length,
                seed=op.seed,
                fua=op.kind == "fua",
            )
        else:
            self.call(op=op.kind, disk=DISK, offset=op.offset, length=op.length)
        self.tally.ops[op.kind] += 1
        if op.kind == "flush":
            return
        self.model[op.offset : op.offset + op.length] = op.data()
        if op.kind in ("zero", "trim"):
            self.tally.bytes_zeroed += op.length
        else:
            self.tally.bytes_written += op.length

    def workload(self) -> None:
        n = 0
        started = time.monotonic()
        try:
            while not self.stop.is_set():
                op = self.next_op(n)
                n += 1
                ahead = self.tally.bytes_written / (self.mbs * 1e6) - (time.monotonic() - started)
                if ahead > 0:
                    self.stop.wait(min(ahead, 0.5))
                with self.op_lock:
                    if self.stop.is_set():
                        return
                    if not self.driver_dead:
                        self._attempt(op)
                if self.driver_dead:
                    time.sleep(0.02)  # until the scheduler restarted the agent
        except BaseException as exc:  # the scheduler reports it
            self.worker_error = exc

    def _attempt(self, op: Op) -> None:
        """``perform`` under op_lock; an operation the agent's death interrupted is uncertain."""
        try:
            self.perform(op)
        except (ConnectionError, ValueError, OSError) as exc:
            if op.kind != "flush":
                self.uncertain.append(op)
            assert self.driver is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.driver.proc.wait(1.0)  # a kill's socket close can precede the reaping
            if self.driver.proc.poll() is None:
                # The agent is alive: a failure here is not a kill's doing.
                self.tally.errors.append(f"{op.kind} failed, agent alive: {exc}")
            else:
                self.driver_dead = True

    def resolve_uncertain(self) -> None:
        """Writes in flight when the agent died: all old or all new in the source (op_lock)."""
        fd = os.open(self.source, os.O_RDONLY)
        try:
            for op in self.uncertain:
                got = os.pread(fd, op.length, op.offset)
                new = op.data()
                old = bytes(self.model[op.offset : op.offset + op.length])
                self.tally.uncertain += 1
                if got == new:
                    self.model[op.offset : op.offset + op.length] = new
                    self.tally.uncertain_applied += 1
                elif got != old:
                    self.diverged(
                        "a write in flight at the agent's kill is torn in the source",
                        op=op.kind,
                        offset=op.offset,
                        length=op.length,
                    )
                    self.model[op.offset : op.offset + op.length] = got  # go on from the truth
        finally:
            os.close(fd)
        self.uncertain.clear()

    # ------------------------------------------------------------------ quiet checks
    def wait_drained(self) -> dict[str, Any]:
        """Flush, then wait until the agent is replicating with nothing unacknowledged and the
        process server applied all of it. Call with op_lock held. Raises Stuck."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        self.call(op="flush", disk=DISK)
        row: dict[str, Any] = {}
        ps: dict[str, Any] = {}
        while time.monotonic() < deadline:
            row = self.call(op="status")["status"]["disks"][0]
            if row["state"] == "replicating" and row["acked_seq"] >= row["journaled_seq"]:
                with contextlib.suppress(OSError, TimeoutError):
                    ps = self.ps_row()
                if ps.get("applied_seq", -1) >= row["journaled_seq"]:
                    if ps.get("error"):
                        raise Stuck(f"process server reports an error: {ps}")
                    return {"agent": row, "ps": ps}
            time.sleep(0.05)
        raise Stuck(f"replication did not drain within {DRAIN_TIMEOUT:g}s: {row} / {ps}")

    def quiet_check(self, why: str) -> dict[str, Any]:
        """Writes paused: model == source image == replica file, and tidemark-ps verify agrees."""
        with self.op_lock:
            assert self.proxy is not None
            self.proxy.clear_faults()
            if self.uncertain:
                self.resolve_uncertain()
            t = time.monotonic()
            state = self.wait_drained()
            drain_s = time.monotonic() - t
            want = sha(self.model)
            src = file_sha(self.source)
            rep = file_sha(self.dep.replica_path(DISK))
            if src != want:
                self.diverged(
                    "source image != model of acknowledged writes",
                    why=why,
                    ranges=differing_ranges(self.model, self.source.read_bytes()),
                )
            if rep != want:
                self.diverged(
                    "replica != model of acknowledged writes",
                    why=why,
                    ranges=differing_ranges(self.model, self.dep.replica_path(DISK).read_bytes()),
                )
            verify = self.ps("verify", DISK, ok=False, timeout=300)
            self.tally.verifies += 1
            if verify.get("equal") is not True:
                self.diverged("tidemark-ps verify: not equal", why=why, report=verify)
            return {
                "why": why,
                "drain_s": round(drain_s, 2),
                "seq": state["agent"]["journaled_seq"],
                "equal": src == want == rep and verify.get("equal") is True,
                "verify_s": verify.get("seconds"),
            }

    # ------------------------------------------------------------------ events
    def ev_point(self) -> dict[str, Any]:
        with self.op_lock:
            assert self.proxy is not None
            self.proxy.clear_faults()
            deadline = time.monotonic() + 60
            while True:  # an unclean stop's re-verification must finish first
                state = self.call(op="status")["status"]["disks"][0]["state"]
                if state == "replicating":
                    break
                if time.monotonic() > deadline:
                    raise Stuck(f"the disk did not get back to replicating: {state}")
                time.sleep(0.1)
            self.tally.ops["point-attempt"] += 1
            reply = self.ps("points", "create", DISK, "--tag", f"soak-{len(self.points)}", ok=False)
            if not reply.get("ok"):
                self.tally.points_refused += 1
                return {"refused": reply.get("error") or reply}
            if self.debug_dir is not None:
                self.debug_dir.mkdir(parents=True, exist_ok=True)
                (self.debug_dir / f"{reply['id']}.model").write_bytes(self.model)
            point = {
                "id": reply["id"],
                "seq": reply.get("seqs"),
                "sha256": sha(self.model),
                "created": time.monotonic(),
                "at": self.now(),
                "recorded": reply.get("recorded"),
                "verified": 0,
            }
        self.points.append(point)
        self.tally.points_created += 1
        return {"id": point["id"], "seq": point["seq"], "hold_ms": reply.get("hold_ms")}

    def ev_failover(self) -> dict[str, Any]:
        now = time.monotonic()
        usable = [p for p in self.points if now - p["created"] < RETENTION - POINT_MARGIN]
        if not usable:
            return {"skipped": "no recorded point young enough"}
        # The oldest usable point half the time: the most history to roll back.
        point = usable[0] if self.rng.random() < 0.5 else self.rng.choice(usable)
        sock = self.root / "fo.sock"
        reply = self.ps(
            "failover", DISK, "--test", "--point", point["id"], "--nbd", f"unix:{sock}", ok=False
        )
        if not reply.get("ok"):
            raise Stuck(f"test failover to {point['id']} failed: {reply}")
        uri = f"nbd+unix:///{DISK}?socket={sock}"
        image = self.root / "point.img"
        try:
            t = time.monotonic()
            if shutil.which("nbdcopy"):
                cmd = ["nbdcopy", uri, str(image)]
            else:
                cmd = ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(image)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                raise Stuck(f"{cmd[0]} of the export failed: {out.stderr.strip()}")
            copy_s = time.monotonic() - t
            got = file_sha(image)
            self.tally.points_verified += 1
            point["verified"] += 1
            if got != point["sha256"]:
                detail: dict[str, Any] = {}
                if self.debug_dir is not None:
                    kept = self.debug_dir / f"{point['id']}.export"
                    shutil.copyfile(image, kept)
                    model = (self.debug_dir / f"{point['id']}.model").read_bytes()
                    export = kept.read_bytes()
                    detail["ranges"] = differing_ranges(model, export)
                    # Newer bytes than the point (an undo piece missing), or something else?
                    detail["export_is_newer"] = [
                        export[o : o + n] == self.model[o : o + n] for o, n in detail["ranges"]
                    ]
                    with contextlib.suppress(Exception):
                        detail["ps_row"] = self.ps_row()
                    for log in self.dep.root.glob("*.log"):
                        shutil.copyfile(log, self.debug_dir / log.name)
                self.diverged(
                    "test failover export != the source at the point",
                    point=point["id"],
                    seq=point["seq"],
                    **detail,
                )
            # The DR side writes to its overlay; it must read back, and never reach the replica
            # (the next verify compares the replica with the model).
            off = self.rng.randrange(0, SIZE // 65536) * 65536
            io = [f"write -P 0xee {off} 65536", f"read -P 0xee {off} 65536"]
            out = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", io[0], "-c", io[1], uri],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if out.returncode != 0 or "Pattern verification failed" in out.stdout:
                self.diverged("the failover overlay did not read back its own write", off=off)
        finally:
            image.unlink(missing_ok=True)
            self.ps("failover", "cleanup", DISK)
        timings = (reply.get("failovers") or [{}])[0].get("timings_ms", {})
        return {
            "point": point["id"],
            "age_s": round(now - point["created"], 1),
            "equal": got == point["sha256"],
            "copy_s": round(copy_s, 2),
            "failover_ms": timings.get("total"),
        }

    def ev_kill_agent(self) -> dict[str, Any]:
        assert self.driver is not None
        old = self.driver
        os.kill(old.pid, signal.SIGKILL)  # whatever the workload is doing right now
        old.proc.wait()
        with self.op_lock:
            old.close()
            t = time.monotonic()
            self.driver = Driver(self.dep, AGENT)
            self.driver_dead = False
            restart_s = time.monotonic() - t
            in_flight = len(self.uncertain)
            if self.uncertain:
                self.resolve_uncertain()
        self._note_pids()
        self.tally.kills["agent"] += 1
        return {"restart_s": round(restart_s, 2), "in_flight": in_flight}

    def ev_kill_ps(self) -> dict[str, Any]:
        self.dep.kill_ps()
        down = self.rng.uniform(0, 2.0)
        time.sleep(down)  # the agent journals on, and retries
        t = time.monotonic()
        self.dep.start_ps()
        self._note_pids()
        self.tally.kills["process-server"] += 1
        return {"down_s": round(down, 2), "restart_s": round(time.monotonic() - t, 2)}

    def ev_fault(self, kind: str) -> dict[str, Any]:
        proxy = self.proxy
        assert proxy is not None
        rng = self.rng
        info: dict[str, Any] = {"fault": kind}
        if kind == "cut":
            proxy.cut()
        elif kind == "refuse":
            proxy.refuse(True)
            proxy.cut()
            info["down_s"] = round(rng.uniform(1, 4), 2)
            time.sleep(info["down_s"])
            proxy.refuse(False)
        elif kind == "stall":
            proxy.stall()
            info["stall_s"] = round(rng.uniform(0.5, 3), 2)
            time.sleep(info["stall_s"])
            proxy.resume()
        elif kind == "delay":
            lat, jit, frag = rng.uniform(0, 0.03), rng.uniform(0, 0.02), rng.choice([0, 1400])
            proxy.set_delay(lat, jit, frag)
            info.update(latency=round(lat, 3), jitter=round(jit, 3), fragment=frag)
            time.sleep(rng.uniform(2, 5))
        elif kind == "corrupt-tls":
            direction = rng.choice(["up", "down"])
            proxy.corrupt(direction, rng.randint(1, 3))  # type: ignore[arg-type]
            info["direction"] = direction
            time.sleep(1.5)
        elif kind in ("frame-header", "frame-payload", "batch-data", "frame-reset"):
            proxy.set_mode("terminate")
            proxy.cut()
            action = {"frame-header": "header", "frame-payload": "payload"}.get(
                kind, "batch-data" if kind == "batch-data" else "reset"
            )
            fault = proxy.add_frame_fault(
                FrameFault(
                    MSG_BATCH,
                    action,  # type: ignore[arg-type]
                    count=None if kind == "batch-data" else rng.randint(1, 3),
                    fraction=rng.random(),
                )
            )
            deadline = time.monotonic() + (2.0 if kind == "batch-data" else 5.0)
            while time.monotonic() < deadline and (kind == "batch-data" or fault.fired < 1):
                time.sleep(0.05)
            info["fired"] = fault.fired
            proxy.clear_faults()
            proxy.set_mode("passthrough")
        elif kind == "reset-after":
            info["bytes"] = rng.randint(37, 200_000)
            proxy.reset_after(info["bytes"])
            proxy.cut()
            time.sleep(1.0)
        elif kind == "half-close":
            direction = rng.choice(["up", "down"])
            info.update(direction=direction, connections=proxy.half_close(direction))  # type: ignore[arg-type]
            time.sleep(1.0)
        elif kind == "freeze":
            info["connections"] = proxy.freeze()
            time.sleep(1.0)  # the agent notices by its receive timeout (~10 s) on its own
        proxy.clear_faults()
        self.tally.faults[kind] += 1
        return info

    # ------------------------------------------------------------------ schedule
    def rounds(self) -> Any:
        """Event names forever: the first round in a fixed order (a short run still gets every
        kind), then shuffled rounds."""
        yield from FIRST_ROUND
        while True:
            r = list(FIRST_ROUND)
            self.rng.shuffle(r)
            yield from r

    def fault_kinds(self) -> Any:
        first = ["cut", "frame-reset", "stall"]  # cheap ones first for short runs
        yield from first
        while True:
            kinds = list(FAULTS)
            self.rng.shuffle(kinds)
            yield from kinds

    def run(self) -> None:
        worker = threading.Thread(target=self.workload, name="soak-workload", daemon=True)
        worker.start()
        end = self.t0 + self.duration
        faults = self.fault_kinds()
        try:
            for name in self.rounds():
                pause = self.rng.uniform(*self.pause)
                if time.monotonic() + pause >= end:
                    break
                time.sleep(pause)
                if self.worker_error is not None:
                    raise Stuck(f"workload: {self.worker_error!r}")
                t = time.monotonic()
                at = self.now()
                if name == "fault":
                    info = self.ev_fault(next(faults))
                elif name == "point":
                    info = self.ev_point()
                elif name == "kill-agent":
                    info = self.ev_kill_agent()
                elif name == "kill-ps":
                    info = self.ev_kill_ps()
                elif name == "failover":
                    info = self.ev_failover()
                else:
                    info = self.quiet_check("scheduled")
                entry = {"at": at, "event": name, "seconds": round(time.monotonic() - t, 2)}
                entry.update(info)
                self.events.append(entry)
                print(f"#   {at:7.1f}s {name}: {info}", file=sys.stderr, flush=True)
        finally:
            self.stop.set()
            worker.join(60)
        final = self.quiet_check("final")
        final["event"] = "final verify"
        self.events.append(final)
        print(f"#   {self.now():7.1f}s final verify: {final}", file=sys.stderr, flush=True)


def run(params: Params) -> ScenarioResult:
    duration = soak_duration(params)
    seed = int(os.environ.get("TIDEMARK_BENCH_SOAK_SEED", str(time.time_ns() % 1_000_000)))
    result = ScenarioResult(
        NAME,
        params={
            "duration_s": duration,
            "disk_size": SIZE,
            "hot_region": HOT,
            "seed": seed,
            "pace_mb_s": float(os.environ.get("TIDEMARK_BENCH_SOAK_MBS", DEFAULT_MBS)),
            "retention_s": RETENTION,
            "writes": "4-64 KiB random (half in the hot region), 5% FUA; zero/trim 4-256 KiB; "
            f"flushes; every {NBD_EVERY}th write by qemu-io over NBD",
        },
    )
    details = result.details
    missing = [t for t in ("qemu-io", "nbdcopy") if shutil.which(t) is None]
    details["tools_missing"] = missing
    print(f"# soak: {duration:g} s, seed {seed}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="tms-", dir=params.tmpdir) as tmp:
        soak = Soak(Path(tmp), duration, seed, QUICK_PAUSE if params.quick else PAUSE)
        stuck: str | None = None
        try:
            soak.setup()
            soak.run()
        except Stuck as exc:
            stuck = str(exc)
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if stuck or result.error or soak.tally.divergences:
                details["log_tails"] = _log_tails(soak.dep.root)
            soak.close()
        t = soak.tally
        details["pids"] = soak.pids
        details["events"] = soak.events
        details["points"] = [{k: v for k, v in p.items() if k != "created"} for p in soak.points]
        details["divergences"] = t.divergences
        details["errors"] = t.errors
        details["ops"] = dict(t.ops)
        details["faults"] = dict(t.faults)
        details["kills"] = dict(t.kills)
        if soak.proxy is not None:
            s = soak.proxy.stats
            details["proxy"] = {
                "connections": s.connections,
                "refused": s.refused,
                "resets": s.resets,
                "corrupted_chunks": s.corrupted_chunks,
                "bytes_up": s.bytes_up,
                "bytes_down": s.bytes_down,
            }
        details["elapsed_s"] = soak.now()
    if stuck:
        t.errors.append(stuck)
    _figures(result, t, soak, stuck)
    return result


def _figures(result: ScenarioResult, t: Tally, soak: Soak, stuck: str | None) -> None:
    def fig(name: str, value: Any, unit: str = "", **kw: Any) -> None:
        result.figures.append(Figure(NAME, name, value, unit, **kw))

    fig("duration (workload and schedule)", soak.duration, "s")
    fig("bytes written (acknowledged data writes)", round(t.bytes_written / MIB, 1), "MiB")
    fig("bytes zeroed / trimmed (acknowledged)", round(t.bytes_zeroed / MIB, 1), "MiB")
    ops = ", ".join(f"{k} {v}" for k, v in sorted(t.ops.items()))
    fig("operations acknowledged", sum(v for k, v in t.ops.items() if k != "point-attempt"))
    result.details["ops_text"] = ops
    fig(
        "writes in flight at an agent kill (old or new in full: checked)",
        f"{t.uncertain} ({t.uncertain_applied} new)",
    )
    fig("kills survived: agent (SIGKILL + restart)", t.kills["agent"])
    fig("kills survived: process server (SIGKILL + restart)", t.kills["process-server"])
    fig("network faults injected", sum(t.faults.values()))
    fig("points created (refused: not replicating yet)", f"{t.points_created} ({t.points_refused})")
    fig("points verified (test failover export == source at the point)", t.points_verified)
    fig("verifies run (model == source == replica; tidemark-ps verify)", t.verifies)
    fig(
        "divergences found",
        len(t.divergences),
        target="== 0",
        passed=not t.divergences,
        critical=True,
    )
    fig(
        "replication recovered every time (no stall, no failed command)",
        stuck is None and not t.errors,
        target="yes",
        passed=stuck is None and not t.errors and result.error is None,
        critical=True,
    )


def _log_tails(root: Path, nbytes: int = 4000) -> dict[str, str]:
    tails = {}
    for log in sorted(root.glob("*.log")):
        with contextlib.suppress(OSError):
            tails[log.name] = log.read_bytes()[-nbytes:].decode("utf-8", "replace")
    return tails
