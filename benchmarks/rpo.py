"""Scenario ``rpo``: recovery-point lag at fixed churn rates, measured from outside the code.

A real deployment on loopback (``python -m process_server.cli serve`` and
``python -m agent.cli run`` with the disk exported over a unix-socket NBD export, mutual TLS
1.3 between them). For each requested churn rate (MB/s, default 10, 50, 100, 150, 200;
``--quick`` 10 and 50) and ``seconds`` (30; ``--quick`` 5):

- **churn**: ``fio --ioengine=nbd --rw=randwrite --bsrange=4k-64k --iodepth=4 --rate=R``
  (fresh random data for every write, ``--refill_buffers``) over the disk minus its last
  16 MiB;
- **sentinels**: every 100 ms this process writes one 4 KiB block into the last 16 MiB of
  the disk (rotating slots) over its own NBD connection (a small client written here). The
  block holds a magic, a run token and the sentinel's number; the wall-clock time of the
  NBD reply (the acknowledgement) is kept here. Right before sending and right after the
  reply the agent's ``journaled_seq`` is read from its admin socket: the sentinel's ``seq``
  lies in ``(before, after]``;
- **(a) durable in the PS cache**: the process server's admin socket is polled every
  10 ms; the sentinel is durable in the cache when its ``acked_seq`` (the cache's durable
  seq, after ``fdatasync``) reaches ``after`` (an upper bound: the first poll at or past
  ``before + 1`` gives the lower bound, also reported);
- **(b) applied to the replica**: a watcher reads the sentinel slots of the **replica file**
  on the process server (plain ``os.pread``, every 10 ms) and notes when each sentinel
  appears. RPO(b) = seen - ack. This is the external cross-check: it depends on nothing the
  product reports. (``applied_seq`` reaching ``after`` — replica ``fdatasync``ed — is kept
  too, as (b'), for comparison.)

After each rate the harness waits until every sentinel was seen and the process server
applied everything the agent journaled, then compares the source image with the replica
(``cmp``); a difference, a sentinel never seen, a fio error or a journal overflow make the
run FAILED. Figures: p50/p90/p99/max of (a) and (b) per rate, the achieved churn against the
requested one, and the highest churn *achieved* (fio's figure: the source may not accept the
requested rate) at a rate whose p99(b) stays <= 2 s. Targets (issue): p99 <= 1 s and p50 <= 250 ms at 50 MB/s; that highest
rate >= 200 MB/s.

Plots (``--plots DIR``, matplotlib): RPO over time (one line per rate), RPO percentiles
against churn, and write throughput against block size — from the nbd scenario's JSON given
with ``--from-json FILE``, else measured here by a short fio sweep of sequential writes
(agent export, and nbdkit when installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.deploy import PYTHON, Deployment
from benchmarks.metrics import MB, MIB, Figure, Params, ProcessSampler, ScenarioResult
from benchmarks.nbd_front import baseline_server, parse_fio
from benchmarks.replication import UNIX_PATH_MAX, compare_images
from common.admin import admin_request

NAME = "rpo"
SUMMARY = (
    "RPO at fixed churn (4-64 KiB random writes via the agent's NBD export): "
    "ack -> PS cache -> replica file, sentinel cross-check"
)
AGENT = "rpo"
DISK_ID = "rpo0"

ENV_RATES = "TIDEMARK_BENCH_RPO_RATES"  # "10,50,100,150,200" (set by ``--rates``)
ENV_PLOTS = "TIDEMARK_BENCH_PLOTS"  # a directory (set by ``--plots DIR``)
ENV_FROM_JSON = "TIDEMARK_BENCH_FROM_JSON"  # nbd scenario JSON for the block-size plot

FULL_RATES = (10.0, 50.0, 100.0, 150.0, 200.0)  # 150: how far past 100 p99 <= 2 s holds
QUICK_RATES = (10.0, 50.0)
BS_MIN, BS_MAX = 4096, 64 * 1024
IODEPTH = 4
SENTINEL_REGION = 16 * MIB
SLOT = 4096
SENTINEL_INTERVAL = 0.1
POLL_INTERVAL = 0.01
DRAIN_TIMEOUT = 180.0
READY_TIMEOUT = 30.0

TARGET_RATE = 50.0
TARGET_P99 = 1.0
TARGET_P50 = 0.25
LIMIT_P99 = 2.0
TARGET_MAX_CHURN = 200.0
PACING_TOLERANCE = 0.99  # fio's --rate pacing delivers the requested rate within ~1 %

SWEEP_BLOCKS = (4096, 16 * 1024, 64 * 1024, 256 * 1024, MIB)
QUICK_SWEEP_BLOCKS = (4096, 64 * 1024, MIB)
SWEEP_SECONDS = 3.0
QUICK_SWEEP_SECONDS = 1.0
SWEEP_IODEPTH = 8
SWEEP_SIZE = 1 << 30

PLOT_FILES = {
    "rpo_over_time": "rpo-over-time.png",
    "rpo_vs_churn": "rpo-vs-churn.png",
    "throughput_vs_block": "throughput-vs-block.png",
}

# --------------------------------------------------------------------------- a small NBD client
# Constants from the NBD protocol (NetworkBlockDevice/nbd doc/proto.md), written out here
# rather than imported from protocol/nbd.py: the client is independent of the code under test.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
CMD_WRITE = 1
CMD_DISC = 2
C_FIXED_NEWSTYLE_NO_ZEROES = 0b11


class NbdError(RuntimeError):
    pass


class NbdClient:
    """Fixed-newstyle handshake (``NBD_OPT_GO``), then one simple-reply request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.size = 0
        self._handle = 0

    @classmethod
    async def connect(cls, path: str, name: str, timeout: float = 10.0) -> NbdClient:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        c = cls(reader, writer)
        try:
            await asyncio.wait_for(c._handshake(name.encode()), timeout)
        except BaseException:
            writer.close()
            raise
        return c

    async def _handshake(self, name: bytes) -> None:
        magic, opt, _flags = struct.unpack(">QQH", await self.reader.readexactly(18))
        if (magic, opt) != (NBDMAGIC, IHAVEOPT):
            raise NbdError("not a fixed-newstyle NBD server")
        self.writer.write(struct.pack(">I", C_FIXED_NEWSTYLE_NO_ZEROES))
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.writer.write(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        while True:
            magic, opt, reply, length = struct.unpack(">QIII", await self.reader.readexactly(20))
            if magic != OPT_REPLY_MAGIC or opt != OPT_GO:
                raise NbdError(f"bad option reply {magic:#x}/{opt}")
            payload = await self.reader.readexactly(length)
            if reply == REP_INFO and payload[:2] == b"\x00\x00":
                _, self.size, _ = struct.unpack(">HQH", payload[:12])
            elif reply == REP_ACK:
                return
            elif reply & (1 << 31):
                raise NbdError(f"NBD_OPT_GO refused: {reply:#x} {payload!r}")

    async def write(self, offset: int, data: bytes) -> None:
        self._handle += 1
        handle = self._handle
        self.writer.write(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, handle, offset, len(data)) + data
        )
        await self.writer.drain()
        magic, error, got = struct.unpack(">IIQ", await self.reader.readexactly(16))
        if magic != SIMPLE_REPLY_MAGIC or got != handle:
            raise NbdError(f"unexpected reply magic={magic:#x} handle={got} (sent {handle})")
        if error:
            raise NbdError(f"write at {offset} failed: errno {error}")

    async def close(self) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            self._handle += 1
            self.writer.write(
                struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, self._handle, 0, 0)
            )
            await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


