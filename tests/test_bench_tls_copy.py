"""The TLS-copy baseline and floors (``benchmarks/tls_copy.py``): ``send --bytes`` sends exactly
that many bytes (the last block cut short), and ``serve`` writes them where they belong,
byte for byte, plain or zstd-compressed, through the page cache or with ``O_DIRECT``
(its unaligned tail through the page cache), one block after another or pipelined over
threads (``--threads``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.deploy import Deployment
from benchmarks.driver import compressible
from tests.bench_helpers import direct_io_works

MIB = 1 << 20
NBYTES = 5 * MIB + 12345  # not a multiple of the block nor of 4 KiB
SIZE = 16 * MIB


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tls-copy")
    dep = Deployment(root)
    dep.init_pki()
    dep.add_agent("sync", {"x": MIB})
    return dep.pki, root / "sync.bundle"


@pytest.mark.parametrize("threads", [0, 3])
@pytest.mark.parametrize("zstd", [False, True])
@pytest.mark.parametrize("direct", [False, True])
def test_exact_bytes_land_in_place(
    pki: tuple[Path, Path], tmp_path: Path, zstd: bool, direct: bool, threads: int
) -> None:
    pki_dir, bundle = pki
    out = tmp_path / "copy.img"
    level = (["--zstd", "1"] if zstd else []) + (["--threads", str(threads)] if threads else [])
    serve = ["serve", "--pki", str(pki_dir), "--out", str(out), "--size", str(SIZE), *level]
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.tls_copy", *serve, *(["--direct"] if direct else [])],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        send = ["send", "--bundle", str(bundle), "--port", str(port), "--bytes", str(NBYTES)]
        client = subprocess.run(
            [sys.executable, "-m", "benchmarks.tls_copy", *send, *level],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stderr
        assert json.loads(client.stdout)["bytes"] == NBYTES
        result = json.loads(server.stdout.readline())
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
    assert result["bytes"] == NBYTES and result["syncs"] >= 1
    assert result["threads"] == threads
    assert result["direct"] is (direct and direct_io_works(tmp_path))
    # The same blocks the sender made (benchmarks.driver.compressible), the last one cut.
    expected = b"".join(
        compressible(i, MIB)[: min(MIB, NBYTES - i * MIB)] for i in range(-(-NBYTES // MIB))
    )
    written = out.read_bytes()
    assert len(written) == SIZE
    assert written[:NBYTES] == expected
    assert written[NBYTES:] == bytes(SIZE - NBYTES)
