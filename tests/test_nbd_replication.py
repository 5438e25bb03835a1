"""NBD clients nobody here wrote, writing through a real agent process whose disk is replicated
to a real process server: after each client, once drained, the replica equals the source.

The comparison is made outside tidemark: `cmp`, `qemu-img compare`, and fio's own verify.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.deploy import Deployment

pytestmark = pytest.mark.interop
DISK = "nbdisk"
SIZE = 64 << 20
TOOLS = ["qemu-img", "qemu-io", "nbdcopy", "nbdinfo", "fio", "cmp"]


def _require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have {missing} (.ci/run installs them)")
        pytest.skip(f"missing {missing}")


def run(*cmd: str, timeout: float = 120) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    _require_tools()
    d = Deployment(tmp_path_factory.mktemp("nbdrep"))
    d.init_pki()
    d.add_agent("nbd01", {DISK: SIZE}, nbd=True)
    d.start_ps()
    d.start_agent("nbd01")
    yield d
    d.stop_all()


def uri(dep: Deployment) -> str:
    return f"nbd+unix:///{DISK}?socket={dep.agents['nbd01'].nbd[DISK]}"


def source(dep: Deployment) -> Path:
    return dep.agents["nbd01"].disks[DISK]


def converged(dep: Deployment, timeout: float = 60) -> None:
    """Wait until the process server applied everything the agent journaled, then compare bytes."""
    deadline = time.monotonic() + timeout
    while True:
        row = dep.agent_status("nbd01")["disks"][0]
        if row["acked_seq"] >= row["journaled_seq"]:
            break
        assert time.monotonic() < deadline, f"agent did not drain: {row}"
        time.sleep(0.1)
    dep.wait_applied(DISK, row["journaled_seq"], timeout=timeout)
    cmp = subprocess.run(
        ["cmp", str(source(dep)), str(dep.replica_path(DISK))], capture_output=True, text=True
    )
    assert cmp.returncode == 0, f"replica differs from source: {cmp.stdout}{cmp.stderr}"


def test_qemu_img_convert_then_compare(dep: Deployment, tmp_path: Path) -> None:
    src = tmp_path / "random.img"
    with open(src, "wb") as f:
        for i in range(SIZE // (1 << 20)):
            f.write(os.urandom(1 << 20) if i % 3 else bytes(1 << 20))  # data and zero runs
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri(dep))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri(dep))
    converged(dep)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(dep.replica_path(DISK)))


def test_qemu_io_patterns_zeroes_and_discards(dep: Deployment) -> None:
    cmds = [
        "write -P 0xab 0 64k",
        "write -P 0x11 1048576 4096",
        "write -P 0x22 1049088 7k",  # unaligned, overlapping the previous write
        "write -z 2097152 128k",
        "write -P 0x33 3145728 1M",
        "discard 3145728 64k",
        "write -P 0x44 5000000 1234",
        "flush",
        "read -P 0xab 0 64k",
        "read -P 0x11 1048576 512",
        "read -P 0x22 1049088 7k",
        "read -P 0 2097152 128k",
        "read -P 0 3145728 64k",
        "read -P 0x33 3211264 960k",
        "read -P 0x44 5000000 1234",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    out = run(*args, uri(dep))
    assert "Pattern verification failed" not in out
    converged(dep)


def test_nbdcopy_in_and_out(dep: Deployment, tmp_path: Path) -> None:
    src = tmp_path / "in.img"
    src.write_bytes(os.urandom(SIZE))
    run("nbdcopy", str(src), uri(dep))
    out = tmp_path / "out.img"
    run("nbdcopy", uri(dep), str(out))
    run("cmp", str(src), str(out))
    converged(dep)
    run("cmp", str(src), str(dep.replica_path(DISK)))


def test_nbdinfo_reports_size_and_flags(dep: Deployment) -> None:
    info = json.loads(run("nbdinfo", "--json", uri(dep)))
    export = info["exports"][0]
    assert export["export-size"] == SIZE
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False


def test_fio_random_writes_with_verify(dep: Deployment) -> None:
    out = run(
        "fio",
        "--name=rep",
        "--ioengine=nbd",
        f"--uri={uri(dep)}",
        "--rw=randwrite",
        "--bs=4k",
        "--size=32M",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--output-format=json",
    )
    result = json.loads(out[out.index("{") :])
    assert result["jobs"][0]["error"] == 0
    converged(dep)


def test_status_lists_the_export(dep: Deployment) -> None:
    status = dep.agent_status("nbd01")
    assert any(DISK in a for a in status["exports"])
    ps_row = next(r for r in dep.ps_status()["disks"] if r["disk"] == DISK)
    for key in (
        "agent",
        "disk",
        "state",
        "journaled_seq",
        "acked_seq",
        "applied_seq",
        "lag_bytes",
        "rpo_seconds",
        "replica_path",
    ):
        assert key in ps_row
