"""The process server's status page: disks with state, RPO and throughput over the last hour,
the recovery-point timeline, running jobs with progress, and the active alerts.

Rules it keeps:
- Fed only by the status dict (the one `tidemark-ps status --json` prints, decorated with
  alerts) and an optional ``points()`` callable; it never touches the data path.
- The history is bounded: one sample per disk every ``SAMPLE_EVERY`` seconds for one
  hour (360 samples), disks that disappear are forgotten.
- Rendered on the server as plain HTML with inline SVG: no script, no outside resource
  (the page is served under a CSP that forbids both); every string from the status is
  escaped. It refreshes itself every 10 seconds.
"""

from __future__ import annotations

import collections
import html
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.units import format_size

WINDOW = 3600.0
SAMPLE_EVERY = 10.0
MAX_SAMPLES = int(WINDOW / SAMPLE_EVERY) + 1
StatusFn = Callable[[], dict[str, Any]]
PointsFn = Callable[[], dict[str, list[dict[str, Any]]]]


@dataclass
class Sample:
    t: float
    rpo: float | None
    received_bytes: int | None


@dataclass
class History:
    """The last hour of (time, RPO, received bytes) per disk."""

    samples: dict[str, collections.deque[Sample]] = field(default_factory=dict)
    last: float = 0.0

    def add(self, status: dict[str, Any], now: float, *, force: bool = False) -> None:
        if not force and now - self.last < SAMPLE_EVERY:
            return
        self.last = now
        seen = set()
        for row in status.get("disks", []):
            disk = str(row.get("disk"))
            seen.add(disk)
            rpo = row.get("rpo_seconds")
            received = row.get("received_bytes")
            self.samples.setdefault(disk, collections.deque(maxlen=MAX_SAMPLES)).append(
                Sample(
                    now,
                    float(rpo) if isinstance(rpo, int | float) else None,
                    int(received) if isinstance(received, int) else None,
                )
            )
        for disk in list(self.samples):
            if disk not in seen:
                del self.samples[disk]

    def rpo_series(self, disk: str, now: float) -> list[tuple[float, float]]:
        return [
            (s.t, s.rpo)
            for s in self.samples.get(disk, ())
            if s.rpo is not None and now - s.t <= WINDOW
        ]

    def throughput_series(self, disk: str, now: float) -> list[tuple[float, float]]:
        """Bytes per second between consecutive samples (a restart's counter reset is skipped)."""
        out = []
        prev: Sample | None = None
        for s in self.samples.get(disk, ()):
            if (
                prev is not None
                and s.received_bytes is not None
                and prev.received_bytes is not None
                and s.received_bytes >= prev.received_bytes
                and s.t > prev.t
                and now - s.t <= WINDOW
            ):
                out.append((s.t, (s.received_bytes - prev.received_bytes) / (s.t - prev.t)))
            prev = s
        return out


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def _sparkline(
    series: list[tuple[float, float]],
    now: float,
    *,
    label: str,
    target: float | None = None,
    fmt: Callable[[float], str] = lambda v: f"{v:.1f}",
) -> str:
    """An inline SVG chart of the last hour; ``target`` draws a dashed limit line."""
    w, h, pad = 320, 60, 2
    peak = max([v for _, v in series] + [1e-9])
    if target is not None and target <= 4 * peak:
        peak = max(peak, target)  # show the target line when it is on a useful scale
    top = peak * 1.15

    def xy(t: float, v: float) -> str:
        x = pad + (w - 2 * pad) * max(0.0, 1 - (now - t) / WINDOW)
        y = h - pad - (h - 2 * pad) * (v / top)
        return f"{x:.1f},{y:.1f}"

    parts = [
        f'<svg class="spark" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="{_e(label)}"><rect width="{w}" height="{h}" fill="#f6f8fa"/>'
    ]
    if target is not None and target <= top:
        y = h - pad - (h - 2 * pad) * (target / top)
        parts.append(
            f'<line x1="0" x2="{w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#d73a49" stroke-dasharray="4 3"/>'
        )
    if series:
        points = " ".join(xy(t, v) for t, v in series)
        parts.append(f'<polyline fill="none" stroke="#0366d6" stroke-width="2" points="{points}"/>')
        cx, cy = xy(*series[-1]).split(",")
        parts.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="#0366d6"/>')
    last = fmt(series[-1][1]) if series else "no data yet"
    parts.append(f'<text x="6" y="14" font-size="11" fill="#24292e">{_e(label)}: {_e(last)}</text>')
    parts.append("</svg>")
    return "".join(parts)


