"""Shared command-line plumbing: logging fit for journald, the event loop, signals, status tables.

Rule: exit code 0 on success, 1 on failure, 2 on usage errors (argparse); a
TidemarkError becomes one ``error: ...`` line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from common.admin import admin_request
from common.units import format_size


def setup_logging(level: str = "INFO") -> None:
    """One line per event, ``key=value`` after the logger name; journald adds the time."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def bound_heap() -> None:
    """Tune glibc's allocator for a process that moves multi-MiB buffers all day.

    - Buffers up to 8 MiB (batches, frames, journal and cache reads: a few MiB each) come
      from the heap and are reused. Above the mmap threshold every buffer is fresh memory,
      page-faulted in and unmapped again: on a VM where a fault costs ~3.4 us per 4 KiB
      page that was ~45% of the process server's CPU in an initial sync (perf), and the
      sync took 1.8x as long. Larger buffers (32 MiB NBD writes) are still mapped and
      returned at once, so memory stays bounded under QD128 x 32 MiB.
    - The threshold is fixed: glibc otherwise raises it after each large free (up to
      32 MiB) and the process keeps its peak as RSS.
    - Up to 64 MiB of free heap top is kept (giving it back and faulting it in again is
      the same churn); two arenas, not one per thread, so worker threads do not each keep
      their own (peak RSS of the process server in an initial sync: 214 MiB with two,
      300 MiB with the default)."""
    try:
        libc = ctypes.CDLL(None)  # the C library Python runs on (find_library: ~2 ms)
        libc.mallopt(M_MMAP_THRESHOLD, 8 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
        libc.mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop when installed, else the default asyncio loop."""
    bound_heap()
    try:
        import uvloop

        return uvloop.run(main)
    except ImportError:
        return asyncio.run(main)


async def run_until_signal(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Start a service, wait for SIGTERM or SIGINT, stop it."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await start()
    try:
        await stopping.wait()
    finally:
        await stop()


async def query_status(socket_path: Path) -> dict[str, Any] | None:
    """Ask a running service for its status; None when it is not running."""
    try:
        reply = await admin_request(socket_path, {"cmd": "status"}, timeout=10)
    except (TimeoutError, OSError, ValueError):
        return None
    return reply if reply.get("ok") else None


class ProgressBar:
    """A tqdm bar (rate, ETA) fed with the ``resync`` progress object of a status row;
    created on the first report that has a total, so nothing is drawn for instant work."""

    def __init__(self, disk_id: str, *, show: bool) -> None:
        self.disk_id = disk_id
        self.show = show
        self._bar: Any = None

    def update(self, progress: dict[str, Any] | None) -> None:
        progress = progress or {}
        if not self.show or not progress.get("total_bytes"):
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=progress["total_bytes"],
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"{progress.get('phase', 'sync')} {self.disk_id}",
            )
        self._bar.update(progress.get("done_bytes", 0) - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_with_progress(
    socket_path: Path,
    request: dict[str, Any],
    disk_id: str,
    *,
    show: bool,
    status_socket: Path | None = None,
) -> dict[str, Any]:
    """Send a long admin request (verify, resync) and, on a terminal, draw a progress bar with
    rate and ETA from the ``resync`` progress the service reports in its status."""
    task = asyncio.ensure_future(admin_request(socket_path, request, timeout=7 * 86400))
    bar = ProgressBar(disk_id, show=show)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not show or task.done():
                continue
            status = await query_status(status_socket or socket_path)
            row = next(
                (d for d in (status or {}).get("disks", []) if d.get("disk") == disk_id), None
            )
            bar.update((row or {}).get("resync"))
        return task.result()
    finally:
        bar.close()
        if not task.done():
            task.cancel()


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key in {"lag_bytes", "journal_bytes", "cache_bytes", "size"} and isinstance(value, int):
        return format_size(value)
    if key == "rpo_seconds" and isinstance(value, int | float):
        return f"{value:.2f}s"
    return str(value)


def print_disk_table(disks: list[dict[str, Any]], columns: list[str]) -> None:
    """A readable fixed-width table of per-disk status rows."""
    rows = [[_fmt(d.get(c), c) for c in columns] for d in disks]
    headers = [c.replace("_", " ") for c in columns]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    if not rows:
        print("(no disks)")
