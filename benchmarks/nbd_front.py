"""Scenario ``nbd``: ``fio --ioengine=nbd`` against the agent's export vs nbdkit and qemu-nbd.

Three NBD servers are measured in the same run, one after another for each workload, with
the same fio parameters and the same image size (a fresh sparse image per target, every
file on the same filesystem, in one temporary directory):

- **agent**: the agent's unix-socket NBD export (``python -m agent.cli run``) with
  replication on: a process server (``python -m process_server.cli serve``) on loopback
  receives, caches and applies every write over mutual TLS 1.3;
- **nbdkit**: ``nbdkit -f --exit-with-parent -U SOCK file FILE``;
- **qemu-nbd**: ``qemu-nbd -f raw --cache=writeback -t --shared=16 -k SOCK FILE``.

Workloads (``fio --time_based --runtime=N --size=IMAGE --output-format=json``):

- ``4k-randwrite-qd16``: 4 KiB random writes at iodepth 16 (IOPS target);
- ``1m-write-qd8``: 1 MiB sequential writes at iodepth 8 (MB/s target);
- ``4k-randwrite-qd1``: 4 KiB random writes at iodepth 1 (latency p50/p99);
- ``32m-write-qd128`` (agent only, 3 s): the agent's peak RSS must stay bounded (its NBD
  export holds at most 64 MiB of payload in flight per connection).

The jobs start once every disk finished its initial sync (a protected disk's steady state;
a job racing the sync would measure the sync hashing what the job writes). After each agent
job the harness waits until the process server applied everything the
agent journaled (so replication does not compete with the next target), then syncs;
after all jobs every replica is compared with its source (a difference makes the run
FAILED, as does a fio error against the agent or a journal overflow).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.deploy import PYTHON, Deployment
from benchmarks.metrics import (
    GIB,
    MIB,
    Figure,
    Params,
    ProcessSampler,
    ScenarioResult,
    cpu_seconds_per_gib,
    ratio,
)
from benchmarks.replication import UNIX_PATH_MAX, compare_images
from common.admin import admin_request

NAME = "nbd"
SUMMARY = "fio --ioengine=nbd: agent export (replicating) vs nbdkit file vs qemu-nbd writeback"
AGENT = "nbdfront"
TOOLS = ("fio", "nbdkit", "qemu-nbd")
TARGETS = ("agent", "nbdkit", "qemu-nbd")
QUICK_JOB_SECONDS = 1.0  # nine jobs (fio takes whole seconds): --quick runs in under 2 minutes
MEM_JOB_SECONDS = 3.0
QUICK_MEM_JOB_SECONDS = 1.0
QUICK_MEM_IMAGE = 256 * MIB
MEM_BLOCK = 32 * MIB
MEM_IODEPTH = 128
QUICK_MEM_IODEPTH = 8  # --quick: 256 MiB asked in flight, still 4x the export's budget
TARGET_RSS_MIB = 300
SERVER_START_TIMEOUT = 15.0


@dataclass(frozen=True)
class Workload:
    key: str  # also the agent's disk id
    label: str
    rw: str
    bs: int
    iodepth: int
    metric: str  # "iops" or "mb_s": the headline figure
    min_vs_nbdkit: float | None = None
    min_vs_qemu: float | None = None


WORKLOADS = (
    Workload("rand4k-qd16", "4 KiB randwrite QD16", "randwrite", 4096, 16, "iops", 0.6, 1.0),
    Workload("seq1m-qd8", "1 MiB seq write QD8", "write", MIB, 8, "mb_s", 0.5, None),
    Workload("rand4k-qd1", "4 KiB randwrite QD1", "randwrite", 4096, 1, "iops", 0.6, 1.0),
)
MEM = Workload("mem32m", "32 MiB write", "write", MEM_BLOCK, MEM_IODEPTH, "mb_s")
UNITS = {"iops": "IOPS", "mb_s": "MB/s"}


class ToolMissing(RuntimeError):
    pass


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


# --------------------------------------------------------------------------- fio


def fio_command(uri: str, wl: Workload, seconds: float, size: int, name: str) -> list[str]:
    return [
        "fio",
        f"--name={name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={wl.rw}",
        f"--bs={wl.bs}",
        f"--iodepth={wl.iodepth}",
        f"--size={size}",
        "--time_based",
        f"--runtime={seconds:g}",
        "--output-format=json",
    ]


def parse_fio(stdout: str) -> dict[str, Any]:
    """The write-side figures of fio's JSON (it prints "fio: connected to NBD server" first)."""
    start = stdout.find("{")
    if start < 0:
        raise ValueError(f"no JSON in fio output: {stdout[-500:]!r}")
    doc = json.loads(stdout[start:])
    job = doc["jobs"][0]
    w = job["write"]
    pct = (w.get("clat_ns") or {}).get("percentile") or {}
    return {
        "error": int(job.get("error") or 0),
        "iops": float(w["iops"]),
        "mb_s": float(w["bw_bytes"]) / 1e6,
        "bytes": int(w["io_bytes"]),
        "ios": int(w["total_ios"]),
        "runtime_ms": int(w["runtime"]),
        "clat_p50_us": float(pct.get("50.000000", 0)) / 1000,
        "clat_p99_us": float(pct.get("99.000000", 0)) / 1000,
        "clat_p999_us": float(pct.get("99.900000", 0)) / 1000,
        "clat_mean_us": float((w.get("clat_ns") or {}).get("mean", 0)) / 1000,
        # fio's own CPU: its usr/sys are percent of one CPU (its job thread's rusage) over
        # the job's whole run, job_runtime, which includes its set-up and NBD connect
        "fio_cpu_seconds": round(
            (float(job.get("usr_cpu", 0)) + float(job.get("sys_cpu", 0)))
            / 100
            * int(job.get("job_runtime", w["runtime"]))
            / 1000,
            3,
        ),
    }


