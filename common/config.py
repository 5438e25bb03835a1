"""TOML configuration of the agent and the process server, validated at start.

Rule: every problem is a :class:`ConfigError` whose message names the file, the
key and what is wrong; unknown keys are errors too (a typo must not silently
fall back to a default). Every key is documented in docs/configuration.md.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from common.errors import ConfigError
from common.rate_limit import ScheduleEntry, parse_rate, parse_schedule
from common.units import parse_duration, parse_size

DISK_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
T = TypeVar("T")


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DiskConfig:
    id: str
    path: Path
    nbd: str | None = None
    mode: str = (
        "journal"  # "journal": the agent is in the write path; "scan": periodic digest scans
    )
    scan_interval: float = 300.0
    crash_consistent_interval: float = 1.0  # 0: no crash-consistent points from this agent
    app_consistent_interval: float = 0.0  # 0: app-consistent points only on request
    pre_snapshot_hook: tuple[str, ...] = ()  # argv, run before an app-consistent point
    post_snapshot_hook: tuple[str, ...] = ()  # argv, always run after the pre hook
    hook_timeout: float = 30.0
    rpo_target: float | None = None  # None: the agent's rpo_target (docs/operations.md)


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    name: str
    state_dir: Path
    process_server: HostPort
    credentials: Path
    disks: tuple[DiskConfig, ...]
    journal_quota: int = 4 << 30
    journal_segment: int = 64 << 20
    max_batch_bytes: int = 4 << 20
    window_batches: int = 8
    window_bytes: int = 64 << 20
    batch_delay: float = 0.0
    compression_level: int = 1
    compression_fast_level: int = -20  # agent/compression_level.py
    # A disk's first sync: "bulk" copies the image outside the journal while writes are held
    # (agent/bulk_copy.py); "journal" sends it as journal references, in seq order.
    initial_copy: str = "bulk"
    heartbeat_interval: float = 1.0
    reconnect_min: float = 0.1
    reconnect_max: float = 10.0
    connect_timeout: float = 10.0
    activity_log_extents: int = 1024
    # operations (docs/operations.md)
    metrics_listen: HostPort | None = None
    bandwidth_limit: int = 0  # bytes per second, 0 = unlimited
    bandwidth_schedule: tuple[ScheduleEntry, ...] = ()
    rpo_target: float = 300.0
    stop_timeout: float = 60.0

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "admin.sock"


@dataclass(frozen=True)
class GroupConfig:
    """A consistency group: ``disks`` get their points at one barrier."""

    name: str
    disks: tuple[str, ...]
    interval: float = 1.0
    hold_timeout: float = 2.0
    app_consistent_interval: float = 0.0


@dataclass(frozen=True)
class ServerConfig:
    path: Path
    listen: HostPort
    state_dir: Path
    pki_dir: Path
    cache_quota: int = 16 << 30
    cache_segment: int = 64 << 20
    max_batch_bytes: int = 32 << 20
    apply_sync_interval: float = 0.05
    heartbeat_timeout: float = 30.0
    verify_on_receive: bool = True
    undo: bool = True  # keep the undo log, hence recovery points
    retention: float = 86400.0  # how far back recovery points reach
    undo_quota: int = 64 << 30  # per disk; the oldest history goes first past it
    undo_segment: int = 64 << 20
    keep_all_points_for: float = 0.0  # 0: every point for the whole retention (no thinning)
    failover_dir: Path | None = None  # NBD sockets of failover exports (default state_dir/failover)
    groups: tuple[GroupConfig, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    # operations (docs/operations.md)
    metrics_listen: HostPort | None = None
    status_listen: HostPort | None = None
    rpo_target: float = 300.0
    rpo_targets: dict[str, float] = field(default_factory=dict)
    cache_key_file: Path | None = None  # AES-256-GCM keys sealing the cache (common/at_rest.py)
    stop_timeout: float = 60.0

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "admin.sock"


class _Section:
    """Typed access to one TOML table that remembers which keys were used."""

    def __init__(self, file: Path, name: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: [{name}] must be a table")
        self.file, self.name, self.table = file, name, table
        self.used: set[str] = set()

    def _err(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.name}.{key}: {problem}")

    def get(
        self,
        key: str,
        parse: Callable[[Any], T],
        default: T | None = None,
        *,
        required: bool = False,
    ) -> T:
        self.used.add(key)
        if key not in self.table:
            if required or default is None:
                raise self._err(key, "missing (required)")
            return default
        try:
            return parse(self.table[key])
        except (ValueError, TypeError, OverflowError) as exc:
            raise self._err(key, str(exc) or type(exc).__name__) from exc

    def optional(self, key: str, parse: Callable[[Any], T]) -> T | None:
        self.used.add(key)
        if key not in self.table:
            return None
        try:
            return parse(self.table[key])
        except (ValueError, TypeError, OverflowError) as exc:
            raise self._err(key, str(exc) or type(exc).__name__) from exc

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self._err(unknown[0], "unknown key (see docs/configuration.md)")


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _path(value: Any) -> Path:
    text = _str(value)
    if "\x00" in text:
        raise ValueError("path contains a NUL byte")
    return Path(text)


def _abs_path(base: Path) -> Callable[[Any], Path]:
    def parse(value: Any) -> Path:
        p = _path(value)
        return p if p.is_absolute() else (base / p)

    return parse


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _size_range(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        n = parse_size(value)
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi} bytes, got {n}")
        return n

    return parse


def _duration_range(lo: float, hi: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        s = parse_duration(value)
        if not lo <= s <= hi:
            raise ValueError(f"must be between {lo}s and {hi}s, got {s}s")
        return s

    return parse


def _rpo_targets(value: Any) -> dict[str, float]:
    """``{"web01-root" = "30s", ...}``: a target RPO per disk id (docs/operations.md)."""
    if not isinstance(value, dict):
        raise ValueError('expected a table of disk id = duration, e.g. {"web01-root" = "30s"}')
    parse = _duration_range(0, 30 * 86400)
    out = {}
    for disk_id, duration in value.items():
        try:
            out[_disk_id(disk_id)] = parse(duration)
        except ValueError as exc:
            raise ValueError(f"{disk_id}: {exc}") from exc
    return out


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def parse_host_port(value: Any) -> HostPort:
    """``"127.0.0.1:7700"``, ``"[::1]:7700"`` or ``"localhost:7700"``. Raises ValueError."""
    text = _str(value)
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", text)
    if not m:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return HostPort(host, port)


def _nbd_endpoint(value: Any) -> str:
    text = _str(value)
    if text.startswith("unix:") and len(text) > 5:
        return text
    if text.startswith("tcp:"):
        parse_host_port(text[4:])
        return text
    raise ValueError(f'expected "unix:/path.sock" or "tcp:HOST:PORT", got {text!r}')


def _mode(value: Any) -> str:
    text = _str(value)
    if text not in ("journal", "scan"):
        raise ValueError(f'expected "journal" or "scan", got {text!r}')
    return text


def _initial_copy(value: Any) -> str:
    text = _str(value)
    if text not in ("bulk", "journal"):
        raise ValueError(f'expected "bulk" or "journal", got {text!r}')
    return text


def _argv(value: Any) -> tuple[str, ...]:
    """A hook command: a string (split like a shell would, but never run by one) or a list."""
    if isinstance(value, str):
        argv = shlex.split(value)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        argv = list(value)
    else:
        raise ValueError(f"expected a command string or a list of strings, got {value!r}")
    if not argv or any("\x00" in a for a in argv):
        raise ValueError("empty command or NUL byte")
    return tuple(argv)


def _group_name(value: Any) -> str:
    text = _str(value)
    if not DISK_ID.match(text):
        raise ValueError(f"group name must match [a-z0-9][a-z0-9._-]{{0,63}}, got {text!r}")
    return text


def _disk_ids(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of disk ids")
    ids = tuple(_disk_id(v) for v in value)
    if len(set(ids)) != len(ids):
        raise ValueError("a disk is listed twice")
    return ids


def _disk_id(value: Any) -> str:
    text = _str(value)
    if not DISK_ID.match(text) or ".." in text:
        raise ValueError(f"disk id must match [a-z0-9][a-z0-9._-]{{0,63}}, got {text!r}")
    return text


def _name(value: Any) -> str:
    text = _str(value)
    if not NAME.match(text):
        raise ValueError(f"name must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}, got {text!r}")
    return text


MAX_UNIX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
ZSTD_LEVELS = (-100, 19)  # the levels the two compression keys accept (0: off)


def _check_socket_path(file: Path, key: str, socket: Path) -> None:
    if len(str(socket).encode()) > MAX_UNIX_PATH:
        raise ConfigError(
            f"{file}: {key}: {socket} is longer than the {MAX_UNIX_PATH} bytes a unix socket path may have"
        )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError) as exc:
        # ValueError: what tomllib lets through, e.g. an integer beyond int's digit limit
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def load_agent_config(path: Path) -> AgentConfig:
    """Load and validate an agent configuration file. Raises ConfigError."""
    path = Path(path)
    doc = _read_toml(path)
    base = path.parent.resolve()
    unknown = sorted(set(doc) - {"agent", "disk"})
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown table (expected [agent] and [[disk]])")
    a = _Section(path, "agent", doc.get("agent", {}))
    cfg_kwargs: dict[str, Any] = {
        "path": path,
        "name": a.get("name", _name, required=True),
        "state_dir": a.get("state_dir", _abs_path(base), required=True),
        "process_server": a.get("process_server", parse_host_port, required=True),
        "credentials": a.get("credentials", _abs_path(base), required=True),
    }
    optional = {
        "journal_quota": _size_range(1 << 20, 1 << 50),
        "journal_segment": _size_range(64 << 10, 1 << 30),
        "max_batch_bytes": _size_range(4 << 10, 32 << 20),
        "window_batches": _int_range(1, 1024),
        "window_bytes": _size_range(64 << 10, 4 << 30),
        "batch_delay": _duration_range(0, 10),
        "compression_level": _int_range(*ZSTD_LEVELS),
        "compression_fast_level": _int_range(*ZSTD_LEVELS),
        "initial_copy": _initial_copy,
        "heartbeat_interval": _duration_range(0.05, 3600),
        "reconnect_min": _duration_range(0.01, 3600),
        "reconnect_max": _duration_range(0.01, 3600),
        "connect_timeout": _duration_range(0.1, 3600),
        "activity_log_extents": _int_range(128, 65536),
        "metrics_listen": parse_host_port,
        "bandwidth_limit": parse_rate,
        "bandwidth_schedule": parse_schedule,
        "rpo_target": _duration_range(0, 30 * 86400),
        "stop_timeout": _duration_range(1, 3600),
    }
    for key, parser in optional.items():
        value = a.optional(key, parser)
        if value is not None:
            cfg_kwargs[key] = value
    a.finish()
    raw_disks = doc.get("disk", [])
    if not isinstance(raw_disks, list) or not raw_disks:
        raise ConfigError(f"{path}: disk: at least one [[disk]] table is required")
    disks: list[DiskConfig] = []
    for index, raw in enumerate(raw_disks):
        d = _Section(path, f"disk[{index}]", raw)
        disk = DiskConfig(
            id=d.get("id", _disk_id, required=True),
            path=d.get("path", _abs_path(base), required=True),
            nbd=d.optional("nbd", _nbd_endpoint),
            mode=d.get("mode", _mode, "journal"),
            scan_interval=d.get("scan_interval", _duration_range(1, 7 * 86400), 300.0),
            crash_consistent_interval=d.get(
                "crash_consistent_interval", _duration_range(0, 86400), 1.0
            ),
            app_consistent_interval=d.get(
                "app_consistent_interval", _duration_range(0, 7 * 86400), 0.0
            ),
            pre_snapshot_hook=d.optional("pre_snapshot_hook", _argv) or (),
            post_snapshot_hook=d.optional("post_snapshot_hook", _argv) or (),
            hook_timeout=d.get("hook_timeout", _duration_range(0.1, 3600), 30.0),
            rpo_target=d.optional("rpo_target", _duration_range(0, 30 * 86400)),
        )
        d.finish()
        if disk.crash_consistent_interval and disk.crash_consistent_interval < 0.1:
            raise ConfigError(
                f"{path}: disk[{index}].crash_consistent_interval: must be 0 (off) or at least 0.1s"
            )
        if disk.mode == "scan" and disk.nbd:
            raise ConfigError(
                f"{path}: disk[{index}].nbd: a scan-mode disk is written by another program; "
                "it cannot also be served over NBD"
            )
        if disk.nbd and disk.nbd.startswith("unix:"):
            _check_socket_path(path, f"disk[{index}].nbd", Path(disk.nbd[5:]))
        if any(other.id == disk.id for other in disks):
            raise ConfigError(f"{path}: disk[{index}].id: duplicate disk id {disk.id!r}")
        disks.append(disk)
    cfg = AgentConfig(disks=tuple(disks), **cfg_kwargs)
    _check_socket_path(path, "agent.state_dir", cfg.admin_socket)
    if cfg.max_batch_bytes > cfg.window_bytes:
        raise ConfigError(f"{path}: agent.window_bytes: must be at least agent.max_batch_bytes")
    if cfg.compression_fast_level == 0:
        raise ConfigError(
            f"{path}: agent.compression_fast_level: must not be 0 (a zstd level from "
            f"{ZSTD_LEVELS[0]} to {ZSTD_LEVELS[1]}; "
            "compression_level = 0 turns compression off)"
        )
    if cfg.compression_level and cfg.compression_fast_level > cfg.compression_level:
        raise ConfigError(
            f"{path}: agent.compression_fast_level: must be at most agent.compression_level "
            f"({cfg.compression_level})"
        )
    return cfg


def _load_groups(path: Path, raw_groups: Any) -> tuple[GroupConfig, ...]:
    if not isinstance(raw_groups, list):
        raise ConfigError(f"{path}: group: must be an array of tables ([[group]])")
    groups: list[GroupConfig] = []
    for index, raw in enumerate(raw_groups):
        g = _Section(path, f"group[{index}]", raw)
        group = GroupConfig(
            name=g.get("name", _group_name, required=True),
            disks=g.get("disks", _disk_ids, required=True),
            interval=g.get("interval", _duration_range(0, 86400), 1.0),
            hold_timeout=g.get("hold_timeout", _duration_range(0.01, 60), 2.0),
            app_consistent_interval=g.get(
                "app_consistent_interval", _duration_range(0, 7 * 86400), 0.0
            ),
        )
        g.finish()
        if any(other.name == group.name for other in groups):
            raise ConfigError(f"{path}: group[{index}].name: duplicate group {group.name!r}")
        for other in groups:
            shared = set(other.disks) & set(group.disks)
            if shared:
                raise ConfigError(
                    f"{path}: group[{index}].disks: {sorted(shared)[0]} is already in group {other.name}"
                )
        groups.append(group)
    return tuple(groups)


def load_server_config(path: Path) -> ServerConfig:
    """Load and validate a process-server configuration file. Raises ConfigError."""
    path = Path(path)
    doc = _read_toml(path)
    base = path.parent.resolve()
    unknown = sorted(set(doc) - {"server", "group"})
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown table (expected [server], [[group]])")
    s = _Section(path, "server", doc.get("server", {}))
    kwargs: dict[str, Any] = {
        "path": path,
        "listen": s.get("listen", parse_host_port, required=True),
        "state_dir": s.get("state_dir", _abs_path(base), required=True),
        "pki_dir": s.get("pki_dir", _abs_path(base), required=True),
    }
    optional = {
        "cache_quota": _size_range(16 << 20, 1 << 50),
        "cache_segment": _size_range(64 << 10, 1 << 30),
        "max_batch_bytes": _size_range(64 << 10, 32 << 20),
        "apply_sync_interval": _duration_range(0, 60),
        "heartbeat_timeout": _duration_range(1, 3600),
        "verify_on_receive": _bool,
        "undo": _bool,
        "retention": _duration_range(10, 366 * 86400),
        "undo_quota": _size_range(16 << 20, 1 << 50),
        "undo_segment": _size_range(64 << 10, 1 << 30),
        "keep_all_points_for": _duration_range(0, 366 * 86400),
        "failover_dir": _abs_path(base),
        "metrics_listen": parse_host_port,
        "status_listen": parse_host_port,
        "rpo_target": _duration_range(0, 30 * 86400),
        "rpo_targets": _rpo_targets,
        "cache_key_file": _abs_path(base),
        "stop_timeout": _duration_range(1, 3600),
    }
    for key, parser in optional.items():
        value = s.optional(key, parser)
        if value is not None:
            kwargs[key] = value
    s.finish()
    kwargs["groups"] = _load_groups(path, doc.get("group", []))
    key_file = kwargs.get("cache_key_file")
    if key_file is not None:
        state, real = kwargs["state_dir"].resolve(), key_file.resolve()
        if real == state or state in real.parents:
            raise ConfigError(
                f"{path}: server.cache_key_file: {key_file} is inside server.state_dir; keep "
                "the key outside it, or whoever copies the state directory has the key too"
            )
    cfg = ServerConfig(**kwargs)
    _check_socket_path(path, "server.state_dir", cfg.admin_socket)
    return cfg


@dataclass(frozen=True)
class MtDiskConfig:
    id: str
    path: Path  # the original source disk, or a new disk of the same size (alternate)
    agent_state_dir: Path | None = None  # the agent's state dir for this disk: its journal
    alternate: bool = False  # a new disk: everything is copied (sparse, compressed)


@dataclass(frozen=True)
class MasterTargetConfig:
    path: Path
    name: str
    state_dir: Path
    process_server: HostPort
    credentials: Path
    disks: tuple[MtDiskConfig, ...]
    cache_quota: int = 16 << 30
    cache_segment: int = 64 << 20
    heartbeat_interval: float = 1.0
    reconnect_min: float = 0.1
    reconnect_max: float = 10.0
    connect_timeout: float = 10.0

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "admin.sock"


def load_mt_config(path: Path) -> MasterTargetConfig:
    """Load and validate a master-target configuration file. Raises ConfigError."""
    path = Path(path)
    doc = _read_toml(path)
    base = path.parent.resolve()
    unknown = sorted(set(doc) - {"master_target", "disk"})
    if unknown:
        raise ConfigError(
            f"{path}: {unknown[0]}: unknown table (expected [master_target] and [[disk]])"
        )
    m = _Section(path, "master_target", doc.get("master_target", {}))
    kwargs: dict[str, Any] = {
        "path": path,
        "name": m.get("name", _name, required=True),
        "state_dir": m.get("state_dir", _abs_path(base), required=True),
        "process_server": m.get("process_server", parse_host_port, required=True),
        "credentials": m.get("credentials", _abs_path(base), required=True),
    }
    optional = {
        "cache_quota": _size_range(16 << 20, 1 << 50),
        "cache_segment": _size_range(64 << 10, 1 << 30),
        "heartbeat_interval": _duration_range(0.05, 3600),
        "reconnect_min": _duration_range(0.01, 3600),
        "reconnect_max": _duration_range(0.01, 3600),
        "connect_timeout": _duration_range(0.1, 3600),
    }
    for key, parser in optional.items():
        value = m.optional(key, parser)
        if value is not None:
            kwargs[key] = value
    m.finish()
    raw_disks = doc.get("disk", [])
    if not isinstance(raw_disks, list) or not raw_disks:
        raise ConfigError(f"{path}: disk: at least one [[disk]] table is required")
    disks: list[MtDiskConfig] = []
    for index, raw in enumerate(raw_disks):
        d = _Section(path, f"disk[{index}]", raw)
        disk = MtDiskConfig(
            id=d.get("id", _disk_id, required=True),
            path=d.get("path", _abs_path(base), required=True),
            agent_state_dir=d.optional("agent_state_dir", _abs_path(base)),
            alternate=d.get("alternate", _bool, False),
        )
        d.finish()
        if any(other.id == disk.id for other in disks):
            raise ConfigError(f"{path}: disk[{index}].id: duplicate disk id {disk.id!r}")
        disks.append(disk)
    cfg = MasterTargetConfig(disks=tuple(disks), **kwargs)
    _check_socket_path(path, "master_target.state_dir", cfg.admin_socket)
    return cfg