# --------------------------------------------------------------------------- sentinels
SENTINEL_MAGIC = b"TMRPOSNT"
HEAD = struct.Struct(">8sQQQ")  # magic, run token, sentinel number, send time (ns)
TAIL = struct.Struct(">Q8s")  # sentinel number, magic: a torn block is not taken as seen


def sentinel_block(token: int, n: int, send_ns: int) -> bytes:
    body = os.urandom(SLOT - HEAD.size - TAIL.size)  # incompressible, like the churn
    return HEAD.pack(SENTINEL_MAGIC, token, n, send_ns) + body + TAIL.pack(n, SENTINEL_MAGIC)


def parse_sentinel(block: bytes, token: int) -> int | None:
    """The sentinel number of an intact block of this run, else None."""
    if len(block) != SLOT:
        return None
    magic, tok, n, _ = HEAD.unpack_from(block)
    n2, magic2 = TAIL.unpack_from(block, SLOT - TAIL.size)
    if magic != SENTINEL_MAGIC or magic2 != SENTINEL_MAGIC or tok != token or n != n2:
        return None
    return int(n)


@dataclass
class Sentinel:
    n: int
    offset: int
    send: float  # wall clock (time.time()) when the request was sent
    ack: float | None = None  # when the NBD reply arrived
    seq_before: int | None = None  # agent journaled_seq just before sending
    seq_after: int | None = None  # ... just after the reply: seq in (before, after]
    agent_rpo: float | None = None  # the agent's own rpo_seconds at that moment
    cached_lo: float | None = None  # PS acked_seq >= seq_before + 1 first seen
    cached: float | None = None  # PS acked_seq >= seq_after first seen (upper bound)
    applied: float | None = None  # PS applied_seq >= seq_after first seen
    seen: float | None = None  # sentinel found in the replica file

    def lag(self, attr: str) -> float | None:
        t = getattr(self, attr)
        return None if t is None or self.ack is None else t - self.ack


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """Nearest-rank p50/p90/p99 (the smallest value with at least p % of samples at or below
    it: never interpolated down), max, min, mean and the sample count."""
    xs = sorted(values)
    n = len(xs)
    if not n:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "min": None}

    def rank(p: float) -> float:
        return round(xs[max(0, math.ceil(p / 100 * n) - 1)], 4)

    return {
        "n": n,
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": round(xs[-1], 4),
        "min": round(xs[0], 4),
        "mean": round(sum(xs) / n, 4),
    }


