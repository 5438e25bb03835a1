"""Scenario ``rto``: recovery time of each failover mode, ``--to FILE`` throughput, and what the
undo log costs replication. Every check is made from outside the code under test.

A real deployment on loopback (``python -m process_server.cli serve``, ``python -m agent.cli
run`` with unix-socket NBD exports, mutual TLS 1.3), undo log on. Two sparse disks: 16 GiB and
4x that, 64 GiB (``--quick``: 1 GiB and 4 GiB). For each disk, through the agent's NBD export:

- **before the point**: ``base`` bytes (2 GiB; quick 128 MiB) of sequential 1 MiB writes
  (fio, fresh random data) from offset 0, plus 1 MiB (qemu-io) at the middle and at the end of
  the disk; drained (the process server applied all of it); the source image is copied
  (``cp --sparse=always``): the reference for the point; then
  ``tidemark-ps points create DISK --tag rto``;
- **after the point**: ``after`` bytes (1 GiB; quick 64 MiB) of random 4-64 KiB writes (fio
  ``--bsrange``, QD8) over ``[after, 3 * after)`` (half overwrites the base data, half is
  fresh), plus 1 MiB at offset 0, the middle and the end (overwriting); drained.

Then, ``repeats`` times (3; quick 1), each failover mode, each followed by
``tidemark-ps failover cleanup DISK``:

- ``test@point``: ``failover DISK --test --point ID``;
- ``test@latest-processed``: ``failover DISK --test --point latest-processed``;
- ``unplanned@point``: ``failover DISK --point ID`` (the disk is fenced until the cleanup);
- ``planned@latest``: ``failover DISK --planned --point latest`` (the agent is connected; it
  freezes the source until the cleanup unfreezes it).

each with ``--nbd unix:SOCK --json``. Per failover: the server's own ``timings_ms.total``, and
the end-to-end wall time from launching the CLI to the first successful 4 KiB read at offset 0
(a byte range rewritten after the point) by ``qemu-io -r -c 'read 0 4k'`` on the export; the
client alone (the same read again on the live export) is reported beside it. The first round
checks every export with ``qemu-img compare`` against its reference (the copy at the point, or
the idle source for the ``latest`` modes): over ``[0, 3 * after)`` where all the writes after
the point are, and over 1 MiB ranges sampled across the disk (16; quick 4) plus the middle and
the end, using qemu's raw ``offset``/``size`` options.
It also checks that the export at the point *differs* from the latest source (the comparison is
not vacuous). After the failovers a write through the agent's export must replicate again
(the source was unfrozen, the disk unfenced), and the replica must equal the source.

``--to FILE``: ``failover DISK --point ID --to FILE`` (the point of the 16 GiB disk holds
``base`` + 2 MiB of data) against ``cp --sparse=always`` of the replica file in the same run,
alternated ``repeats`` times (best of each), dirty pages written back (``sync``) before each;
both throughputs count the data (non-hole) bytes. ``--to`` returns once its image is durable
(fsynced), so the target is judged against ``cp`` followed by ``sync`` of the copy (the same
durability); the ratio to ``cp`` alone (a copy still in the page cache) is reported beside it. The image is compared with the reference
(``qemu-img compare``).

Undo log on vs off: the ``replication`` scenario's workload (1 MiB 2:1-compressible sequential
writes through the agent's Python API, a flush every 64 writes, drained and applied) in a
writer child like ``benchmarks.driver`` but with passes bounded by size rather than time, run
with ``undo = false`` and with ``undo = true`` in fresh deployments, each with a disk of
``--disk-size`` (4 GiB; quick 256 MiB) and two passes over the whole disk: a **fresh** pass
over the sparse replica (old contents are holes: the undo record is cheap) and an
**overwrite** pass rewriting every block with other data (the realistic case: the process
server reads the old data and writes it to the undo log before the replica). Throughput until
applied to the replica (the target) and until durable in the cache; replica == source after.

Targets (issue): RTO <= 1 s for the 16 GiB disk with 1 GiB written after the point, and no
more for the 4x disk (judged: <= 1 s, and the median within 1.2x + 50 ms of the 16 GiB one);
``--to`` >= 0.7x ``cp --sparse=always`` + ``sync``; replication with the undo log >= 0.7x
without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.deploy import PYTHON, Deployment, Driver
from benchmarks.metrics import (
    GIB,
    MIB,
    Figure,
    Params,
    ProcessSampler,
    ScenarioResult,
    mb_per_s,
    ratio,
)
from benchmarks.nbd_front import run_fio
from benchmarks.replication import UNIX_PATH_MAX, _auto_journal_quota, compare_images
from common.admin import admin_request

NAME = "rto"
SUMMARY = (
    "RTO per failover mode (16 GiB and 64 GiB disks, 1 GiB written after the point), "
    "--to FILE vs cp, replication with the undo log on vs off"
)
AGENT = "rto"

FULL_SIZE, QUICK_SIZE = 16 * GIB, 1 * GIB
SCALE = 4  # the second disk is this many times larger
FULL_BASE, QUICK_BASE = 2 * GIB, 128 * MIB  # written before the point
FULL_AFTER, QUICK_AFTER = 1 * GIB, 64 * MIB  # written after the point
FULL_REPEATS, QUICK_REPEATS = 3, 1
FULL_SAMPLES, QUICK_SAMPLES = 16, 4
QUICK_REPL_BYTES = 256 * MIB
SAMPLE = MIB
PROBE = 4096

MODES = ("test@point", "test@latest-processed", "unplanned@point", "planned@latest")

TARGET_RTO = 1.0
TARGET_SCALE_RATIO = 1.2
TARGET_SCALE_SLACK = 0.05
TARGET_TO_FILE = 0.7
TARGET_UNDO = 0.7

DRAIN_TIMEOUT = 600.0
CLI_TIMEOUT = 600.0


# --------------------------------------------------------------------------- small helpers


def _run(
    cmd: list[str], timeout: float = 600, log: Path | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        with open(log, "a") as f:
            f.write(
                f"$ {shlex.join(cmd)}\n-> {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}\n"
            )
    return proc


def _check(
    cmd: list[str], timeout: float = 600, log: Path | None = None
) -> subprocess.CompletedProcess[str]:
    proc = _run(cmd, timeout, log)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:].strip()}"
        )
    return proc


def ps_command() -> list[str]:
    """The operator's command: the ``tidemark-ps`` script next to this Python, else ``-m``."""
    script = Path(PYTHON).parent / "tidemark-ps"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [PYTHON, "-m", "process_server.cli"]


