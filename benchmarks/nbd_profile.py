"""Where the CPU goes during one fio job against the agent's NBD export (a diagnostic).

Not a scenario with targets: the tool behind the CPU readings in ``docs/benchmarks.md``
(``nbd``, "Where the time goes"). A fresh deployment (one process server, one agent, one
sparse disk exported on a unix socket, replication on), the disk's initial sync finished,
then one ``fio --ioengine=nbd`` job. Printed (and with ``--json``, written):

- fio's IOPS, MB/s and completion-latency p50/p99, and how many writes the agent journaled;
- CPU seconds of the agent and of the process server during the job, and per I/O, each
  split by thread (user + system, and system alone);
- the agent's event-loop thread: seconds it ran and seconds it was runnable but waiting
  for a CPU (``/proc/PID/task/TID/schedstat``), voluntary and involuntary switches;
- the machine's split over the job (``/proc/stat``: user, system, idle, iowait).

``--stop-ps`` stops the process server (SIGSTOP) for the job, then resumes it: the front
alone, every write still journaled (the journal holds what the process server has not
acknowledged). After the job the tool waits until the process server applied every
journaled write and reports that drain too.

    python -m benchmarks.nbd_profile [--rw randwrite|write] [--bs 4KiB] [--iodepth 16] [--seconds 8]
                                     [--disk-gib 4] [--stop-ps] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.deploy import Deployment
from benchmarks.nbd_front import (
    AGENT,
    Workload,
    fio_command,
    run_fio,
    wait_applied,
    wait_protected,
)
from common.units import parse_size

DISK = "d1"


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """``tid -> (user + system, system)`` CPU seconds of every thread of ``pid``."""
    return {
        t.id: (t.user_time + t.system_time, t.system_time) for t in psutil.Process(pid).threads()
    }


def loop_thread_sched(pid: int) -> tuple[float, float, int, int]:
    """The main thread's (ran s, waited for a CPU s, voluntary, involuntary switches)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        ran_ns, waited_ns = (int(v) for v in f.read().split()[:2])
    switches = {}
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                switches[key] = int(value)
    return (
        ran_ns / 1e9,
        waited_ns / 1e9,
        switches["voluntary_ctxt_switches"],
        switches["nonvoluntary_ctxt_switches"],
    )


def _cpu_delta(
    before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]
) -> dict[str, Any]:
    threads = {
        tid: (
            round(total - before.get(tid, (0.0, 0.0))[0], 2),
            round(sys_ - before.get(tid, (0.0, 0.0))[1], 2),
        )
        for tid, (total, sys_) in after.items()
    }
    busy = {str(tid): {"cpu": c, "system": s} for tid, (c, s) in threads.items() if c >= 0.05}
    return {"cpu_seconds": round(sum(c for c, _ in threads.values()), 2), "threads": busy}


