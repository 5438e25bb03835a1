"""The operational shell around a running agent or process server: systemd notifications
(READY, STATUS, WATCHDOG, RELOADING, STOPPING), SIGTERM/SIGHUP, alerts, the HTTP endpoints
(Prometheus ``/metrics``, ``/api/status``, the status page) and journald-fit logging.

Rules it keeps:
- The service is reached only through ``status()`` and its config object: this module
  reads, it never reaches into the data path (the bandwidth limiter is the one knob).
- SIGTERM: stop within ``stop_timeout`` and exit 0; past the bound, exit 1 (systemd's
  ``TimeoutStopSec`` is the last resort). SIGHUP: re-read the config file and apply only
  the keys that are safe to change live; log, in one line, what was applied and what
  needs a restart. A bad file changes nothing.
- One log line per event, ``key=value``; PEM blocks and key material never reach a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from common.config import (
    AgentConfig,
    HostPort,
    ServerConfig,
    load_agent_config,
    load_server_config,
)
from common.errors import ConfigError
from common.http_status import Handler, HttpServer, Response, text
from common.rate_limit import BandwidthLimiter, limiter_for, parse_rate
from common.rpo_alerts import AlertTracker, log_transitions
from common.sdnotify import Notifier

log = logging.getLogger("tidemark.ops")
TICK = 1.0  # how often alerts, the status line and the page history are refreshed

# Keys a SIGHUP applies live: read by the running code on each use, so swapping the config
# object changes behaviour without touching the journal, the cache or the connections.
AGENT_RELOADABLE = (
    "bandwidth_limit",
    "bandwidth_schedule",
    "rpo_target",
    "batch_delay",
    "heartbeat_interval",
    "reconnect_min",
    "reconnect_max",
    "connect_timeout",
    "window_batches",
    "window_bytes",
    "compression_level",  # from the next connection
    "compression_fast_level",  # from the next connection
    "max_batch_bytes",  # from the next connection
    "stop_timeout",
)
# Per-disk keys a SIGHUP applies live: read from the disk's config at each use (the hooks by
# agent/points.py's PointKeeper.disk_cfg at each app-consistent point).
DISK_RELOADABLE = ("rpo_target", "pre_snapshot_hook", "post_snapshot_hook", "hook_timeout")
SERVER_RELOADABLE: tuple[str, ...] = ("rpo_target", "rpo_targets", "heartbeat_timeout")
SERVER_RELOADABLE += ("verify_on_receive", "stop_timeout")
NEVER_COMPARED = ("path",)


# ----------------------------------------------------------------- logging

_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|$)", re.S)
_SECRETS = re.compile(r"((?:password|passphrase|secret|token|private_key)=)\S+", re.I)
_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


class RedactingFilter(logging.Filter):
    """Belt and braces: PEM blocks and ``password=...``-like values become ``[redacted]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = _SECRETS.sub(r"\1[redacted]", _PEM.sub("[redacted]", message))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JournaldFormatter(logging.Formatter):
    """``<priority>LEVEL logger key=value ...``: journald reads the priority prefix and stamps
    the time itself; newlines are escaped so one event stays one line."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"<{_PRIORITY.get(record.levelname, 6)}>{record.levelname} {record.name} "
        line += record.getMessage()
        if record.exc_info:
            line += " exception=" + repr(self.formatException(record.exc_info))
        return line.replace("\n", "\\n")


def configure_service_logging() -> None:
    """Run after ``setup_logging``: redact secrets everywhere, and under systemd (stderr wired to
    the journal, ``$JOURNAL_STREAM``) print priority-prefixed lines without a timestamp."""
    root = logging.getLogger()
    journald = _stderr_is_journal()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
        if journald:
            handler.setFormatter(JournaldFormatter())


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


# ----------------------------------------------------------------- reload


def diff_config(old: Any, new: Any, reloadable: Iterable[str]) -> tuple[list[str], list[str]]:
    """Keys that changed between two config dataclasses: (reloadable, needing a restart)."""
    safe = set(reloadable)
    applied: list[str] = []
    refused: list[str] = []
    for f in dataclasses.fields(old):
        if f.name in NEVER_COMPARED:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.name == "disks":
            a_by_id, b_by_id = {d.id: d for d in a}, {d.id: d for d in b}
            if list(a_by_id) != list(b_by_id):
                refused.append("disk")  # disks added, removed or reordered
                continue
            for disk_id, da in a_by_id.items():
                for df in dataclasses.fields(da):
                    if getattr(da, df.name) != getattr(b_by_id[disk_id], df.name):
                        name = f"disk.{df.name}"
                        target = applied if df.name in DISK_RELOADABLE else refused
                        if name not in target:
                            target.append(name)
            continue
        if a != b:
            (applied if f.name in safe else refused).append(f.name)
    return applied, refused


def merge_config(old: Any, new: Any, reloadable: Iterable[str]) -> Any:
    """``old`` with the reloadable keys (and the per-disk RPO targets) taken from ``new``."""
    changes = {k: getattr(new, k) for k in reloadable if hasattr(old, k)}
    if hasattr(old, "disks"):
        by_id = {d.id: d for d in new.disks}
        changes["disks"] = tuple(
            dataclasses.replace(d, **{k: getattr(by_id[d.id], k) for k in DISK_RELOADABLE})
            if d.id in by_id
            else d
            for d in old.disks
        )
    return dataclasses.replace(old, **changes)


# ----------------------------------------------------------------- the shell


def _fmt_seconds(value: Any) -> str:
    return f"{value:.1f}s" if isinstance(value, int | float) else "-"


class ServiceOps:
    """Alerts, metrics, HTTP, notifications and reload for one service object.

    ``service`` must have ``status() -> dict`` and a ``cfg`` attribute (and, for the
    agent, a ``shipper`` whose ``cfg`` follows reloads)."""

    def __init__(self, service: Any, cfg: AgentConfig | ServerConfig, *, role: str) -> None:
        self.service = service
        self.cfg = cfg
        self.role = role
        self.notifier = Notifier()
        self.tracker = AlertTracker(self.rpo_target)
        self.limiter: BandwidthLimiter | None = (
            limiter_for(cfg) if isinstance(cfg, AgentConfig) else None
        )
        self.page: Any = None
        self.http: list[HttpServer] = []
        self.reloads = 0

    # ------------------------------------------------------------- status
    def rpo_target(self, disk_id: str) -> float | None:
        cfg = self.cfg
        if isinstance(cfg, AgentConfig):
            for d in cfg.disks:
                if d.id == disk_id and d.rpo_target is not None:
                    return d.rpo_target or None  # 0: no alert for this disk
            return cfg.rpo_target or None
        return cfg.rpo_targets.get(disk_id, cfg.rpo_target) or None

    def raw_status(self) -> dict[str, Any]:
        return dict(self.service.status())

    def status(self) -> dict[str, Any]:
        """The service's status with alerts, RPO targets and the bandwidth limiter."""
        out = self.tracker.decorate(self.raw_status())
        if self.limiter is not None:
            out["bandwidth"] = self.limiter.status()
        out["http"] = [f"{s.address.host}:{s.port}" for s in self.http]
        return out

    def recovery_points(self) -> dict[str, list[dict[str, Any]]]:
        """Per disk, the recovery points of the process server's catalog (empty elsewhere)."""
        points = getattr(self.service, "points", None)
        if points is None or not hasattr(points, "list_points"):
            return {}
        return {disk: points.list_points(disk) for disk in getattr(self.service, "disks", {})}

    def status_line(self, status: dict[str, Any] | None = None) -> str:
        """One line for ``systemctl status``: what the service is doing now."""
        st = status or self.status()
        disks = st.get("disks", [])
        rpos = [d["rpo_seconds"] for d in disks if isinstance(d.get("rpo_seconds"), int | float)]
        states: dict[str, int] = {}
        for d in disks:
            states[str(d.get("state"))] = states.get(str(d.get("state")), 0) + 1
        state_text = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no disks"
        alerts = st.get("alerts", [])
        if self.role == "agent":
            link = st.get("link") or {}
            head = f"link {'up' if link.get('connected') else 'down'}; {state_text}"
        else:
            head = f"{len(st.get('sessions', []))} agent sessions; {state_text}"
        line = f"{head}; max RPO {_fmt_seconds(max(rpos) if rpos else None)}"
        if alerts:
            worst = alerts[0]
            line += f"; {len(alerts)} alerts ({worst['kind']} {worst.get('disk') or ''})".rstrip()
        return line

    def tick(self, now: float | None = None) -> None:
        """Refresh alerts (logging raises and clears), the page history and STATUS=."""
        now = time.time() if now is None else now
        raw = self.raw_status()
        log_transitions(self.tracker.update(raw, now))
        decorated = self.tracker.decorate(raw)
        if self.page is not None:
            self.page.tick(decorated, now)
        self.notifier.status(self.status_line(decorated))

    async def run_ticks(self) -> None:
        while True:
            try:
                self.tick()
            except Exception as exc:  # reporting must never stop replication; logged, retried
                log.error("event=ops_tick_failed error=%r", exc, exc_info=True)
            await asyncio.sleep(TICK)

    # ------------------------------------------------------------- HTTP
    def _routes_metrics(self) -> dict[str, Handler]:
        # Imported only where metrics are served: prometheus-client costs every start
        # (each CLI command, and an agent's first sync, which waits for it) ~25 ms.
        from common.metrics import make_registry, render

        registry = make_registry(
            self.status, self.tracker, self.limiter.status if self.limiter else None
        )

        def metrics(query: dict[str, list[str]]) -> Response:
            body, ctype = render(registry)
            return Response(200, ctype, body)

        return {"/metrics": metrics, "/api/status": self._json_status, "/healthz": _healthz}

    def _json_status(self, query: dict[str, list[str]]) -> Response:
        body = json.dumps(self.status(), indent=1, sort_keys=True, default=str).encode()
        return Response(200, "application/json", body)

    def _routes_page(self) -> dict[str, Handler]:
        from process_server.status_page import StatusPage

        self.page = StatusPage(self.status, self.recovery_points)

        def page(query: dict[str, list[str]]) -> Response:
            return Response(200, "text/html; charset=utf-8", self.page.html().encode())

        return {"/": page, "/api/status": self._json_status, "/healthz": _healthz}

    async def start_http(self) -> None:
        """Start the configured endpoints. Raises OSError when an address cannot be bound."""
        metrics_at: HostPort | None = self.cfg.metrics_listen
        page_at: HostPort | None = getattr(self.cfg, "status_listen", None)
        servers: dict[HostPort, dict[str, Handler]] = {}
        if metrics_at is not None:
            servers.setdefault(metrics_at, {}).update(self._routes_metrics())
        if page_at is not None:
            servers.setdefault(page_at, {}).update(self._routes_page())
            if page_at != metrics_at:  # the page links /metrics: serve it there too
                servers[page_at].update(self._routes_metrics())
        for address, routes in servers.items():
            server = HttpServer(address, routes, self.role)
            await server.start()
            self.http.append(server)

    async def close_http(self) -> None:
        for server in self.http:
            await server.close()
        self.http.clear()

    # ------------------------------------------------------------- admin
    def install_admin(self) -> None:
        """Serve the decorated status (alerts) and the ``reload`` and ``bandwidth`` commands on
        the service's admin socket."""
        admin = getattr(self.service, "admin", None) or getattr(self.service, "_admin", None)
        if admin is None:
            return

        async def status(request: dict[str, Any]) -> dict[str, Any]:
            return {"ok": True, **self.status()}

        async def reload(request: dict[str, Any]) -> dict[str, Any]:
            return self.reload()

        admin.handlers["status"] = status
        admin.handlers["reload"] = reload
        if self.limiter is not None:
            admin.handlers["bandwidth"] = self._admin_bandwidth

    async def _admin_bandwidth(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{"cmd": "bandwidth", "limit": "10MiB"}`` until the next reload; ``null`` removes the
        override, ``0`` means unlimited."""
        assert self.limiter is not None
        try:
            limit = request.get("limit")
            rate = None if limit is None else parse_rate(limit)
        except (ValueError, TypeError) as exc:
            return {"ok": False, "error": f"limit: {exc}"}
        self.limiter.set_override(rate)
        log.info("event=bandwidth_override limit_bytes_per_s=%s", rate)
        return {"ok": True, **self.limiter.status()}

    # ------------------------------------------------------------- reload
    def reload(self) -> dict[str, Any]:
        """Re-read the config file; apply what is safe; say what needs a restart."""
        self.notifier.reloading()
        try:
            if isinstance(self.cfg, AgentConfig):
                new: Any = load_agent_config(self.cfg.path)
                reloadable: tuple[str, ...] = AGENT_RELOADABLE
            else:
                new = load_server_config(self.cfg.path)
                reloadable = SERVER_RELOADABLE
        except ConfigError as exc:
            log.error("event=reload_failed error=%r (nothing changed)", str(exc))
            self.notifier.reloaded(f"reload failed, old configuration kept: {exc}")
            return {"ok": False, "error": str(exc)}
        applied, refused = diff_config(self.cfg, new, reloadable)
        merged = merge_config(self.cfg, new, reloadable)
        self.cfg = merged
        self.service.cfg = merged
        shipper = getattr(self.service, "shipper", None)
        if shipper is not None:
            shipper.cfg = merged
        keeper: Any = getattr(self.service, "points", None)  # the agent's PointKeeper: hooks
        if isinstance(getattr(keeper, "disk_cfg", None), dict) and isinstance(merged, AgentConfig):
            keeper.disk_cfg.update({d.id: d for d in merged.disks})
        if self.limiter is not None and isinstance(merged, AgentConfig):
            self.limiter.configure(merged.bandwidth_limit, merged.bandwidth_schedule)
        self.reloads += 1
        log.info(
            "event=reloaded applied=%s not_applied=%s%s",
            ",".join(applied) or "-",
            ",".join(refused) or "-",
            " (restart the service to apply these)" if refused else "",
        )
        self.notifier.reloaded(self.status_line())
        return {"ok": True, "applied": applied, "not_applied": refused}


def _healthz(query: dict[str, list[str]]) -> Response:
    return text(200, "ok")


async def run_service(
    ops: ServiceOps,
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    *,
    running: Callable[[], asyncio.Future[Any] | None] | None = None,
) -> int:
    """Start the service, tell systemd, serve signals until SIGTERM/SIGINT, stop within
    ``cfg.stop_timeout``. ``running()``, when given, is the service's main task (known after
    ``start``): its end stops the shell too. Returns the exit code."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    def on_hup() -> None:
        ops.reload()

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    ops.notifier.status("starting")
    await start()  # raises on failure, having cleaned up after itself
    code = 0
    tasks: list[asyncio.Task[None]] = []
    try:
        ops.install_admin()
        await ops.start_http()
        ops.tick()
        ops.notifier.ready(ops.status_line())
        log.info("event=service_ready role=%s pid=%d", ops.role, os.getpid())
        tasks = [
            asyncio.create_task(ops.run_ticks(), name="ops-ticks"),
            asyncio.create_task(ops.notifier.run_watchdog(), name="ops-watchdog"),
        ]
        main = running() if running is not None else None
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stopping.wait())}
        if main is not None:
            waiters.add(main)
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            if w is not main:
                w.cancel()
        if main is not None and main.done() and not stopping.is_set():
            log.error("event=service_ended_unexpectedly role=%s", ops.role)
            code = 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bound = float(getattr(ops.cfg, "stop_timeout", 60.0))
        ops.notifier.stopping(f"stopping: finishing in-flight writes (at most {bound:g}s)")
        log.info("event=service_stopping role=%s bound_seconds=%g", ops.role, bound)
        started = time.monotonic()
        with contextlib.suppress(OSError):
            await ops.close_http()
        try:
            await asyncio.wait_for(stop(), bound)
        except TimeoutError:
            log.error("event=stop_timeout role=%s bound_seconds=%g", ops.role, bound)
            code = 1
        ops.notifier.close()
        log.info(
            "event=service_stopped role=%s seconds=%.2f exit=%d",
            ops.role,
            time.monotonic() - started,
            code,
        )
    return code


async def run_task_service(
    ops: ServiceOps,
    main: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    request_stop: Callable[[], None],
) -> int:
    """:func:`run_service` for a service whose ``main(ready)`` runs until ``request_stop()``
    (the process server's ``serve``): ready when ``ready`` is set; a ``main`` that fails
    before that fails the start (its exception propagates)."""
    task: asyncio.Task[None] | None = None

    async def start() -> None:
        nonlocal task
        ready = asyncio.Event()
        task = asyncio.create_task(main(ready), name=f"{ops.role}-main")
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.is_set():
            waiter.cancel()
            task.result()  # raises what made it fail
            raise RuntimeError(f"{ops.role} ended during start")
        waiter.cancel()

    async def stop() -> None:
        request_stop()
        if task is not None:
            await task

    return await run_service(ops, start, stop, running=lambda: task)


__all__ = [
    "ServiceOps",
    "configure_service_logging",
    "diff_config",
    "merge_config",
    "run_service",
    "run_task_service",
]
