"""The process server's status page in a real headless browser (Debian's ``chromium``): served by
a real process server replicating a real agent's disk, it renders the disk with its state, RPO
and throughput charts, the recovery-point and jobs sections and the alerts; the screenshot is
not blank. The page is also checked for what the browser does not show: no script, and a CSP."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
import urllib.request
import zlib
from pathlib import Path

import pytest

from benchmarks.deploy import Deployment, Driver, free_port


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("CI must have chromium (apt-get install chromium)")
    pytest.skip("chromium missing (apt-get install chromium)")


def _headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # root in CI containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=1400,1000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG (what Chromium writes): width, height and
    the unfiltered rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line) if bpp == 3 else bytes(v for j, v in enumerate(line) if j % 4 != 3))
        prev = line
    return width, height, rows


def test_status_page_in_headless_chromium(tmp_path: Path) -> None:
    browser = _chromium()
    dep = Deployment(tmp_path / "d")
    dep.init_pki()
    port = free_port()
    dep.write_ps_config(status_listen=f"127.0.0.1:{port}")
    dep.add_agent("page01", {"page-root": 8 << 20, "page-data": 8 << 20})
    url = f"http://127.0.0.1:{port}/"
    with dep:
        dep.start_ps()
        driver = Driver(dep, "page01")
        try:
            for i in range(8):
                reply = driver.call(
                    op="write", disk="page-root", offset=i << 20, length=1 << 20, seed=i
                )
                assert reply["ok"], reply
            seq = int(reply["seq"]) if "seq" in reply else 8
            dep.wait_applied("page-root", seq)
            time.sleep(1.2)  # one more status tick, so the page has history to draw
            with urllib.request.urlopen(url, timeout=10) as response:
                html = response.read().decode()
                csp = response.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "<script" not in html
            dom = _headless(browser, tmp_path / "profile", "--dump-dom", url)
            assert dom.returncode == 0, dom.stderr
            for text in (
                "tidemark process server",
                "page-root",
                "page-data",
                "replicating",
                "RPO, last hour",
                "throughput, last hour",
                "Recovery points",
                "Jobs",
                "Alerts",
            ):
                assert text in dom.stdout, f"{text!r} not rendered"
            by_disk = {r["disk"]: r for r in dep.ps_status()["disks"]}
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                metrics = r.read().decode()  # the page's address serves /metrics too
            assert 'tidemark_disk_rpo_seconds{agent="page01",disk="page-root"}' in metrics
            if by_disk["page-root"].get(
                "points"
            ):  # the catalog has points: the timeline shows them
                assert "points</span>" in dom.stdout and "<line" in dom.stdout
                assert "tidemark_disk_newest_recovery_point_age_seconds{" in metrics
            shot = tmp_path / "status.png"
            out = _headless(browser, tmp_path / "profile", f"--screenshot={shot}", url)
            assert out.returncode == 0 and shot.exists(), out.stderr
        finally:
            driver.quit()
    width, height, rows = png_pixels(shot.read_bytes())
    assert (width, height) == (1400, 1000)
    background = rows[0][:3]
    inked = sum(
        1 for row in rows[::4] for x in range(0, len(row), 12) if row[x : x + 3] != background
    )
    colours = {row[x : x + 3] for row in rows[::4] for x in range(0, len(row), 12)}
    total = len(rows[::4]) * (len(rows[0]) // 12)
    assert inked > 0.01 * total, f"the screenshot is blank ({inked} of {total} samples inked)"
    assert len(colours) > 8, f"the screenshot has only {len(colours)} colours"
