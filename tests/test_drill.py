"""The README's main job, the local disaster-recovery drill, passes end to end."""

from __future__ import annotations

import subprocess
import sys


def test_drill_passes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.drill", "--size-mib", "128", "--write-mib", "16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "IDENTICAL" in out.stdout and "drill PASSED" in out.stdout
    assert "EQUAL" in out.stdout  # tidemark-agent verify agreed
