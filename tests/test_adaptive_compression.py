"""Adaptive compression against real processes (agent/compression_level.py): an agent whose
NBD export qemu-img fills with 2:1-compressible data, replicating to a real process server
over TLS on loopback.

- A slow configured level (zstd 15, ~15 MB/s here) makes the encoder what the link waits
  for: the shipper steps down to faster levels, the data still goes compressed, and the
  replica equals the source.
- A bandwidth limit makes the link the bottleneck: while the backlog drains through it the
  shipper stays at the configured level (every byte saved is time saved).
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.deploy import Deployment
from benchmarks.driver import compressible
from common.admin import admin_request
from tests.bench_helpers import require_tools

DISK = "zdisk"


def _source(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(compressible(i, 1 << 20))


def _link(dep: Deployment, agent: str) -> dict[str, Any]:
    status = asyncio.run(
        admin_request(dep.agents[agent].state_dir / "admin.sock", {"cmd": "status"}, timeout=10)
    )
    return dict(status["link"])


def _copy_in(src: Path, uri: str) -> None:
    out = subprocess.run(
        ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


def _deploy(tmp_path: Path, mib: int, options: dict[str, Any]) -> tuple[Deployment, str, Path]:
    dep = Deployment(tmp_path / "d")
    dep.init_pki()
    spec = dep.add_agent("z01", {DISK: mib << 20}, nbd=True, options=options)
    src = tmp_path / "src.img"
    _source(src, mib)
    return dep, f"nbd+unix:///{DISK}?socket={spec.nbd[DISK]}", src


def _levels_while(dep: Deployment, busy: threading.Event) -> list[int]:
    """The disk's next-batch level, sampled every 20 ms until ``busy`` clears."""
    seen: list[int] = []
    while busy.is_set():
        level = _link(dep, "z01")["compression_levels"].get(DISK)
        if level is not None:
            seen.append(level)
        time.sleep(0.02)
    return seen


def _drain_and_compare(dep: Deployment, src: Path) -> dict[str, Any]:
    journaled = dep.agent_status("z01")["disks"][0]["journaled_seq"]
    dep.wait_applied(DISK, journaled, timeout=120)
    assert dep.replica_path(DISK).read_bytes() == src.read_bytes()
    return _link(dep, "z01")


@pytest.mark.timeout(180)
def test_a_slow_encoder_steps_down_and_still_compresses(tmp_path: Path) -> None:
    require_tools("qemu-img")
    dep, uri, src = _deploy(tmp_path, 48, {"compression_level": 15, "compression_fast_level": -3})
    with dep:
        dep.start_ps()
        dep.start_agent("z01")
        busy = threading.Event()
        busy.set()
        levels: list[int] = []
        sampler = threading.Thread(target=lambda: levels.extend(_levels_while(dep, busy)))
        sampler.start()
        try:
            _copy_in(src, uri)
            link = _drain_and_compare(dep, src)
        finally:
            busy.clear()
            sampler.join()
    assert levels, "no level was ever reported"
    assert min(levels) <= 12, f"the shipper never left level 15: {sorted(set(levels))}"
    assert all(-3 <= level <= 15 and level != 0 for level in levels)
    # Still compressed: the data is 2:1, so well under its size went over the link.
    assert link["wire_bytes_sent"] < 0.7 * link["raw_bytes_sent"], link


@pytest.mark.timeout(180)
def test_a_limited_link_keeps_the_configured_level(tmp_path: Path) -> None:
    require_tools("nbdcopy")
    options = {
        "compression_level": 3,
        "bandwidth_limit": "1MiB",
        "max_batch_bytes": "256KiB",  # many batches while the limit holds the backlog back
    }
    dep, uri, src = _deploy(tmp_path, 12, options)
    with dep:
        dep.start_ps()
        dep.start_agent("z01")
        # 64 KiB writes: 48 batches of 256 KiB, ~6 MiB on the wire at 1 MiB/s. (The first
        # batches may find the sender idle and step down; each later one, held by the
        # limit, steps back up.)
        out = subprocess.run(
            ["nbdcopy", "--request-size=65536", "--requests=1", str(src), uri],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 30
        while _link(dep, "z01")["batches_sent"] < 12:
            assert time.monotonic() < deadline, "the link sent too few batches"
            time.sleep(0.05)
        levels = []
        for _ in range(10):
            levels.append(_link(dep, "z01")["compression_levels"][DISK])
            time.sleep(0.05)
        row = dep.agent_status("z01")["disks"][0]
        assert row["lag_bytes"] > 1 << 20, f"the limit did not hold the backlog: {row}"
        assert levels == [3] * 10, levels
        _drain_and_compare(dep, src)