def run_fio(cmd: list[str], seconds: float, log: Path) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(
            f"fio exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:].strip()}"
        )
    out = parse_fio(proc.stdout)
    if out["error"]:
        raise RuntimeError(f"fio job error {out['error']}: {proc.stderr[-800:].strip()}")
    return out


# --------------------------------------------------------------------------- baseline servers


def _wait_unix(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            return
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not appear within {timeout:g}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill a baseline server: its image is thrown away, and a clean stop would first write
    the image's dirty pages back (qemu-nbd flushes on SIGTERM: seconds of wall time after a
    random-write job, and writeback competing with the next target)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def baseline_command(target: str, sock: Path, image: Path) -> list[str]:
    if target == "nbdkit":
        return ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "file", str(image)]
    if target == "qemu-nbd":
        return [
            "qemu-nbd",
            "-f",
            "raw",
            "--cache=writeback",
            "-t",
            "--shared=16",
            "-k",
            str(sock),
            str(image),
        ]
    raise ValueError(target)


@contextlib.contextmanager
def baseline_server(target: str, root: Path, size: int, pids: dict[str, int], tag: str):
    """A fresh sparse image served by nbdkit or qemu-nbd; both are removed afterwards."""
    image = root / f"{tag}.img"
    sock = root / f"{tag}.sock"
    with open(image, "wb") as f:
        f.truncate(size)
    log = open(root / f"{tag}.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        baseline_command(target, sock, image),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    pids[tag] = proc.pid
    try:
        _wait_unix(sock, proc, SERVER_START_TIMEOUT)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        _stop(proc)
        log.close()
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        image.unlink()


# --------------------------------------------------------------------------- agent side


def _admin(path: Path) -> dict[str, Any]:
    return asyncio.run(admin_request(path, {"cmd": "status"}, timeout=10))


def _row(status: dict[str, Any], disk_id: str) -> dict[str, Any]:
    for row in status.get("disks", []):
        if row.get("disk") == disk_id:
            return dict(row)
    raise RuntimeError(f"{disk_id} missing from status: {status}")


def wait_applied(dep: Deployment, disk_id: str, timeout: float) -> dict[str, Any]:
    """Wait until the PS applied every write the agent journaled on ``disk_id``."""
    agent_sock = dep.agents[AGENT].state_dir / "admin.sock"
    ps_sock = dep.ps_state / "admin.sock"
    start = time.monotonic()
    deadline = start + timeout
    ps_row: dict[str, Any] = {}
    while True:
        agent_row = _row(_admin(agent_sock), disk_id)
        journaled = int(agent_row.get("journaled_seq") or 0)
        with contextlib.suppress(RuntimeError):
            ps_row = _row(_admin(ps_sock), disk_id)
        if int(ps_row.get("applied_seq") or 0) >= journaled:
            return {
                "journaled_seq": journaled,
                "applied_seq": ps_row.get("applied_seq"),
                "seconds": round(time.monotonic() - start, 2),
                "agent": agent_row,
                "ps": ps_row,
            }
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{disk_id}: applied_seq {ps_row.get('applied_seq')} did not reach "
                f"journaled_seq {journaled} within {timeout:.0f}s"
            )
        time.sleep(0.05)