KIND_COLOURS = {"crash-consistent": "#0366d6", "app-consistent": "#28a745", "manual": "#6f42c1"}
KIND_RANK = {"manual": 3, "app-consistent": 2, "crash-consistent": 1}


def _timeline(points: list[dict[str, Any]], now: float) -> str:
    """Recovery points as ticks on a time axis from the oldest point to now."""
    stamps = [
        (p, int(p.get("time_ns") or p.get("created_ns") or 0) / 1e9)
        for p in points
        if isinstance(p, dict)
    ]
    stamps = [(p, t) for p, t in stamps if t > 0]
    if not stamps:
        return '<span class="muted">no recovery points</span>'
    w, h = 480, 34
    start = min(t for _, t in stamps)
    span = max(now - start, 1.0)
    # one tick per pixel column at most (a day of 1 s points is 86400): keep the most telling
    # kind of each column (manual, then app-consistent, then crash-consistent), the newest first
    columns: dict[int, tuple[dict[str, Any], float]] = {}
    for p, t in stamps:
        col = int((w - 8) * (t - start) / span)
        old = columns.get(col)
        if old is None or KIND_RANK.get(str(p.get("kind")), 0) >= KIND_RANK.get(
            str(old[0].get("kind")), 0
        ):
            columns[col] = (p, t)
    ticks = []
    for col, (p, t) in sorted(columns.items()):
        x = 4 + col
        colour = KIND_COLOURS.get(str(p.get("kind")), "#586069")
        title = f"seq {p.get('seq')} · {p.get('kind')} · {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))}"
        ticks.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="6" y2="24" stroke="{colour}" stroke-width="2">'
            f"<title>{_e(title)}</title></line>"
        )
    oldest = time.strftime("%H:%M:%S", time.localtime(start))
    return (
        f'<svg class="timeline" width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
        f'<rect width="{w}" height="{h}" fill="#f6f8fa"/>{"".join(ticks)}'
        f'<text x="4" y="33" font-size="9">{_e(oldest)}</text>'
        f'<text x="{w - 24}" y="33" font-size="9">now</text></svg>'
        f' <span class="muted">{len(stamps)} points</span>'
    )


