"""Measurement and report primitives shared by every ``tidemark-bench`` scenario.

- :class:`ProcessSampler` samples the RSS and CPU time of a few pids in a background
  thread (psutil) and reads the kernel's own high-water mark (``VmHWM``) on Linux, so a
  short peak between two samples is not missed.
- :func:`mb_per_s` and friends: units are decimal, 1 MB = 10**6 bytes; sizes in MiB/GiB.
- :class:`Figure` / :class:`ScenarioResult` / :class:`Params`: what a scenario returns and
  takes, so the CLI can print one table and one JSON document for any scenario.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

MB = 1_000_000
MIB = 1 << 20
GIB = 1 << 30


def mb_per_s(nbytes: int, seconds: float) -> float:
    """Throughput in MB/s (10**6 bytes per second); 0 when ``seconds`` is not positive."""
    return nbytes / MB / seconds if seconds > 0 else 0.0


def cpu_seconds_per_gib(cpu_seconds: float, nbytes: int) -> float:
    """CPU seconds spent per GiB of payload moved."""
    return cpu_seconds / (nbytes / GIB) if nbytes > 0 else 0.0


def ratio(value: float, baseline: float) -> float | None:
    return value / baseline if baseline > 0 else None


def _vm_hwm_bytes(pid: int) -> int | None:
    """Peak resident set size as the kernel recorded it (Linux ``VmHWM``), or None."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class ProcessStats:
    """What was seen of one process between :meth:`ProcessSampler.start` and ``stop``."""

    label: str
    pid: int
    peak_rss_bytes: int = 0  # max(sampled RSS, kernel VmHWM)
    sampled_peak_rss_bytes: int = 0
    samples: int = 0
    cpu_start: float | None = None  # user + system seconds
    cpu_end: float | None = None
    write_bytes_start: int | None = None  # storage-layer bytes written (/proc/PID/io)
    write_bytes_end: int | None = None

    @property
    def write_bytes(self) -> int:
        if self.write_bytes_start is None or self.write_bytes_end is None:
            return 0
        return max(0, self.write_bytes_end - self.write_bytes_start)

    @property
    def cpu_measured(self) -> bool:
        """False when the CPU time could not be read at the start or the end (the process
        was gone, or not ours to read): ``cpu_seconds`` is then 0, not a measurement."""
        return self.cpu_start is not None and self.cpu_end is not None

    @property
    def cpu_seconds(self) -> float:
        if self.cpu_start is None or self.cpu_end is None:  # (not cpu_measured)
            return 0.0
        return max(0.0, self.cpu_end - self.cpu_start)

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "pid": self.pid,
            "peak_rss_mib": round(self.peak_rss_bytes / MIB, 1),
            "sampled_peak_rss_mib": round(self.sampled_peak_rss_bytes / MIB, 1),
            "samples": self.samples,
            "cpu_seconds": round(self.cpu_seconds, 3),
            "cpu_measured": self.cpu_measured,
            "storage_write_bytes": self.write_bytes,
        }


class ProcessSampler:
    """Samples RSS and CPU time of labelled pids every ``interval`` seconds in a thread.

    ``stop()`` takes the final CPU time and the kernel's RSS high-water mark, so call it
    while the processes are still alive (before asking them to quit).
    """

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.stats = {label: ProcessStats(label, pid) for label, pid in pids.items()}
        self._procs = {label: psutil.Process(pid) for label, pid in pids.items()}
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _cpu(self, label: str) -> float | None:
        with contextlib.suppress(psutil.Error):
            t = self._procs[label].cpu_times()
            return float(t.user + t.system)
        return None

    def _write_bytes(self, label: str) -> int | None:
        with contextlib.suppress(psutil.Error, AttributeError):
            return int(self._procs[label].io_counters().write_bytes)
        return None

    def _sample(self) -> None:
        for label, proc in self._procs.items():
            with contextlib.suppress(psutil.Error):
                rss = int(proc.memory_info().rss)
                st = self.stats[label]
                st.samples += 1
                st.sampled_peak_rss_bytes = max(st.sampled_peak_rss_bytes, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> ProcessSampler:
        for label, st in self.stats.items():
            st.cpu_start = self._cpu(label)
            st.write_bytes_start = self._write_bytes(label)
        self._sample()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, ProcessStats]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()
        for label, st in self.stats.items():
            st.cpu_end = self._cpu(label)
            st.write_bytes_end = self._write_bytes(label)
            hwm = _vm_hwm_bytes(st.pid) or 0
            st.peak_rss_bytes = max(st.sampled_peak_rss_bytes, hwm)
        return self.stats

    def __enter__(self) -> ProcessSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self.stop()


def machine_info() -> dict[str, Any]:
    """Where the figures were taken."""
    mem = psutil.virtual_memory()
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(mem.total / GIB, 1),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    with contextlib.suppress(OSError):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    try:
        import ssl

        info["openssl"] = ssl.OPENSSL_VERSION
    except ImportError:  # pragma: no cover
        pass
    return info


# --------------------------------------------------------------------------- report model


@dataclass
class Params:
    """What every scenario is given (the CLI fills it from its options)."""

    seconds: float = 30.0
    disk_size: int = 4 * GIB
    block: int = MIB
    quick: bool = False
    tmpdir: Path | None = None
    journal_quota: int | None = None  # agent journal quota; None: large enough not to overflow


@dataclass
class Figure:
    """One row of the results table.

    ``target`` is a human-readable goal (``">= 0.7x baseline"``); ``passed`` is None when the
    figure has no target. ``critical`` marks correctness figures: one that failed makes the
    whole run FAILED (exit code 1), whatever the throughput.
    """

    scenario: str
    name: str
    value: float | str | bool | None
    unit: str = ""
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    critical: bool = False


@dataclass
class ScenarioResult:
    scenario: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def failed(self) -> bool:
        """A correctness failure (or an error): the run's figures cannot be trusted."""
        return self.error is not None or any(f.critical and f.passed is False for f in self.figures)

    @property
    def targets_met(self) -> bool:
        return all(f.passed is not False for f in self.figures)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "status": "FAILED" if self.failed else ("ok" if self.targets_met else "targets missed"),
            "error": self.error,
            "params": self.params,
            "figures": [asdict(f) for f in self.figures],
            "details": self.details,
        }


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.monotonic()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self.start