def wait_protected(dep: Deployment, disk_ids: list[str], timeout: float) -> float:
    """Wait until every disk finished its initial sync and replicates (the state a protected
    disk lives in; a job started earlier would race the sync hashing what it writes).
    Returns the seconds waited."""
    agent_sock = dep.agents[AGENT].state_dir / "admin.sock"
    start = time.monotonic()
    while True:
        status = _admin(agent_sock)
        rows = [_row(status, d) for d in disk_ids]
        if all(r.get("state") == "replicating" and not r.get("resync_reason") for r in rows):
            return round(time.monotonic() - start, 2)
        if time.monotonic() - start > timeout:
            states = {r.get("disk"): r.get("state") for r in rows}
            raise TimeoutError(f"disks not replicating within {timeout:.0f}s: {states}")
        time.sleep(0.1)


def _reset_hwm(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) so it covers only what follows."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _overflowed(row: dict[str, Any]) -> bool:
    return (
        row.get("state") == "resync-required"
        or bool(row.get("resync_reason"))
        or int(row.get("dirty_bytes") or 0) > 0
    )


def _auto_journal_quota(root: Path, disk_size: int, n_disks: int) -> int:
    """Enough journal that one job never overflows it, bounded by the free space (sources,
    replicas and baseline images need room too)."""
    free = shutil.disk_usage(root).free
    return max(4 * GIB, min(64 * GIB, (free - 2 * (n_disks + 1) * disk_size) // 3 // MIB * MIB))


def _log_tails(root: Path, nbytes: int = 3000) -> dict[str, str]:
    tails = {}
    for log in sorted(root.rglob("*.log")):
        with contextlib.suppress(OSError):
            tails[str(log.relative_to(root))] = log.read_bytes()[-nbytes:].decode(
                "utf-8", "replace"
            )
    return tails


def job_seconds(params: Params) -> float:
    from benchmarks.cli import QUICK_SECONDS

    if params.quick and params.seconds == QUICK_SECONDS:
        return QUICK_JOB_SECONDS  # the CLI's quick default is 5 s; this scenario runs 9 jobs
    return params.seconds


# --------------------------------------------------------------------------- the scenario


def run(params: Params) -> ScenarioResult:
    seconds = job_seconds(params)
    size = params.disk_size
    mem_size = min(size, QUICK_MEM_IMAGE if params.quick else 4 * GIB)
    mem_seconds = QUICK_MEM_JOB_SECONDS if params.quick else MEM_JOB_SECONDS
    mem_wl = MEM if not params.quick else dataclasses.replace(MEM, iodepth=QUICK_MEM_IODEPTH)
    result = ScenarioResult(
        NAME,
        params={
            "job_seconds": seconds,
            "image_size": size,
            "workloads": [
                {"name": w.key, "rw": w.rw, "bs": w.bs, "iodepth": w.iodepth} for w in WORKLOADS
            ],
            "memory_job": {
                "rw": mem_wl.rw,
                "bs": mem_wl.bs,
                "iodepth": mem_wl.iodepth,
                "seconds": mem_seconds,
                "size": mem_size,
            },
            "order": "per workload: agent, nbdkit, qemu-nbd",
        },
    )
    details = result.details
    details["cores"] = len(os.sched_getaffinity(0))
    pids: dict[str, int] = {}
    details["pids"] = pids
    missing = missing_tools()
    if missing:
        result.error = f"not installed: {', '.join(missing)}"
        return result
    details["tool_versions"] = _versions()

    runs: dict[str, dict[str, dict[str, Any]]] = {w.key: {} for w in WORKLOADS}
    details["runs"] = runs
    timeline: list[tuple[str, float]] = []
    details["timeline"] = timeline
    t_start = time.monotonic()

    def phase(name: str) -> None:
        """Progress on stderr, and when each phase started in the report."""
        at = round(time.monotonic() - t_start, 2)
        timeline.append((name, at))
        print(f"#   {at:6.1f}s {name}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="tmn-", dir=params.tmpdir) as tmp:
        root = Path(tmp)
        details["workdir"] = str(root)
        dep = Deployment(root / "d")
        disk_ids = [w.key for w in WORKLOADS] + [MEM.key]
        longest = max(
            [str(dep.root / f"{d}.sock") for d in disk_ids]
            + [str(dep.root / f"agent-{AGENT}" / "admin.sock")],
            key=len,
        )
        if len(os.fsencode(longest)) > UNIX_PATH_MAX:
            result.error = f"{longest}: too long for a unix socket; use a shorter --tmpdir"
            return result
        fio_log = root / "fio.log"
        try:
            phase("pki + process server + agent")
            dep.init_pki()
            quota = params.journal_quota or _auto_journal_quota(root, size, len(disk_ids))
            result.params["journal_quota"] = quota
            spec = dep.add_agent(
                AGENT,
                {d: (mem_size if d == MEM.key else size) for d in disk_ids},
                nbd=True,
                options={"journal_quota": quota},
            )
            pids["ps"] = dep.start_ps().pid
            agent_pid = dep.start_agent(AGENT).pid
            pids["agent"] = agent_pid
            phase("initial sync of every disk")
            details["initial_sync_seconds"] = wait_protected(dep, disk_ids, 300)
            details["commands"] = {
                "ps": shlex.join(
                    [PYTHON, "-m", "process_server.cli", "serve", "--config", "ps.toml"]
                ),
                "agent": shlex.join(
                    [PYTHON, "-m", "agent.cli", "run", "--config", f"{AGENT}.toml"]
                ),
                "nbdkit": shlex.join(baseline_command("nbdkit", Path("SOCK"), Path("IMAGE"))),
                "qemu-nbd": shlex.join(baseline_command("qemu-nbd", Path("SOCK"), Path("IMAGE"))),
                "fio": {
                    w.key: shlex.join(fio_command("URI", w, seconds, size, w.key))
                    for w in WORKLOADS
                },
            }
            drain_timeout = max(180.0, 20 * seconds)
            for wl in WORKLOADS:
                for target in TARGETS:
                    phase(f"{wl.key}: {target}")
                    if target == "agent":
                        uri = f"nbd+unix:///{wl.key}?socket={spec.nbd[wl.key]}"
                        cmd = fio_command(uri, wl, seconds, size, wl.key)
                        sampler = ProcessSampler({"agent": agent_pid, "ps": pids["ps"]}).start()
                        try:
                            out = run_fio(cmd, seconds, fio_log)
                            drain = wait_applied(dep, wl.key, drain_timeout)
                        finally:
                            stats = sampler.stop()
                        out["drain_after_fio"] = drain
                        out["processes"] = {k: st.as_dict() for k, st in stats.items()}
                        for side in ("agent", "ps"):  # (none for a CPU time not read)
                            st = stats[side]
                            out[f"{side}_cpu_s_per_gib"] = (
                                round(cpu_seconds_per_gib(st.cpu_seconds, out["bytes"]), 2)
                                if st.cpu_measured
                                else None
                            )
                    else:
                        tag = f"{target}-{wl.key}"
                        with baseline_server(target, root, size, pids, tag) as uri:
                            cmd = fio_command(uri, wl, seconds, size, wl.key)
                            sampler = ProcessSampler({target: pids[tag]}).start()
                            try:
                                out = run_fio(cmd, seconds, fio_log)
                            finally:
                                stats = sampler.stop()
                            out["processes"] = {k: st.as_dict() for k, st in stats.items()}
                    out["command"] = shlex.join(cmd)
                    runs[wl.key][target] = out
                    t0 = time.monotonic()
                    os.sync()  # nobody pays for the previous target's writeback
                    out["sync_seconds"] = round(time.monotonic() - t0, 2)

            # Memory under QD128 x 32 MiB writes (agent only).
            phase(f"{MEM.key} QD{mem_wl.iodepth}: agent")
            uri = f"nbd+unix:///{MEM.key}?socket={spec.nbd[MEM.key]}"
            cmd = fio_command(uri, mem_wl, mem_seconds, mem_size, MEM.key)
            hwm_reset = _reset_hwm(agent_pid) and _reset_hwm(pids["ps"])
            before = ProcessSampler({"agent": agent_pid, "ps": pids["ps"]}).start().stop()
            sampler = ProcessSampler({"agent": agent_pid, "ps": pids["ps"]}, interval=0.02)
            sampler.start()
            try:
                mem = run_fio(cmd, mem_seconds, fio_log)
                mem["drain_after_fio"] = wait_applied(dep, MEM.key, drain_timeout)
            finally:
                stats = sampler.stop()
            mem["command"] = shlex.join(cmd)
            mem["iodepth"] = mem_wl.iodepth
            mem["hwm_reset"] = hwm_reset
            mem["rss_before_mib"] = {
                k: round(st.sampled_peak_rss_bytes / MIB, 1) for k, st in before.items()
            }
            mem["processes"] = {k: st.as_dict() for k, st in stats.items()}
            details["memory"] = mem

            final = {d: _row(_admin(spec.state_dir / "admin.sock"), d) for d in disk_ids}
            details["agent_disks"] = final
            details["link"] = _admin(spec.state_dir / "admin.sock").get("link")
            phase("stop")
            dep.stop_all()
            phase("compare replicas")
            with ThreadPoolExecutor(len(disk_ids)) as pool:  # reads release the GIL
                futures = {
                    d: pool.submit(compare_images, spec.disks[d], dep.replica_path(d))
                    for d in disk_ids
                }
                verify = {d: f.result() for d, f in futures.items()}
            details["verify"] = verify
            phase("done")
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            dep.stop_all()
            details["log_tails"] = _log_tails(root)
            _figures(result, runs, None, None, None, details["cores"])
            return result
        finally:
            dep.stop_all()

    _figures(result, runs, mem, final, verify, details["cores"])
    print(matrix(runs), file=sys.stderr, flush=True)
    return result


def _versions() -> dict[str, str]:
    out = {}
    for tool, arg in (("fio", "--version"), ("nbdkit", "--version"), ("qemu-nbd", "--version")):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            text = subprocess.run([tool, arg], capture_output=True, text=True, timeout=10).stdout
            out[tool] = text.splitlines()[0].strip() if text else ""
    return out


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def cpu_us_per_io(run: dict[str, Any]) -> float | None:
    """CPU microseconds per write of everything on the machine's cores for one job: the
    server side (the agent and the process server, with the drain after the job; or the
    baseline server) and fio. None for a run recorded before these were measured, or when a
    process's CPU time could not be read (it would count as none)."""
    procs = run.get("processes")
    if not procs or "fio_cpu_seconds" not in run or not run.get("ios"):
        return None
    if not all(p.get("cpu_measured", True) for p in procs.values()):
        return None
    cpu = sum(float(p["cpu_seconds"]) for p in procs.values()) + float(run["fio_cpu_seconds"])
    return cpu / int(run["ios"]) * 1e6


def _cpu_figures(wl: Workload, r: dict[str, dict[str, Any]], cores: int) -> list[Figure]:
    """Where a target is out of reach at the agent's CPU cost: its CPU per write against
    nbdkit's, and the agent's ceiling if every core ran at that cost with nothing idle."""
    agent_us, kit_us = cpu_us_per_io(r["agent"]), cpu_us_per_io(r["nbdkit"])
    if agent_us is None or kit_us is None or agent_us <= 0:
        return []
    unit = UNITS[wl.metric]
    per_second = cores * 1e6 / agent_us  # writes per second with every core busy
    ceiling = per_second if wl.metric == "iops" else per_second * wl.bs / 1e6
    kit = float(r["nbdkit"][wl.metric])
    return [
        Figure(
            NAME,
            f"{wl.label}: CPU per write, agent + process server + fio (vs nbdkit + fio)",
            round(agent_us, 1),
            "us",
            baseline=round(kit_us, 1),
            ratio=_r(ratio(agent_us, kit_us)),
        ),
        Figure(
            NAME,
            f"{wl.label}: agent's ceiling at that CPU, all {cores} cores busy (vs nbdkit)",
            round(ceiling, 0 if wl.metric == "iops" else 1),
            unit,
            baseline=round(kit, 0 if wl.metric == "iops" else 1),
            ratio=_r(ratio(ceiling, kit)),
            target="" if wl.min_vs_nbdkit is None else f"target needs {wl.min_vs_nbdkit:g}x",
        ),
    ]


def _figures(
    result: ScenarioResult,
    runs: dict[str, dict[str, dict[str, Any]]],
    mem: dict[str, Any] | None,
    final: dict[str, dict[str, Any]] | None,
    verify: dict[str, dict[str, Any]] | None,
    cores: int,
) -> None:
    figs = result.figures
    for wl in WORKLOADS:
        r = runs.get(wl.key, {})
        if set(r) != set(TARGETS):
            continue
        unit = UNITS[wl.metric]
        nd = 0 if wl.metric == "iops" else 1
        agent, kit, qemu = (float(r[t][wl.metric]) for t in TARGETS)
        figs.append(Figure(NAME, f"{wl.label}: nbdkit file", round(kit, nd), unit))
        figs.append(Figure(NAME, f"{wl.label}: qemu-nbd writeback", round(qemu, nd), unit))
        for base_name, base, minimum in (
            ("nbdkit", kit, wl.min_vs_nbdkit),
            ("qemu-nbd", qemu, wl.min_vs_qemu),
        ):
            q = ratio(agent, base)
            figs.append(
                Figure(
                    NAME,
                    f"{wl.label}: agent vs {base_name}",
                    round(agent, nd),
                    unit,
                    baseline=round(base, nd),
                    ratio=_r(q),
                    target="" if minimum is None else f">= {minimum:g}x {base_name}",
                    passed=None if minimum is None else (q is not None and q >= minimum),
                )
            )
        figs.extend(_cpu_figures(wl, r, cores))
        if wl.iodepth == 1:
            for pct in ("p50", "p99"):
                key = f"clat_{pct}_us"
                for t in TARGETS:
                    base = float(r["nbdkit"][key])
                    value = float(r[t][key])
                    figs.append(
                        Figure(
                            NAME,
                            f"{wl.label}: clat {pct} {t}",
                            round(value, 1),
                            "us",
                            baseline=round(base, 1) if t != "nbdkit" else None,
                            ratio=_r(ratio(value, base)) if t != "nbdkit" else None,
                        )
                    )
    if mem is not None:
        procs = mem["processes"]
        qd = int(mem["iodepth"])
        mem_label = f"{MEM.label} QD{qd} ({qd * MEM.bs // MIB} MiB asked in flight)"
        for label, who in (("agent", "agent"), ("ps", "process server")):
            rss = float(procs[label]["peak_rss_mib"])
            is_agent = label == "agent"
            figs.append(
                Figure(
                    NAME,
                    f"{mem_label}: {who} peak RSS",
                    rss,
                    "MiB",
                    baseline=mem["rss_before_mib"].get(label),
                    target=f"<= {TARGET_RSS_MIB} MiB" if is_agent else "",
                    passed=(rss <= TARGET_RSS_MIB) if is_agent else None,
                )
            )
        figs.append(Figure(NAME, f"{mem_label}: agent", round(float(mem["mb_s"]), 1), "MB/s"))
    if final is not None:
        overflow = [d for d, row in final.items() if _overflowed(row)]
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
    if verify is not None:
        equal = all(v["equal"] for v in verify.values())
        figs.append(
            Figure(
                NAME,
                f"replica == source ({len(verify)} disks)",
                equal,
                target="yes",
                passed=equal,
                critical=True,
            )
        )


def matrix(runs: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A compact per-workload, per-target table (stderr and docs)."""
    head = f"{'workload':22} {'target':9} {'IOPS':>9} {'MB/s':>8} {'p50 us':>9} {'p99 us':>9}"
    lines = [head, "-" * len(head)]
    for wl in WORKLOADS:
        for t in TARGETS:
            o = runs.get(wl.key, {}).get(t)
            if o is None:
                continue
            lines.append(
                f"{wl.label:22} {t:9} {o['iops']:9,.0f} {o['mb_s']:8,.1f} "
                f"{o['clat_p50_us']:9,.1f} {o['clat_p99_us']:9,.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cli import main as cli_main

    return cli_main([NAME, *(sys.argv[1:] if argv is None else argv)])
