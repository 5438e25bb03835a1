"""Alternating runs of an initial sync's copy under two or more variants (a diagnostic).

Why: on the shared 2-core VM the machine's pace for CPU-heavy work moves by the minute, so
one run of each version says nothing: the same code's copy of the ``sync`` image spread over
2.0-3.3 s in one hour, and ten alternating pairs of it against itself gave medians 13%
apart (docs/benchmarks.md, "sync"). This runs the variants in turns, the
order of each pair alternating, and reports each variant's sorted times, median and mean,
its mean CPU-s per service, and against the first variant how many pairs it won with a
two-sided sign test: what the "alternating pairs" in docs/benchmarks.md are.

A variant is ``NAME=REV``: a git revision of this repository (exported with ``git archive``
into a temporary directory and byte-compiled), ``.``, the working tree as it is, or the path
of another tree (with a ``/``: a throwaway copy holding an experiment), plus agent settings
(``--option NAME:KEY=VALUE``). The services of a run import the variant's
code (``PYTHONPATH``, and ``PYTHONSAFEPATH`` so that no current directory comes first); the
harness is this tree's. Each run is :func:`benchmarks.sync.tidemark_initial` on one image
(half holes and half 2:1-compressible data, or ``--random`` bytes), timed from starting the
agent until the replica is level and applied, with the machine's busy, idle and steal
seconds (``/proc/stat``) from the clock's start until the run's figures are in (a few
tens of ms more); every replica is compared with its source.

    python -m benchmarks.sync_ab --variant base=HEAD --variant new=. [--pairs 10]
        [--option new:compression_fast_level=-50] [--size-mib 4096] [--random]
        [--tmpdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.deploy import compile_packages
from benchmarks.sync import INIT_DISK, make_half_holes, make_random, same, tidemark_initial
from benchmarks.sync_timeline import _option

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 300.0  # seconds for one copy to be level


@dataclass
class Variant:
    name: str
    rev: str  # a git revision, "." for the working tree, or the path of another tree
    options: dict[str, Any] = field(default_factory=dict)
    tree: Path = REPO  # where its code is (set up by prepare)


def parse_variant(text: str) -> Variant:
    name, sep, rev = text.partition("=")
    if not sep or not name.isidentifier() or not rev:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=REV (REV a git revision, . or a tree's path)"
        )
    return Variant(name, rev)


def parse_variant_option(text: str) -> tuple[str, str, Any]:
    name, sep, setting = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:KEY=VALUE")
    key, value = _option(setting)
    return name, key, value


def prepare(variant: Variant, workdir: Path) -> None:
    """Put the variant's code in a tree of its own (``git archive``), byte-compiled as an
    installed package would be. ``.`` is this tree; a path to a directory (it has a ``/``)
    is a tree of its own, used as it is (a throwaway copy with an experiment in it)."""
    if variant.rev == ".":
        variant.tree = REPO
        return
    if os.sep in variant.rev and Path(variant.rev).is_dir():  # a tree of its own, as it is
        tree = Path(variant.rev).resolve()
        if not (tree / "agent" / "cli.py").is_file():
            raise SystemExit(f"{variant.rev}: not a tidemark tree (no agent/cli.py)")
        compile_packages(tree)
        variant.tree = tree
        return
    tree = workdir / f"tree-{variant.name}"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", variant.rev],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"git archive {variant.rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    compile_packages(tree)
    variant.tree = tree


def cpu_times() -> tuple[float, float, float]:
    """(busy, idle + iowait, steal) seconds of the whole machine so far (``/proc/stat``)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq, t.idle + t.iowait, t.steal


@contextlib.contextmanager
def code_of(variant: Variant) -> Iterator[None]:
    """The services started meanwhile import ``variant``'s code."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONSAFEPATH")}
    os.environ["PYTHONPATH"] = str(variant.tree)
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def one_run(variant: Variant, root: Path, image: Path) -> dict[str, Any]:
    """One initial sync of ``image`` by ``variant``'s services; its replica compared."""
    window: list[tuple[float, float, float]] = []
    with code_of(variant):
        dep, tm = tidemark_initial(
            root,
            image,
            INIT_DISK,
            {},
            RUN_TIMEOUT,
            options=variant.options or None,
            on_start=lambda: window.append(cpu_times()),
        )
    window.append(cpu_times())
    try:
        equal = same(image, dep.replica_path(INIT_DISK))
    finally:
        dep.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    (busy0, idle0, steal0), (busy1, idle1, steal1) = window
    procs = tm["processes"]
    return {
        "variant": variant.name,
        "seconds": tm["seconds"],
        "agent_cpu": procs["agent"].get("cpu_seconds"),
        "ps_cpu": procs["ps"].get("cpu_seconds"),
        "machine_busy": round(busy1 - busy0, 2),
        "machine_idle": round(idle1 - idle0, 2),
        "machine_steal": round(steal1 - steal0, 2),
        "equal": equal,
    }