# --------------------------------------------------------------------------- one churn rate


@dataclass
class Ctx:
    nbd_sock: str
    agent_sock: Path
    ps_sock: Path
    replica: Path
    source: Path
    disk_size: int
    token: int
    log: Path
    probe: Path  # a scratch file on the replica's filesystem
    first_n: int = 0


def churn_command(ctx: Ctx, rate_mbs: float, seconds: float) -> list[str]:
    return [
        "fio",
        "--name=churn",
        "--ioengine=nbd",
        f"--uri=nbd+unix:///{DISK_ID}?socket={ctx.nbd_sock}",
        "--rw=randwrite",
        f"--bsrange={BS_MIN}-{BS_MAX}",
        f"--iodepth={IODEPTH}",
        f"--rate={int(rate_mbs * MB)}",
        "--offset=0",
        f"--size={ctx.disk_size - SENTINEL_REGION}",
        "--norandommap",
        "--randrepeat=0",
        "--refill_buffers",
        "--time_based",
        f"--runtime={seconds:g}",
        "--output-format=json",
    ]


def sweep_command(uri: str, bs: int, seconds: float, size: int) -> list[str]:
    return [
        "fio",
        f"--name=seq{bs}",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=write",
        f"--bs={bs}",
        f"--iodepth={SWEEP_IODEPTH}",
        f"--size={size}",
        "--refill_buffers",
        "--time_based",
        f"--runtime={seconds:g}",
        "--output-format=json",
    ]


def _row(status: dict[str, Any]) -> dict[str, Any]:
    for row in status.get("disks", []):
        if row.get("disk") == DISK_ID:
            return dict(row)
    raise RuntimeError(f"{DISK_ID} missing from status: {str(status)[:500]}")


async def _status(path: Path) -> dict[str, Any]:
    return _row(await admin_request(path, {"cmd": "status"}, timeout=30))


