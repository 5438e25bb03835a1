"""Prometheus metrics of the agent and of the process server, made at scrape time from the
service's status dict (the same one `status --json` prints) with ``prometheus-client``.

Rules it keeps:
- One source of truth: every value is read from ``status()`` (plus the alert tracker and
  the bandwidth limiter) when Prometheus scrapes; nothing is counted twice in parallel.
- Labels are bounded: ``agent`` and ``disk`` (ids validated at registration) and small
  enums (``state``, ``kind``, ``severity``); no free text, no paths, no secrets.
- A key missing from a status row (an older or offline peer) means no sample, not 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from common.rpo_alerts import AlertTracker

DISK_STATES = (
    "replicating",
    "connecting",
    "disconnected",
    "initial-sync",
    "resync-required",
    "error",
    "stopped",
)
StatusFn = Callable[[], dict[str, Any]]


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def newest_point_age(row: dict[str, Any], now_ns: int) -> float | None:
    """Age in seconds of a disk's newest recovery point, from whichever field the status row
    carries: ``newest_point_age_seconds``, ``newest_point_ns`` or ``newest_point.time_ns``."""
    age = _num(row.get("newest_point_age_seconds"))
    if age is not None:
        return age
    stamp = row.get("newest_point_ns")
    point = row.get("newest_point")
    if stamp is None and isinstance(point, dict):
        stamp = point.get("time_ns") or point.get("created_ns")
    if isinstance(stamp, int) and stamp > 0:
        return max(0.0, (now_ns - stamp) / 1e9)
    return None


class StatusCollector(Collector):
    """Turns one status dict into metric families on every scrape."""

    def __init__(
        self,
        status: StatusFn,
        tracker: AlertTracker | None = None,
        bandwidth: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.status = status
        self.tracker = tracker
        self.bandwidth = bandwidth

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        role = str(status.get("role", "unknown"))
        now_ns = time.time_ns()
        up = GaugeMetricFamily("tidemark_up", "1 while the service runs", labels=["role"])
        up.add_metric([role], 1.0 if status.get("running", True) else 0.0)
        yield up
        yield from self._disks(status, now_ns)
        yield from self._link(status)
        yield from self._alerts()
        if self.bandwidth is not None:
            bw = self.bandwidth()
            g = GaugeMetricFamily(
                "tidemark_bandwidth_limit_bytes_per_second",
                "bandwidth limit in force (0 = unlimited)",
            )
            g.add_metric([], float(bw["limit_bytes_per_s"]))
            yield g
            c = CounterMetricFamily(
                "tidemark_bandwidth_throttled_seconds", "time batches waited for the limit"
            )
            c.add_metric([], float(bw["throttled_seconds"]))
            yield c

    def _disks(self, status: dict[str, Any], now_ns: int) -> Iterator[Metric]:
        labels = ["agent", "disk"]
        gauges = {
            "rpo_seconds": ("tidemark_disk_rpo_seconds", "age of the oldest unreplicated write"),
            "rpo_target_seconds": ("tidemark_disk_rpo_target_seconds", "the disk's target RPO"),
            "lag_bytes": ("tidemark_disk_lag_bytes", "journaled bytes not yet durable remotely"),
            "journal_bytes": ("tidemark_disk_journal_bytes", "agent journal size"),
            "journal_quota": ("tidemark_disk_journal_quota_bytes", "agent journal quota"),
            "dirty_bytes": ("tidemark_disk_dirty_bytes", "bytes marked in the dirty bitmap"),
            "cache_bytes": ("tidemark_disk_cache_bytes", "process-server cache size"),
            "cache_quota": ("tidemark_disk_cache_quota_bytes", "process-server cache quota"),
            "journaled_seq": ("tidemark_disk_journaled_seq", "newest journaled seq"),
            "acked_seq": ("tidemark_disk_acked_seq", "newest seq durable in the cache"),
            "applied_seq": ("tidemark_disk_applied_seq", "newest seq applied to the replica"),
        }
        counters = {
            "received_bytes": ("tidemark_disk_received_bytes", "batch bytes received (raw)"),
            "received_batches": ("tidemark_disk_received_batches", "batches received"),
            "applied_bytes": ("tidemark_disk_applied_bytes", "bytes applied to the replica"),
        }
        g_fams = {k: GaugeMetricFamily(n, h, labels=labels) for k, (n, h) in gauges.items()}
        c_fams = {k: CounterMetricFamily(n, h, labels=labels) for k, (n, h) in counters.items()}
        state = GaugeMetricFamily(
            "tidemark_disk_state", "1 for the disk's current state", labels=[*labels, "state"]
        )
        breached = GaugeMetricFamily(
            "tidemark_disk_rpo_breached", "1 while the RPO exceeds its target", labels=labels
        )
        breaches = CounterMetricFamily(
            "tidemark_disk_rpo_breaches", "times the RPO target was breached", labels=labels
        )
        resyncs = CounterMetricFamily(
            "tidemark_disk_resyncs", "times the disk entered a resync", labels=labels
        )
        resync_bytes = CounterMetricFamily(
            "tidemark_disk_resync_bytes",
            "resync work: bytes hashed and bytes sent",
            labels=[*labels, "kind"],
        )
        errors = GaugeMetricFamily(
            "tidemark_disk_error", "1 while the disk's applier has failed", labels=labels
        )
        point_age = GaugeMetricFamily(
            "tidemark_disk_newest_recovery_point_age_seconds",
            "age of the newest recovery point",
            labels=labels,
        )
        fill = GaugeMetricFamily(
            "tidemark_disk_quota_fill_ratio",
            "journal (agent) or cache (process server) use against its quota",
            labels=[*labels, "store"],
        )
        for row in status.get("disks", []):
            values = [str(row.get("agent") or status.get("name") or ""), str(row.get("disk"))]
            for key, fam in g_fams.items():
                v = _num(row.get(key))
                if v is not None:
                    fam.add_metric(values, v)
            for key, cfam in c_fams.items():
                v = _num(row.get(key))
                if v is not None:
                    cfam.add_metric(values, v)
            current = str(row.get("state"))
            for s in DISK_STATES if current in DISK_STATES else (*DISK_STATES, current):
                state.add_metric([*values, s], 1.0 if s == current else 0.0)
            if "rpo_breached" in row:
                breached.add_metric(values, float(bool(row["rpo_breached"])))
            if "error" in row:
                errors.add_metric(values, 1.0 if row["error"] else 0.0)
            if self.tracker is not None:
                counts = self.tracker.counters.get(str(row.get("disk")))
                breaches.add_metric(values, float(counts.rpo_breaches if counts else 0))
                resyncs.add_metric(values, float(counts.resyncs if counts else 0))
            totals = row.get("resync_totals")
            if isinstance(totals, dict):
                for kind in ("hashed_bytes", "sent_bytes"):
                    resync_bytes.add_metric(
                        [*values, kind.removesuffix("_bytes")], float(totals.get(kind, 0))
                    )
            age = newest_point_age(row, now_ns)
            if age is not None:
                point_age.add_metric(values, age)
            for store in ("journal", "cache"):
                used, quota = _num(row.get(f"{store}_bytes")), _num(row.get(f"{store}_quota"))
                if used is not None and quota:
                    fill.add_metric([*values, store], used / quota)
        yield from g_fams.values()
        yield from c_fams.values()
        yield from (state, breached, breaches, resyncs, resync_bytes, errors, point_age, fill)

    def _link(self, status: dict[str, Any]) -> Iterator[Metric]:
        link = status.get("link")
        if isinstance(link, dict):  # agent: the replication link
            g = GaugeMetricFamily("tidemark_link_up", "1 while connected to the process server")
            g.add_metric([], 1.0 if link.get("connected") else 0.0)
            yield g
            for key, name, doc in (
                ("connects", "tidemark_link_connects", "successful connections"),
                ("failures", "tidemark_link_failures", "connection attempts and sessions failed"),
                ("batches_sent", "tidemark_sent_batches", "batches sent"),
                ("raw_bytes_sent", "tidemark_sent_raw_bytes", "batch bytes sent, uncompressed"),
                ("wire_bytes_sent", "tidemark_sent_wire_bytes", "batch bytes sent, as encoded"),
            ):
                c = CounterMetricFamily(name, doc)
                c.add_metric([], float(link.get(key) or 0))
                yield c
        if "sessions" in status:  # process server
            g = GaugeMetricFamily("tidemark_sessions", "agent sessions open")
            g.add_metric([], float(len(status["sessions"])))
            yield g
            c = CounterMetricFamily(
                "tidemark_rejected_connections", "connections refused or closed for errors"
            )
            c.add_metric([], float(status.get("rejected_connections", 0)))
            yield c

    def _alerts(self) -> Iterator[Metric]:
        if self.tracker is None:
            return
        g = GaugeMetricFamily(
            "tidemark_alerts_active", "active alerts", labels=["kind", "severity", "disk"]
        )
        for a in self.tracker.sorted_alerts():
            g.add_metric([a.kind, a.severity, a.disk or ""], 1.0)
        yield g


def make_registry(
    status: StatusFn,
    tracker: AlertTracker | None = None,
    bandwidth: Callable[[], dict[str, Any]] | None = None,
) -> CollectorRegistry:
    """A registry holding only tidemark's collector (no process or GC collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status, tracker, bandwidth))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition format and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


__all__ = ["StatusCollector", "make_registry", "newest_point_age", "render"]