def sign_test(wins: int, losses: int) -> float:
    """Two-sided p of ``wins`` against ``losses`` (ties left out) if either were as likely."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(max(wins, losses), n + 1)) / 2**n
    return min(1.0, 2 * tail)


def summary(variants: list[Variant], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: times, median, mean, mean CPU-s; against the first: pairs won, sign test."""
    by_name = {v.name: [r for r in runs if r["variant"] == v.name] for v in variants}
    out: dict[str, Any] = {}
    base = by_name[variants[0].name]
    for v in variants:
        mine = by_name[v.name]
        seconds = [r["seconds"] for r in mine]
        row: dict[str, Any] = {
            "rev": v.rev,
            "options": v.options,
            "seconds": sorted(seconds),
            "median": round(statistics.median(seconds), 3) if seconds else None,
            "mean": round(statistics.mean(seconds), 3) if seconds else None,
        }
        for key in ("agent_cpu", "ps_cpu", "machine_idle"):
            values = [r[key] for r in mine if r[key] is not None]
            row[f"{key}_mean"] = round(statistics.mean(values), 3) if values else None
        if v is not variants[0]:
            pairs = list(zip(base, mine, strict=False))
            wins = sum(1 for b, m in pairs if m["seconds"] < b["seconds"])
            losses = sum(1 for b, m in pairs if m["seconds"] > b["seconds"])
            row["against"] = variants[0].name
            row["pairs_won"] = wins
            row["pairs_lost"] = losses
            row["sign_test_p"] = round(sign_test(wins, losses), 3)
        out[v.name] = row
    return out


def render(result: dict[str, Any]) -> str:
    lines = []
    for name, row in result["summary"].items():
        options = " ".join(f"{k}={v}" for k, v in row["options"].items())
        lines.append(
            f"{name} ({row['rev']}{' ' + options if options else ''}): median {row['median']} s,"
            f" mean {row['mean']} s, CPU-s agent {row['agent_cpu_mean']} / process server"
            f" {row['ps_cpu_mean']}, machine idle {row['machine_idle_mean']} s"
        )
        lines.append("  times: " + ", ".join(f"{s:.2f}" for s in row["seconds"]))
        if "against" in row:
            lines.append(
                f"  against {row['against']}: won {row['pairs_won']}, lost {row['pairs_lost']}"
                f" (sign test p = {row['sign_test_p']})"
            )
    if not result["all_equal"]:
        lines.append("A REPLICA DIFFERED FROM ITS SOURCE")
    return "\n".join(lines)


def compare(
    variants: list[Variant], pairs: int, size: int, random_data: bool, workdir: Path
) -> dict[str, Any]:
    for variant in variants:
        prepare(variant, workdir)
    image = workdir / "src.img"
    if random_data:
        make_random(image, size, seed=7)
    else:
        make_half_holes(image, size, seed=11)
    runs: list[dict[str, Any]] = []
    for i in range(pairs):
        order = variants if i % 2 == 0 else variants[::-1]
        for variant in order:
            run = one_run(variant, workdir / f"run-{len(runs)}", image)
            run["pair"] = i
            runs.append(run)
            print(
                f"pair {i + 1}/{pairs} {variant.name}: {run['seconds']:.2f} s, CPU-s agent"
                f" {run['agent_cpu']} / ps {run['ps_cpu']}, machine idle {run['machine_idle']}"
                f" steal {run['machine_steal']}{'' if run['equal'] else ', REPLICA DIFFERS'}",
                flush=True,
            )
    return {
        "size": size,
        "data": "random" if random_data else "half holes, 2:1 compressible",
        "pairs": pairs,
        "runs": runs,
        "summary": summary(variants, runs),
        "all_equal": all(r["equal"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sync_ab", description=__doc__)
    ap.add_argument("--variant", type=parse_variant, action="append", required=True)
    ap.add_argument(
        "--option", type=parse_variant_option, action="append", default=[], metavar="NAME:K=V"
    )
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--size-mib", type=int, default=4096)
    ap.add_argument("--random", action="store_true", help="random bytes, no holes")
    ap.add_argument("--tmpdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args(argv)
    variants: list[Variant] = args.variant
    names = [v.name for v in variants]
    if len(variants) < 2 or len(set(names)) != len(names):
        ap.error("give at least two --variant, each with a name of its own")
    if args.pairs < 1 or args.size_mib < 16 or args.size_mib % 2:
        ap.error("--pairs must be at least 1 and --size-mib an even number from 16")
    for name, key, value in args.option:
        if name not in names:
            ap.error(f"--option {name}:{key}: no variant named {name!r}")
        variants[names.index(name)].options[key] = value
    with tempfile.TemporaryDirectory(prefix="ab-", dir=args.tmpdir) as tmp:
        result = compare(variants, args.pairs, args.size_mib << 20, args.random, Path(tmp))
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
