"""Scenario ``sync``: digest resync vs rsync and bdsync; initial sync over TLS vs nbdcopy.

Two phases, each on its own images and its own deployment (real processes on loopback:
``python -m process_server.cli serve`` and ``python -m agent.cli run``, mutual TLS 1.3,
connected directly; the wire bytes are the kernel's counts of the agent's connections,
:mod:`benchmarks.tcp_bytes`, outside the code under test and with nothing in the path).
Everything lives in one temporary directory, removed at the end.

**Initial sync.** A sparse image, half holes and half 2:1-compressible data
(:func:`benchmarks.driver.compressible`) in 1 MiB runs. Baseline: ``nbdkit
--exit-with-parent -f -i 127.0.0.1 -p PORT file TARGET`` (a fresh sparse target of the
same size; an export on loopback, as the issue names it and as tidemark's own link runs)
and ``nbdcopy --flush SRC nbd://127.0.0.1:PORT`` is timed (``--flush``: the copy is
durable at the end, as tidemark's replica is once applied; a run without ``--flush`` is
reported too). The same copy into an export on a unix socket (``-U SOCK``,
``nbd+unix:///?socket=SOCK``; the baseline until 2026-12-07, faster: no TCP) is timed and
reported beside it, not judged (docs/resync.md, "The baseline's transport"). Tidemark: a
fresh deployment, the process server already up; the clock runs from starting the agent
until the disk is level (agent state ``replicating``, every journaled seq acknowledged and
applied to the replica, which the process server ``fdatasync``s). Every copy is compared
with the source (``cmp``). The three are timed ``INITIAL_ROUNDS`` times (once with
``--quick``), their order turned by one each round (``ROUND_ORDER``), each time on a fresh
target and a fresh deployment; the target is judged on the medians (a single pair on a
shared 2-core VM swings with the minute), and every round's times are reported.

**Resync.** A fully allocated image of random bytes is initially synced (timed too, for
information); the agent is stopped; 1 % of its 4 KiB blocks, at random, are overwritten
with random bytes behind the agent's back; the agent is started again (it believes it is
level: a clean stop); then ``python -m agent.cli resync --config CFG DISK`` is timed until
the disk is level again and applied. Wire bytes = both directions of the agent's
connection during that window. Timed ``RESYNC_ROUNDS`` times (once with ``--quick``), each
of a fresh 1 % change, on the same deployment; the target is judged on the median, the
wire bytes on the worst round, and every round's replica is compared with the source. The
baselines run once, on the first round's change (the later rounds' changes are undone
first). On the same images, the "old" copy is the replica as it was before the change
(``cp --sparse=always``) and the baselines bring it level with the source:

- ``rsync -I --inplace --no-whole-file --stats SRC OLD`` (local: sender, generator and
  receiver processes on pipes, its delta algorithm forced);
- ``bdsync "BDSYNC --server" SRC OLD > PATCH`` then ``bdsync --patch=OLD < PATCH`` (the
  changed blocks are put back in OLD between the two baselines), when a bdsync binary is
  given (``--bdsync PATH``, the ``TIDEMARK_BENCH_BDSYNC`` variable, or ``bdsync`` on
  ``PATH``); otherwise it is reported "not available".

Same start for every timed step: dirty pages are written back (``sync``) and the files
the step reads are read once beforehand, so each tool starts from a warm page cache as far
as memory allows (the resident fraction, from ``fincore``, is reported with each time).

Every copy is compared with its source with ``cmp`` at the end of its phase; a mismatch,
or an error of any tool, makes the run FAILED.

Profiling: with ``TIDEMARK_BENCH_PYSPY=DIR`` set, ``py-spy record --gil -f raw`` samples
the agent and the process server during the timed tidemark windows (files in DIR). It
slows them down: such a run's times are not comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.deploy import PYTHON, Deployment, free_port
from benchmarks.driver import compressible
from benchmarks.metrics import MIB, Figure, Params, ProcessSampler, ScenarioResult, ratio
from benchmarks.tcp_bytes import Counts, Endpoints, WireCountError, connections_to, wire_between
from benchmarks.tls_copy import run_baseline
from common.admin import admin_request

NAME = "sync"
SUMMARY = (
    "resync of 1% changed 4 KiB blocks vs rsync/bdsync; initial sync over TLS vs nbdcopy->nbdkit"
)
AGENT = "sync"
INIT_DISK = "init0"
RESYNC_DISK = "resync0"
QUICK_SIZE = 256 * MIB
# The initial sync's floors (tls_floor): JSON key, label, zstd level, O_DIRECT writes,
# threads per side (0: one block after another; N: pipelined, tls_copy --threads).
PIPELINE_THREADS = 2
FLOORS = (
    ("tls_floor", "plain", None, False, 0),
    ("tls_zstd_floor", "zstd 1", 1, False, 0),
    ("tls_direct_floor", "plain, O_DIRECT", None, True, 0),
    ("tls_zstd_direct_floor", "zstd 1, O_DIRECT", 1, True, 0),
    ("tls_direct_pipelined_floor", "plain, O_DIRECT, pipelined", None, True, PIPELINE_THREADS),
    (
        "tls_zstd_direct_pipelined_floor",
        "zstd 1, O_DIRECT, pipelined",
        1,
        True,
        PIPELINE_THREADS,
    ),
)
BLOCK = 4096
CHANGE_FRACTION = 0.01
TARGET_RESYNC = 0.33  # x the faster of rsync and bdsync
TARGET_WIRE = 1.1  # x the changed bytes
TARGET_INITIAL = 1.2  # x nbdcopy into nbdkit file
INITIAL_ROUNDS = 3  # rounds of the initial sync, each timing ROUND_ORDER (1 with --quick)
# What each round times, the first going first in round 1, then turned by one each round.
# "nbdcopy": into nbdkit on TCP loopback (the target's baseline); "nbdcopy_unix": the same
# on a unix socket (the baseline until 2026-12-07, reported; docs/resync.md says why).
ROUND_ORDER = ("nbdcopy", "tidemark", "nbdcopy_unix")
RESYNC_ROUNDS = 3  # timed tidemark resyncs, each of a fresh 1% change (1 with --quick)
UNIX_PATH_MAX = 107
BDSYNC_ENV = "TIDEMARK_BENCH_BDSYNC"
PYSPY_ENV = "TIDEMARK_BENCH_PYSPY"
NOT_AVAILABLE = "not available"


# --------------------------------------------------------------------------- images


def make_half_holes(path: Path, size: int, seed: int) -> int:
    """Half of the 1 MiB runs (chosen at random) 2:1-compressible data, the rest holes."""
    runs = size // MIB
    rnd = random.Random(seed)
    data_runs = sorted(rnd.sample(range(runs), runs // 2))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for i in data_runs:
            os.pwrite(fd, compressible(seed * 1_000_003 + i, MIB), i * MIB)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data_runs) * MIB


def make_random(path: Path, size: int, seed: int, piece: int = 16 * MIB) -> None:
    """A fully allocated image of random bytes."""
    rnd = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, size, piece):
            os.pwrite(fd, rnd.randbytes(min(piece, size - offset)), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def change_blocks(
    path: Path, size: int, fraction: float, seed: int
) -> tuple[list[int], list[bytes]]:
    """Overwrite ``fraction`` of the 4 KiB blocks, chosen at random, with random bytes.
    Returns the block numbers and their old contents (to put them back later)."""
    rnd = random.Random(seed)
    blocks = sorted(rnd.sample(range(size // BLOCK), int(size // BLOCK * fraction)))
    old: list[bytes] = []
    fd = os.open(path, os.O_RDWR)
    try:
        for b in blocks:
            old.append(os.pread(fd, BLOCK, b * BLOCK))
            new = rnd.randbytes(BLOCK)
            while new == old[-1]:  # pragma: no cover - 2**-32768
                new = rnd.randbytes(BLOCK)
            os.pwrite(fd, new, b * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    return blocks, old


def restore_blocks(path: Path, blocks: list[int], old: list[bytes]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for b, data in zip(blocks, old, strict=True):
            os.pwrite(fd, data, b * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)


def same(a: Path, b: Path) -> bool:
    """``cmp -s``: byte for byte, sizes included."""
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def settle() -> None:
    """Write back dirty pages of the previous step so they do not bill the next timed one."""
    os.sync()


def resident(path: Path) -> float | None:
    """Fraction of ``path`` in the page cache (``fincore``), None when unknown."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(
        ["fincore", "-b", "-n", "-o", "RES,SIZE", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        res, size = (int(x) for x in out.stdout.split()[:2])
    except ValueError:
        return None
    return round(res / size, 3) if size else None


def warm(*paths: Path) -> dict[str, float | None]:
    """Same start for every tool: write back what is dirty, read the files that the timed
    step reads once (into the page cache, as far as memory allows), and say how much of
    each is resident when the clock starts."""
    settle()
    buf = bytearray(8 * MIB)
    view = memoryview(buf)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            offset = 0
            while n := os.preadv(fd, [view], offset):
                offset += n
        finally:
            os.close(fd)
    return {path.name: resident(path) for path in paths}


# --------------------------------------------------------------------------- tools


def find_bdsync() -> str | None:
    for candidate in (os.environ.get(BDSYNC_ENV), shutil.which("bdsync")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return str(Path(candidate).resolve())
    return None


TOOLS = ("nbdkit", "nbdcopy", "rsync", "cmp", "cp", "ss")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def parse_rsync_stats(text: str) -> dict[str, int]:
    """The byte counters of ``rsync --stats`` (thousands separators removed)."""
    keys = {
        "Literal data": "literal_bytes",
        "Matched data": "matched_bytes",
        "Total bytes sent": "sent_bytes",
        "Total bytes received": "received_bytes",
        "Total file size": "file_bytes",
    }
    out: dict[str, int] = {}
    for line in text.splitlines():
        label, _, rest = line.partition(":")
        key = keys.get(label.strip())
        m = re.match(r"\s*([\d,.]+)", rest)
        if key and m:
            out[key] = int(re.sub(r"[,.]", "", m.group(1)))
    return out


def run_rsync(src: Path, dst: Path) -> dict[str, Any]:
    cmd = ["rsync", "-I", "--inplace", "--no-whole-file", "--stats", str(src), str(dst)]
    cache = warm(src, dst)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"rsync exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return {
        "command": shlex.join(cmd),
        "seconds": round(seconds, 3),
        "page_cache": cache,
        "stats": parse_rsync_stats(proc.stdout),
    }


def run_bdsync(bdsync: str, src: Path, dst: Path, patch: Path) -> dict[str, Any]:
    client = [bdsync, f"{bdsync} --server", str(src), str(dst)]
    apply = [bdsync, f"--patch={dst}"]
    cache = warm(src, dst)
    t0 = time.monotonic()
    with open(patch, "wb") as out:
        p1 = subprocess.run(client, stdout=out, stderr=subprocess.PIPE, text=False, check=False)
    t1 = time.monotonic()
    if p1.returncode != 0:
        raise RuntimeError(f"bdsync client exited {p1.returncode}: {p1.stderr[-500:]!r}")
    with open(patch, "rb") as inp:
        p2 = subprocess.run(apply, stdin=inp, capture_output=True, check=False)
    t2 = time.monotonic()
    if p2.returncode != 0:
        raise RuntimeError(f"bdsync --patch exited {p2.returncode}: {p2.stderr[-500:]!r}")
    return {
        "command": f"{shlex.join(client)} > PATCH && {shlex.join(apply)} < PATCH",
        "seconds": round(t2 - t0, 3),
        "diff_seconds": round(t1 - t0, 3),
        "patch_seconds": round(t2 - t1, 3),
        "patch_bytes": patch.stat().st_size,
        "page_cache": cache,
    }


def _wait_ready(pidfile: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Until nbdkit has written ``pidfile``: it does so once it accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-500:] if proc.stderr else ""
            raise RuntimeError(f"nbdkit exited with {proc.returncode}: {err.strip()}")
        with contextlib.suppress(OSError):
            if pidfile.read_text().strip().isdigit():
                return
        time.sleep(0.02)
    raise TimeoutError(f"nbdkit: {pidfile} did not appear within {timeout}s")


def run_nbdcopy(
    src: Path,
    target: Path,
    workdir: Path,
    *,
    flush: bool,
    pids: dict[str, int],
    label: str,
    transport: str = "tcp",
) -> dict[str, Any]:
    """``nbdcopy`` of ``src`` into a fresh sparse ``target`` exported by ``nbdkit file``:
    on TCP loopback (``transport`` "tcp", what the target is judged against, as the issue
    names it and as tidemark's own link runs) or on a unix socket in ``workdir`` ("unix",
    reported beside it)."""
    if transport not in ("tcp", "unix"):
        raise ValueError(f"transport {transport!r}: tcp or unix")
    size = src.stat().st_size
    with open(target, "wb") as f:
        f.truncate(size)
    sock = workdir / "nbdkit.sock"
    pidfile = workdir / "nbdkit.pid"
    for stale in (sock, pidfile):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()  # nbdkit leaves them behind when terminated
    if transport == "tcp":
        port = free_port()  # nothing listens on it now; nbdkit binds it next
        listen = ["-i", "127.0.0.1", "-p", str(port)]
        uri = f"nbd://127.0.0.1:{port}"
    else:
        listen = ["-U", str(sock)]
        uri = f"nbd+unix:///?socket={sock}"
    server = ["nbdkit", "--exit-with-parent", "-f", *listen, "-P", str(pidfile)]
    server += ["file", str(target)]
    proc = subprocess.Popen(
        server, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    pids[f"nbdkit-{label}"] = proc.pid
    try:
        _wait_ready(pidfile, proc)
        cache = warm(src)
        cmd = ["nbdcopy", *(["--flush"] if flush else []), str(src), uri]
        t0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError(f"nbdcopy exited {out.returncode}: {out.stderr.strip()[-500:]}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        for stale in (sock, pidfile):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    return {
        "server": shlex.join(server),
        "command": shlex.join(cmd),
        "transport": transport,
        "seconds": round(seconds, 3),
        "page_cache": cache,
        "equal": same(src, target),
        "target_allocated_bytes": allocated(target),
    }


class PySpy:
    """Opt-in sampling profiles (``TIDEMARK_BENCH_PYSPY=DIR``) of a few pids."""

    def __init__(self, name: str, pids: dict[str, int]) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.files: list[str] = []
        out_dir = os.environ.get(PYSPY_ENV)
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not out_dir or not os.access(exe, os.X_OK):
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for label, pid in pids.items():
            out = Path(out_dir) / f"{name}-{label}.txt"
            # TIDEMARK_BENCH_PYSPY_IDLE=1: every thread, waiting included (where time goes);
            # TIDEMARK_BENCH_PYSPY_NATIVE=1: every running thread with its C frames (where
            # CPU goes, zstd and hashing included); default: the thread holding the GIL.
            # TIDEMARK_BENCH_PYSPY_RATE: samples a second (default 100).
            if os.environ.get(PYSPY_ENV + "_IDLE"):
                mode = ["--idle"]
            elif os.environ.get(PYSPY_ENV + "_NATIVE"):
                mode = ["--native"]
            else:
                mode = ["--gil"]
            rate = os.environ.get(PYSPY_ENV + "_RATE", "100")
            cmd = [exe, "record", *mode, "-f", "raw", "-r", rate, "-o", str(out)]
            self.procs.append(
                subprocess.Popen(
                    [*cmd, "--pid", str(pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            self.files.append(str(out))
        time.sleep(0.5)  # attached before the clock starts

    def stop(self) -> list[str]:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        return self.files


# --------------------------------------------------------------------------- tidemark


def _status(sock: Path) -> dict[str, Any]:
    return asyncio.run(admin_request(sock, {"cmd": "status"}, timeout=10))


def _row(status: dict[str, Any], disk: str) -> dict[str, Any]:
    for row in status.get("disks", []):
        if row.get("disk") == disk:
            return dict(row)
    raise RuntimeError(f"{disk} missing from status: {status}")


OnSample = Callable[[dict[str, Any], dict[str, Any] | None], None]


def wait_level(
    dep: Deployment,
    disk: str,
    timeout: float,
    poll: float = 0.05,
    on_sample: OnSample | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Until the agent is ``replicating`` with everything acknowledged (its ``wait`` request,
    or polls every ``poll`` s while sampling), then until the process server applied
    everything journaled. Returns the agent and PS status rows.
    ``on_sample(agent_row, ps_row)``, if given, sees both at every poll (``ps_row`` None
    until the disk is registered there; benchmarks/sync_timeline.py)."""
    spec = dep.agents[AGENT]
    deadline = time.monotonic() + timeout
    row: dict[str, Any] = {}
    ps_row: dict[str, Any] | None = None
    if on_sample is None:  # the agent says when (`tidemark-agent wait`): no polling lag
        sock = spec.state_dir / "admin.sock"
        request = {"cmd": "wait", "disks": [disk], "timeout": timeout}
        reply = asyncio.run(admin_request(sock, request, timeout=timeout + 30))
        if not reply.get("ok"):
            raise TimeoutError(f"{disk} not level: {reply.get('error')}")
    while True:
        row = _row(_status(spec.state_dir / "admin.sock"), disk)
        if on_sample is not None:
            ps_row = _ps_row(dep, disk)
            on_sample(row, ps_row)
        if row["state"] == "replicating" and row["acked_seq"] >= row["journaled_seq"]:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{disk} not level within {timeout:.0f}s: {row}")
        time.sleep(poll)
    seq = int(row["journaled_seq"])
    if ps_row is not None and (ps_row.get("applied_seq") or 0) >= seq:
        return row, ps_row  # the last sample already shows it applied
    while True:
        ps_row = _row(_status(dep.ps_state / "admin.sock"), disk)
        if on_sample is not None:
            on_sample(row, ps_row)
        if (ps_row.get("applied_seq") or 0) >= seq:
            return row, ps_row
        if time.monotonic() > deadline:
            raise TimeoutError(f"{disk} applied_seq did not reach {seq}: {ps_row}")
        time.sleep(poll)


def _ps_row(dep: Deployment, disk: str) -> dict[str, Any] | None:
    try:
        return _row(_status(dep.ps_state / "admin.sock"), disk)
    except RuntimeError:  # not registered yet
        return None


def _resync_command(config: Path, disk: str) -> list[str]:
    """The operator's command; ``--no-wait`` when the CLI has it: the harness then waits
    with the agent's own ``wait`` request (:func:`wait_level`), as the command would, and
    reports when the command itself returned apart."""
    cmd = [PYTHON, "-m", "agent.cli", "resync", "--config", str(config), disk]
    try:
        from agent.cli import build_parser

        build_parser().parse_args(["resync", "--config", "x", "d", "--no-wait"])
    except (SystemExit, ImportError):
        return cmd
    return [*cmd, "--no-wait"]


def _log_tails(root: Path, nbytes: int = 3000) -> dict[str, str]:
    tails = {}
    for log in sorted(root.rglob("*.log")):
        with contextlib.suppress(OSError):
            tails[str(log.relative_to(root))] = log.read_bytes()[-nbytes:].decode(
                "utf-8", "replace"
            )
    return tails


def _check_paths(dep: Deployment) -> str | None:
    longest = max(
        str(dep.ps_state / "admin.sock"), str(dep.root / f"agent-{AGENT}" / "admin.sock"), key=len
    )
    if len(os.fsencode(longest)) > UNIX_PATH_MAX:
        return f"{longest}: too long for a unix socket; use a shorter --tmpdir or TMPDIR"
    return None


def tidemark_initial(
    root: Path,
    image: Path,
    disk: str,
    pids: dict[str, int],
    timeout: float,
    *,
    options: dict[str, Any] | None = None,
    poll: float = 0.05,
    on_sample: OnSample | None = None,
    label: str = "",
    on_start: Callable[[], object] | None = None,
) -> tuple[Deployment, dict[str, Any]]:
    """A fresh deployment; time from starting the agent until ``image`` is level.
    ``options``: more agent settings; ``poll`` and ``on_sample``: as :func:`wait_level`;
    ``label``: told apart in the profiles' names (one per round); ``on_start``: called just
    before the clock starts (benchmarks/sync_ab.py reads the machine's CPU times there)."""
    dep = Deployment(root)
    if (err := _check_paths(dep)) is not None:
        raise RuntimeError(err)
    dep.init_pki()
    try:
        dep.add_agent(AGENT, {disk: image}, options=options)
        pids[f"ps-{disk}"] = dep.start_ps().pid
        cache = warm(image)
        before = _Snapshot(connections_to(dep.port), _LinkCounts(0, 0))  # no agent yet
        if on_start is not None:
            on_start()
        t0 = time.monotonic()
        agent = dep.start_agent(AGENT)
        pids[f"agent-{disk}"] = agent.pid
        prof = PySpy(f"initial-{disk}{label}", {"agent": agent.pid, "ps": pids[f"ps-{disk}"]})
        sampler = ProcessSampler({"agent": agent.pid, "ps": pids[f"ps-{disk}"]}).start()
        try:
            row, ps_row = wait_level(dep, disk, timeout, poll, on_sample)
        finally:
            stats = sampler.stop()
            profiles = prof.stop()
        seconds = time.monotonic() - t0
        wire = _wire_since(dep, before)
    except BaseException:
        dep.stop_all()
        raise
    out: dict[str, Any] = {
        "seconds": round(seconds, 3),
        "page_cache": cache,
        **_wire_fields(wire),
        "agent": row,
        "ps": ps_row,
        "processes": {k: v.as_dict() for k, v in stats.items()},
        "note": "includes the agent process start (and a py-spy attach if profiling)"
        if profiles
        else "includes the agent process start",
    }
    if profiles:
        out["profiles"] = profiles
    return dep, out


class _LinkCounts(NamedTuple):
    """The agent's own count of its sessions with the process server since it started."""

    connects: int  # established
    failures: int  # attempts and sessions that ended in an error


class _Snapshot(NamedTuple):
    connections: dict[Endpoints, Counts]
    link: _LinkCounts


def _link_counts(dep: Deployment) -> _LinkCounts:
    link = _status(dep.agents[AGENT].state_dir / "admin.sock").get("link") or {}
    return _LinkCounts(int(link.get("connects", 0)), int(link.get("failures", 0)))


def _snapshot(dep: Deployment) -> _Snapshot:
    """The agent's connections (:mod:`benchmarks.tcp_bytes`) with its counts read before
    and after them: equal, or the link changed while it was read (WireCountError)."""
    link = _link_counts(dep)
    connections = connections_to(dep.port)
    if _link_counts(dep) != link:
        raise WireCountError("the agent's link changed while its bytes were read")
    return _Snapshot(connections, link)


def _wire_fields(wire: Counts) -> dict[str, int]:
    return {
        "wire_bytes": wire.up + wire.down,
        "wire_bytes_up": wire.up,
        "wire_bytes_down": wire.down,
    }


def _wire_since(dep: Deployment, before: _Snapshot) -> Counts:
    """The bytes on the agent's connections since ``before``. Raises WireCountError when
    they cannot all be counted: a session failed in the window (its connection is gone,
    and its bytes with it), or the connections do not match the sessions made."""
    after = _snapshot(dep)
    return wire_between(
        before.connections,
        after.connections,
        after.link.connects - before.link.connects,
        after.link.failures - before.link.failures,
    )


# --------------------------------------------------------------------------- phases


def phase_initial(
    root: Path,
    size: int,
    pids: dict[str, int],
    timeout: float,
    out: dict[str, Any],
    rounds: int = INITIAL_ROUNDS,
) -> None:
    """Fills ``out`` as it goes (what was measured survives an error in a later step).
    ``nbdcopy`` and ``tidemark`` are the first round's; ``rounds`` has every round's times
    (the target is judged on their medians, :func:`_figures`)."""
    root.mkdir()
    image = root / "src.img"
    data = make_half_holes(image, size, seed=11)
    out.update(image_size=size, data_bytes=data, hole_bytes=size - data)
    target = root / "nbdkit.img"
    out["nbdcopy_noflush"] = run_nbdcopy(image, target, root, flush=False, pids=pids, label="a")
    target.unlink()
    out["source_allocated_bytes"] = allocated(image)
    out["rounds"] = []
    dep = None
    for n in range(rounds):
        suffix = "" if n == 0 else f"-{n + 1}"
        # The order turns each round: none always runs first, or right after another's
        # clean-up.
        turn = n % len(ROUND_ORDER)
        order = [*ROUND_ORDER[turn:], *ROUND_ORDER[:turn]]
        copies: dict[str, dict[str, Any]] = {}
        for who in order:
            if who == "tidemark":
                dep_n, copies[who] = _initial_round(root, image, suffix, pids, timeout)
            else:
                transport = "unix" if who == "nbdcopy_unix" else "tcp"
                label = ("b" if transport == "tcp" else "u") + suffix
                copies[who] = run_nbdcopy(
                    image, target, root, flush=True, pids=pids, label=label, transport=transport
                )
                target.unlink()
        tm, nbdcopy, unix = copies["tidemark"], copies["nbdcopy"], copies["nbdcopy_unix"]
        if n == 0:
            dep = dep_n  # its PKI serves the floors
            out["nbdcopy"], out["tidemark"], out["nbdcopy_unix"] = nbdcopy, tm, unix
        else:
            shutil.rmtree(dep_n.root)
        out["rounds"].append(
            {
                "first": order[0],
                "order": order,
                "nbdcopy_seconds": nbdcopy["seconds"],
                "nbdcopy_unix_seconds": unix["seconds"],
                "tidemark_seconds": tm["seconds"],
                "ratio": ratio(tm["seconds"], nbdcopy["seconds"]),
                "ratio_unix": ratio(tm["seconds"], unix["seconds"]),
                "equal": bool(nbdcopy["equal"] and tm["equal"] and unix["equal"]),
            }
        )
        if not out["rounds"][-1]["equal"]:
            break  # reported as a failed copy; more rounds would not change that
    assert dep is not None
    for name, _, level, direct, threads in FLOORS:
        out[name] = tls_floor(dep, root, size, data, level, direct, threads)
        for side in ("client", "server"):
            pids[f"{name}-{side}"] = out[name]["processes"][side]["pid"]


def _initial_round(
    root: Path, image: Path, suffix: str, pids: dict[str, int], timeout: float
) -> tuple[Deployment, dict[str, Any]]:
    """One round's tidemark initial sync (:func:`tidemark_initial`), its replica compared
    with the source and then deleted (the floors need only the deployment's PKI), the
    deployment stopped; its pids go into ``pids`` with ``suffix``, also when it fails."""
    round_pids: dict[str, int] = {}
    try:
        dep, tm = tidemark_initial(
            root / f"d{suffix}", image, INIT_DISK, round_pids, timeout, label=suffix
        )
    finally:
        pids.update({k + suffix: v for k, v in round_pids.items()})
    try:
        replica = dep.replica_path(INIT_DISK)
        tm["equal"] = same(image, replica)
        tm["replica_allocated_bytes"] = allocated(replica)
        replica.unlink()
    finally:
        dep.stop_all()
    return dep, tm


def tls_floor(
    dep: Deployment,
    root: Path,
    size: int,
    data: int,
    level: int | None,
    direct: bool,
    threads: int = 0,
) -> dict[str, Any]:
    """What the simplest TLS copy of the image's data bytes costs on this machine, with the
    deployment's PKI and TLS contexts: ``data`` bytes of the same 2:1 data in 1 MiB blocks,
    from memory (the source is not even read), each block zstd-compressed at ``level`` or
    not, written into a fresh sparse file (through the page cache as nbdkit does, or with
    ``O_DIRECT`` as the process server writes into holes) and ``fdatasync``ed once at the
    end (as ``nbdcopy --flush`` makes its copy durable). No digests, no journal, no cache,
    one blocking process per side, one block after another or, with ``threads``, pipelined
    over the cores (compressing, and decompressing and writing, in that many threads while
    one thread sends and one receives): a yardstick for the initial sync over the product's
    link, not a proof of what is impossible (a cleverer copy may beat it)."""
    settle()
    result = run_baseline(
        pki_dir=dep.pki,
        bundle=dep.root / f"{AGENT}.bundle",
        out=root / "floor.img",
        seconds=0,
        block=MIB,
        size=size,
        sync_every=1 << 62,
        log=root / "floor.log",
        nbytes=data,
        zstd=level,
        direct=direct,
        threads=threads,
    )
    result["command"] = (
        f"python -m benchmarks.tls_copy serve/send --bytes {data} --sync-every 2^62"
        + (f" --zstd {level}" if level is not None else "")
        + (" --direct" if direct else "")
        + (f" --threads {threads}" if threads else "")
    )
    return result


def phase_resync(
    root: Path,
    size: int,
    pids: dict[str, int],
    bdsync: str | None,
    timeout: float,
    out: dict[str, Any],
    rounds: int = RESYNC_ROUNDS,
) -> None:
    """Fills ``out`` as it goes (what was measured survives an error in a later step).
    ``tidemark`` is the first round's; ``rounds`` has every round's figures (the target is
    judged on their median, :func:`_figures`). The baselines run on the first round's
    change: a later round changes blocks of its own choosing (they may overlap the first
    round's), and its change is undone afterwards, newest first."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    root.mkdir()
    image = root / "src.img"
    make_random(image, size, seed=21)
    out.update(image_size=size, image="fully allocated, random bytes")
    dep, first = tidemark_initial(root / "d", image, RESYNC_DISK, pids, timeout)
    later: list[tuple[list[int], list[bytes]]] = []  # (blocks, old contents) of rounds 2..
    try:
        replica = dep.replica_path(RESYNC_DISK)
        first["equal"] = same(image, replica)
        out["initial_sync"] = first
        if not first["equal"]:
            raise RuntimeError("replica differs from the source after the initial sync")
        out["rounds"] = []
        for n in range(rounds):
            suffix = "" if n == 0 else f"-{n + 1}"
            dep.stop_agent(AGENT)
            change = change_blocks(image, size, CHANGE_FRACTION, seed=22 + n)
            if n == 0:
                # The baselines' "remote" copy: the replica as it was before the change.
                old = root / "old.img"
                subprocess.run(["cp", "--sparse=always", str(replica), str(old)], check=True)
                blocks, old_contents = change
                out.update(
                    changed_blocks=len(blocks), changed_bytes=len(blocks) * BLOCK, block=BLOCK
                )
            else:
                later.append(change)
            tm = _resync_round(dep, image, replica, pids, timeout, suffix)
            if n == 0:
                out["tidemark"] = tm
            out["rounds"].append(
                {
                    "seconds": tm["seconds"],
                    "wire_bytes": tm["wire_bytes"],
                    "changed_bytes": len(change[0]) * BLOCK,
                    "equal": tm["equal"],
                    "processes": tm["processes"],
                }
            )
            if not tm["equal"]:
                break  # reported as a failed copy; more rounds would not change that
    finally:
        dep.stop_all()
    for blocks_n, old_n in reversed(later):  # the source as the first round left it
        restore_blocks(image, blocks_n, old_n)
    with contextlib.suppress(FileNotFoundError):
        replica.unlink()  # room for the baselines

    rs = run_rsync(image, old)
    rs["equal"] = same(image, old)
    out["rsync"] = rs

    if bdsync is None:
        out["bdsync"] = {"available": False}
    else:
        restore_blocks(old, blocks, old_contents)  # the pre-change copy again
        bd = run_bdsync(bdsync, image, old, root / "bdsync.patch")
        bd["equal"] = same(image, old)
        bd["available"] = True
        bd["binary"] = bdsync
        out["bdsync"] = bd


def _resync_round(
    dep: Deployment,
    image: Path,
    replica: Path,
    pids: dict[str, int],
    timeout: float,
    suffix: str,
) -> dict[str, Any]:
    """One timed resync: the agent (stopped, the image changed behind its back) is started
    again and believes it is level; ``agent.cli resync`` is timed until the disk is level
    and applied; the replica is then compared with the source."""
    agent_pid = dep.start_agent(AGENT).pid
    pids[f"agent-{RESYNC_DISK}-2{suffix}"] = agent_pid
    wait_level(dep, RESYNC_DISK, timeout)  # a clean restart: it believes it is level
    ps_pid = pids[f"ps-{RESYNC_DISK}"]
    cmd = _resync_command(dep.agents[AGENT].config, RESYNC_DISK)
    cache = warm(image, replica)
    before = _snapshot(dep)  # (its status requests outside the processes' CPU figures)
    prof = PySpy(f"resync{suffix}", {"agent": agent_pid, "ps": ps_pid})
    sampler = ProcessSampler({"agent": agent_pid, "ps": ps_pid}).start()
    t0 = time.monotonic()
    try:
        cli = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
        cli_seconds = time.monotonic() - t0
        if cli.returncode != 0:
            raise RuntimeError(f"resync command exited {cli.returncode}: {cli.stderr}")
        row, ps_row = wait_level(dep, RESYNC_DISK, timeout)
        seconds = time.monotonic() - t0
    finally:
        stats = sampler.stop()
        profiles = prof.stop()
    wire = _wire_since(dep, before)
    tm: dict[str, Any] = {
        "command": shlex.join(cmd),
        "seconds": round(seconds, 3),
        "page_cache": cache,
        "command_returned_seconds": round(cli_seconds, 3),
        "command_output": cli.stdout.strip(),
        **_wire_fields(wire),
        "agent": row,
        "ps": ps_row,
        "processes": {k: v.as_dict() for k, v in stats.items()},
    }
    if profiles:
        tm["profiles"] = profiles
    tm["equal"] = same(image, replica)
    return tm


# --------------------------------------------------------------------------- figures


def _transport(nbdcopy: dict[str, Any]) -> str:
    """Where the baseline's nbdkit listened (a JSON from before 2026-12-07: a unix socket)."""
    return "TCP loopback" if nbdcopy.get("transport") == "tcp" else "unix socket"


def _round_told(x: dict[str, Any]) -> str:
    """One round: ``tidemark/nbdcopy (ratio)``, and ``; /unix (ratio)`` when it was timed."""
    told = f"{x['tidemark_seconds']:.2f}/{x['nbdcopy_seconds']:.2f}"
    told += f" ({x['ratio']:.2f}x)" if x.get("ratio") is not None else ""
    if "nbdcopy_unix_seconds" in x:
        told += f"; /{x['nbdcopy_unix_seconds']:.2f}"
        told += f" ({x['ratio_unix']:.2f}x)" if x.get("ratio_unix") is not None else ""
    return told


def _rounds_told(rounds: list[dict[str, Any]]) -> str:
    """What a headline figure was judged on."""
    return f"median of {len(rounds)}" if len(rounds) > 1 else "one round"


def _wire_ratio(resync_round: dict[str, Any]) -> float | None:
    """A resync round's wire bytes against the bytes it changed (None: nothing changed)."""
    return ratio(resync_round["wire_bytes"], resync_round["changed_bytes"])


def _wire_note(resync_round: dict[str, Any]) -> str:
    q = _wire_ratio(resync_round)
    return "" if q is None else f" ({q:.2f}x)"


def _figures(details: dict[str, Any]) -> list[Figure]:
    figs: list[Figure] = []
    gib = lambda n: f"{n / (1 << 30):g} GiB"  # noqa: E731
    rz = details.get("resync") or {}
    if all(k in rz for k in ("tidemark", "rsync", "bdsync")):
        size = gib(rz["image_size"])
        tm, rs, bd = rz["tidemark"], rz["rsync"], rz["bdsync"]
        rounds = rz.get("rounds") or [  # a JSON from before the rounds: its one resync
            {
                "seconds": tm["seconds"],
                "wire_bytes": tm["wire_bytes"],
                "changed_bytes": rz["changed_bytes"],
                "equal": bool(tm.get("equal")),
            }
        ]
        tm_s = statistics.median(x["seconds"] for x in rounds)
        bd_s = bd["seconds"] if bd.get("available") else None
        faster = min(s for s in (rs["seconds"], bd_s) if s is not None)
        r = ratio(tm_s, faster)
        what = _rounds_told(rounds)
        figs.append(
            Figure(
                NAME,
                f"resync, 1% of 4 KiB blocks changed, {size}: tidemark ({what})",
                tm_s,
                "s",
                faster,
                r,
                f"<= {TARGET_RESYNC}x faster of rsync/bdsync",
                r is not None and r <= TARGET_RESYNC,
            )
        )
        if len(rounds) > 1:
            figs.append(
                Figure(
                    NAME,
                    "resync rounds: tidemark seconds (wire vs changed)",
                    ", ".join(f"{x['seconds']:.2f}{_wire_note(x)}" for x in rounds),
                    "",
                )
            )
        figs.append(Figure(NAME, "resync: rsync -I --inplace --no-whole-file", rs["seconds"], "s"))
        figs.append(
            Figure(NAME, "resync: bdsync", bd_s if bd_s is not None else NOT_AVAILABLE, "s")
        )
        every_round_equal = all(x["equal"] for x in rounds)
        # Every round is held to the wire target: the worst one is reported.
        worst = max(rounds, key=lambda x: _wire_ratio(x) or 0.0)
        wire, changed = worst["wire_bytes"], worst["changed_bytes"]
        wr = ratio(wire, changed)
        figs.append(
            Figure(
                NAME,
                "resync wire bytes (both directions) vs changed bytes"
                + (f" (worst of {len(rounds)})" if len(rounds) > 1 else ""),
                round(wire / MIB, 2),
                "MiB",
                round(changed / MIB, 2),
                wr,
                f"<= {TARGET_WIRE}x changed",
                wr is not None and wr <= TARGET_WIRE,
            )
        )
        st = rs["stats"]
        if "sent_bytes" in st:
            figs.append(
                Figure(
                    NAME,
                    "rsync bytes on its pipes (--stats sent + received)",
                    round((st["sent_bytes"] + st.get("received_bytes", 0)) / MIB, 2),
                    "MiB",
                )
            )
        if bd.get("available"):
            figs.append(Figure(NAME, "bdsync patch size", round(bd["patch_bytes"] / MIB, 2), "MiB"))
        figs.append(
            Figure(
                NAME,
                "resync: replica / rsync copy / bdsync copy == source",
                " / ".join(
                    "yes" if x.get("equal") else ("-" if not x.get("available", True) else "NO")
                    for x in ({"equal": every_round_equal}, rs, bd)
                ),
                "",
                target="cmp equal",
                passed=bool(every_round_equal and rs["equal"] and bd.get("equal", True)),
                critical=True,
            )
        )
    ini = details.get("initial") or {}
    if all(k in ini for k in ("tidemark", "nbdcopy", "nbdcopy_noflush")):
        tm, nc = ini["tidemark"], ini["nbdcopy"]
        rounds = ini.get("rounds") or [  # a JSON from before the rounds: its one pair
            {
                "nbdcopy_seconds": nc["seconds"],
                "tidemark_seconds": tm["seconds"],
                "ratio": ratio(tm["seconds"], nc["seconds"]),
                "equal": bool(tm.get("equal") and nc.get("equal")),
            }
        ]
        tm_s = statistics.median(r["tidemark_seconds"] for r in rounds)
        nc_s = statistics.median(r["nbdcopy_seconds"] for r in rounds)
        r = ratio(tm_s, nc_s)
        what = _rounds_told(rounds)
        figs.append(
            Figure(
                NAME,
                f"initial sync over TLS, {gib(ini['image_size'])} half holes: tidemark ({what})",
                tm_s,
                "s",
                nc_s,
                r,
                f"<= {TARGET_INITIAL}x nbdcopy, {_transport(nc)}",
                r is not None and r <= TARGET_INITIAL,
            )
        )
        figs.append(
            Figure(
                NAME,
                f"initial sync: nbdcopy --flush -> nbdkit file, {_transport(nc)} ({what})",
                nc_s,
                "s",
            )
        )
        unix = all("nbdcopy_unix_seconds" in x for x in rounds)
        if unix:
            unix_s = statistics.median(x["nbdcopy_unix_seconds"] for x in rounds)
            figs.append(
                Figure(
                    NAME,
                    f"initial sync: tidemark vs nbdcopy --flush -> nbdkit file, unix socket"
                    f" (reported; {what})",
                    tm_s,
                    "s",
                    unix_s,
                    ratio(tm_s, unix_s),
                )
            )
        if len(rounds) > 1:
            figs.append(
                Figure(
                    NAME,
                    "initial sync rounds: tidemark / nbdcopy seconds (ratio)"
                    + (", then nbdcopy on a unix socket (ratio)" if unix else ""),
                    ", ".join(_round_told(x) for x in rounds),
                    "",
                )
            )
        figs.append(
            Figure(
                NAME,
                "initial sync: nbdcopy (no --flush) -> nbdkit file",
                ini["nbdcopy_noflush"]["seconds"],
                "s",
            )
        )
        floors = [(label, ini[key]["seconds"]) for key, label, *_ in FLOORS if key in ini]
        for label, seconds in floors:
            figs.append(
                Figure(
                    NAME,
                    f"initial sync floor: bare TLS copy of the data ({label}, tls_copy)",
                    round(seconds, 3),
                    "s",
                    nc_s,
                    ratio(seconds, nc_s),
                )
            )
        if floors:
            best = min(seconds for _, seconds in floors)
            figs.append(
                Figure(
                    NAME,
                    "initial sync: tidemark vs the fastest floor",
                    tm_s,
                    "s",
                    round(best, 3),
                    ratio(tm_s, best),
                )
            )
        figs.append(
            Figure(
                NAME,
                "initial sync wire bytes vs data bytes",
                round(tm["wire_bytes"] / MIB, 1),
                "MiB",
                round(ini["data_bytes"] / MIB, 1),
                ratio(tm["wire_bytes"], ini["data_bytes"]),
            )
        )
        figs.append(
            Figure(
                NAME,
                "initial sync: replica / nbdkit copy == source (every round)",
                f"{'yes' if tm['equal'] else 'NO'} / {'yes' if nc['equal'] else 'NO'}"
                + ("" if all(x["equal"] for x in rounds) else " (a later round: NO)"),
                "",
                target="cmp equal",
                passed=bool(all(x["equal"] for x in rounds) and ini["nbdcopy_noflush"]["equal"]),
                critical=True,
            )
        )
    return figs


def run(params: Params) -> ScenarioResult:
    size = min(params.disk_size, QUICK_SIZE) if params.quick else params.disk_size
    bdsync = find_bdsync()
    timeout = max(120.0, size / MIB * 0.5)  # generous: 0.5 s per MiB
    result = ScenarioResult(
        NAME,
        params={
            "image_size": size,
            "change_fraction": CHANGE_FRACTION,
            "block": BLOCK,
            "bdsync": bdsync or NOT_AVAILABLE,
            "quick": params.quick,
            "profiling": os.environ.get(PYSPY_ENV) or None,
        },
    )
    details = result.details
    pids: dict[str, int] = {}
    details["pids"] = pids
    if missing := missing_tools():
        result.error = f"missing tools: {', '.join(missing)}"
        return result
    with tempfile.TemporaryDirectory(prefix="tms-", dir=params.tmpdir) as tmp:
        root = Path(tmp)
        details["workdir"] = str(root)
        phase = "initial"
        try:
            details["initial"] = {}
            rounds = 1 if params.quick else INITIAL_ROUNDS
            phase_initial(root / "i", size, pids, timeout, details["initial"], rounds)
            shutil.rmtree(root / "i")
            phase = "resync"
            details["resync"] = {}
            rounds = 1 if params.quick else RESYNC_ROUNDS
            phase_resync(root / "r", size, pids, bdsync, timeout, details["resync"], rounds=rounds)
        except Exception as exc:
            result.error = f"{phase}: {type(exc).__name__}: {exc}"
            details["log_tails"] = _log_tails(root)
        result.figures = _figures(details)
    return result
