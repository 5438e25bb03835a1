"""Reads the stage stamps of ``common/stage_trace.py``: how long batches spent between two
stages, how busy the applier was, how long the resync's digest requests waited, and whether
the stamps keep the pipeline's rules (no ACK before the cache is durable, nothing applied
before it is durable). A diagnostic for one replicated disk at a time.

    python -m benchmarks.stage_trace DIR      # the directory TIDEMARK_STAGE_TRACE named

``python -m benchmarks.sync_timeline --trace`` sets the variable and prints this analysis
after the timeline.
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

Stamp = tuple[int, int, int]  # (monotonic ns, seq, value)

# Stamped once per batch, with the batch's last seq.
PER_BATCH = ("built", "sent", "received", "cached")
# Stamped with a seq up to which everything is done (a batch is there at the first stamp
# whose seq reaches its own).
UP_TO = ("durable", "acked", "applied")
LEGS = (
    ("built", "sent"),
    ("sent", "received"),
    ("received", "cached"),
    ("cached", "durable"),
    ("durable", "acked"),
    ("cached", "applied"),
    ("built", "applied"),
)


def load(directory: Path) -> dict[str, list[Stamp]]:
    """Every stamp of every ``*.trace`` file in ``directory``, by stage, in time order.
    Raises ValueError on a line that is not ``ns stage seq value``, OSError when the
    directory cannot be read."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    stages: dict[str, list[Stamp]] = defaultdict(list)
    for path in sorted(directory.glob("*.trace")):
        with open(path) as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if len(fields) != 4:
                    raise ValueError(f"{path}:{number}: expected 'ns stage seq value'")
                ns, stage, seq, value = fields
                stages[stage].append((int(ns), int(seq), int(value)))
    for stamps in stages.values():
        stamps.sort()
    return dict(stages)


def _first(stamps: list[Stamp]) -> dict[int, int]:
    """seq -> its first stamp (a batch sent again after a reconnection counts once)."""
    out: dict[int, int] = {}
    for ns, seq, _ in stamps:
        out.setdefault(seq, ns)
    return out


class _UpTo:
    """When a stage first reached a seq: its stamps' seqs, kept as a running maximum."""

    def __init__(self, stamps: list[Stamp]) -> None:
        self.times: list[int] = []
        self.seqs: list[int] = []
        top = -1
        for ns, seq, _ in stamps:
            if seq > top:
                top = seq
                self.times.append(ns)
                self.seqs.append(seq)

    def at(self, seq: int) -> int | None:
        i = bisect.bisect_left(self.seqs, seq)
        return self.times[i] if i < len(self.seqs) else None


def _summary(values_ns: list[int]) -> dict[str, float | int]:
    ms = sorted(v / 1e6 for v in values_ns)
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "mean_ms": round(statistics.fmean(ms), 2),
        "p50_ms": round(ms[len(ms) // 2], 2),
        "p90_ms": round(ms[int(len(ms) * 0.9)], 2),
        "max_ms": round(ms[-1], 2),
    }


def _applier_busy(started: list[Stamp], applied: list[Stamp]) -> tuple[int, int, int]:
    """(ns busy, groups, ns from the first start to the last end): each start paired with
    the first ``applied`` after it and before the next start (a group that failed has none)."""
    busy = groups = j = 0
    for k, (ns, _, _) in enumerate(started):
        next_start = started[k + 1][0] if k + 1 < len(started) else None
        while j < len(applied) and applied[j][0] < ns:
            j += 1
        if j < len(applied) and (next_start is None or applied[j][0] < next_start):
            busy += applied[j][0] - ns
            groups += 1
            j += 1
    span = applied[-1][0] - started[0][0] if started and applied else 0
    return busy, groups, span


def analyse(stages: dict[str, list[Stamp]]) -> dict[str, Any]:
    """Latencies between stages, applier busy time, digest waits and rule violations."""
    per_batch = {stage: _first(stages.get(stage, [])) for stage in PER_BATCH}
    up_to = {stage: _UpTo(stages.get(stage, [])) for stage in UP_TO}
    batches = sorted(per_batch["built"] or per_batch["cached"])

    def when(stage: str, seq: int) -> int | None:
        if stage in per_batch:
            return per_batch[stage].get(seq)
        return up_to[stage].at(seq)

    legs: dict[str, dict[str, float | int]] = {}
    for a, b in LEGS:
        spans = []
        for seq in batches:
            start, end = when(a, seq), when(b, seq)
            if start is not None and end is not None:
                spans.append(end - start)
        legs[f"{a} -> {b}"] = _summary(spans)

    violations = []
    for seq in sorted(per_batch["cached"]):
        durable = up_to["durable"].at(seq)
        for stage in ("acked", "applied"):
            done = up_to[stage].at(seq)
            if done is not None and durable is not None and done < durable:
                violations.append(f"seq {seq}: {stage} before the cache was durable")

    busy, groups, span = _applier_busy(stages.get("apply_started", []), stages.get("applied", []))

    asked = {}
    waits = []
    for ns, offset, _ in stages.get("digests_asked", []):
        asked[offset] = ns
    for ns, offset, _ in stages.get("digests_got", []):
        if offset in asked:
            waits.append(ns - asked.pop(offset))
    return {
        "batches": len(batches),
        "legs": legs,
        "applier": {
            "groups": groups,
            "busy_s": round(busy / 1e9, 3),
            "span_s": round(span / 1e9, 3),
            "busy_fraction": round(busy / span, 3) if span else None,
        },
        "digest_requests": _summary(waits),
        "violations": violations,
    }


def render(result: dict[str, Any]) -> str:
    lines = [f"{result['batches']} batches; per batch, from one stage to the next:"]
    lines.append(f"  {'leg':<22} {'n':>6} {'mean ms':>9} {'p50 ms':>9} {'p90 ms':>9} {'max ms':>9}")
    for name, s in result["legs"].items():
        if s["n"]:
            lines.append(
                f"  {name:<22} {s['n']:>6} {s['mean_ms']:>9} {s['p50_ms']:>9} {s['p90_ms']:>9}"
                f" {s['max_ms']:>9}"
            )
    a = result["applier"]
    lines.append(
        f"applier: {a['groups']} groups, busy {a['busy_s']} s of {a['span_s']} s"
        f" ({a['busy_fraction']})"
    )
    d = result["digest_requests"]
    if d["n"]:
        lines.append(f"digest requests: {d['n']}, waited mean {d['mean_ms']} ms, p90 {d['p90_ms']}")
    lines.append(f"rule violations: {len(result['violations'])}")
    lines.extend(f"  {v}" for v in result["violations"][:20])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stage_trace", description=__doc__)
    ap.add_argument("directory", type=Path)
    args = ap.parse_args(argv)
    try:
        result = analyse(load(args.directory))
    except (OSError, ValueError) as exc:
        print(f"stage_trace: {exc}", file=sys.stderr)
        return 1
    print(render(result))
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