def data_bytes(path: Path) -> int:
    """Bytes of ``path`` that are not holes (SEEK_DATA / SEEK_HOLE)."""
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            pos = end
    finally:
        os.close(fd)
    return total


def nbd_uri(disk: str, sock: str | Path) -> str:
    return f"nbd+unix:///{disk}?socket={sock}"


def _image_opts(
    offset: int,
    length: int,
    *,
    file: Path | None = None,
    sock: Path | None = None,
    export: str = "",
) -> str:
    """A qemu ``--image-opts`` string: the raw byte range ``[offset, offset+length)`` of a local
    file or of an NBD export on a unix socket."""
    head = f"driver=raw,offset={offset},size={length}"
    if file is not None:
        return f"{head},file.driver=file,file.filename={file}"
    return (
        f"{head},file.driver=nbd,file.server.type=unix,file.server.path={sock},file.export={export}"
    )


def compare_range(ref: Path, sock: Path, export: str, offset: int, length: int) -> dict[str, Any]:
    """``qemu-img compare`` of a byte range of ``ref`` and of the export: 0 equal, 1 differ."""
    start = time.monotonic()
    cmd = [
        "qemu-img",
        "compare",
        "--image-opts",
        _image_opts(offset, length, file=ref),
        _image_opts(offset, length, sock=sock, export=export),
    ]
    proc = _run(cmd, timeout=1800)
    if proc.returncode > 1:
        raise RuntimeError(
            f"qemu-img compare failed: {(proc.stderr or proc.stdout).strip()[-500:]}"
        )
    return {
        "offset": offset,
        "length": length,
        "equal": proc.returncode == 0,
        "output": (proc.stdout + proc.stderr).strip()[:200],
        "seconds": round(time.monotonic() - start, 3),
    }


# --------------------------------------------------------------------------- the layout


