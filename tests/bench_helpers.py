"""Shared checks of the tests that run real tools and benchmarks: the tools are there (a
missing one skips, but fails under CI), finding a figure, nothing left behind, and a
loopback TCP server to measure against."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest


def require_tools(*tools: str) -> None:
    """Skip the test when a tool is missing; with ``CI`` set, fail it instead (CI installs
    every tool the tests use, so a missing one is a broken set-up, not a reason to skip)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {', '.join(missing)} is not installed")
    pytest.skip(f"{', '.join(missing)} not installed")


def figure_named(result: dict[str, Any], name: str) -> dict[str, Any]:
    """The figure called exactly ``name`` (AssertionError listing the names otherwise)."""
    for fig in result["figures"]:
        if fig["name"] == name:
            return dict(fig)
    raise AssertionError(f"no figure {name!r} in {[f['name'] for f in result['figures']]}")


def figure_prefixed(result: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The first figure whose name starts with ``prefix``."""
    for fig in result["figures"]:
        if fig["name"].startswith(prefix):
            return dict(fig)
    raise AssertionError(f"no figure {prefix!r} in {[f['name'] for f in result['figures']]}")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_nothing_left(private_tmp: Path, pids: dict[str, int]) -> None:
    """Every process the run reported has exited, and none mentions its temp dir."""
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [name for name, p in pids.items() if alive(p)]
    leftovers = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(private_tmp) in cmdline:
            leftovers.append((p.info["pid"], cmdline))
    assert leftovers == []


def direct_io_works(directory: Path) -> bool:
    """Can files in ``directory`` be opened with ``O_DIRECT`` (not on every filesystem)?"""
    probe = directory / "probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@contextlib.contextmanager
def loopback_server(serve: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP server on 127.0.0.1 (a port the kernel picks) that hands each connection to
    ``serve`` in a thread of its own; yields the port, and stops accepting at the end."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
