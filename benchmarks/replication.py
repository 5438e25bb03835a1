"""Scenario ``replication``: sustained 1 MiB writes through the Python API, end to end.

Agent (the driver process, benchmarks/driver.py, running the agent in-process) and process
server (``python -m process_server.cli serve``) are separate processes on loopback with
mutual TLS 1.3. The driver writes sequential 1 MiB blocks of 2:1-compressible data into a
sparse disk image for ``seconds`` (offsets wrap at the disk size), flushing every 64
writes, then waits until the process server acknowledged everything (data durable in its
cache). Figures:

- throughput *drained*: bytes / time until the PS acknowledged the last write (durable);
- throughput *applied*: bytes / time until the PS's ``applied_seq`` reached the last seq;
- the baseline (benchmarks.tls_copy): the same bytes over a plain TLS connection with the
  same PKI into a file with fdatasync every 64 MiB, in the same run, and the ratio;
- peak RSS and CPU seconds per GiB of the agent and the process server;
- replica == source, compared chunk by chunk after the run (a mismatch makes the run FAILED).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import xxhash

from benchmarks.deploy import PYTHON, Deployment, Driver
from benchmarks.metrics import (
    GIB,
    MIB,
    Figure,
    Params,
    ProcessSampler,
    ScenarioResult,
    cpu_seconds_per_gib,
    mb_per_s,
    ratio,
)
from benchmarks.tls_copy import SYNC_EVERY, run_baseline
from common.admin import admin_request

NAME = "replication"
SUMMARY = (
    "1 MiB 2:1-compressible writes via the Python API, agent -> PS over TLS, vs a plain TLS copy"
)
AGENT = "bench"
DISK_ID = "bench0"
TARGET_RATIO = 0.7
TARGET_RSS_MIB = 300
COMPARE_CHUNK = 8 * MIB
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the NUL


def _ps_status(dep: Deployment) -> dict[str, Any]:
    """Status straight from the PS admin socket (cheaper than spawning the CLI)."""
    return asyncio.run(admin_request(dep.ps_state / "admin.sock", {"cmd": "status"}, timeout=10))


def _wait_applied(dep: Deployment, seq: int, timeout: float, poll: float = 0.05) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for row in _ps_status(dep).get("disks", []):
            if row.get("disk") == DISK_ID and (row.get("applied_seq") or 0) >= seq:
                return row
        time.sleep(poll)
    raise TimeoutError(f"{DISK_ID}: applied_seq did not reach {seq} within {timeout:.0f}s: {row}")


def compare_images(source: Path, replica: Path, chunk: int = COMPARE_CHUNK) -> dict[str, Any]:
    """Compare two images chunk by chunk; XXH3-128 of each and the first differing offset."""
    h_src, h_rep = xxhash.xxh3_128(), xxhash.xxh3_128()
    first_diff: int | None = None
    start = time.monotonic()
    with open(source, "rb", buffering=0) as fs, open(replica, "rb", buffering=0) as fr:
        size_src, size_rep = os.fstat(fs.fileno()).st_size, os.fstat(fr.fileno()).st_size
        offset = 0
        while True:
            a, b = fs.read(chunk), fr.read(chunk)
            if not a and not b:
                break
            h_src.update(a)
            h_rep.update(b)
            if first_diff is None and a != b:
                first_diff = offset + next(
                    (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                    min(len(a), len(b)),
                )
            offset += max(len(a), len(b))
    equal = first_diff is None and size_src == size_rep
    return {
        "equal": equal,
        "source_size": size_src,
        "replica_size": size_rep,
        "source_xxh3_128": h_src.hexdigest(),
        "replica_xxh3_128": h_rep.hexdigest(),
        "first_difference_offset": first_diff,
        "seconds": round(time.monotonic() - start, 2),
    }


def _auto_journal_quota(root: Path, disk_size: int) -> int:
    """A journal quota the writer cannot exhaust in one run (the default 4 GiB overflows in
    a few seconds when the writer outruns the link), bounded by the free space: the run
    also needs the source image, the replica and the PS cache."""
    free = shutil.disk_usage(root).free
    return max(4 * GIB, min(64 * GIB, (free - 3 * disk_size) // 3 // MIB * MIB))


def len_(path: Path) -> int:
    return len(os.fsencode(path))


def _log_tails(root: Path, nbytes: int = 3000) -> dict[str, str]:
    """The end of every log under ``root`` (kept in the report: the directory is removed)."""
    tails = {}
    for log in sorted(root.rglob("*.log")):
        with contextlib.suppress(OSError):
            data = log.read_bytes()[-nbytes:]
            tails[str(log.relative_to(root))] = data.decode("utf-8", "replace")
    return tails


def _disk_row(status: dict[str, Any]) -> dict[str, Any]:
    for row in status.get("disks", []):
        if row.get("disk") == DISK_ID:
            return dict(row)
    raise RuntimeError(f"{DISK_ID} missing from the agent status: {status}")


def run(params: Params) -> ScenarioResult:
    result = ScenarioResult(
        NAME,
        params={
            "seconds": params.seconds,
            "disk_size": params.disk_size,
            "block": params.block,
            "compressible": True,
            "flush_every_writes": 64,
            "baseline_sync_every": SYNC_EVERY,
        },
    )
    details = result.details
    pids: dict[str, int] = {}
    details["pids"] = pids
    with tempfile.TemporaryDirectory(prefix="tmb-", dir=params.tmpdir) as tmp:
        root = Path(tmp)
        details["workdir"] = str(root)
        dep = Deployment(root / "d")
        longest = max(
            dep.ps_state / "admin.sock", dep.root / f"agent-{AGENT}" / "admin.sock", key=len_
        )
        if len(os.fsencode(longest)) > UNIX_PATH_MAX:
            result.error = (
                f"{longest}: too long for a unix socket ({UNIX_PATH_MAX} bytes max); "
                "use a shorter --tmpdir or TMPDIR"
            )
            return result
        driver: Driver | None = None
        try:
            dep.init_pki()
            quota = params.journal_quota or _auto_journal_quota(root, params.disk_size)
            result.params["journal_quota"] = quota
            spec = dep.add_agent(
                AGENT, {DISK_ID: params.disk_size}, options={"journal_quota": quota}
            )

            # 1. The baseline, first, on an idle machine; its file is removed before step 2.
            base = run_baseline(
                pki_dir=dep.pki,
                bundle=dep.root / f"{AGENT}.bundle",
                out=root / "tls-copy.img",
                seconds=params.seconds,
                block=params.block,
                size=params.disk_size,
                log=root / "tls-copy.log",
            )
            details["baseline"] = base
            pids["tls_client"] = base["processes"]["client"]["pid"]
            pids["tls_server"] = base["processes"]["server"]["pid"]

            # 2. Replication.
            ps_proc = dep.start_ps()
            pids["ps"] = ps_proc.pid
            driver = Driver(dep, AGENT)
            pids["agent"] = driver.pid
            details["commands"] = {
                "ps": shlex.join(
                    [PYTHON, "-m", "process_server.cli", "serve", "--config", "ps.toml"]
                ),
                "agent": shlex.join([PYTHON, "-m", "benchmarks.driver", f"{AGENT}.toml"]),
            }
            load_cmd = {
                "op": "load",
                "disk": DISK_ID,
                "seconds": params.seconds,
                "block": params.block,
                "compressible": True,
                "drain_timeout": max(120.0, 10 * params.seconds),
            }
            details["load_command"] = load_cmd
            sampler = ProcessSampler({"agent": driver.pid, "ps": ps_proc.pid}).start()
            try:
                load = driver.call(**load_cmd)
                returned = time.monotonic()
                if not load.get("ok"):
                    raise RuntimeError(f"driver load failed: {load}")
                agent_status = driver.call(op="status")["status"]
                agent_row = _disk_row(agent_status)
                journaled = int(agent_row["journaled_seq"])
                ps_row = _wait_applied(dep, journaled, timeout=max(120.0, 10 * params.seconds))
                applied_seconds = float(load["drain_seconds"]) + (time.monotonic() - returned)
            finally:
                stats = sampler.stop()
            details["load"] = load
            details["agent_link"] = agent_status.get("link")
            details["ps_disk"] = ps_row
            details["agent_disk"] = agent_row
            details["processes"] = {label: st.as_dict() for label, st in stats.items()}

            driver.quit()
            driver = None
            dep.stop_all()
            verify = compare_images(spec.disks[DISK_ID], dep.replica_path(DISK_ID))
            details["verify"] = verify
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            if driver is not None:
                driver.kill()
                driver = None
            dep.stop_all()
            details["log_tails"] = _log_tails(root)
            return result
        finally:
            if driver is not None:
                driver.kill()
            dep.stop_all()

    nbytes = int(load["bytes"])
    base_mbs = float(base["mb_per_s"])
    drained_mbs = mb_per_s(nbytes, float(load["drain_seconds"]))
    applied_mbs = mb_per_s(nbytes, applied_seconds)
    r = ratio(drained_mbs, base_mbs)
    link = details.get("agent_link") or {}
    wire = int(link.get("wire_bytes_sent") or 0)
    bp = base["processes"]
    figs = result.figures
    figs.append(Figure(NAME, "baseline: TLS copy, fdatasync/64MiB", round(base_mbs, 1), "MB/s"))
    figs.append(
        Figure(
            NAME,
            "replication, until PS durable (drained)",
            round(drained_mbs, 1),
            "MB/s",
            baseline=round(base_mbs, 1),
            ratio=None if r is None else round(r, 3),
            target=f">= {TARGET_RATIO}x baseline",
            passed=r is not None and r >= TARGET_RATIO,
        )
    )
    ra = ratio(applied_mbs, base_mbs)
    figs.append(
        Figure(
            NAME,
            "replication, until applied to replica",
            round(applied_mbs, 1),
            "MB/s",
            baseline=round(base_mbs, 1),
            ratio=None if ra is None else round(ra, 3),
        )
    )
    figs.append(
        Figure(
            NAME,
            "writes accepted by the agent (write phase)",
            round(mb_per_s(nbytes, float(load["write_seconds"])), 1),
            "MB/s",
        )
    )
    figs.append(Figure(NAME, "bytes written", round(nbytes / GIB, 2), "GiB"))
    figs.append(
        Figure(
            NAME, "wire compression (raw / sent)", round(nbytes / wire, 2) if wire else None, "x"
        )
    )
    for label, base_label in (("agent", "client"), ("ps", "server")):
        st = stats[label]
        rss = st.peak_rss_bytes / MIB
        figs.append(
            Figure(
                NAME,
                f"{label} peak RSS",
                round(rss, 1),
                "MiB",
                baseline=bp[base_label]["peak_rss_mib"],
                target=f"<= {TARGET_RSS_MIB} MiB",
                passed=rss <= TARGET_RSS_MIB,
            )
        )
        base_w = int(bp[base_label].get("storage_write_bytes") or 0) / max(1, int(base["bytes"]))
        figs.append(
            Figure(
                NAME,
                f"{label} storage writes / payload byte",
                round(st.write_bytes / nbytes, 2),
                "x",
                baseline=round(base_w, 2),
            )
        )
        cpu = cpu_seconds_per_gib(st.cpu_seconds, nbytes)
        base_cpu = cpu_seconds_per_gib(float(bp[base_label]["cpu_seconds"]), int(base["bytes"]))
        figs.append(
            Figure(
                NAME,
                f"{label} CPU",
                round(cpu, 2),
                "s/GiB",
                baseline=round(base_cpu, 2),
                ratio=None if base_cpu <= 0 else round(cpu / base_cpu, 2),
            )
        )
    figs.append(
        Figure(
            NAME,
            "all writes acknowledged by the PS",
            bool(load.get("drained")),
            target="yes",
            passed=bool(load.get("drained")),
            critical=True,
        )
    )
    overflow = (
        agent_row.get("state") == "resync-required"
        or bool(agent_row.get("resync_reason"))
        or int(agent_row.get("dirty_bytes") or 0) > 0
        or journaled * params.block < nbytes
    )
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
    figs.append(
        Figure(
            NAME,
            "replica == source",
            bool(verify["equal"]),
            target="yes",
            passed=bool(verify["equal"]),
            critical=True,
        )
    )
    return result


def main(argv: list[str] | None = None) -> int:
    """``tidemark-bench replication [options]`` (kept for callers of the first version)."""
    from benchmarks.cli import main as cli_main

    return cli_main(["replication", *(sys.argv[1:] if argv is None else argv)])
