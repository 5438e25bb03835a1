"""Interop: NBD clients nobody here wrote (qemu-img, qemu-io, nbdcopy, nbdinfo, fio) against a real
ProtectedDisk export. After each client, the image file is checked by means independent of our
code (hashlib / byte comparison / fio's own verify on the file). A missing tool skips only
outside CI; with CI set it fails."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.disk import ProtectedDisk
from agent.nbd_server import NbdExport
from tests.bench_helpers import require_tools

pytestmark = pytest.mark.interop

SIZE = 32 << 20
DISK_ID = "disk-1"


async def run(*cmd: str, timeout: float = 30, check: bool = True) -> str:
    """Run a client while the export keeps serving on this loop; fail with its output."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    assert proc.returncode == 0 or not check, f"{cmd[0]} exited {proc.returncode}:\n{text}"
    return text


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


@pytest.fixture
async def disk(tmp_path: Path, image: Path) -> AsyncIterator[ProtectedDisk]:
    d = await ProtectedDisk.open(DISK_ID, image, tmp_path / "journal")
    yield d
    await d.close()


@pytest.fixture
async def export(disk: ProtectedDisk, tmp_path: Path) -> AsyncIterator[NbdExport]:
    async with NbdExport(disk, f"unix:{tmp_path}/nbd.sock") as e:
        yield e


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Random data with zero runs (which clients send as WRITE_ZEROES / skip)."""
    src = tmp_path / "src.img"
    rnd = os.urandom(SIZE)
    chunks = [
        rnd[i : i + (1 << 20)] if (i >> 20) % 3 else bytes(1 << 20) for i in range(0, SIZE, 1 << 20)
    ]
    src.write_bytes(b"".join(chunks))
    return src


async def test_qemu_img_convert_and_compare(export: NbdExport, image: Path, source: Path) -> None:
    require_tools("qemu-img")
    # Pre-dirty the image so the zero runs really have to be written as zeroes.
    await run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {SIZE}", export.address)
    await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), export.address)
    out = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), export.address)
    assert "identical" in out.lower()
    assert sha(image) == sha(source)


async def test_qemu_io_mixed_operations(export: NbdExport, image: Path) -> None:
    require_tools("qemu-io")
    ops = [
        ("write -P 0xab 0 64k", [(0, 65536, 0xAB)]),
        ("write -P 0x11 1000 3000", [(1000, 3000, 0x11)]),  # unaligned
        ("write -P 0x22 1M 1M", [(1 << 20, 1 << 20, 0x22)]),
        ("write -P 0x33 -f 3M 4k", [(3 << 20, 4096, 0x33)]),  # FUA
        ("write -P 0x44 4M 8M", [(4 << 20, 8 << 20, 0x44)]),  # larger than qemu's request size
        ("write -z 4M 64k", [(4 << 20, 65536, 0)]),
        ("write -z -u 5M 128k", [(5 << 20, 128 << 10, 0)]),  # may unmap
        ("discard 6M 64k", [(6 << 20, 65536, 0)]),  # trimmed ranges read back as zeroes here
        ("write -P 0x55 32767k 1k", [((32 << 20) - 1024, 1024, 0x55)]),  # the last KiB
        ("flush", []),
    ]
    expected = bytearray(SIZE)
    args = []
    for cmd, effects in ops:
        args += ["-c", cmd]
        for offset, length, byte in effects:
            expected[offset : offset + length] = bytes([byte]) * length
    checks = [
        "read -P 0xab 0 1000",
        "read -P 0x11 1000 3000",
        "read -P 0xab 4000 61536",
        "read -P 0x22 1M 1M",
        "read -P 0x33 3M 4k",
        "read -P 0 4M 64k",
        "read -P 0x44 4160k 960k",
        "read -P 0 5M 128k",
        "read -P 0 6M 64k",
        "read -P 0x55 32767k 1k",
        "read -v 0 16",
    ]
    for cmd in checks:
        args += ["-c", cmd]
    out = await run("qemu-io", "-f", "raw", *args, export.address)
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    assert image.read_bytes() == bytes(expected)


async def test_qemu_io_failure_leaves_the_export_serving(export: NbdExport) -> None:
    require_tools("qemu-io")
    out = await run(
        "qemu-io", "-f", "raw", "-c", f"read {SIZE - 512} 1024", export.address, check=False
    )
    assert "read failed" in out
    await run("qemu-io", "-f", "raw", "-c", "read -P 0 0 4k", export.address)


async def test_nbdcopy_in_and_out(
    export: NbdExport, image: Path, source: Path, tmp_path: Path
) -> None:
    require_tools("nbdcopy")
    await run("nbdcopy", "--flush", str(source), export.address)
    assert sha(image) == sha(source)
    out = tmp_path / "out.img"
    await run("nbdcopy", export.address, str(out))
    assert out.stat().st_size == SIZE
    assert sha(out) == sha(source)


async def test_nbdinfo_json(export: NbdExport) -> None:
    require_tools("nbdinfo")
    info = json.loads(await run("nbdinfo", "--json", export.address))
    (e,) = info["exports"]
    assert e["export-size"] == SIZE
    assert e["export-name"] == DISK_ID
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert e[flag] is True, flag
    assert e["is_read_only"] is False
    assert e["block_size_minimum"] == 1
    assert e["block_size_preferred"] == 4096
    assert e["block_size_maximum"] == 32 << 20
    listing = await run("nbdinfo", "--list", "--json", export.address)
    assert [x["export-name"] for x in json.loads(listing)["exports"]] == [DISK_ID]


async def test_nbdinfo_read_only_over_tcp(disk: ProtectedDisk) -> None:
    require_tools("nbdinfo")
    disk.read_only = True
    async with NbdExport(disk, "tcp:127.0.0.1:0") as export:
        (e,) = json.loads(await run("nbdinfo", "--json", export.address))["exports"]
    disk.read_only = False
    assert e["is_read_only"] is True
    assert e["can_trim"] is False and e["can_zero"] is False
    assert e["can_flush"] is True and e["can_multi_conn"] is True


async def test_fio_randwrite_verify(export: NbdExport, image: Path) -> None:
    require_tools("fio")
    job = [
        "--name=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--size=16M",
        "--verify=crc32c",
        "--verify_state_save=0",
    ]
    out = await run(
        "fio",
        *job,
        "--ioengine=nbd",
        f"--uri={export.address}",
        "--iodepth=16",
        "--output-format=json",
        timeout=45,
    )
    result = json.loads(out[out.index("{") :])
    assert result["jobs"][0]["error"] == 0
    assert result["jobs"][0]["write"]["io_bytes"] == 16 << 20
    # fio itself re-verifies the image file, without our code in the way.
    await run("fio", *job, "--ioengine=psync", f"--filename={image}", "--verify_only")
    assert image.read_bytes()[16 << 20 :] == bytes(16 << 20)  # nothing past the job's range


async def test_qemu_img_over_tcp(disk: ProtectedDisk, image: Path, source: Path) -> None:
    require_tools("qemu-img")
    async with NbdExport(disk, "tcp:127.0.0.1:0") as export:
        await run(
            "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), export.address
        )
        out = await run(
            "qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), export.address
        )
    assert "identical" in out.lower()
    assert sha(image) == sha(source)
