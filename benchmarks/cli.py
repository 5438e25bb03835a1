"""``tidemark-bench``: the benchmark harness.

    tidemark-bench                      every scenario, full length
    tidemark-bench --quick              every scenario, short form (5 s, 1 GiB disks)
    tidemark-bench replication [--seconds N] [--disk-size 4GiB] [--json FILE]
    tidemark-bench --list

Each scenario is a module with ``NAME``, ``SUMMARY`` and ``run(Params) -> ScenarioResult``,
registered in :data:`SCENARIOS` (imported lazily, so one broken scenario does not stop the
others from being listed). Exit code: 0 when every scenario ran and its correctness checks
held, 1 when one FAILED (an error, or e.g. a replica that differs from its source) — or, with
``--strict``, when a performance target was missed too; 2 on usage errors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.deploy import compile_packages
from benchmarks.metrics import GIB, MIB, Figure, Params, ScenarioResult, machine_info
from common.units import duration_option

SCENARIOS: dict[str, str] = {
    "replication": "benchmarks.replication",
    "nbd": "benchmarks.nbd_front",
    "sync": "benchmarks.sync",
    "rpo": "benchmarks.rpo",
    "rto": "benchmarks.rto",
    "failback": "benchmarks.failback",
    "soak": "benchmarks.soak",
}
"""Scenario name -> module path."""

FULL_SECONDS = 30.0
QUICK_SECONDS = 5.0
FULL_DISK = 4 * GIB
QUICK_DISK = 1 * GIB


def _load(name: str) -> ModuleType:
    return importlib.import_module(SCENARIOS[name])


def _size(text: str) -> int:
    from common.units import parse_size

    try:
        n = parse_size(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if n < 64 * MIB or n % MIB:
        raise argparse.ArgumentTypeError("disk size must be a whole number of MiB, at least 64MiB")
    return n


def _seconds(text: str) -> float:
    try:
        n = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.5 <= n <= 24 * 3600:
        raise argparse.ArgumentTypeError("seconds must be between 0.5 and 86400")
    return n


def _executable(text: str) -> Path:
    path = Path(text)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise argparse.ArgumentTypeError(f"not an executable file: {text}")
    return path.resolve()


def _rates(text: str) -> str:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of MB/s: {text!r}") from None
    if not rates or any(not 0 < r <= 10_000 for r in rates):
        raise argparse.ArgumentTypeError("rates must be in (0, 10000] MB/s")
    return ",".join(f"{r:g}" for r in rates)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tidemark-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scenario",
        nargs="?",
        default="all",
        choices=[*SCENARIOS, "all"],
        help="scenario to run (default: all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"short form: {QUICK_SECONDS:g} s, {QUICK_DISK // GIB} GiB disk (unless given)",
    )
    p.add_argument(
        "--seconds",
        type=_seconds,
        default=None,
        help=f"how long to write (default {FULL_SECONDS:g}, {QUICK_SECONDS:g} with --quick)",
    )
    p.add_argument(
        "--disk-size",
        type=_size,
        default=None,
        help="protected disk size, e.g. 4GiB (default 4GiB, 1GiB with --quick)",
    )
    p.add_argument(
        "--journal-quota",
        type=_size,
        default=None,
        help="agent journal quota (default: large enough that the journal never overflows)",
    )
    p.add_argument(
        "--json", type=Path, default=None, metavar="FILE", help="write every figure to FILE"
    )
    p.add_argument(
        "--tmpdir",
        type=Path,
        default=None,
        help="where the temporary deployment lives (default: $TMPDIR); removed at the end",
    )
    p.add_argument(
        "--strict", action="store_true", help="exit 1 when a performance target is missed"
    )
    p.add_argument(
        "--bdsync",
        type=_executable,
        default=None,
        metavar="PATH",
        help="sync: the bdsync binary for the resync baseline (default: $TIDEMARK_BENCH_BDSYNC, "
        "else bdsync on PATH, else reported 'not available')",
    )
    p.add_argument(
        "--rates",
        type=_rates,
        default=None,
        metavar="MB/S,...",
        help="rpo: churn rates in MB/s (default 10,50,100,150,200; 10,50 with --quick)",
    )
    p.add_argument(
        "--plots",
        type=Path,
        default=None,
        metavar="DIR",
        help="rpo: write PNG plots to DIR (needs matplotlib: pip install tidemark[plots]); "
        "a full run with --json FILE and no --plots writes them to FILE's stem + '-plots'",
    )
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="FILE",
        help="rpo: take the throughput-vs-block-size plot from this nbd (or rpo) JSON "
        "instead of measuring a short sweep",
    )
    p.add_argument(
        "--duration",
        type=duration_option(
            lambda s: 30 <= s <= 7 * 86400, "duration must be between 30s and 7 days"
        ),
        default=None,
        metavar="D",
        help="soak: how long to run (seconds, or 30s / 10m / 1h); sets --seconds "
        "(the soak runs at least 30 s)",
    )
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return p


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def format_table(results: list[ScenarioResult]) -> str:
    headers = ["scenario", "figure", "value", "unit", "baseline", "ratio", "target", "result"]
    rows: list[list[str]] = []
    for res in results:
        figs: list[Figure] = res.figures
        for f in figs:
            verdict = (
                ""
                if f.passed is None
                else ("pass" if f.passed else ("FAILED" if f.critical else "fail"))
            )
            rows.append(
                [
                    f.scenario,
                    f.name,
                    _fmt(f.value),
                    f.unit,
                    _fmt(f.baseline),
                    "-" if f.ratio is None else f"{f.ratio:.2f}x",
                    f.target or "-",
                    verdict,
                ]
            )
        if res.error:
            rows.append([res.scenario, "error", res.error, "", "", "", "", "FAILED"])
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    right = {2, 4, 5}
    lines = [
        "  ".join(
            h.rjust(w) if i in right else h.ljust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            "  ".join(
                v.rjust(w) if i in right else v.ljust(w)
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
    return "\n".join(lines)


def compile_bytecode() -> None:
    """Byte-compile tidemark's packages as ``scripts/bootstrap`` does (each .pyc checked
    against its source's hash). Without it, a module edited since the bootstrap is compiled
    from source in every agent the benchmarks start when ``PYTHONDONTWRITEBYTECODE`` is set,
    and the initial sync's clock counts the agent's start (six modules: ~12 ms, measured
    2026-12-07). Where the tree is not writable, nothing changes."""
    compile_packages(Path(__file__).resolve().parent.parent)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.list:
        for name in SCENARIOS:
            try:
                summary = _load(name).SUMMARY
            except Exception as exc:  # a broken scenario must not hide the others
                summary = f"(cannot load: {exc})"
            print(f"{name:14} {summary}")
        return 0
    params = Params(
        seconds=args.duration
        if args.duration is not None  # soak: --duration 10m is its --seconds
        else args.seconds
        if args.seconds is not None
        else (QUICK_SECONDS if args.quick else FULL_SECONDS),
        disk_size=args.disk_size
        if args.disk_size is not None
        else (QUICK_DISK if args.quick else FULL_DISK),
        quick=args.quick,
        tmpdir=args.tmpdir,
        journal_quota=args.journal_quota,
    )
    if args.bdsync is not None:  # read by benchmarks.sync (and its child processes)
        os.environ["TIDEMARK_BENCH_BDSYNC"] = str(args.bdsync)
    # read by benchmarks.rpo
    if args.rates is not None:
        os.environ["TIDEMARK_BENCH_RPO_RATES"] = args.rates
    plots_dir = args.plots
    if plots_dir is None and args.json is not None and not args.quick:
        plots_dir = args.json.with_name(args.json.stem + "-plots")
    if plots_dir is not None:
        os.environ["TIDEMARK_BENCH_PLOTS"] = str(plots_dir.resolve())
    if args.from_json is not None:
        if not args.from_json.is_file():
            print(f"tidemark-bench: --from-json: no such file: {args.from_json}", file=sys.stderr)
            return 2
        os.environ["TIDEMARK_BENCH_FROM_JSON"] = str(args.from_json.resolve())
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    compile_bytecode()
    started = dt.datetime.now(dt.UTC)
    results: list[ScenarioResult] = []
    for name in names:
        print(
            f"# {name}: {params.seconds:g} s, disk {params.disk_size / GIB:g} GiB ...",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.monotonic()
        try:
            res = _load(name).run(params)
        except Exception as exc:
            res = ScenarioResult(name, error=f"{type(exc).__name__}: {exc}")
            res.details["traceback"] = traceback.format_exc()
        res.details["wall_seconds"] = round(time.monotonic() - t0, 2)
        results.append(res)

    print(format_table(results))
    failed = [r.scenario for r in results if r.failed]
    missed = [r.scenario for r in results if not r.failed and not r.targets_met]
    status = "FAILED" if failed else ("targets missed" if missed else "ok")
    print(f"\nstatus: {status}" + (f" ({', '.join(failed or missed)})" if failed or missed else ""))
    if args.json is not None:
        doc = {
            "tool": "tidemark-bench",
            "started_at": started.isoformat(timespec="seconds"),
            "command": shlex.join(["tidemark-bench", *argv]),
            "cwd": os.getcwd(),
            "params": {
                "scenarios": names,
                "seconds": params.seconds,
                "disk_size": params.disk_size,
                "block": params.block,
                "quick": params.quick,
                "journal_quota": params.journal_quota,
            },
            "machine": machine_info(),
            "status": status,
            "results": [r.as_dict() for r in results],
        }
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        os.replace(tmp, args.json)
    if failed or (args.strict and missed):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