def profile(
    root: Path,
    *,
    rw: str = "randwrite",
    bs: int = 4096,
    iodepth: int = 16,
    seconds: float = 8,
    disk_gib: int = 4,
    stop_ps: bool = False,
) -> dict[str, Any]:
    with Deployment(root) as dep:
        dep.init_pki()
        ps = dep.start_ps()
        spec = dep.add_agent(AGENT, {DISK: disk_gib << 30}, nbd=True)
        agent = dep.start_agent(AGENT)
        wait_protected(dep, [DISK], 300)
        uri = f"nbd+unix:///{DISK}?socket={spec.nbd[DISK]}"
        journaled_before = int(dep.agent_status(AGENT)["disks"][0]["journaled_seq"])
        if stop_ps:
            ps.send_signal(signal.SIGSTOP)
        cpu0 = (thread_cpu(agent.pid), thread_cpu(ps.pid))
        sched0, ticks0, t0 = (
            loop_thread_sched(agent.pid),
            list(psutil.cpu_times()),
            time.monotonic(),
        )
        workload = Workload("profile", "profile", rw, bs, iodepth, "iops")
        try:
            fio = run_fio(
                fio_command(uri, workload, seconds, disk_gib << 30, "profile"),
                seconds,
                root / "fio.log",
            )
        finally:
            if stop_ps:
                ps.send_signal(signal.SIGCONT)
        wall = time.monotonic() - t0
        sched1, ticks1 = loop_thread_sched(agent.pid), list(psutil.cpu_times())
        cpu1 = (thread_cpu(agent.pid), thread_cpu(ps.pid))
        drain_start = time.monotonic()
        drained = wait_applied(dep, DISK, 300)
        drain = time.monotonic() - drain_start
        cpu2 = (thread_cpu(agent.pid), thread_cpu(ps.pid))
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    ticks = [b - a for a, b in zip(ticks0[:8], ticks1[:8], strict=True)]
    total = sum(ticks) or 1.0
    ios = max(fio["ios"], 1)
    agent_cpu, ps_cpu = _cpu_delta(cpu0[0], cpu1[0]), _cpu_delta(cpu0[1], cpu1[1])
    return {
        "params": {
            "rw": rw,
            "bs": bs,
            "iodepth": iodepth,
            "seconds": seconds,
            "disk_gib": disk_gib,
            "stop_ps": stop_ps,
        },
        "fio": fio,
        "wall_seconds": round(wall, 2),
        "journaled_writes": int(drained["journaled_seq"]) - journaled_before,
        "agent": {**agent_cpu, "us_per_io": round(agent_cpu["cpu_seconds"] / ios * 1e6, 1)},
        "ps": {**ps_cpu, "us_per_io": round(ps_cpu["cpu_seconds"] / ios * 1e6, 1)},
        "agent_loop_thread": {
            "ran_seconds": round(sched1[0] - sched0[0], 2),
            "waited_for_cpu_seconds": round(sched1[1] - sched0[1], 2),
            "voluntary_switches": sched1[2] - sched0[2],
            "involuntary_switches": sched1[3] - sched0[3],
        },
        "machine_pct": {
            "user": round(100 * (ticks[0] + ticks[1]) / total, 1),
            "system": round(100 * ticks[2] / total, 1),
            "idle": round(100 * ticks[3] / total, 1),
            "iowait": round(100 * ticks[4] / total, 1),
            "irq": round(100 * (ticks[5] + ticks[6]) / total, 1),
            "steal": round(100 * ticks[7] / total, 1),
        },
        "drain": {
            "seconds": round(drain, 2),
            "agent_cpu_seconds": _cpu_delta(cpu1[0], cpu2[0])["cpu_seconds"],
            "ps_cpu_seconds": _cpu_delta(cpu1[1], cpu2[1])["cpu_seconds"],
        },
    }


def render(result: dict[str, Any]) -> str:
    p, f, loop, m = (
        result["params"],
        result["fio"],
        result["agent_loop_thread"],
        result["machine_pct"],
    )
    lines = [
        f"{p['bs']} B {p['rw']} QD{p['iodepth']}, {p['seconds']} s, {p['disk_gib']} GiB disk"
        + (", process server stopped" if p["stop_ps"] else ", replication on"),
        f"  fio: {f['iops']:,.0f} IOPS, {f['mb_s']:.1f} MB/s, p50 {f['clat_p50_us']:.1f} us, "
        f"p99 {f['clat_p99_us']:.1f} us ({f['ios']:,} writes; the agent journaled "
        f"{result['journaled_writes']:,})",
    ]
    for name in ("agent", "ps"):
        row = result[name]
        threads = ", ".join(
            f"{tid}: {t['cpu']} ({t['system']} sys)" for tid, t in row["threads"].items()
        )
        lines.append(
            f"  {name}: {row['cpu_seconds']} CPU-s, {row['us_per_io']} us per write [{threads}]"
        )
    lines.append(
        f"  agent loop thread: ran {loop['ran_seconds']} s, waited for a CPU "
        f"{loop['waited_for_cpu_seconds']} s of {result['wall_seconds']} s "
        f"({loop['voluntary_switches']} voluntary, {loop['involuntary_switches']} involuntary)"
    )
    lines.append(
        f"  machine: user {m['user']}%, system {m['system']}%, idle {m['idle']}%, "
        f"iowait {m['iowait']}%, irq {m['irq']}%, steal {m['steal']}%"
    )
    d = result["drain"]
    lines.append(
        f"  drain: {d['seconds']} s (agent {d['agent_cpu_seconds']}, "
        f"process server {d['ps_cpu_seconds']} CPU-s)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.nbd_profile", description=__doc__)
    ap.add_argument("--rw", default="randwrite", choices=["randwrite", "write"])
    ap.add_argument(
        "--bs", type=parse_size, default=4096, help="fio block size (4KiB, 1MiB, 65536)"
    )
    ap.add_argument("--iodepth", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--disk-gib", type=int, default=4)
    ap.add_argument("--stop-ps", action="store_true", help="SIGSTOP the process server")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--tmpdir", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tm-nbdprof-", dir=args.tmpdir) as tmp:
        result = profile(
            Path(tmp),
            rw=args.rw,
            bs=args.bs,
            iodepth=args.iodepth,
            seconds=args.seconds,
            disk_gib=args.disk_gib,
            stop_ps=args.stop_ps,
        )
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