def _jobs(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Running jobs: what the status lists under ``jobs`` plus each disk's resync progress."""
    jobs = [dict(j) for j in status.get("jobs", []) if isinstance(j, dict)]
    for f in status.get("failovers", []):
        if isinstance(f, dict):
            point = f.get("point")
            seq = point.get("seq") if isinstance(point, dict) else point
            jobs.append(
                {
                    "kind": "test failover" if f.get("test") else "failover",
                    "disk": f.get("disk"),
                    "state": f"{f.get('state')} (point seq {seq}, {f.get('nbd') or 'no export'})",
                }
            )
    for row in status.get("disks", []):
        progress = row.get("resync")
        if isinstance(progress, dict) and progress.get("total_bytes"):
            jobs.append(
                {
                    "kind": progress.get("phase", "resync"),
                    "disk": row.get("disk"),
                    "state": "running",
                    "percent": progress.get("percent"),
                    "eta_seconds": progress.get("eta_seconds"),
                }
            )
    return jobs


CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#24292e;background:#fff}
h1{font-size:20px;margin:0 0 .2em} h2{font-size:16px;margin:1.4em 0 .4em}
table{border-collapse:collapse} td,th{padding:4px 10px;border-bottom:1px solid #e1e4e8;text-align:left;vertical-align:middle}
th{background:#f6f8fa} .muted{color:#586069} .ok{color:#22863a;font-weight:600}
.warning{color:#b08800;font-weight:600} .critical{color:#cb2431;font-weight:600}
.state-replicating{color:#22863a} .state-disconnected,.state-error,.state-resync-required{color:#cb2431}
progress{width:160px}
"""


def render_page(
    status: dict[str, Any], history: History, points: dict[str, list[dict[str, Any]]], now: float
) -> str:
    """The whole page as one HTML string."""
    alerts = status.get("alerts", [])
    worst = "ok"
    for a in alerts:
        if a.get("severity") == "critical" or (a.get("severity") == "warning" and worst == "ok"):
            worst = str(a.get("severity"))
    out = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta http-equiv="refresh" content="10">',
        "<title>tidemark process server</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>tidemark process server</h1>",
        f'<p class="muted">listening on {_e(status.get("listen"))} · state in '
        f"{_e(status.get('state_dir'))} · {len(status.get('sessions', []))} agent sessions · "
        f"{_e(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now)))} · "
        f'overall <span class="{worst}">{worst.upper()}</span></p>',
        "<h2>Alerts</h2>",
    ]
    if alerts:
        out.append("<table><tr><th>severity</th><th>kind</th><th>disk</th><th>since</th>")
        out.append("<th>message</th></tr>")
        for a in alerts:
            since = time.strftime("%H:%M:%S", time.localtime(float(a.get("since") or now)))
            out.append(
                f'<tr><td class="{_e(a.get("severity"))}">{_e(a.get("severity"))}</td>'
                f"<td>{_e(a.get('kind'))}</td><td>{_e(a.get('disk'))}</td><td>{_e(since)}</td>"
                f"<td>{_e(a.get('message'))}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append('<p class="ok">no active alerts</p>')
    out.append("<h2>Disks</h2>")
    disks = status.get("disks", [])
    if not disks:
        out.append('<p class="muted">no disks registered yet</p>')
    else:
        out.append(
            "<table><tr><th>agent</th><th>disk</th><th>state</th><th>RPO (target)</th>"
            "<th>lag</th><th>cache</th><th>applied seq</th><th>RPO, last hour</th>"
            "<th>throughput, last hour</th></tr>"
        )
        for row in disks:
            disk = str(row.get("disk"))
            target = row.get("rpo_target_seconds")
            rpo = row.get("rpo_seconds")
            rpo_class = "critical" if row.get("rpo_breached") else "ok"
            cache = row.get("cache_bytes")
            quota = row.get("cache_quota")
            cache_text = (
                f"{format_size(cache)} / {format_size(quota)}"
                if isinstance(cache, int) and isinstance(quota, int)
                else "-"
            )
            lag = row.get("lag_bytes")
            out.append(
                f"<tr><td>{_e(row.get('agent'))}</td><td><b>{_e(disk)}</b></td>"
                f'<td class="state-{_e(row.get("state"))}">{_e(row.get("state"))}</td>'
                f'<td class="{rpo_class}">{_e(rpo)} s ({_e(target)} s)</td>'
                f"<td>{_e(format_size(lag) if isinstance(lag, int) else lag)}</td>"
                f"<td>{_e(cache_text)}</td><td>{_e(row.get('applied_seq'))}</td>"
                f"<td>{_sparkline(history.rpo_series(disk, now), now, label='RPO s', target=target if isinstance(target, int | float) else None)}</td>"
                f"<td>{_sparkline(history.throughput_series(disk, now), now, label='MiB/s', fmt=lambda v: f'{v / (1 << 20):.2f}')}</td></tr>"
            )
        out.append("</table>")
    out.append("<h2>Recovery points</h2><table><tr><th>disk</th><th>timeline</th></tr>")
    for row in disks:
        disk = str(row.get("disk"))
        disk_points = points.get(disk) or row.get("recovery_points") or []
        out.append(f"<tr><td>{_e(disk)}</td><td>{_timeline(list(disk_points), now)}</td></tr>")
    out.append("</table><h2>Jobs</h2>")
    jobs = _jobs(status)
    if not jobs:
        out.append('<p class="muted">no running jobs</p>')
    else:
        out.append("<table><tr><th>job</th><th>disk</th><th>state</th><th>progress</th></tr>")
        for job in jobs:
            pct = job.get("percent")
            bar = (
                f'<progress max="100" value="{float(pct):.1f}"></progress> {float(pct):.1f}%'
                if isinstance(pct, int | float)
                else "-"
            )
            out.append(
                f"<tr><td>{_e(job.get('kind'))}</td><td>{_e(job.get('disk'))}</td>"
                f"<td>{_e(job.get('state'))}</td><td>{bar}</td></tr>"
            )
        out.append("</table>")
    out.append(
        '<p class="muted">JSON: <code>/api/status</code> · Prometheus: <code>/metrics</code></p>'
    )
    out.append("</body></html>")
    return "".join(out)


class StatusPage:
    """Owns the history; :meth:`tick` samples, :meth:`html` renders."""

    def __init__(self, status: StatusFn, points: PointsFn | None = None) -> None:
        self.status = status
        self.points = points
        self.history = History()

    def tick(self, status: dict[str, Any], now: float) -> None:
        self.history.add(status, now)

    def html(self) -> str:
        now = time.time()
        status = self.status()
        self.history.add(status, now, force=not self.history.samples)
        return render_page(status, self.history, self.points() if self.points else {}, now)


__all__ = ["History", "StatusPage", "render_page"]
