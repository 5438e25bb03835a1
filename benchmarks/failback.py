"""Scenario ``failback``: failback of a disk with 1 % divergence vs ``rsync`` of the same images.

A real deployment on loopback (``python -m process_server.cli serve``, ``python -m agent.cli
run`` with a unix-socket NBD export, mutual TLS 1.3, undo log on), then the whole documented
cycle (docs/failback.md) with real processes:

1. **Protect.** A sparse disk of ``--disk-size`` (4 GiB; ``--quick``: 256 MiB) whose first
   quarter (1 GiB; quick 64 MiB) holds random bytes before the agent starts; the initial sync
   copies it to the replica.
2. **Point.** ``tidemark-ps points create DISK``.
3. **Divergence: 1 % of the disk** (random 64 KiB writes by fio, fresh random data, no block
   written twice, four disjoint regions):

   - 40 % of it: source writes after the point, replicated and applied (the failover rolls
     them back: they come back as the DR disk's older contents);
   - 10 %: source writes while the process server is down (they stay in the stopped agent's
     journal);
   - 50 %: DR writes through the failover export, after ``tidemark-ps failover DISK --point ID
     --nbd unix:SOCK`` (unplanned: the process server restarted, the agent stopped); half over
     data, half over holes; then ``tidemark-ps failover commit DISK``.

   The first three regions lie in the data quarter, so the DR contents that must travel back
   are random bytes too (no zero extents, nothing for compression).
4. **Baseline, same run.** The source image (agent stopped) and the DR replica are copied
   (``cp --sparse=always``); ``rsync -I --inplace --no-whole-file --stats DR_COPY SOURCE_COPY``
   is timed on these **local** files (no network, no TLS, no durability: generous to rsync; its
   delta algorithm forced; it reads both images in full). The copies are compared with ``cmp``
   after (rsync must make them equal); the number of differing 4 KiB blocks between them
   (computed here, outside tidemark) is the divergence the wire figure is judged against.
5. **Failback, timed.** ``mt.toml`` is written (the source image, the stopped agent's state
   dir); the master target's link to the process server goes through
   :class:`benchmarks.proxy.CountingProxy`, which counts TCP bytes both ways (TLS included).
   Both images are read once (warm page cache, as for rsync). The clock runs from launching
   ``python -m master_target.cli run --config mt.toml`` until ``tidemark-ps failback DISK
   --planned --json`` returns; in between, the process server's status is polled (admin
   socket, 20 ms) until the reverse stream is drained (``applied_seq >= journal_last_seq``),
   which is when an operator would run ``--planned``. Per phase: master target launch to
   registration, registration to drained, the ``--planned`` command (and the server's own
   drain / verify / swap timings), plus the delta preparation from the process server's log.
6. **Checks, outside tidemark.** ``cmp`` of the source image with the DR replica (a mismatch
   makes the run FAILED); then the agent is started again and must be ``replicating`` with no
   resync (forward protection resumes from replica == source).

Targets (issue): failback wall time **<= 0.33x** the rsync time, wire bytes **<= 1.1x** the
divergent bytes.

Profiling: with ``TIDEMARK_BENCH_PYSPY=DIR`` set, ``py-spy record --gil -f raw`` samples the
process server and the master target during the timed window (files in DIR). Attaching costs
time: such a run's figures are not comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.deploy import PYTHON, Deployment
from benchmarks.metrics import MIB, Figure, Params, ProcessSampler, ScenarioResult, ratio
from benchmarks.nbd_front import run_fio
from benchmarks.proxy import CountingProxy
from benchmarks.rto import ps_command
from benchmarks.sync import PYSPY_ENV, PySpy, allocated, run_rsync, same, warm
from common.admin import admin_request

NAME = "failback"
KEEP_LOGS_ENV = "TIDEMARK_BENCH_KEEP_LOGS"  # a directory: the run's logs are copied there
SUMMARY = (
    "failback of a 4 GiB disk with 1% divergence (rolled back + unreplicated + DR writes) "
    "vs rsync -I --inplace --no-whole-file of the same two images"
)
AGENT = "src"
DISK = "fb0"
MT_NAME = "mt01"
QUICK_SIZE = 256 * MIB
FILL_FRACTION = 0.25  # the first quarter of the disk holds random data before protection
DIVERGENCE = 0.01
BLOCK = 64 << 10  # fio's write size for every divergent write
COMPARE_BLOCK = 4096
TARGET_WALL = 0.33  # x rsync
TARGET_WIRE = 1.1  # x divergent bytes
POLL = 0.02
UNIX_PATH_MAX = 107
TOOLS = ("fio", "rsync", "cmp", "cp")


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Region:
    """``blocks`` random 64 KiB writes (no block twice) within ``[offset, offset + length)``."""

    name: str
    offset: int
    length: int
    blocks: int

    @property
    def nbytes(self) -> int:
        return self.blocks * BLOCK


@dataclass(frozen=True)
class Plan:
    size: int
    fill: int
    after_point: Region  # source writes, applied, then rolled back by the failover
    unreplicated: Region  # source writes the process server never sees
    dr_data: Region  # DR writes over the data quarter
    dr_holes: Region  # DR writes over holes

    @property
    def regions(self) -> tuple[Region, ...]:
        return (self.after_point, self.unreplicated, self.dr_data, self.dr_holes)

    @property
    def divergent_bytes(self) -> int:
        return sum(r.nbytes for r in self.regions)


def make_plan(size: int) -> Plan:
    """Four disjoint regions; 1 % of the disk in 64 KiB blocks (40/10/25/25 %)."""
    if size % MIB or size < 64 * MIB:
        raise ValueError("the disk size must be a whole number of MiB, at least 64 MiB")
    fill = int(size * FILL_FRACTION) // MIB * MIB
    total = int(size * DIVERGENCE) // BLOCK
    after = round(total * 0.4)
    unrep = max(1, round(total * 0.1))
    dr = total - after - unrep
    dr_data, dr_holes = dr - dr // 2, dr // 2
    eighth = size // 8 // MIB * MIB
    sixteenth = size // 16 // MIB * MIB
    return Plan(
        size=size,
        fill=fill,
        after_point=Region("after the point (rolled back)", 0, eighth, after),
        unreplicated=Region("never reached the process server", eighth, sixteenth, unrep),
        dr_data=Region(
            "DR writes over data", eighth + sixteenth, fill - eighth - sixteenth, dr_data
        ),
        dr_holes=Region("DR writes over holes", size // 2, eighth, dr_holes),
    )


def make_image(path: Path, size: int, fill: int, seed: int, piece: int = 16 * MIB) -> None:
    """A sparse image of ``size`` bytes whose first ``fill`` bytes are random."""
    rnd = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for offset in range(0, fill, piece):
            os.pwrite(fd, rnd.randbytes(min(piece, fill - offset)), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


def divergent_blocks(a: Path, b: Path, block: int = COMPARE_BLOCK) -> int:
    """How many ``block``-byte blocks differ between two images of one size (holes in both
    are equal and not read)."""
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        size = os.fstat(fa).st_size
        if os.fstat(fb).st_size != size:
            raise ValueError(f"{a} and {b} differ in size")
        spans = sorted(_data_ranges(fa, size) + _data_ranges(fb, size))
        merged: list[list[int]] = []
        for s, e in spans:
            s -= s % block
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        count = 0
        piece = 4 * MIB
        for s, e in merged:
            for pos in range(s, e, piece):
                n = min(piece, e - pos)
                x, y = os.pread(fa, n, pos), os.pread(fb, n, pos)
                if x == y:
                    continue
                for i in range(0, n, block):
                    if x[i : i + block] != y[i : i + block]:
                        count += 1
        return count
    finally:
        os.close(fa)
        os.close(fb)


# --------------------------------------------------------------------------- helpers


def _admin(sock: Path, request: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    return dict(asyncio.run(admin_request(sock, request, timeout=timeout)))


def _row(status: dict[str, Any], disk: str, key: str = "disks") -> dict[str, Any] | None:
    for row in status.get(key, []):
        if row.get("disk") == disk:
            return dict(row)
    return None


class Ctx:
    def __init__(self, dep: Deployment, log: Path) -> None:
        self.dep = dep
        self.log = log
        self.agent_sock = dep.agents[AGENT].state_dir / "admin.sock"
        self.ps_sock = dep.ps_state / "admin.sock"

    def ps(self, *args: str, timeout: float = 600) -> tuple[dict[str, Any], float, list[str]]:
        """``tidemark-ps ARGS --config ps.toml --json``: (reply, wall seconds, command)."""
        cmd = [*ps_command(), *args, "--config", str(self.dep.ps_config), "--json"]
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        wall = time.monotonic() - start
        with open(self.log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n-> {proc.returncode} ({wall:.3f}s)\n")
            f.write(f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}\n")
        try:
            reply = json.loads(proc.stdout) if proc.stdout.strip() else {}
        except ValueError:
            reply = {}
        if proc.returncode != 0 or not reply.get("ok"):
            raise RuntimeError(
                f"{shlex.join(cmd)} exited {proc.returncode}: {reply or proc.stderr.strip()[-800:]}"
            )
        return reply, wall, cmd

    def wait_level(self, timeout: float = 600) -> int:
        """Agent ``replicating`` with everything acknowledged, and the process server applied
        it all; returns the journaled seq."""
        deadline = time.monotonic() + timeout
        row: dict[str, Any] | None = None
        while True:
            row = _row(_admin(self.agent_sock, {"cmd": "status"}), DISK)
            if row and row["state"] == "replicating" and row["acked_seq"] >= row["journaled_seq"]:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{DISK} not level within {timeout:g}s: {row}")
            time.sleep(0.05)
        seq = int(row["journaled_seq"])
        while True:
            ps_row = _row(_admin(self.ps_sock, {"cmd": "status"}), DISK) or {}
            if int(ps_row.get("applied_seq") or 0) >= seq:
                return seq
            if time.monotonic() > deadline:
                raise TimeoutError(f"{DISK}: applied_seq did not reach {seq}: {ps_row}")
            time.sleep(0.05)

    def fio(self, uri: str, region: Region, seed: int) -> dict[str, Any]:
        """``region.blocks`` random 64 KiB writes of fresh random data, no block twice."""
        cmd = [
            "fio",
            f"--name={re.sub(r'[^a-z]+', '-', region.name)}",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--rw=randwrite",
            f"--bs={BLOCK}",
            f"--offset={region.offset}",
            f"--size={region.length}",
            f"--io_size={region.nbytes}",
            "--iodepth=8",
            "--refill_buffers",
            f"--randseed={seed}",
            "--end_fsync=1",
            "--output-format=json",
        ]
        out = run_fio(cmd, 600, self.log)
        out["command"] = shlex.join(cmd)
        return out


def nbd_uri(disk: str, sock: str | Path) -> str:
    return f"nbd+unix:///{disk}?socket={sock}"


def _mt_config(dep: Deployment, port: int) -> Path:
    spec = dep.agents[AGENT]
    config = dep.root / "mt.toml"
    config.write_text(
        "[master_target]\n"
        f'name = "{MT_NAME}"\n'
        f'state_dir = "{dep.root / "mt"}"\n'
        f'process_server = "127.0.0.1:{port}"\n'
        f'credentials = "{dep.root / (MT_NAME + ".bundle")}"\n'
        'reconnect_min = "50ms"\nreconnect_max = "500ms"\n'
        f'\n[[disk]]\nid = "{DISK}"\npath = "{spec.disks[DISK]}"\n'
        f'agent_state_dir = "{spec.state_dir / "disks" / DISK}"\n'
    )
    return config


def _delta_from_log(ps_log: Path) -> dict[str, Any]:
    """The process server's ``event=failback_delta`` line (how, ranges, bytes, seconds)."""
    text = ps_log.read_text(errors="replace") if ps_log.exists() else ""
    pattern = (
        rf"disk={DISK} event=failback_delta how=(?P<how>'[^']*'|\"[^\"]*\") "
        r"ranges=(?P<ranges>\d+) bytes=(?P<bytes>\d+) seconds=(?P<seconds>[\d.]+)"
    )
    found = list(re.finditer(pattern, text))
    if not found:
        return {}
    m = found[-1]
    return {
        "how": m["how"].strip("'\""),
        "ranges": int(m["ranges"]),
        "bytes": int(m["bytes"]),
        "seconds": float(m["seconds"]),
    }


