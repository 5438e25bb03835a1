"""A whole tidemark deployment on loopback, made of real processes: PKI, process server, agents.

Used by the tests, the benchmarks and the drill. Rule: everything lives under one
root directory and every process it starts is stopped (or killed) by it; nothing
is left behind.
"""

from __future__ import annotations

import compileall
import contextlib
import functools
import json
import os
import py_compile
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PYTHON = sys.executable
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"  # as Environment= in packaging/systemd/*.service
PACKAGES = ("agent", "benchmarks", "common", "master_target", "process_server", "protocol")


@functools.cache
def ensure_bytecode() -> None:
    """Byte-compile tidemark once, as ``pip install`` does for an installed package, so that
    every process started here loads ``.pyc`` files instead of compiling its sources again
    (``PYTHONDONTWRITEBYTECODE`` is set on CI machines and would otherwise make each process
    start ~0.2 s slower than it does on a real host)."""
    root = Path(__file__).resolve().parent.parent
    for package in PACKAGES:
        with contextlib.suppress(OSError):  # a read-only checkout: start as it is
            compileall.compile_dir(root / package, quiet=2)


SERVICE_PACKAGES = ("agent", "common", "protocol", "process_server", "master_target")


def compile_packages(root: Path) -> None:
    """Byte-compile the services' packages under ``root`` as ``scripts/bootstrap`` does (each
    .pyc checked against its source's hash), so that processes importing them from there load
    the .pyc files even where ``PYTHONDONTWRITEBYTECODE`` is set."""
    for name in SERVICE_PACKAGES:
        compileall.compile_dir(
            root / name, quiet=2, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _toml_table(values: dict[str, Any]) -> str:
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items() if v is not None)


@dataclass
class AgentSpec:
    name: str
    config: Path
    state_dir: Path
    disks: dict[str, Path] = field(default_factory=dict)
    nbd: dict[str, str] = field(default_factory=dict)


