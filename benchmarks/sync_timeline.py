"""Where an initial sync's time goes, as a timeline (a diagnostic, like ``nbd_profile``).

Not a scenario with targets: the tool behind the initial-sync timelines in
``docs/benchmarks.md`` (``sync``). The ``sync`` scenario's initial-sync step
(``benchmarks.sync.tidemark_initial``: a fresh deployment, an image of half holes and half
2:1-compressible data, the agent started and timed until the replica is level and applied),
sampled every ``--interval`` seconds on the way:

- the agent's state, its resync progress (bytes done), journaled and acknowledged seqs;
- the process server's cached and applied seqs and its cache bytes;
- the bytes the device holding the deployment wrote and its busy time (``/proc/diskstats``).

One seq is one journal record (resync references are at most 1 MiB), so the distance
between two columns is the work queued between two stages: which stage sets the pace.
``--option KEY=VALUE`` adds agent settings (an experiment: ``compression_level=0``).
``--trace`` also has both services stamp every batch's stages (``common/stage_trace.py``)
and prints what ``benchmarks/stage_trace.py`` makes of them: per batch, the time from one
stage to the next, how busy the applier was, how long digest requests waited.

    python -m benchmarks.sync_timeline [--size-gib 4] [--interval 0.1] [--option K=V ...]
                                       [--trace] [--tmpdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from benchmarks import stage_trace
from benchmarks.sync import make_half_holes, tidemark_initial
from common.stage_trace import ENV as TRACE_ENV

COLUMNS = (
    "t",
    "state",
    "done_mib",
    "journaled",
    "acked",
    "cached",
    "applied",
    "cache_mib",
    "dev_written_mib",
    "dev_busy_ms",
)


def device_counters(path: Path) -> tuple[int, int]:
    """(MiB written, ms busy) so far of the block device holding ``path`` (0, 0 if unknown)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if int(fields[0]) == major and int(fields[1]) == minor:
                return int(fields[9]) * 512 >> 20, int(fields[12])
    return 0, 0


class Sampler:
    """``wait_level``'s ``on_sample`` for :func:`tidemark_initial`: one row per poll."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.samples: list[dict[str, Any]] = []
        self._start: tuple[float, int, int] | None = None

    def __call__(self, agent: dict[str, Any], ps: dict[str, Any] | None) -> None:
        written, busy = device_counters(self.root)
        if self._start is None:
            self._start = (time.monotonic(), written, busy)
        t0, written0, busy0 = self._start
        if ps is None:  # the disk is not registered at the process server yet
            return
        values = (
            round(time.monotonic() - t0, 2),
            agent["state"],
            int((agent.get("resync") or {}).get("done_bytes", 0)) >> 20,
            int(agent["journaled_seq"]),
            int(agent["acked_seq"]),
            int(ps["cached_seq"]),
            int(ps["applied_seq"]),
            int(ps.get("cache_bytes", 0)) >> 20,
            written - written0,
            busy - busy0,
        )
        self.samples.append(dict(zip(COLUMNS, values, strict=True)))


def timeline(
    root: Path,
    *,
    size_gib: int = 4,
    interval: float = 0.1,
    options: dict[str, Any] | None = None,
    seed: int = 11,
    trace: bool = False,
) -> dict[str, Any]:
    """One initial sync of a fresh half-holes image, sampled (with ``trace``, its stage
    stamps analysed too: ``trace`` in the result)."""
    root.mkdir(parents=True, exist_ok=True)
    image = root / "src.img"
    data = make_half_holes(image, size_gib << 30, seed)
    sampler = Sampler(root)
    trace_dir = root / "trace"
    previous = os.environ.pop(TRACE_ENV, None)
    if trace:  # the services inherit it (benchmarks.deploy.service_env)
        os.environ[TRACE_ENV] = str(trace_dir)
    try:
        dep, out = tidemark_initial(
            root / "d", image, "init0", {}, 600, options=options, poll=interval, on_sample=sampler
        )
    finally:
        os.environ.pop(TRACE_ENV, None)
        if previous is not None:
            os.environ[TRACE_ENV] = previous
    try:
        replica = dep.replica_path("init0")
    finally:
        dep.stop_all()
    traced = stage_trace.analyse(stage_trace.load(trace_dir)) if trace else None
    return {
        "params": {"size_gib": size_gib, "interval": interval, "options": options or {}},
        "data_bytes": data,
        "seconds": out["seconds"],
        "wire_bytes": out["wire_bytes"],
        "cpu_seconds": {k: v.get("cpu_seconds") for k, v in out["processes"].items()},
        "replica": str(replica),
        "source": str(image),
        "samples": sampler.samples,
        **({"trace": traced} if traced is not None else {}),
    }


def render(result: dict[str, Any], every: int = 1) -> str:
    lines = [
        f"initial sync of {result['params']['size_gib']} GiB (data {result['data_bytes'] >> 20}"
        f" MiB): {result['seconds']} s, wire {result['wire_bytes'] >> 20} MiB, CPU-s "
        + ", ".join(f"{k} {v}" for k, v in result["cpu_seconds"].items()),
        "  ".join(f"{c:>9}" for c in COLUMNS),
    ]
    samples = result["samples"]
    for i, row in enumerate(samples):
        if i % every == 0 or i == len(samples) - 1:
            lines.append("  ".join(f"{row[c]!s:>9}" for c in COLUMNS))
    if "trace" in result:
        lines.append(stage_trace.render(result["trace"]))
    return "\n".join(lines)


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value  # a bare string


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sync_timeline", description=__doc__)
    ap.add_argument("--size-gib", type=int, default=4)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--trace", action="store_true", help="stamp and analyse every batch's stages")
    ap.add_argument("--tmpdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args(argv)
    if args.size_gib < 1 or args.interval <= 0:
        ap.error("--size-gib must be at least 1 and --interval positive")
    with tempfile.TemporaryDirectory(prefix="tl-", dir=args.tmpdir) as tmp:
        result = timeline(
            Path(tmp),
            size_gib=args.size_gib,
            interval=args.interval,
            options=dict(args.option),
            trace=args.trace,
        )
    print(render(result, every=max(1, int(0.5 / args.interval))))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
