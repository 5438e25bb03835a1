"""PNG plots for ``tidemark-bench`` (matplotlib, the optional ``plots`` extra).

matplotlib is imported lazily, inside each call, with the non-interactive ``Agg`` backend:
without it every function returns (or reports) :data:`NOT_AVAILABLE` instead of raising, so
a benchmark run never fails for want of a plotting library.

- :func:`rpo_over_time`: RPO of each sentinel against its acknowledgement time, one line per
  churn rate;
- :func:`rpo_vs_churn`: RPO percentiles (p50/p90/p99/max) against the churn rate;
- :func:`throughput_vs_block`: MB/s against the block size, one line per NBD server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

NOT_AVAILABLE = "not available (pip install tidemark[plots])"
DPI = 100
FLOOR = 1e-3  # seconds: the lowest value drawn on a log axis
SIZE = (8.0, 4.8)  # inches: 800 x 480 px, a few tens of KiB per PNG


def available() -> str | None:
    """None when matplotlib can be imported, else :data:`NOT_AVAILABLE`."""
    try:
        _pyplot()
    except ImportError:
        return NOT_AVAILABLE
    return None


def _pyplot() -> Any:
    import matplotlib  # optional dependency (the plots extra), imported on use

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.tight_layout()
    fig.savefig(
        tmp,
        format="png",
        dpi=DPI,
        metadata={"Software": None},
        pil_kwargs={"optimize": True},
    )
    os.replace(tmp, path)
    return str(path)


def _block_label(nbytes: float) -> str:
    n = int(nbytes)
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return str(n)


def rpo_over_time(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: Path,
    *,
    title: str = "RPO over time under load",
    ylabel: str = "RPO (s): write ack -> seen in replica file",
    limit: float | None = None,
) -> str:
    """One line per label: (seconds since the load started, RPO seconds) points; log y axis
    (values below 1 ms are drawn at 1 ms)."""
    try:
        plt = _pyplot()
    except ImportError:
        return NOT_AVAILABLE
    fig, ax = plt.subplots(figsize=SIZE)
    try:
        for label, points in series.items():
            pts = sorted(points)
            pts = [(x, max(y, FLOOR)) for x, y in pts]  # log scale: clamp tiny/negative lags
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=label)
        if limit is not None:
            ax.axhline(limit, color="grey", ls="--", lw=0.8, label=f"{limit:g} s")
        ax.set_xlabel("time since the load started (s)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        return _save(fig, path)
    finally:
        plt.close(fig)


def rpo_vs_churn(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    *,
    title: str = "RPO percentiles against churn",
    limits: Sequence[float] = (),
) -> str:
    """``rows``: per churn rate, ``{"rate": MB/s, "a": {...}, "b": {...}}`` where ``a``/``b``
    map ``p50``/``p90``/``p99``/``max`` to seconds (``a``: durable in the PS cache, ``b``:
    seen in the replica file). Log scale on y; ``limits`` are dashed horizontal lines."""
    try:
        plt = _pyplot()
    except ImportError:
        return NOT_AVAILABLE
    fig, ax = plt.subplots(figsize=SIZE)
    try:
        rates = [float(r["rate"]) for r in rows]
        colors = {"p50": "tab:blue", "p90": "tab:green", "p99": "tab:orange", "max": "tab:red"}
        for kind, style, what in (("b", "-", "applied (replica file)"), ("a", ":", "PS cache")):
            for pct, color in colors.items():
                ys = [(r.get(kind) or {}).get(pct) for r in rows]
                pts = [(x, y) for x, y in zip(rates, ys, strict=True) if y is not None and y > 0]
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        style,
                        marker="o",
                        ms=3,
                        color=color,
                        label=f"{pct} {what}",
                    )
        for limit in limits:
            ax.axhline(limit, color="grey", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("requested churn (MB/s of 4-64 KiB random writes)")
        ax.set_ylabel("RPO (s)")
        ax.set_title(title)
        ax.set_xticks(rates)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small", ncol=2)
        return _save(fig, path)
    finally:
        plt.close(fig)


def throughput_vs_block(
    series: Mapping[str, Sequence[tuple[int, float]]],
    path: Path,
    *,
    title: str = "Write throughput against block size (NBD)",
) -> str:
    """One line per label: (block size in bytes, MB/s) points; log2 x axis."""
    try:
        plt = _pyplot()
    except ImportError:
        return NOT_AVAILABLE
    fig, ax = plt.subplots(figsize=SIZE)
    try:
        sizes: set[int] = set()
        for label, points in series.items():
            pts = sorted(points)
            if pts:
                sizes.update(p[0] for p in pts)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        if sizes:
            ticks = sorted(sizes)
            ax.set_xticks(ticks)
            ax.set_xticklabels([_block_label(t) for t in ticks])
        ax.set_xlabel("block size")
        ax.set_ylabel("MB/s")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        return _save(fig, path)
    finally:
        plt.close(fig)


__all__ = [
    "NOT_AVAILABLE",
    "available",
    "rpo_over_time",
    "rpo_vs_churn",
    "throughput_vs_block",
]
