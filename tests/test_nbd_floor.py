"""benchmarks/nbd_floor.py, the reference server of the NBD floor experiment, writes what a
real client sends: nbdcopy into it, then the image compared with the source byte for byte."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bench_helpers import require_tools


@pytest.mark.parametrize(
    "mode", ["once", "twice", "twice-threads", "once-inplace", "twice-inplace"]
)
def test_floor_server_stores_what_nbdcopy_sends(tmp_path: Path, mode: str) -> None:
    require_tools("nbdcopy")
    source, image, sock = tmp_path / "src", tmp_path / "img", tmp_path / "s.sock"
    source.write_bytes(os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(12345))
    with open(image, "wb") as f:
        f.truncate(4 << 30)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.nbd_floor",
            str(sock),
            mode,
            str(image),
            str(tmp_path / "j"),
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        subprocess.run(
            ["nbdcopy", str(source), f"nbd+unix:///?socket={sock}"], check=True, timeout=60
        )
    finally:
        server.terminate()
        server.wait(10)
    with open(image, "rb") as f:
        stored = f.read(source.stat().st_size)
    assert hashlib.sha256(stored).digest() == hashlib.sha256(source.read_bytes()).digest()