def service_env() -> dict[str, str]:
    """The environment the packaged systemd units give tidemark's services (see
    packaging/systemd and docs/operations.md): unbuffered output and glibc's malloc
    advising transparent huge pages for its large buffers."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, MALLOC_TUNABLE) if t)
    return env


class Deployment:
    """PKI + one process server + any number of agents under ``root``."""

    def __init__(
        self, root: Path, *, port: int | None = None, ps_options: dict[str, Any] | None = None
    ) -> None:
        ensure_bytecode()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pki = self.root / "pki"
        self.port = port or free_port()
        self.ps_state = self.root / "ps"
        self.ps_config = self.root / "ps.toml"
        self.ps_options = ps_options or {}
        self.ps_proc: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, AgentSpec] = {}
        self.agent_procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []

    # ----------------------------------------------------------------- set-up
    def cli(
        self, module: str, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", module, *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def init_pki(self) -> None:
        if not (self.pki / "ca.key").exists():
            self.cli("process_server.cli", "pki", "init", "--dir", str(self.pki))
        self.write_ps_config()

    def write_ps_config(self, **options: Any) -> None:
        self.ps_options.update(options)
        values: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "state_dir": str(self.ps_state),
            "pki_dir": str(self.pki),
        }
        values.update(self.ps_options)
        groups = values.pop("groups", {})
        text = "[server]\n" + _toml_table(values)
        for name, group in groups.items():
            text += "\n[[group]]\n" + _toml_table({"name": name, **group})
        self.ps_config.write_text(text)

    def add_agent(
        self,
        name: str,
        disks: dict[str, int | Path],
        *,
        nbd: bool = False,
        options: dict[str, Any] | None = None,
        role: str = "agent",
        disk_options: dict[str, dict[str, Any]] | None = None,
    ) -> AgentSpec:
        """Issue credentials, create sparse disk images (size in bytes) and write agent.toml."""
        bundle = self.root / f"{name}.bundle"
        if not bundle.exists():
            self.cli(
                "process_server.cli",
                "pki",
                "issue",
                "--dir",
                str(self.pki),
                "--name",
                name,
                "--out",
                str(bundle),
                "--role",
                role,
            )
        spec = AgentSpec(name, self.root / f"{name}.toml", self.root / f"agent-{name}")
        text = "[agent]\n" + _toml_table(
            {
                "name": name,
                "state_dir": str(spec.state_dir),
                "process_server": f"127.0.0.1:{self.port}",
                "credentials": str(bundle),
                "reconnect_min": "50ms",
                "reconnect_max": "1s",
                **(options or {}),
            }
        )
        for disk_id, size_or_path in disks.items():
            if isinstance(size_or_path, Path):
                image = size_or_path
            else:
                image = self.root / f"{disk_id}.img"
                with open(image, "wb") as f:
                    f.truncate(size_or_path)
            spec.disks[disk_id] = image
            text += "\n[[disk]]\n" + _toml_table(
                {"id": disk_id, "path": str(image), **(disk_options or {}).get(disk_id, {})}
            )
            if nbd:
                sock = self.root / f"{disk_id}.sock"
                spec.nbd[disk_id] = str(sock)
                text += _toml_table({"nbd": f"unix:{sock}"})
        spec.config.write_text(text)
        self.agents[name] = spec
        return spec

    # ----------------------------------------------------------------- processes
    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.root / log_name, "ab")  # noqa: SIM115 - closed in stop_all
        self._logs.append(log)
        env = service_env()
        return subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def start_ps(self, timeout: float = 30) -> subprocess.Popen[bytes]:
        self.ps_proc = self._spawn(
            [PYTHON, "-m", "process_server.cli", "serve", "--config", str(self.ps_config)], "ps.log"
        )
        self._wait_socket(self.ps_state / "admin.sock", self.ps_proc, timeout)
        return self.ps_proc

    def start_agent(self, name: str, timeout: float = 30) -> subprocess.Popen[bytes]:
        spec = self.agents[name]
        proc = self._spawn(
            [PYTHON, "-m", "agent.cli", "run", "--config", str(spec.config)], f"agent-{name}.log"
        )
        self.agent_procs[name] = proc
        self._wait_socket(spec.state_dir / "admin.sock", proc, timeout)
        return proc

    def _wait_socket(self, path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"process exited with {proc.returncode}; see logs in {self.root}"
                )
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                return
            time.sleep(0.02)
        raise TimeoutError(f"{path} did not appear within {timeout}s")

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 30) -> int | None:
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop_ps(self) -> int | None:
        return self._stop(self.ps_proc, signal.SIGTERM)

    def kill_ps(self) -> None:
        self._stop(self.ps_proc, signal.SIGKILL)

    def stop_agent(self, name: str) -> int | None:
        return self._stop(self.agent_procs.get(name), signal.SIGTERM)

    def kill_agent(self, name: str) -> None:
        self._stop(self.agent_procs.get(name), signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.agent_procs):
            self.stop_agent(name)
        self.stop_ps()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    # ----------------------------------------------------------------- observing
    def ps_json(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """``tidemark-ps ARGS --config ps.toml --json``: its JSON reply, with ``returncode``
        added (and ``stderr`` when it printed any, ``stdout`` when that was not JSON)."""
        out = self.cli(
            "process_server.cli",
            *args,
            "--config",
            str(self.ps_config),
            "--json",
            check=False,
            timeout=timeout,
        )
        try:
            reply = dict(json.loads(out.stdout)) if out.stdout.strip() else {}
        except (TypeError, ValueError):  # not JSON, or not an object
            reply = {"stdout": out.stdout}
        reply.setdefault("returncode", out.returncode)
        if out.stderr.strip():
            reply.setdefault("stderr", out.stderr.strip()[-2000:])
        return reply

    def ps_status(self) -> dict[str, Any]:
        out = self.cli("process_server.cli", "status", "--config", str(self.ps_config), "--json")
        return dict(json.loads(out.stdout))

    def agent_status(self, name: str) -> dict[str, Any]:
        out = self.cli("agent.cli", "status", "--config", str(self.agents[name].config), "--json")
        return dict(json.loads(out.stdout))

    def replica_path(self, disk_id: str) -> Path:
        return self.ps_state / "disks" / disk_id / "replica.img"

    def wait_applied(self, disk_id: str, seq: int, timeout: float = 60) -> dict[str, Any]:
        """Poll the process server until ``applied_seq >= seq`` for the disk."""
        deadline = time.monotonic() + timeout
        row: dict[str, Any] = {}
        while time.monotonic() < deadline:
            for row in self.ps_status()["disks"]:
                if row["disk"] == disk_id and row["applied_seq"] >= seq:
                    return row
            time.sleep(0.1)
        raise TimeoutError(f"{disk_id}: applied_seq did not reach {seq}: {row}")


class Driver:
    """A writer process (benchmarks/driver.py) running one agent through the Python API."""

    def __init__(self, deployment: Deployment, agent: str) -> None:
        spec = deployment.agents[agent]
        self.log = open(deployment.root / f"driver-{agent}.log", "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "benchmarks.driver", str(spec.config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=service_env(),
            start_new_session=True,
        )
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"driver did not start: {ready}")
        self.pid = int(ready["pid"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise ConnectionError(f"driver exited ({self.proc.poll()})")
        return dict(json.loads(line))

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()
        return self._read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.close()

    def quit(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ConnectionError, BrokenPipeError):
                self.call(op="quit")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.close()

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.log.close()