class Gaps:
    """Time between consecutive polls (the resolution of a timestamp taken by polling)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.n = 0
        self.total = 0.0
        self.worst = 0.0

    def tick(self, now: float) -> None:
        if self.last is not None:
            gap = now - self.last
            self.n += 1
            self.total += gap
            self.worst = max(self.worst, gap)
        self.last = now

    def as_dict(self) -> dict[str, Any]:
        return {
            "polls": self.n + (1 if self.last is not None else 0),
            "mean_gap_ms": round(1000 * self.total / self.n, 2) if self.n else None,
            "max_gap_ms": round(1000 * self.worst, 1),
        }


async def measure_rate(ctx: Ctx, rate_mbs: float, seconds: float) -> dict[str, Any]:
    """fio churn at ``rate_mbs`` + sentinels for ``seconds``, then the drain; raw observations."""
    sentinels: list[Sentinel] = []
    n_slots = SENTINEL_REGION // SLOT
    region = ctx.disk_size - SENTINEL_REGION
    done = asyncio.Event()
    ps_gaps, watch_gaps = Gaps(), Gaps()
    ps_last: dict[str, Any] = {}
    backlog = {"max_cache_bytes": 0, "max_unapplied_writes": 0, "max_unsynced_writes": 0}
    errors: list[str] = []

    async def sentinel_writer(client: NbdClient, t_end: float) -> None:
        n = ctx.first_n
        tick = time.monotonic()
        while time.monotonic() < t_end:
            before = await _status(ctx.agent_sock)
            offset = region + (n % n_slots) * SLOT
            send_ns = time.time_ns()
            s = Sentinel(n, offset, send_ns / 1e9, seq_before=int(before["journaled_seq"]))
            sentinels.append(s)
            await client.write(offset, sentinel_block(ctx.token, n, send_ns))
            s.ack = time.time()
            after = await _status(ctx.agent_sock)
            s.seq_after = int(after["journaled_seq"])
            s.agent_rpo = after.get("rpo_seconds")
            n += 1
            tick = max(tick + SENTINEL_INTERVAL, time.monotonic())
            await asyncio.sleep(max(0.0, tick - time.monotonic()))

    async def watcher() -> None:
        """The external check: plain preads of the replica file."""
        while not done.is_set():
            now = time.time()
            watch_gaps.tick(now)
            pending = [s for s in sentinels if s.seen is None]
            if pending:
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(ctx.replica, os.O_RDONLY)
                    try:
                        for s in pending:
                            block = os.pread(fd, SLOT, s.offset)
                            if parse_sentinel(block, ctx.token) == s.n:
                                s.seen = time.time()
                    finally:
                        os.close(fd)
            await asyncio.sleep(POLL_INTERVAL)

    fsync_probe: list[float] = []

    async def fsync_prober() -> None:
        """Storage latency seen from outside: 4 KiB pwrite + fdatasync on the replica's
        filesystem every 100 ms (what the applier's replica sync competes with)."""
        path = ctx.probe
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        block = os.urandom(4096)
        try:
            i = 0
            while not done.is_set():
                t0 = time.monotonic()
                await asyncio.to_thread(_write_sync, fd, block, (i % 256) * 4096)
                fsync_probe.append(time.monotonic() - t0)
                i += 1
                await asyncio.sleep(SENTINEL_INTERVAL)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def ps_poller() -> None:
        while not done.is_set():
            try:
                row = await _status(ctx.ps_sock)
            except (OSError, RuntimeError, TimeoutError) as exc:
                errors.append(f"ps status: {exc!r}")
                await asyncio.sleep(POLL_INTERVAL)
                continue
            now = time.time()
            ps_gaps.tick(now)
            ps_last.update(row)
            acked = int(row.get("acked_seq") or 0)
            applied = int(row.get("applied_seq") or 0)
            applying = int(row.get("applying_seq") or applied)
            # durable in the cache but not yet written to the replica / not yet fdatasynced
            backlog["max_cache_bytes"] = max(backlog["max_cache_bytes"], row.get("cache_bytes", 0))
            backlog["max_unapplied_writes"] = max(backlog["max_unapplied_writes"], acked - applying)
            backlog["max_unsynced_writes"] = max(backlog["max_unsynced_writes"], applying - applied)
            for s in sentinels:
                if s.seq_before is not None and s.cached_lo is None and acked > s.seq_before:
                    s.cached_lo = now
                if s.seq_after is None:
                    continue
                if s.cached is None and acked >= s.seq_after:
                    s.cached = now
                if s.applied is None and applied >= s.seq_after:
                    s.applied = now
            await asyncio.sleep(POLL_INTERVAL)

    cmd = churn_command(ctx, rate_mbs, seconds)
    client = await NbdClient.connect(ctx.nbd_sock, DISK_ID)
    bg = [
        asyncio.create_task(watcher()),
        asyncio.create_task(ps_poller()),
        asyncio.create_task(fsync_prober()),
    ]
    start_wall = time.time()
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    writer_task = asyncio.create_task(sentinel_writer(client, start + seconds))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 120)
        await writer_task
        load_end = time.monotonic()
        with open(ctx.log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n{err.decode(errors='replace')}\n")
        if proc.returncode != 0:
            raise RuntimeError(f"fio exited {proc.returncode}: {err.decode()[-800:].strip()}")
        fio = parse_fio(out.decode())
        if fio["error"]:
            raise RuntimeError(f"fio job error {fio['error']}: {err.decode()[-800:].strip()}")

        # Drain: every sentinel seen, cached, applied; the PS applied what the agent journaled.
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            agent_row = await _status(ctx.agent_sock)
            journaled = int(agent_row["journaled_seq"])
            ready = (
                all(
                    s.seen is not None and s.cached is not None and s.applied is not None
                    for s in sentinels
                )
                and int(ps_last.get("applied_seq") or 0) >= journaled
            )
            if ready:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        drain_seconds = time.monotonic() - load_end
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if not writer_task.done():
            writer_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer_task
        done.set()
        with contextlib.suppress(Exception):
            await asyncio.gather(*bg)
        await client.close()
    return {
        "rate": rate_mbs,
        "command": shlex.join(cmd),
        "fio": fio,
        "start_wall": start_wall,
        "sentinels": sentinels,
        "drain_seconds": round(drain_seconds, 2),
        "drained": ready,
        "agent_after": agent_row,
        "ps_after": dict(ps_last),
        "ps_poll": ps_gaps.as_dict(),
        "replica_poll": watch_gaps.as_dict(),
        "ps_backlog": backlog,
        "fsync_probe": fsync_probe,
        "poll_errors": errors[:20],
    }


def _write_sync(fd: int, data: bytes, offset: int) -> None:
    os.pwrite(fd, data, offset)
    os.fdatasync(fd)


def summarize(raw: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Percentiles of one rate's observations (seconds)."""
    ss: list[Sentinel] = raw["sentinels"]
    acked = [s for s in ss if s.ack is not None]

    def lags(attr: str) -> list[float]:
        return [v for s in acked if (v := s.lag(attr)) is not None]

    fio = raw["fio"]
    achieved = fio["bytes"] / MB / (fio["runtime_ms"] / 1000) if fio["runtime_ms"] else 0.0
    bracket = [
        s.seq_after - s.seq_before
        for s in acked
        if s.seq_after is not None and s.seq_before is not None
    ]
    t0 = raw["start_wall"]
    return {
        "requested_mb_s": raw["rate"],
        "achieved_mb_s": round(achieved, 2),
        "achieved_ratio": round(achieved / raw["rate"], 3) if raw["rate"] else None,
        "fio_writes": fio["ios"],
        "fio_bytes": fio["bytes"],
        "fio_clat_p50_us": fio["clat_p50_us"],
        "fio_clat_p99_us": fio["clat_p99_us"],
        "seconds": seconds,
        "sentinels": len(ss),
        "sentinels_acked": len(acked),
        "sentinels_seen": sum(1 for s in acked if s.seen is not None),
        "rpo_a_cache": percentiles(lags("cached")),
        "rpo_a_cache_lower_bound": percentiles(lags("cached_lo")),
        "rpo_b_replica_file": percentiles(lags("seen")),
        "rpo_b_applied_seq": percentiles(lags("applied")),
        "sentinel_write_latency": percentiles([s.ack - s.send for s in acked if s.ack is not None]),
        "agent_reported_rpo": percentiles([float(s.agent_rpo or 0.0) for s in acked]),
        "seq_bracket_writes": percentiles([float(b) for b in bracket]),
        "drain_seconds": raw["drain_seconds"],
        "drained": raw["drained"],
        "ps_poll": raw["ps_poll"],
        "replica_poll": raw["replica_poll"],
        "ps_backlog": raw["ps_backlog"],
        "fsync_probe_seconds": percentiles(raw["fsync_probe"]),
        "poll_errors": raw["poll_errors"],
        "command": raw["command"],
        "timeline": [
            {
                "t": round(s.ack - t0, 3),
                "write_ms": round(1000 * (s.ack - s.send), 2),
                "a": _r(s.lag("cached")),
                "b": _r(s.lag("seen")),
            }
            for s in acked
            if s.ack is not None
        ],
    }


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


# --------------------------------------------------------------------------- helpers


def _rates(params: Params) -> tuple[float, ...]:
    text = os.environ.get(ENV_RATES, "").strip()
    if text:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
        if not rates or any(not 0 < r <= 10_000 for r in rates):
            raise ValueError(f"{ENV_RATES}={text!r}: rates must be in (0, 10000] MB/s")
        return tuple(sorted(set(rates)))
    return QUICK_RATES if params.quick else FULL_RATES


def cmp_images(source: Path, replica: Path) -> dict[str, Any]:
    """``cmp`` of the two files (outside the code under test); chunked XXH3 when cmp is absent."""
    start = time.monotonic()
    if shutil.which("cmp") is None:
        out = compare_images(source, replica)
        out["tool"] = "xxh3 chunks"
        return out
    proc = subprocess.run(
        ["cmp", str(source), str(replica)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode > 1:
        raise RuntimeError(f"cmp failed: {proc.stderr.strip()}")
    return {
        "tool": "cmp",
        "equal": proc.returncode == 0,
        "output": (proc.stdout + proc.stderr).strip()[:300],
        "bytes": os.path.getsize(source),
        "seconds": round(time.monotonic() - start, 2),
    }


def _wait_replicating(agent_sock: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, RuntimeError):
            row = asyncio.run(_status(agent_sock))
            if row.get("state") == "replicating":
                return row
        time.sleep(0.05)
    raise TimeoutError(f"{DISK_ID}: not replicating within {timeout:g}s: {row}")


def _wait_drained(dep: Deployment, agent_sock: Path, timeout: float) -> float:
    start = time.monotonic()
    while True:
        journaled = int(asyncio.run(_status(agent_sock))["journaled_seq"])
        applied = int(asyncio.run(_status(dep.ps_state / "admin.sock")).get("applied_seq") or 0)
        if applied >= journaled:
            return time.monotonic() - start
        if time.monotonic() - start > DRAIN_TIMEOUT:
            raise TimeoutError(f"applied_seq {applied} did not reach {journaled}")
        time.sleep(0.05)


def _overflowed(row: dict[str, Any]) -> bool:
    return (
        row.get("state") == "resync-required"
        or bool(row.get("resync_reason"))
        or int(row.get("dirty_bytes") or 0) > 0
    )


def _log_tails(root: Path, nbytes: int = 3000) -> dict[str, str]:
    tails = {}
    for log in sorted(root.rglob("*.log")):
        with contextlib.suppress(OSError):
            tails[str(log.relative_to(root))] = log.read_bytes()[-nbytes:].decode(
                "utf-8", "replace"
            )
    return tails


def throughput_from_json(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Block-size series from a saved ``tidemark-bench`` JSON: an rpo run's sweep, or the nbd
    scenario's runs (4 KiB randwrite QD16 and 1 MiB sequential QD8 per NBD server)."""
    doc = json.loads(Path(path).read_text())
    series: dict[str, list[tuple[int, float]]] = {}
    for res in doc.get("results", []):
        details = res.get("details") or {}
        for label, points in (details.get("sweep") or {}).items():
            series[label] = [(int(p["bs"]), float(p["mb_s"])) for p in points]
        runs = details.get("runs") if res.get("scenario") == "nbd" else None
        for key, bs in (("rand4k-qd16", 4096), ("seq1m-qd8", MIB)):
            for target, r in ((runs or {}).get(key) or {}).items():
                label = f"{target} (4 KiB randwrite QD16, 1 MiB seq QD8)"
                series.setdefault(label, []).append((bs, float(r["mb_s"])))
    if not series:
        raise ValueError(f"{path}: no nbd runs or rpo sweep in this JSON")
    return series


# --------------------------------------------------------------------------- the scenario


def run(params: Params) -> ScenarioResult:
    rates = _rates(params)
    seconds = params.seconds
    size = params.disk_size
    plots_dir = Path(os.environ[ENV_PLOTS]) if os.environ.get(ENV_PLOTS) else None
    from_json = Path(os.environ[ENV_FROM_JSON]) if os.environ.get(ENV_FROM_JSON) else None
    result = ScenarioResult(
        NAME,
        params={
            "rates_mb_s": list(rates),
            "seconds_per_rate": seconds,
            "disk_size": size,
            "block_sizes": f"{BS_MIN}-{BS_MAX} (fio --bsrange, multiples of 4 KiB)",
            "iodepth": IODEPTH,
            "sentinel_interval_s": SENTINEL_INTERVAL,
            "sentinel_region": SENTINEL_REGION,
            "poll_interval_s": POLL_INTERVAL,
            "plots": str(plots_dir) if plots_dir else None,
            "from_json": str(from_json) if from_json else None,
        },
    )
    details = result.details
    pids: dict[str, int] = {}
    details["pids"] = pids
    per_rate: list[dict[str, Any]] = []
    details["rates"] = per_rate
    verify: list[dict[str, Any]] = []
    details["verify"] = verify
    timeline: list[tuple[str, float]] = []
    details["timeline"] = timeline
    t_start = time.monotonic()

    def phase(name: str) -> None:
        at = round(time.monotonic() - t_start, 2)
        timeline.append((name, at))
        print(f"#   {at:6.1f}s {name}", file=sys.stderr, flush=True)

    if shutil.which("fio") is None:
        result.error = "not installed: fio"
        return result
    plots_missing = None
    if plots_dir is not None:
        from benchmarks import plots

        plots_missing = plots.available()
    want_sweep = plots_dir is not None and plots_missing is None and from_json is None
    sweep: dict[str, list[dict[str, Any]]] = {}
    final_row: dict[str, Any] | None = None

    with tempfile.TemporaryDirectory(prefix="tmr-", dir=params.tmpdir) as tmp:
        root = Path(tmp)
        details["workdir"] = str(root)
        dep = Deployment(root / "d")
        longest = max(
            [str(dep.root / f"{DISK_ID}.sock"), str(dep.root / f"agent-{AGENT}" / "admin.sock")],
            key=len,
        )
        if len(os.fsencode(longest)) > UNIX_PATH_MAX:
            result.error = f"{longest}: too long for a unix socket; use a shorter --tmpdir"
            return result
        try:
            phase("pki + process server + agent")
            dep.init_pki()
            options = {"journal_quota": params.journal_quota} if params.journal_quota else None
            spec = dep.add_agent(AGENT, {DISK_ID: size}, nbd=True, options=options)
            pids["ps"] = dep.start_ps().pid
            pids["agent"] = dep.start_agent(AGENT).pid
            details["commands"] = {
                "ps": shlex.join(
                    [PYTHON, "-m", "process_server.cli", "serve", "--config", "ps.toml"]
                ),
                "agent": shlex.join(
                    [PYTHON, "-m", "agent.cli", "run", "--config", f"{AGENT}.toml"]
                ),
            }
            agent_sock = spec.state_dir / "admin.sock"
            _wait_replicating(agent_sock, READY_TIMEOUT)
            ctx = Ctx(
                nbd_sock=spec.nbd[DISK_ID],
                agent_sock=agent_sock,
                ps_sock=dep.ps_state / "admin.sock",
                replica=dep.replica_path(DISK_ID),
                source=spec.disks[DISK_ID],
                disk_size=size,
                token=int.from_bytes(os.urandom(8), "big"),
                log=root / "fio.log",
                probe=root / "fsync-probe",
            )
            for rate in rates:
                phase(f"churn {rate:g} MB/s for {seconds:g} s")
                sampler = ProcessSampler({"agent": pids["agent"], "ps": pids["ps"]}).start()
                try:
                    raw = asyncio.run(measure_rate(ctx, rate, seconds))
                finally:
                    stats = sampler.stop()
                ctx.first_n += len(raw["sentinels"])
                summary = summarize(raw, seconds)
                summary["cpu_seconds"] = {k: round(st.cpu_seconds, 2) for k, st in stats.items()}
                summary["peak_rss_mib"] = {
                    k: round(st.peak_rss_bytes / MIB, 1) for k, st in stats.items()
                }
                summary["overflow"] = _overflowed(raw["agent_after"])
                per_rate.append(summary)
                _print_rate(summary)
                phase(f"cmp source replica after {rate:g} MB/s")
                check = cmp_images(ctx.source, ctx.replica)
                check["after_rate_mb_s"] = rate
                verify.append(check)
                t0 = time.monotonic()
                os.sync()  # the next rate does not pay for this one's writeback
                summary["sync_seconds"] = round(time.monotonic() - t0, 2)

            if want_sweep:
                sweep = _sweep(dep, spec, root, params, ctx, phase, verify, pids)
                details["sweep"] = sweep
            final_row = asyncio.run(_status(agent_sock))
            details["agent_disk"] = final_row
            details["link"] = asyncio.run(admin_request(agent_sock, {"cmd": "status"})).get("link")
            phase("stop")
            dep.stop_all()
            phase("done")
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            dep.stop_all()
            details["log_tails"] = _log_tails(root)
        finally:
            dep.stop_all()

    _figures(result, per_rate, verify, final_row, sweep)
    details["plots"] = _plots(result, plots_dir, plots_missing, from_json, per_rate, sweep)
    return result


def _sweep(
    dep: Deployment,
    spec: Any,
    root: Path,
    params: Params,
    ctx: Ctx,
    phase: Any,
    verify: list[dict[str, Any]],
    pids: dict[str, int],
) -> dict[str, list[dict[str, Any]]]:
    """Sequential writes at QD8 for each block size: the agent export, then nbdkit."""
    blocks = QUICK_SWEEP_BLOCKS if params.quick else SWEEP_BLOCKS
    secs = QUICK_SWEEP_SECONDS if params.quick else SWEEP_SECONDS
    size = min(SWEEP_SIZE, params.disk_size - SENTINEL_REGION)
    out: dict[str, list[dict[str, Any]]] = {"agent (replicating)": []}
    uri = f"nbd+unix:///{DISK_ID}?socket={spec.nbd[DISK_ID]}"
    for bs in blocks:
        phase(f"sweep: agent, seq write {bs} B QD{SWEEP_IODEPTH}")
        cmd = sweep_command(uri, bs, secs, size)
        r = _run_fio(cmd, secs, ctx.log)
        r["drain_seconds"] = round(_wait_drained(dep, ctx.agent_sock, DRAIN_TIMEOUT), 2)
        out["agent (replicating)"].append({"bs": bs, **r, "command": shlex.join(cmd)})
    check = cmp_images(ctx.source, ctx.replica)
    check["after_rate_mb_s"] = "sweep"
    verify.append(check)
    if shutil.which("nbdkit") is not None:
        out["nbdkit file"] = []
        for bs in blocks:
            phase(f"sweep: nbdkit, seq write {bs} B QD{SWEEP_IODEPTH}")
            with baseline_server("nbdkit", root, size, pids, f"nbdkit-{bs}") as kit_uri:
                cmd = sweep_command(kit_uri, bs, secs, size)
                r = _run_fio(cmd, secs, ctx.log)
            out["nbdkit file"].append({"bs": bs, **r, "command": shlex.join(cmd)})
    return out


def _run_fio(cmd: list[str], seconds: float, log: Path) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"fio exited {proc.returncode}: {proc.stderr[-800:].strip()}")
    out = parse_fio(proc.stdout)
    if out["error"]:
        raise RuntimeError(f"fio job error {out['error']}: {proc.stderr[-800:].strip()}")
    return out


def _print_rate(s: dict[str, Any]) -> None:
    a, b = s["rpo_a_cache"], s["rpo_b_replica_file"]

    def f(p: dict[str, Any]) -> str:
        keys = ("p50", "p90", "p99", "max")
        return "/".join("-" if p[k] is None else f"{p[k]:.3f}" for k in keys)

    print(
        f"#     requested {s['requested_mb_s']:g} MB/s, achieved {s['achieved_mb_s']:.1f} MB/s; "
        f"RPO s p50/p90/p99/max: (a) cache {f(a)}  (b) replica {f(b)}; "
        f"{s['sentinels_seen']}/{s['sentinels']} sentinels seen; drain {s['drain_seconds']} s",
        file=sys.stderr,
        flush=True,
    )


def _pct_text(p: dict[str, Any]) -> str:
    if not p.get("n"):
        return "-"
    return " / ".join(f"{p[k]:.3f}" for k in ("p50", "p90", "p99", "max"))


def _figures(
    result: ScenarioResult,
    per_rate: list[dict[str, Any]],
    verify: list[dict[str, Any]],
    final_row: dict[str, Any] | None,
    sweep: dict[str, list[dict[str, Any]]],
) -> None:
    figs = result.figures
    for s in per_rate:
        r = s["requested_mb_s"]
        figs.append(
            Figure(
                NAME,
                f"{r:g} MB/s: achieved churn",
                s["achieved_mb_s"],
                "MB/s",
                baseline=r,
                ratio=s["achieved_ratio"],
            )
        )
        figs.append(
            Figure(
                NAME,
                f"{r:g} MB/s: RPO (a) durable in PS cache p50/p90/p99/max",
                _pct_text(s["rpo_a_cache"]),
                "s",
            )
        )
        figs.append(
            Figure(
                NAME,
                f"{r:g} MB/s: RPO (b) seen in replica file p50/p90/p99/max",
                _pct_text(s["rpo_b_replica_file"]),
                "s",
            )
        )
    at = next((s for s in per_rate if s["requested_mb_s"] == TARGET_RATE), None)
    if at is not None:
        for kind, label in (
            ("rpo_b_replica_file", "(b) replica file"),
            ("rpo_a_cache", "(a) cache"),
        ):
            p = at[kind]
            for pct, limit in (("p99", TARGET_P99), ("p50", TARGET_P50)):
                v = p.get(pct)
                figs.append(
                    Figure(
                        NAME,
                        f"RPO {label} {pct} at {TARGET_RATE:g} MB/s",
                        v,
                        "s",
                        target=f"<= {limit:g} s",
                        passed=v is not None and v <= limit,
                    )
                )
    if per_rate:
        # The churn that happened is what fio achieved: a rate counts at its achieved MB/s.
        holding = [
            s
            for s in per_rate
            if s["rpo_b_replica_file"].get("p99") is not None
            and s["rpo_b_replica_file"]["p99"] <= LIMIT_P99
        ]
        best_row = max(holding, key=lambda s: s["achieved_mb_s"], default=None)
        best = 0.0 if best_row is None else best_row["achieved_mb_s"]
        measurable = max(s["requested_mb_s"] for s in per_rate) >= TARGET_MAX_CHURN
        need = round(PACING_TOLERANCE * TARGET_MAX_CHURN, 1)
        figs.append(
            Figure(
                NAME,
                f"highest churn achieved with p99 RPO(b) <= {LIMIT_P99:g} s",
                best,
                "MB/s",
                baseline=None if best_row is None else best_row["requested_mb_s"],
                target=f">= {TARGET_MAX_CHURN:g} MB/s (achieved >= {need:g})"
                + ("" if measurable else " (not measured: lower rates only)"),
                passed=(best >= need) if measurable else None,
            )
        )
        seen = all(s["sentinels_seen"] == s["sentinels"] and s["sentinels"] > 0 for s in per_rate)
        figs.append(
            Figure(
                NAME,
                "every sentinel acknowledged and seen in the replica",
                seen,
                target="yes",
                passed=seen,
                critical=True,
            )
        )
    if sweep:
        for label, points in sweep.items():
            for p in points:
                figs.append(
                    Figure(
                        NAME,
                        f"seq write {p['bs'] // 1024} KiB QD{SWEEP_IODEPTH}: {label}",
                        round(float(p["mb_s"]), 1),
                        "MB/s",
                    )
                )
    if final_row is not None:
        overflow = _overflowed(final_row) or any(s.get("overflow") for s in per_rate)
        figs.append(
            Figure(
                NAME,
                "every write replicated via the journal (no overflow/resync)",
                not overflow,
                target="yes",
                passed=not overflow,
                critical=True,
            )
        )
    if verify:
        equal = all(v["equal"] for v in verify)
        figs.append(
            Figure(
                NAME,
                f"replica == source (cmp after each of {len(verify)} phases)",
                equal,
                target="yes",
                passed=equal,
                critical=True,
            )
        )


def _plots(
    result: ScenarioResult,
    plots_dir: Path | None,
    missing: str | None,
    from_json: Path | None,
    per_rate: list[dict[str, Any]],
    sweep: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    if plots_dir is None:
        note = "not requested (--plots DIR)"
        result.figures.append(Figure(NAME, "plots", note))
        return {"status": note}
    if missing is not None:
        result.figures.append(Figure(NAME, "plots", missing))
        return {"status": missing}
    from benchmarks import plots

    made: dict[str, str] = {}
    try:
        if per_rate:
            made["rpo_over_time"] = plots.rpo_over_time(
                {
                    f"{s['requested_mb_s']:g} MB/s (achieved {s['achieved_mb_s']:.0f})": [
                        (p["t"], p["b"]) for p in s["timeline"] if p["b"] is not None
                    ]
                    for s in per_rate
                },
                plots_dir / PLOT_FILES["rpo_over_time"],
                limit=LIMIT_P99,
            )
            made["rpo_vs_churn"] = plots.rpo_vs_churn(
                [
                    {
                        "rate": s["requested_mb_s"],
                        "a": s["rpo_a_cache"],
                        "b": s["rpo_b_replica_file"],
                    }
                    for s in per_rate
                ],
                plots_dir / PLOT_FILES["rpo_vs_churn"],
                limits=(TARGET_P50, TARGET_P99, LIMIT_P99),
            )
        if from_json is not None:
            series = throughput_from_json(from_json)
        else:
            series = {
                label: [(int(p["bs"]), float(p["mb_s"])) for p in points]
                for label, points in sweep.items()
            }
        if series:
            made["throughput_vs_block"] = plots.throughput_vs_block(
                series, plots_dir / PLOT_FILES["throughput_vs_block"]
            )
    except Exception as exc:  # a plot must never fail the benchmark
        made["error"] = f"{type(exc).__name__}: {exc}"
    files = [v for k, v in made.items() if k != "error"]
    value = f"{len(files)} PNG in {plots_dir}" + (f"; {made['error']}" if "error" in made else "")
    result.figures.append(Figure(NAME, "plots", value))
    return {"status": "made", "files": made}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cli import main as cli_main

    return cli_main([NAME, *(sys.argv[1:] if argv is None else argv)])


__all__ = ["NAME", "SUMMARY", "Sentinel", "parse_sentinel", "percentiles", "run", "sentinel_block"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
