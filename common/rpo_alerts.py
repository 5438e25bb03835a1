"""Alerts computed from a service's status dict: RPO breaches against each disk's target RPO
(as Zerto's "target RPO"), cache and journal fill levels (70% warning, 75% critical, Azure
Site Recovery's levels), journal overflow to the dirty bitmap, applier errors, a link down.

Rules it keeps:
- Pure: :meth:`AlertTracker.update` takes the status dict and ``now`` and returns the
  transitions; the caller logs them (one line each) and publishes the active set.
- An alert is raised once when its condition starts and cleared once when it ends; a
  condition must hold for its ``grace`` before it is raised, so start-up and one slow
  sample do not page anyone.
- Nothing here changes the data path: alerts report, they never act.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("tidemark.alerts")

FILL_WARNING = 0.70
FILL_CRITICAL = 0.75
LINK_GRACE = 10.0  # seconds a link or session may be down before it is an alert
SEVERITY_RANK = {"warning": 1, "critical": 2}


@dataclass
class Alert:
    kind: str  # rpo_breach, cache_fill, journal_fill, journal_overflow, applier_error, link_down, agent_disconnected
    severity: str  # warning | critical
    disk: str | None
    message: str
    since: float  # wall-clock seconds when the condition started
    value: float | None = None
    threshold: float | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.kind, self.disk)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "disk": self.disk,
            "message": self.message,
            "since": round(self.since, 3),
            "value": self.value,
            "threshold": self.threshold,
        }


@dataclass
class Transition:
    action: str  # raised | cleared | changed (severity)
    alert: Alert

    def log_line(self) -> str:
        a = self.alert
        parts = [f"event=alert_{self.action}", f"kind={a.kind}", f"severity={a.severity}"]
        if a.disk:
            parts.append(f"disk={a.disk}")
        if a.value is not None:
            parts.append(f"value={a.value:g}")
        if a.threshold is not None:
            parts.append(f"threshold={a.threshold:g}")
        parts.append(f"message={a.message!r}")
        return " ".join(parts)


@dataclass
class DiskCounters:
    rpo_breaches: int = 0
    resyncs: int = 0
    last_state: str | None = None


@dataclass
class AlertTracker:
    """Keeps the active alerts of one service and the counters the metrics export."""

    target_for: Callable[[str], float | None]
    grace: dict[str, float] = field(
        default_factory=lambda: {"link_down": LINK_GRACE, "agent_disconnected": LINK_GRACE}
    )
    active: dict[tuple[str, str | None], Alert] = field(default_factory=dict)
    pending: dict[tuple[str, str | None], float] = field(default_factory=dict)
    counters: dict[str, DiskCounters] = field(default_factory=dict)

    def _conditions(self, status: dict[str, Any], now: float) -> list[Alert]:
        found: list[Alert] = []
        link = status.get("link")
        if status.get("role") == "agent" and isinstance(link, dict) and not link.get("connected"):
            error = link.get("last_error") or "not connected yet"
            found.append(
                Alert("link_down", "warning", None, f"process server unreachable: {error}", now)
            )
        for row in status.get("disks", []):
            disk = str(row.get("disk"))
            state = str(row.get("state"))
            rpo = row.get("rpo_seconds")
            target = self.target_for(disk)
            if target is not None and isinstance(rpo, int | float) and rpo > target:
                found.append(
                    Alert(
                        "rpo_breach",
                        "critical" if rpo > 2 * target else "warning",
                        disk,
                        f"RPO {rpo:.1f}s exceeds the target of {target:g}s",
                        now,
                        float(rpo),
                        target,
                    )
                )
            for kind, used_key, quota_key, what in (
                ("cache_fill", "cache_bytes", "cache_quota", "process-server cache"),
                ("journal_fill", "journal_bytes", "journal_quota", "agent journal"),
            ):
                used, quota = row.get(used_key), row.get(quota_key)
                if isinstance(used, int) and isinstance(quota, int) and quota > 0:
                    fill = used / quota
                    if fill >= FILL_WARNING:
                        severity = "critical" if fill >= FILL_CRITICAL else "warning"
                        found.append(
                            Alert(
                                kind,
                                severity,
                                disk,
                                f"{what} {100 * fill:.0f}% full ({used} of {quota} bytes)",
                                now,
                                round(fill, 4),
                                FILL_CRITICAL if severity == "critical" else FILL_WARNING,
                            )
                        )
            if state == "resync-required":
                reason = row.get("resync_reason") or "unknown"
                found.append(
                    Alert(
                        "journal_overflow" if "overflow" in str(reason) else "resync_required",
                        "critical",
                        disk,
                        f"tracking changes in the dirty bitmap until a resync: {reason}",
                        now,
                    )
                )
            if row.get("error"):
                found.append(
                    Alert("applier_error", "critical", disk, f"applier: {row['error']}", now)
                )
            if status.get("role") == "process-server" and state == "disconnected":
                found.append(
                    Alert(
                        "agent_disconnected",
                        "warning",
                        disk,
                        f"agent {row.get('agent')} is not connected",
                        now,
                    )
                )
        return found

    def update(self, status: dict[str, Any], now: float) -> list[Transition]:
        """Compare the conditions in ``status`` with the active alerts; return what changed."""
        self._count(status)
        transitions: list[Transition] = []
        seen: set[tuple[str, str | None]] = set()
        for alert in self._conditions(status, now):
            key = alert.key
            seen.add(key)
            started = self.pending.setdefault(key, now)
            if key in self.active:
                old = self.active[key]
                alert.since = old.since
                self.active[key] = alert
                if old.severity != alert.severity:
                    transitions.append(Transition("changed", alert))
                continue
            if now - started < self.grace.get(alert.kind, 0.0):
                continue
            alert.since = started
            self.active[key] = alert
            if alert.kind == "rpo_breach" and alert.disk is not None:
                self.counters.setdefault(alert.disk, DiskCounters()).rpo_breaches += 1
            transitions.append(Transition("raised", alert))
        for key in list(self.pending):
            if key not in seen:
                del self.pending[key]
        for key in list(self.active):
            if key not in seen:
                transitions.append(Transition("cleared", self.active.pop(key)))
        return transitions

    def _count(self, status: dict[str, Any]) -> None:
        for row in status.get("disks", []):
            c = self.counters.setdefault(str(row.get("disk")), DiskCounters())
            state = str(row.get("state"))
            if state in ("resync-required", "initial-sync") and c.last_state != state:
                c.resyncs += 1
            c.last_state = state

    def decorate(self, status: dict[str, Any]) -> dict[str, Any]:
        """``status`` with ``alerts`` (active, most severe first) and, per disk,
        ``rpo_target_seconds`` and ``rpo_breached``. Returns a new dict."""
        out = dict(status)
        rows = []
        for row in status.get("disks", []):
            row = dict(row)
            disk = str(row.get("disk"))
            row["rpo_target_seconds"] = self.target_for(disk)
            row["rpo_breached"] = ("rpo_breach", disk) in self.active
            rows.append(row)
        out["disks"] = rows
        out["alerts"] = [a.as_dict() for a in self.sorted_alerts()]
        return out

    def sorted_alerts(self) -> list[Alert]:
        return sorted(
            self.active.values(),
            key=lambda a: (-SEVERITY_RANK.get(a.severity, 0), a.since, a.kind, a.disk or ""),
        )


def log_transitions(transitions: list[Transition]) -> None:
    for t in transitions:
        if t.action == "cleared":
            log.info(t.log_line())
        elif t.alert.severity == "critical":
            log.error(t.log_line())
        else:
            log.warning(t.log_line())


__all__ = ["Alert", "AlertTracker", "Transition", "log_transitions"]