def _log_tails(root: Path, nbytes: int = 3000) -> dict[str, str]:
    tails = {}
    for log in sorted(root.rglob("*.log")):
        with contextlib.suppress(OSError):
            tails[str(log.relative_to(root))] = log.read_bytes()[-nbytes:].decode(
                "utf-8", "replace"
            )
    return tails


# --------------------------------------------------------------------------- the run


def prepare(
    ctx: Ctx, plan: Plan, seed: int, out: dict[str, Any], pids: dict[str, int], phase: Any
) -> str:
    """Protect, point, the divergence, failover, commit. Returns the point id."""
    dep = ctx.dep
    spec = dep.agents[AGENT]
    uri = nbd_uri(DISK, spec.nbd[DISK])
    phase(f"initial sync of {plan.fill / MIB:g} MiB of random data")
    t0 = time.monotonic()
    pids["agent"] = dep.start_agent(AGENT).pid
    ctx.wait_level()
    out["initial_sync_seconds"] = round(time.monotonic() - t0, 2)
    reply, _, _ = ctx.ps("points", "create", DISK, "--tag", "failback")
    if not reply.get("recorded"):
        raise RuntimeError(f"point not recorded: {reply}")
    point = str(reply["id"])
    writes: dict[str, Any] = {}
    out["writes"] = writes
    phase(f"point {point}; {plan.after_point.nbytes / MIB:g} MiB of source writes after it")
    writes["after_point"] = ctx.fio(uri, plan.after_point, seed + 1)
    ctx.wait_level()
    phase(
        f"process server down: {plan.unreplicated.nbytes / MIB:g} MiB the process server "
        "never sees; agent stopped"
    )
    dep.stop_ps()
    writes["unreplicated"] = ctx.fio(uri, plan.unreplicated, seed + 2)
    dep.stop_agent(AGENT)
    pids["ps-2"] = dep.start_ps().pid
    phase("unplanned failover to the point; DR writes through its export; commit")
    sock = dep.root / "fx" / "dr.sock"
    reply, wall, cmd = ctx.ps("failover", DISK, "--point", point, "--nbd", f"unix:{sock}")
    out["failover"] = {
        "command": shlex.join(cmd),
        "wall_seconds": round(wall, 3),
        "timings_ms": reply["failovers"][0].get("timings_ms"),
    }
    export = reply["failovers"][0].get("nbd") or nbd_uri(DISK, sock)
    writes["dr_data"] = ctx.fio(export, plan.dr_data, seed + 3)
    writes["dr_holes"] = ctx.fio(export, plan.dr_holes, seed + 4)
    reply, wall, _ = ctx.ps("failover", "commit", DISK)
    out["commit_wall_seconds"] = round(wall, 3)
    return point