@dataclass
class DiskPlan:
    disk: str
    size: int
    base: int
    after: int
    samples: int
    seed: int
    source: Path = Path()
    nbd_sock: Path = Path()
    point_ref: Path = Path()
    point_id: str = ""
    point_seq: int | None = None
    writes: dict[str, Any] = field(default_factory=dict)

    @property
    def hot_end(self) -> int:
        """Every byte written after the point lies in ``[0, hot_end)`` or in a marker MiB."""
        return max(self.base + MIB, 3 * self.after)

    @property
    def markers(self) -> list[int]:
        return [self.size // 2 // MIB * MIB, self.size - MIB]

    def ranges(self) -> list[tuple[int, int]]:
        """What a correctness check compares: the hot region, the markers, sampled MiBs."""
        rnd = random.Random(self.seed)
        mibs = self.size // MIB
        offsets = {m for m in self.markers}
        while len(offsets) < len(self.markers) + self.samples:
            offsets.add(rnd.randrange(mibs) * MIB)
        out = [(0, self.hot_end)]
        out += sorted((o, SAMPLE) for o in offsets if o >= self.hot_end)
        return out


def _fio_write(uri: str, name: str, log: Path, *args: str) -> dict[str, Any]:
    cmd = [
        "fio",
        f"--name={name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--iodepth=8",
        "--refill_buffers",
        "--randrepeat=0",
        "--output-format=json",
        *args,
    ]
    out = run_fio(cmd, 600, log)
    out["command"] = shlex.join(cmd)
    return out


def _qemu_write(uri: str, pattern: int, offset: int, length: int, log: Path) -> None:
    _check(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", uri], log=log)


async def _row(sock: Path, disk: str) -> dict[str, Any]:
    status = await admin_request(sock, {"cmd": "status"}, timeout=30)
    for row in status.get("disks", []):
        if row.get("disk") == disk:
            return dict(row)
    raise RuntimeError(f"{disk} missing from the status of {sock}")


def wait_drained(agent_sock: Path, ps_sock: Path, disk: str, timeout: float = DRAIN_TIMEOUT) -> int:
    """Wait until the process server applied (fdatasync'ed) all the agent journaled."""
    start = time.monotonic()
    while True:
        journaled = int(asyncio.run(_row(agent_sock, disk))["journaled_seq"])
        row = asyncio.run(_row(ps_sock, disk))
        if int(row.get("applied_seq") or 0) >= journaled:
            return journaled
        if time.monotonic() - start > timeout:
            raise TimeoutError(
                f"{disk}: applied_seq {row.get('applied_seq')} did not reach {journaled}"
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------- the RTO run


@dataclass
class Ctx:
    dep: Deployment
    root: Path
    agent_sock: Path
    ps_sock: Path
    log: Path
    repeats: int
    phase: Any


def _ps(ctx: Ctx, *args: str) -> tuple[dict[str, Any], float, list[str]]:
    """Run ``tidemark-ps ARGS --config ps.toml --json``; (reply, wall seconds, command)."""
    cmd = [*ps_command(), *args, "--config", str(ctx.dep.ps_config), "--json"]
    start = time.monotonic()
    proc = _run(cmd, CLI_TIMEOUT, ctx.log)
    wall = time.monotonic() - start
    try:
        reply = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        reply = {}
    if proc.returncode != 0 or not reply.get("ok"):
        raise RuntimeError(
            f"{shlex.join(cmd)} exited {proc.returncode}: {reply or proc.stderr.strip()[-800:]}"
        )
    return reply, wall, cmd


def prepare_disk(ctx: Ctx, plan: DiskPlan) -> None:
    """Write the data before the point, copy the source, take the point, write after it."""
    uri = nbd_uri(plan.disk, plan.nbd_sock)
    gib = plan.size / GIB
    ctx.phase(f"{gib:g} GiB disk: {plan.base / MIB:g} MiB before the point")
    w = plan.writes
    w["base"] = _fio_write(
        uri, "base", ctx.log, "--rw=write", "--bs=1M", "--offset=0", f"--size={plan.base}"
    )
    for i, m in enumerate(plan.markers):
        _qemu_write(uri, 0x51 + i, m, MIB, ctx.log)
    wait_drained(ctx.agent_sock, ctx.ps_sock, plan.disk)
    t0 = time.monotonic()
    _check(["cp", "--sparse=always", str(plan.source), str(plan.point_ref)], log=ctx.log)
    w["reference_copy_seconds"] = round(time.monotonic() - t0, 2)
    reply, wall, cmd = _ps(ctx, "points", "create", plan.disk, "--tag", "rto")
    if not reply.get("recorded"):
        raise RuntimeError(f"point not recorded: {reply}")
    plan.point_id = str(reply["id"])
    w["point_create"] = {"reply": reply, "wall_seconds": round(wall, 3), "command": shlex.join(cmd)}
    ctx.phase(f"{gib:g} GiB disk: point {plan.point_id}; {plan.after / MIB:g} MiB after it")
    w["after"] = _fio_write(
        uri,
        "after",
        ctx.log,
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--norandommap",
        f"--offset={plan.after}",
        f"--size={2 * plan.after}",
        f"--io_size={plan.after}",
    )
    for i, m in enumerate([0, *plan.markers]):
        _qemu_write(uri, 0xA1 + i, m, MIB, ctx.log)
    w["drained_seq"] = wait_drained(ctx.agent_sock, ctx.ps_sock, plan.disk)


def _probe(uri: str, log: Path, tries: int = 50) -> tuple[bool, float, int]:
    """``qemu-io -r -c 'read 0 4k'`` until it succeeds: (ok, seconds, attempts)."""
    start = time.monotonic()
    cmd = ["qemu-io", "-r", "-f", "raw", "-c", f"read 0 {PROBE}", uri]
    for attempt in range(1, tries + 1):
        proc = _run(cmd, 60)
        if proc.returncode == 0 and f"read {PROBE}/{PROBE} bytes" in proc.stdout:
            return True, time.monotonic() - start, attempt
        if attempt == 1:
            with open(log, "a") as f:
                f.write(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
        time.sleep(0.01)
    return False, time.monotonic() - start, tries


def failover_args(mode: str, plan: DiskPlan) -> list[str]:
    point = plan.point_id if mode.endswith("@point") else mode.split("@", 1)[1]
    args = ["failover", plan.disk, "--point", point]
    if mode.startswith("test@"):
        args.append("--test")
    elif mode.startswith("planned@"):
        args.append("--planned")
    return args


def one_failover(ctx: Ctx, plan: DiskPlan, mode: str, verify: bool) -> dict[str, Any]:
    sock = ctx.root / f"fo-{plan.disk}.sock"
    args = [*failover_args(mode, plan), "--nbd", f"unix:{sock}"]
    out: dict[str, Any] = {"mode": mode, "disk": plan.disk, "size": plan.size}
    start = time.monotonic()
    reply, cli_wall, cmd = _ps(ctx, *args)
    try:
        fo = reply["failovers"][0]
        uri = fo["nbd"]
        ok, read_s, attempts = _probe(uri, ctx.log)
        e2e = time.monotonic() - start
        if not ok:
            raise RuntimeError(f"{mode}: no 4 KiB read from {uri} after {attempts} attempts")
        _, client_s, _ = _probe(uri, ctx.log)  # the client alone, on a live export
        out.update(
            command=shlex.join(cmd),
            point=fo["point"],
            timings_ms=fo["timings_ms"],
            server_total_s=round(fo["timings_ms"]["total"] / 1000, 4),
            cli_wall_s=round(cli_wall, 4),
            read_after_reply_s=round(read_s, 4),
            read_attempts=attempts,
            end_to_end_s=round(e2e, 4),
            client_alone_s=round(client_s, 4),
        )
        if verify:
            ref = plan.point_ref if mode.endswith("@point") else plan.source
            checks = [compare_range(ref, sock, plan.disk, o, n) for o, n in plan.ranges()]
            out["compare"] = {
                "reference": "copy at the point" if ref == plan.point_ref else "idle source",
                "equal": all(c["equal"] for c in checks),
                "bytes": sum(c["length"] for c in checks),
                "seconds": round(sum(c["seconds"] for c in checks), 2),
                "ranges": len(checks),
                "differing": [c for c in checks if not c["equal"]][:5],
            }
            if mode == "test@point":
                # Not vacuous: the export at the point is not the latest source.
                hot = compare_range(plan.source, sock, plan.disk, 0, plan.hot_end)
                out["differs_from_latest"] = not hot["equal"]
    finally:
        _, cleanup_wall, _ = _ps(ctx, "failover", "cleanup", plan.disk)
        out["cleanup_wall_s"] = round(cleanup_wall, 4)
    return out


def to_file_runs(ctx: Ctx, plan: DiskPlan, repeats: int) -> dict[str, Any]:
    """``failover --to FILE`` of the point against ``cp --sparse=always`` of the replica."""
    replica = ctx.dep.replica_path(plan.disk)
    replica_data = data_bytes(replica)
    cps: list[dict[str, Any]] = []
    tos: list[dict[str, Any]] = []
    equal = True
    for i in range(repeats):
        dst = ctx.root / "cp-replica.img"
        os.sync()
        t0 = time.monotonic()
        _check(["cp", "--sparse=always", str(replica), str(dst)], log=ctx.log)
        cp_s = time.monotonic() - t0
        _check(["sync", str(dst)], log=ctx.log)
        cp_sync_s = time.monotonic() - t0
        cps.append(
            {
                "seconds": round(cp_s, 3),
                "with_fsync_seconds": round(cp_sync_s, 3),
                "data_bytes": replica_data,
                "mb_s": round(mb_per_s(replica_data, cp_s), 1),
                "with_fsync_mb_s": round(mb_per_s(replica_data, cp_sync_s), 1),
            }
        )
        dst.unlink()
        image = ctx.root / "to-file.img"
        os.sync()
        reply, wall, cmd = _ps(
            ctx, "failover", plan.disk, "--point", plan.point_id, "--to", str(image)
        )
        server_s = reply["timings_ms"]["total"] / 1000
        n = int(reply["data_bytes"])
        run = {
            "command": shlex.join(cmd),
            "timings_ms": reply["timings_ms"],
            "data_bytes": n,
            "image_data_bytes": data_bytes(image),
            "server_seconds": round(server_s, 3),
            "cli_wall_seconds": round(wall, 3),
            "mb_s": round(mb_per_s(n, server_s), 1),
            "cli_mb_s": round(mb_per_s(n, wall), 1),
        }
        if i == 0:
            proc = _run(
                ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(plan.point_ref), str(image)],
                1800,
                ctx.log,
            )
            if proc.returncode > 1:
                raise RuntimeError(f"qemu-img compare failed: {proc.stderr.strip()[-500:]}")
            run["equal_to_point_copy"] = proc.returncode == 0
            equal = equal and proc.returncode == 0
        tos.append(run)
        image.unlink()
    best_cp = max(cps, key=lambda r: r["mb_s"])
    best_to = max(tos, key=lambda r: r["mb_s"])
    return {
        "disk": plan.disk,
        "size": plan.size,
        "replica_data_bytes": replica_data,
        "cp": cps,
        "to_file": tos,
        "best_cp_mb_s": best_cp["mb_s"],
        "best_cp_with_fsync_mb_s": max(r["with_fsync_mb_s"] for r in cps),
        "best_to_file_mb_s": best_to["mb_s"],
        "best_to_file_cli_mb_s": max(r["cli_mb_s"] for r in tos),
        "equal": equal,
    }


def rto_part(params: Params, root: Path, details: dict[str, Any], phase: Any) -> dict[str, Any]:
    quick = params.quick
    size = QUICK_SIZE if quick else FULL_SIZE
    base = QUICK_BASE if quick else FULL_BASE
    after = QUICK_AFTER if quick else FULL_AFTER
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    samples = QUICK_SAMPLES if quick else FULL_SAMPLES
    seed = int.from_bytes(os.urandom(4), "big")
    plans = [
        DiskPlan(f"rto{int(s // GIB)}g", s, base, after, samples, seed + i)
        for i, s in enumerate((size, SCALE * size))
    ]
    dep = Deployment(root / "d")
    pids = details["pids"]
    out: dict[str, Any] = {"plans": [], "failovers": [], "to_file": []}
    longest = str(dep.root / f"agent-{AGENT}" / "admin.sock")
    if len(os.fsencode(longest)) > UNIX_PATH_MAX - 16:
        raise RuntimeError(f"{longest}: too long for a unix socket; use a shorter --tmpdir")
    try:
        phase("pki + process server + agent (rto)")
        dep.init_pki()
        spec = dep.add_agent(AGENT, {p.disk: p.size for p in plans}, nbd=True)
        pids["ps"] = dep.start_ps().pid
        pids["agent"] = dep.start_agent(AGENT).pid
        ctx = Ctx(
            dep=dep,
            root=dep.root,
            agent_sock=spec.state_dir / "admin.sock",
            ps_sock=dep.ps_state / "admin.sock",
            log=root / "rto.log",
            repeats=repeats,
            phase=phase,
        )
        _wait_replicating(ctx, [p.disk for p in plans])
        for plan in plans:
            plan.source = spec.disks[plan.disk]
            plan.nbd_sock = Path(spec.nbd[plan.disk])
            plan.point_ref = root / f"{plan.disk}-at-point.img"
            prepare_disk(ctx, plan)
        for plan in plans:
            gib = plan.size / GIB
            for r in range(repeats):
                for mode in MODES:
                    phase(f"{gib:g} GiB disk: failover {mode} (round {r + 1}/{repeats})")
                    row = one_failover(ctx, plan, mode, verify=r == 0)
                    row["round"] = r + 1
                    out["failovers"].append(row)
                    _print_failover(row)
        for plan in plans:
            phase(f"{plan.size / GIB:g} GiB disk: --to FILE vs cp --sparse=always")
            runs = to_file_runs(ctx, plan, repeats if plan is plans[0] else 1)
            out["to_file"].append(runs)
            print(
                f"#     --to FILE {runs['best_to_file_mb_s']:.0f} MB/s (CLI "
                f"{runs['best_to_file_cli_mb_s']:.0f}), cp --sparse=always "
                f"{runs['best_cp_mb_s']:.0f} MB/s (with fsync {runs['best_cp_with_fsync_mb_s']:.0f})",
                file=sys.stderr,
                flush=True,
            )
        phase("replication resumes after the failovers")
        out["after"] = _after_failovers(ctx, plans)
        for plan in plans:
            out["plans"].append(
                {
                    "disk": plan.disk,
                    "size": plan.size,
                    "base": plan.base,
                    "after": plan.after,
                    "point_id": plan.point_id,
                    "hot_end": plan.hot_end,
                    "compare_ranges": len(plan.ranges()),
                    "writes": plan.writes,
                }
            )
        details["ps_status"] = asyncio.run(admin_request(ctx.ps_sock, {"cmd": "status"}))
    finally:
        dep.stop_all()
        for plan in plans:
            with contextlib.suppress(OSError):
                plan.point_ref.unlink()
    return out


def _wait_replicating(ctx: Ctx, disks: list[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, RuntimeError):
            rows = [asyncio.run(_row(ctx.agent_sock, d)) for d in disks]
            if all(r.get("state") == "replicating" for r in rows):
                return
        time.sleep(0.05)
    raise TimeoutError(f"not replicating within {timeout:g}s: {rows}")


def _after_failovers(ctx: Ctx, plans: list[DiskPlan]) -> dict[str, Any]:
    """A write through the agent after every cleanup replicates; replica == source."""
    out: dict[str, Any] = {}
    for plan in plans:
        uri = nbd_uri(plan.disk, plan.nbd_sock)
        _qemu_write(uri, 0xEE, MIB, MIB, ctx.log)  # refused while the source is frozen
        wait_drained(ctx.agent_sock, ctx.ps_sock, plan.disk)
        replica = ctx.dep.replica_path(plan.disk)
        proc = _run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(plan.source), str(replica)],
            1800,
            ctx.log,
        )
        if proc.returncode > 1:
            raise RuntimeError(f"qemu-img compare failed: {proc.stderr.strip()[-500:]}")
        out[plan.disk] = {"equal": proc.returncode == 0, "output": proc.stdout.strip()[:200]}
    return out


def _print_failover(row: dict[str, Any]) -> None:
    check = row.get("compare")
    verdict = "" if check is None else (" compare ok" if check["equal"] else " COMPARE DIFFERS")
    print(
        f"#     {row['mode']}: end to end {row['end_to_end_s'] * 1000:.0f} ms "
        f"(server {row['server_total_s'] * 1000:.0f} ms, CLI {row['cli_wall_s'] * 1000:.0f} ms, "
        f"read {row['read_after_reply_s'] * 1000:.0f} ms; client alone "
        f"{row['client_alone_s'] * 1000:.0f} ms){verdict}",
        file=sys.stderr,
        flush=True,
    )


# --------------------------------------------------------------------------- undo on vs off

REPL_AGENT = "repl"
REPL_DISK = "repl0"


class Writer(Driver):
    """The replication workload's writer with passes of a given size: a child process running
    the agent through its Python API (like ``benchmarks.driver``), commands on stdin."""

    def __init__(
        self, deployment: Deployment, agent: str
    ) -> None:  # no super().__init__: another child module
        spec = deployment.agents[agent]
        self.log = open(deployment.root / f"writer-{agent}.log", "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "benchmarks.rto", WRITER_FLAG, str(spec.config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            start_new_session=True,
        )
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"writer did not start: {ready}")
        self.pid = int(ready["pid"])


WRITER_FLAG = "--writer"


async def _write_pass(agent: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    """``bytes`` of 1 MiB 2:1-compressible sequential writes from offset 0, a flush every 64
    writes (the replication scenario's workload, bounded by size rather than time); ``lap``
    rotates the data so a second pass changes every block it rewrites."""
    from benchmarks.driver import compressible

    disk = agent.disk(cmd["disk"])
    block = int(cmd["block"])
    nbytes = int(cmd["bytes"])
    lap = int(cmd.get("lap", 0))
    blocks = [compressible(i, block) for i in range(16)]
    start = time.monotonic()
    offset = i = 0
    while offset < nbytes:
        n = min(block, nbytes - offset)
        await disk.write(offset, blocks[(i + lap) % 16][:n])
        offset += n
        i += 1
        if i % 64 == 0:
            await disk.flush()
    await disk.flush()
    write_done = time.monotonic()
    drained = await agent.wait_drained(float(cmd.get("drain_timeout", 600)))
    return {
        "bytes": offset,
        "write_seconds": write_done - start,
        "drain_seconds": time.monotonic() - start,
        "drained": drained,
    }


async def _writer_serve(config: Path) -> None:
    from agent.service import Agent
    from common.config import load_agent_config

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with Agent(load_agent_config(config), nbd=False) as agent:
        print(json.dumps({"ok": True, "ready": True, "pid": os.getpid()}), flush=True)
        while True:
            line = await reader.readline()
            if not line:
                return
            cmd = json.loads(line)
            reply: dict[str, Any] = {"ok": True}
            if cmd["op"] == "pass":
                reply.update(await _write_pass(agent, cmd))
            elif cmd["op"] == "status":
                reply["status"] = agent.status()
            elif cmd["op"] == "quit":
                print(json.dumps(reply), flush=True)
                return
            else:
                reply = {"ok": False, "error": f"unknown op {cmd['op']!r}"}
            print(json.dumps(reply), flush=True)


def replication_runs(
    params: Params, root: Path, undo: bool, nbytes: int, pids: dict[str, int]
) -> dict[str, Any]:
    """The replication workload in a new deployment: a fresh pass of ``nbytes`` over a sparse
    disk of that size, then an overwrite pass rewriting every block with other data."""
    label = "on" if undo else "off"
    os.sync()  # the previous part's dirty pages are not this run's to write back
    dep = Deployment(root / f"u{label}", ps_options={"undo": undo})
    writer: Writer | None = None
    out: dict[str, Any] = {"undo": undo, "passes": {}}
    try:
        dep.init_pki()
        quota = params.journal_quota or _auto_journal_quota(root, nbytes)
        spec = dep.add_agent(REPL_AGENT, {REPL_DISK: nbytes}, options={"journal_quota": quota})
        ps_proc = dep.start_ps()
        pids[f"ps_undo_{label}"] = ps_proc.pid
        writer = Writer(dep, REPL_AGENT)
        pids[f"writer_undo_{label}"] = writer.pid
        for lap, name in enumerate(("fresh", "overwrite")):
            p = _replication_pass(dep, writer, ps_proc.pid, nbytes, lap, params)
            p["overwritten_fraction"] = float(lap)
            out["passes"][name] = p
        writer.quit()
        writer = None
        dep.stop_all()
        out["verify"] = compare_images(spec.disks[REPL_DISK], dep.replica_path(REPL_DISK))
    finally:
        if writer is not None:
            writer.kill()
        dep.stop_all()
        shutil.rmtree(dep.root, ignore_errors=True)
    return out


def _replication_pass(
    dep: Deployment, writer: Writer, ps_pid: int, nbytes: int, lap: int, params: Params
) -> dict[str, Any]:
    """One pass of the workload, drained (durable in the PS cache) and applied."""
    timeout = max(300.0, nbytes / (5 * 10**6))
    cmd = {
        "op": "pass",
        "disk": REPL_DISK,
        "bytes": nbytes,
        "lap": lap,
        "block": params.block,
        "drain_timeout": timeout,
    }
    sampler = ProcessSampler({"agent": writer.pid, "ps": ps_pid}).start()
    try:
        load = writer.call(**cmd)
        returned = time.monotonic()
        if not load.get("ok") or not load.get("drained"):
            raise RuntimeError(f"writer pass failed: {load}")
        status = writer.call(op="status")["status"]
        row = next(r for r in status["disks"] if r["disk"] == REPL_DISK)
        journaled = int(row["journaled_seq"])
        ps_row = _wait_ps_applied(dep, journaled, timeout)
        applied_s = float(load["drain_seconds"]) + (time.monotonic() - returned)
    finally:
        stats = sampler.stop()
    n = int(load["bytes"])
    return {
        "bytes": n,
        "write_seconds": round(float(load["write_seconds"]), 3),
        "drain_seconds": round(float(load["drain_seconds"]), 3),
        "applied_seconds": round(applied_s, 3),
        "drained_mb_s": round(mb_per_s(n, float(load["drain_seconds"])), 1),
        "applied_mb_s": round(mb_per_s(n, applied_s), 1),
        "ps_cpu_seconds": round(stats["ps"].cpu_seconds, 2),
        "ps_storage_write_bytes": stats["ps"].write_bytes,
        "agent_cpu_seconds": round(stats["agent"].cpu_seconds, 2),
        "undo_bytes": ps_row.get("undo_bytes"),
        "overflow": row.get("state") == "resync-required"
        or bool(row.get("resync_reason"))
        or int(row.get("dirty_bytes") or 0) > 0,
    }


def _wait_ps_applied(dep: Deployment, seq: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        row = asyncio.run(_row(dep.ps_state / "admin.sock", REPL_DISK))
        if int(row.get("applied_seq") or 0) >= seq:
            return row
        time.sleep(0.05)
    raise TimeoutError(f"{REPL_DISK}: applied_seq did not reach {seq}: {row}")


# --------------------------------------------------------------------------- the scenario


def run(params: Params) -> ScenarioResult:
    quick = params.quick
    repl_bytes = min(params.disk_size, QUICK_REPL_BYTES) if quick else params.disk_size
    size = QUICK_SIZE if quick else FULL_SIZE
    result = ScenarioResult(
        NAME,
        params={
            "disk_sizes": [size, SCALE * size],
            "before_point_bytes": QUICK_BASE if quick else FULL_BASE,
            "after_point_bytes": QUICK_AFTER if quick else FULL_AFTER,
            "after_point_writes": "random 4-64 KiB, QD8 (fio --bsrange)",
            "repeats": QUICK_REPEATS if quick else FULL_REPEATS,
            "modes": list(MODES),
            "probe": f"qemu-io -r -c 'read 0 {PROBE}'",
            "replication_disk_size": params.disk_size,
            "replication_bytes_per_pass": repl_bytes,
            "replication_block": params.block,
        },
    )
    details = result.details
    details["pids"] = {}
    timeline: list[tuple[str, float]] = []
    details["timeline"] = timeline
    t_start = time.monotonic()

    def phase(name: str) -> None:
        at = round(time.monotonic() - t_start, 2)
        timeline.append((name, at))
        print(f"#   {at:6.1f}s {name}", file=sys.stderr, flush=True)

    missing = [t for t in ("fio", "qemu-io", "qemu-img", "cp", "sync") if shutil.which(t) is None]
    if missing:
        result.error = f"not installed: {', '.join(missing)}"
        return result
    details["commands"] = {
        "ps": shlex.join([PYTHON, "-m", "process_server.cli", "serve", "--config", "ps.toml"]),
        "agent": shlex.join([PYTHON, "-m", "agent.cli", "run", "--config", f"{AGENT}.toml"]),
        "cli": shlex.join(ps_command()),
    }
    rto: dict[str, Any] = {}
    undo: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tmo-", dir=params.tmpdir) as tmp:
        root = Path(tmp)
        details["workdir"] = str(root)
        try:
            rto = rto_part(params, root, details, phase)
            details["rto"] = rto
            for on in (False, True):
                label = "on" if on else "off"
                phase(
                    f"replication, undo log {label}: fresh + overwrite passes of "
                    f"{repl_bytes / MIB:g} MiB"
                )
                undo[label] = replication_runs(params, root, on, repl_bytes, details["pids"])
                for name, p in undo[label]["passes"].items():
                    print(
                        f"#     undo {label}, {name}: {p['bytes'] / MIB:.0f} MiB, applied "
                        f"{p['applied_mb_s']:.1f} MB/s, drained {p['drained_mb_s']:.1f} MB/s",
                        file=sys.stderr,
                        flush=True,
                    )
            details["undo"] = undo
            phase("done")
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            details["log_tails"] = _log_tails(root)
    if rto.get("failovers"):
        details["rto_summary"] = summary_table(rto["failovers"])
    _figures(result, rto, undo)
    return result


def _log_tails(root: Path, nbytes: int = 3000) -> dict[str, str]:
    tails = {}
    for log in sorted(root.rglob("*.log")):
        with contextlib.suppress(OSError):
            tails[str(log.relative_to(root))] = log.read_bytes()[-nbytes:].decode(
                "utf-8", "replace"
            )
    return tails


def summarize_failovers(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (mode, disk size): median and worst of the end-to-end and server times."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        out.setdefault((row["mode"], row["size"]), {"rows": []})["rows"].append(row)
    for s in out.values():
        e2e = [r["end_to_end_s"] for r in s["rows"]]
        server = [r["server_total_s"] for r in s["rows"]]
        s.update(
            n=len(e2e),
            e2e_median=statistics.median(e2e),
            e2e_max=max(e2e),
            server_median=statistics.median(server),
            server_max=max(server),
            cli_median=statistics.median(r["cli_wall_s"] for r in s["rows"]),
            client_median=statistics.median(r["client_alone_s"] for r in s["rows"]),
            open_view_ms_median=statistics.median(
                float(r.get("timings_ms", {}).get("open_view", 0.0)) for r in s["rows"]
            ),
        )
    return out


def summary_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, disk size) for the JSON: medians and worsts in ms."""
    out = []
    for (mode, size), s in summarize_failovers(rows).items():
        out.append(
            {
                "mode": mode,
                "size": size,
                "n": s["n"],
                "end_to_end_ms_median": _ms(s["e2e_median"]),
                "end_to_end_ms_max": _ms(s["e2e_max"]),
                "server_total_ms_median": _ms(s["server_median"]),
                "server_total_ms_max": _ms(s["server_max"]),
                "open_view_ms_median": round(s["open_view_ms_median"], 1),
                "cli_wall_ms_median": _ms(s["cli_median"]),
                "client_alone_ms_median": _ms(s["client_median"]),
            }
        )
    return out


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _gib(n: int) -> str:
    return f"{n / GIB:g} GiB"


def _figures(result: ScenarioResult, rto: dict[str, Any], undo: dict[str, dict[str, Any]]) -> None:
    figs = result.figures
    rows = rto.get("failovers") or []
    summary = summarize_failovers(rows)
    sizes = sorted({size for _, size in summary})
    for mode in MODES:
        for size in sizes:
            s = summary.get((mode, size))
            if s is None:
                continue
            figs.append(
                Figure(
                    NAME,
                    f"RTO {mode}, {_gib(size)} disk: launch -> first 4 KiB read (worst)",
                    _ms(s["e2e_max"]),
                    "ms",
                    target=f"<= {TARGET_RTO * 1000:.0f} ms",
                    passed=s["e2e_max"] <= TARGET_RTO,
                )
            )
            figs.append(
                Figure(
                    NAME,
                    f"RTO {mode}, {_gib(size)} disk: server timings_ms.total (worst)",
                    _ms(s["server_max"]),
                    "ms",
                )
            )
        if len(sizes) == 2 and all((mode, z) in summary for z in sizes):
            small, big = summary[(mode, sizes[0])], summary[(mode, sizes[1])]
            limit = TARGET_SCALE_RATIO * small["e2e_median"] + TARGET_SCALE_SLACK
            r = ratio(big["e2e_median"], small["e2e_median"])
            figs.append(
                Figure(
                    NAME,
                    f"RTO {mode}: {_gib(sizes[1])} vs {_gib(sizes[0])} disk (median end to end)",
                    _ms(big["e2e_median"]),
                    "ms",
                    baseline=_ms(small["e2e_median"]),
                    ratio=None if r is None else round(r, 2),
                    target=f"<= {TARGET_RTO * 1000:.0f} ms and <= {TARGET_SCALE_RATIO:g}x + "
                    f"{TARGET_SCALE_SLACK * 1000:.0f} ms",
                    passed=big["e2e_max"] <= TARGET_RTO and big["e2e_median"] <= limit,
                )
            )
    if rows:
        overhead = statistics.median(r["cli_wall_s"] - r["server_total_s"] for r in rows)
        figs.append(
            Figure(
                NAME,
                "tidemark-ps CLI wall - server total (start-up, reply; median)",
                _ms(overhead),
                "ms",
            )
        )
        client = statistics.median(r["client_alone_s"] for r in rows)
        figs.append(Figure(NAME, "NBD client alone: qemu-io read 0 4k (median)", _ms(client), "ms"))
        checked = [r for r in rows if "compare" in r]
        equal = bool(checked) and all(r["compare"]["equal"] for r in checked)
        figs.append(
            Figure(
                NAME,
                f"every export == its reference (qemu-img compare, {len(checked)} failovers)",
                equal,
                target="yes",
                passed=equal,
                critical=True,
            )
        )
        differs = [r.get("differs_from_latest") for r in checked if r["mode"] == "test@point"]
        ok = bool(differs) and all(differs)
        figs.append(
            Figure(
                NAME,
                "the export at the point differs from the latest source",
                ok,
                target="yes",
                passed=ok,
                critical=True,
            )
        )
    after = rto.get("after")
    if after is not None:
        ok = all(v["equal"] for v in after.values())
        figs.append(
            Figure(
                NAME,
                "replication resumes after cleanup (replica == source)",
                ok,
                target="yes",
                passed=ok,
                critical=True,
            )
        )
    for i, runs in enumerate(rto.get("to_file") or []):
        size = runs["size"]
        data = runs["to_file"][0]["data_bytes"]
        if i == 0:
            durable = ratio(runs["best_to_file_mb_s"], runs["best_cp_with_fsync_mb_s"])
            cached = ratio(runs["best_to_file_mb_s"], runs["best_cp_mb_s"])
            copied = f"({_gib(size)} disk, {runs['replica_data_bytes'] / GIB:.2f} GiB data)"
            figs.append(
                Figure(
                    NAME,
                    f"cp --sparse=always + sync of the replica {copied}",
                    runs["best_cp_with_fsync_mb_s"],
                    "MB/s",
                )
            )
            figs.append(
                Figure(
                    NAME,
                    f"--to FILE at the point, fsynced ({_gib(size)} disk, {data / GIB:.2f} GiB data)",
                    runs["best_to_file_mb_s"],
                    "MB/s",
                    baseline=runs["best_cp_with_fsync_mb_s"],
                    ratio=None if durable is None else round(durable, 2),
                    target=f">= {TARGET_TO_FILE:g}x cp + sync",
                    passed=durable is not None and durable >= TARGET_TO_FILE,
                )
            )
            figs.append(
                Figure(
                    NAME,
                    f"--to FILE vs cp --sparse=always alone (copy left in the page cache) {copied}",
                    runs["best_to_file_mb_s"],
                    "MB/s",
                    baseline=runs["best_cp_mb_s"],
                    ratio=None if cached is None else round(cached, 2),
                )
            )
        else:
            figs.append(
                Figure(
                    NAME,
                    f"--to FILE at the point ({_gib(size)} disk, {data / GIB:.2f} GiB data)",
                    runs["best_to_file_mb_s"],
                    "MB/s",
                )
            )
        figs.append(
            Figure(
                NAME,
                f"--to FILE image == the source at the point ({_gib(size)} disk)",
                runs["equal"],
                target="yes",
                passed=runs["equal"],
                critical=True,
            )
        )
    if "off" in undo and "on" in undo:
        for name in ("fresh", "overwrite"):
            off, on = undo["off"]["passes"][name], undo["on"]["passes"][name]
            r = ratio(on["applied_mb_s"], off["applied_mb_s"])
            figs.append(
                Figure(
                    NAME,
                    f"replication, undo log on vs off, {name} pass: until applied",
                    on["applied_mb_s"],
                    "MB/s",
                    baseline=off["applied_mb_s"],
                    ratio=None if r is None else round(r, 2),
                    target=f">= {TARGET_UNDO:g}x undo off",
                    passed=r is not None and r >= TARGET_UNDO,
                )
            )
            rd = ratio(on["drained_mb_s"], off["drained_mb_s"])
            figs.append(
                Figure(
                    NAME,
                    f"replication, undo log on vs off, {name} pass: until PS durable",
                    on["drained_mb_s"],
                    "MB/s",
                    baseline=off["drained_mb_s"],
                    ratio=None if rd is None else round(rd, 2),
                )
            )
        no_overflow = not any(p["overflow"] for u in undo.values() for p in u["passes"].values())
        equal = all(u["verify"]["equal"] for u in undo.values())
        figs.append(
            Figure(
                NAME,
                "replication runs: replica == source, no overflow",
                equal and no_overflow,
                target="yes",
                passed=equal and no_overflow,
                critical=True,
            )
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [WRITER_FLAG] and len(argv) == 2:  # the writer child of ``Writer``
        from common.cli import run_loop, setup_logging

        setup_logging(os.environ.get("TIDEMARK_LOG_LEVEL", "WARNING"))

        async def _main() -> int:
            await _writer_serve(Path(argv[1]))
            return 0

        return int(run_loop(_main()) or 0)
    from benchmarks.cli import main as cli_main

    return cli_main([NAME, *argv])


__all__ = ["MODES", "NAME", "SUMMARY", "DiskPlan", "failover_args", "run", "summarize_failovers"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