def baseline(ctx: Ctx, root: Path, out: dict[str, Any], phase: Any) -> None:
    """Copies of the source (as before failback) and the DR replica; rsync between them."""
    source = ctx.dep.agents[AGENT].disks[DISK]
    replica = ctx.dep.replica_path(DISK)
    src_copy, dr_copy = root / "source-copy.img", root / "dr-copy.img"
    phase("baseline: cp --sparse=always of both images; divergence measured; rsync")
    for a, b in ((source, src_copy), (replica, dr_copy)):
        subprocess.run(["cp", "--sparse=always", str(a), str(b)], check=True)
    out["source_allocated_bytes"] = allocated(source)
    out["replica_allocated_bytes"] = allocated(replica)
    t0 = time.monotonic()
    blocks = divergent_blocks(src_copy, dr_copy)
    out["divergent_blocks"] = blocks
    out["divergent_bytes"] = blocks * COMPARE_BLOCK
    out["divergence_compare_seconds"] = round(time.monotonic() - t0, 2)
    try:
        out["loadavg_before_rsync"] = [round(x, 2) for x in os.getloadavg()]
        rs = run_rsync(dr_copy, src_copy)
        rs["equal"] = same(dr_copy, src_copy)
        rs["note"] = "local files: no network, no TLS, no fsync (generous to rsync)"
        out["rsync"] = rs
    finally:
        for p in (src_copy, dr_copy):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def failback(ctx: Ctx, out: dict[str, Any], pids: dict[str, int], phase: Any) -> None:
    """The timed window: launch the master target ... ``failback --planned`` returns."""
    dep = ctx.dep
    source = dep.agents[AGENT].disks[DISK]
    replica = dep.replica_path(DISK)
    proxy = CountingProxy(dep.port)
    mt: subprocess.Popen[bytes] | None = None
    try:
        config = _mt_config(dep, proxy.port)
        mt_cmd = [PYTHON, "-m", "master_target.cli", "run", "--config", str(config)]
        planned_cmd = [
            *ps_command(),
            "failback",
            DISK,
            "--planned",
            "--config",
            str(dep.ps_config),
            "--json",
        ]
        out["commands"] = {"master_target": shlex.join(mt_cmd), "planned": shlex.join(planned_cmd)}
        phase("failback: master target launched ... failback --planned returned (timed)")
        out["page_cache"] = warm(source, replica)
        out["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
        prof = PySpy("failback-ps", {"ps": pids["ps-2"]})
        sampler = ProcessSampler({"ps": pids["ps-2"]}).start()
        proxy.reset()
        t0 = time.monotonic()
        mt = dep._spawn(mt_cmd, "mt.log")
        pids["master_target"] = mt.pid
        mt_prof = PySpy("failback-mt", {"mt": mt.pid}) if prof.procs else None
        registered = drained = None
        row: dict[str, Any] | None = None
        while True:
            if mt.poll() is not None:
                raise RuntimeError(f"the master target exited with {mt.returncode}")
            row = _row(_admin(ctx.ps_sock, {"cmd": "status"}), DISK, "failbacks")
            now = time.monotonic()
            if row is not None and registered is None:
                registered = now
            if row and row["applied_seq"] >= row["journal_last_seq"] > 0:
                drained = now
                break
            if now - t0 > 600:
                raise TimeoutError(f"the reverse stream did not drain: {row}")
            time.sleep(POLL)
        proc = subprocess.run(
            planned_cmd, capture_output=True, text=True, timeout=3600, check=False
        )
        t_end = time.monotonic()
        wire = (proxy.total, proxy.bytes_up, proxy.bytes_down)
        try:
            mt_rc = mt.wait(60)
        except subprocess.TimeoutExpired:
            mt_rc = None
        mt_exit = time.monotonic()
        stats = sampler.stop()
        profiles = prof.stop() + (mt_prof.stop() if mt_prof else [])
        with open(ctx.log, "a") as f:
            f.write(f"$ {shlex.join(planned_cmd)}\n-> {proc.returncode}\n{proc.stdout}\n")
            f.write(proc.stderr)
        try:
            reply = json.loads(proc.stdout)
        except ValueError:
            reply = {}
        if proc.returncode != 0 or not reply.get("ok"):
            raise RuntimeError(
                f"failback --planned exited {proc.returncode}: {reply or proc.stderr[-800:]}"
            )
        assert registered is not None and drained is not None
        out.update(
            seconds=round(t_end - t0, 3),
            phases={
                "mt_launch_to_registered_s": round(registered - t0, 3),
                "registered_to_drained_s": round(drained - registered, 3),
                "planned_command_s": round(t_end - drained, 3),
                "mt_exit_after_planned_s": round(mt_exit - t_end, 3),
            },
            last_row_before_planned=row,
            report=reply,
            master_target_exit=mt_rc,
            wire_bytes=wire[0],
            wire_bytes_to_mt=wire[2],
            wire_bytes_from_mt=wire[1],
            proxy_connections=proxy.connections,
            delta=_delta_from_log(dep.root / "ps.log"),
            processes={k: v.as_dict() for k, v in stats.items()},
        )
        if profiles:
            out["profiles"] = profiles
    finally:
        if mt is not None and mt.poll() is None:
            mt.kill()
            mt.wait()
        proxy.close()
    out["equal"] = same(source, replica)


def resume(ctx: Ctx, out: dict[str, Any], pids: dict[str, int], phase: Any) -> None:
    """The agent starts again: ``replicating``, no resync, no rebase (docs/failback.md 5)."""
    phase("forward protection resumes")
    dep = ctx.dep
    log = dep.root / f"agent-{AGENT}.log"
    start = log.stat().st_size if log.exists() else 0
    pids["agent-2"] = dep.start_agent(AGENT).pid
    deadline = time.monotonic() + 30
    row: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        row = _row(_admin(ctx.agent_sock, {"cmd": "status"}), DISK)
        if row and row.get("state") == "replicating":
            break
        time.sleep(0.05)
    lines = [
        line
        for line in log.read_text(errors="replace")[start:].splitlines()
        if f"disk={DISK}" in line and ("resync" in line or "rebased" in line)
    ]
    out.update(
        state=(row or {}).get("state"),
        resync_lines=lines[:5],
        ok=bool(row and row.get("state") == "replicating" and not lines),
    )


def _figures(details: dict[str, Any], plan: Plan | None) -> list[Figure]:
    figs: list[Figure] = []
    fb = details.get("failback") or {}
    base = details.get("baseline") or {}
    rs = base.get("rsync") or {}
    if plan is None or "seconds" not in fb or "seconds" not in rs:
        if "equal" in fb:
            figs.append(_equal_figure(fb))
        return figs
    size = f"{plan.size / (1 << 30):g} GiB"
    pct = 100 * base["divergent_bytes"] / plan.size
    r = ratio(fb["seconds"], rs["seconds"])
    figs.append(
        Figure(
            NAME,
            f"failback, {size}, {pct:.2f}% divergent: MT launch -> --planned returned",
            fb["seconds"],
            "s",
            rs["seconds"],
            r,
            f"<= {TARGET_WALL}x rsync",
            r is not None and r <= TARGET_WALL,
        )
    )
    figs.append(
        Figure(
            NAME, "failback: rsync -I --inplace --no-whole-file (local files)", rs["seconds"], "s"
        )
    )
    div = base["divergent_bytes"]
    wr = ratio(fb["wire_bytes"], div)
    figs.append(
        Figure(
            NAME,
            "failback wire bytes (TCP both ways, TLS incl.) vs divergent bytes",
            round(fb["wire_bytes"] / MIB, 2),
            "MiB",
            round(div / MIB, 2),
            wr,
            f"<= {TARGET_WIRE}x divergent",
            wr is not None and wr <= TARGET_WIRE,
        )
    )
    rep = fb.get("report") or {}
    if "wire_bytes" in rep:
        figs.append(
            Figure(
                NAME,
                "failback: batch bytes sent / raw (process server's report)",
                f"{rep['wire_bytes'] / MIB:.2f} / {rep.get('raw_bytes', 0) / MIB:.2f}",
                "MiB",
            )
        )
    ph = fb["phases"]
    figs.append(
        Figure(NAME, "phase: MT launch -> registered", ph["mt_launch_to_registered_s"], "s")
    )
    figs.append(
        Figure(
            NAME, "phase: registered -> reverse stream drained", ph["registered_to_drained_s"], "s"
        )
    )
    figs.append(Figure(NAME, "phase: failback --planned (CLI wall)", ph["planned_command_s"], "s"))
    t = rep.get("timings") or {}
    figs.append(
        Figure(
            NAME,
            "phase: --planned, server side: drain / verify / swap",
            " / ".join(f"{t.get(k, 0):.0f}" for k in ("drain_ms", "verify_ms", "swap_ms")),
            "ms",
        )
    )
    if fb.get("delta"):
        figs.append(
            Figure(NAME, "delta preparation (process server log)", fb["delta"]["seconds"], "s")
        )
    st = rs.get("stats") or {}
    if "literal_bytes" in st:
        figs.append(Figure(NAME, "rsync literal data", round(st["literal_bytes"] / MIB, 2), "MiB"))
    figs.append(_equal_figure(fb, rs))
    res = details.get("resume") or {}
    if "ok" in res:
        figs.append(
            Figure(
                NAME,
                "agent resumes: replicating, no resync",
                res["ok"],
                "",
                target="yes",
                passed=bool(res["ok"]),
                critical=True,
            )
        )
    return figs


def _equal_figure(fb: dict[str, Any], rs: dict[str, Any] | None = None) -> Figure:
    rs = rs or {}
    ok = bool(fb.get("equal")) and rs.get("equal", True) is True
    value = "yes" if fb.get("equal") else "NO"
    if rs:
        value += " / " + ("yes" if rs.get("equal") else "NO")
    return Figure(
        NAME,
        "source == DR replica after failback (cmp)" + (" / rsync copies equal" if rs else ""),
        value,
        "",
        target="cmp equal",
        passed=ok,
        critical=True,
    )


def run(params: Params) -> ScenarioResult:
    size = min(params.disk_size, QUICK_SIZE) if params.quick else params.disk_size
    plan: Plan | None = None
    result = ScenarioResult(NAME, params={"disk_size": size, "quick": params.quick})
    details = result.details
    pids: dict[str, int] = {}
    details["pids"] = pids
    timeline: list[tuple[str, float]] = []
    details["timeline"] = timeline
    t_start = time.monotonic()

    def phase(name: str) -> None:
        at = round(time.monotonic() - t_start, 2)
        timeline.append((name, at))
        print(f"#   {at:6.1f}s {name}", file=sys.stderr, flush=True)

    try:
        plan = make_plan(size)
    except ValueError as exc:
        result.error = str(exc)
        return result
    result.params.update(
        fill_bytes=plan.fill,
        divergence_fraction=DIVERGENCE,
        write_block=BLOCK,
        regions=[
            {"name": r.name, "offset": r.offset, "length": r.length, "bytes": r.nbytes}
            for r in plan.regions
        ],
        planned_divergent_bytes=plan.divergent_bytes,
        profiling=os.environ.get(PYSPY_ENV) or None,
    )
    if missing := [t for t in TOOLS if shutil.which(t) is None]:
        result.error = f"not installed: {', '.join(missing)}"
        return result
    seed = int.from_bytes(os.urandom(4), "big")
    details["seed"] = seed
    with tempfile.TemporaryDirectory(prefix="tmf-", dir=params.tmpdir) as tmp:
        root = Path(tmp)
        details["workdir"] = str(root)
        dep = Deployment(root / "d")
        longest = str(dep.root / f"agent-{AGENT}" / "admin.sock")
        if len(os.fsencode(longest)) > UNIX_PATH_MAX - 16:
            result.error = f"{longest}: too long for a unix socket; use a shorter --tmpdir"
            return result
        ctx: Ctx | None = None
        try:
            phase("pki + process server; image with random data")
            dep.init_pki()
            dep.write_ps_config(failover_dir=str(dep.root / "fx"))
            dep.cli(
                "process_server.cli", "pki", "issue", "--dir", str(dep.pki), "--name", MT_NAME,
                "--out", str(dep.root / f"{MT_NAME}.bundle"), "--role", "master-target",
            )  # fmt: skip
            image = dep.root / f"{DISK}.img"
            make_image(image, size, plan.fill, seed)
            dep.add_agent(AGENT, {DISK: image}, nbd=True)
            ctx = Ctx(dep, root / "failback.log")
            pids["ps"] = dep.start_ps().pid
            details["prepare"] = {}
            point = prepare(ctx, plan, seed, details["prepare"], pids, phase)
            details["point"] = point
            details["baseline"] = {}
            baseline(ctx, root, details["baseline"], phase)
            details["failback"] = {}
            failback(ctx, details["failback"], pids, phase)
            details["resume"] = {}
            resume(ctx, details["resume"], pids, phase)
            phase("done")
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            details["log_tails"] = _log_tails(root)
        finally:
            dep.stop_all()
            if keep := os.environ.get(KEEP_LOGS_ENV):  # for a look at the timeline afterwards
                Path(keep).mkdir(parents=True, exist_ok=True)
                for log_file in root.rglob("*.log"):
                    shutil.copy(log_file, Path(keep) / log_file.name)
    result.figures = _figures(details, plan)
    return result
