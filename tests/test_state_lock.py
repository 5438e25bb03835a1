"""One process owns a state directory: a second server on it is refused, and an offline
``status`` never opens (and so never truncates) the logs of a server that does not answer."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from benchmarks.deploy import PYTHON, Deployment, service_env
from common.config import load_server_config
from common.state_lock import StateDirBusy, hold_state_dir, state_dir_held
from process_server.server import offline_status


def test_the_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    busy = pytest.raises(StateDirBusy, match=f"in use by first pid {os.getpid()}")
    with state_dir_held(tmp_path, "first"), busy:
        hold_state_dir(tmp_path, "second")
    os.close(hold_state_dir(tmp_path, "second"))  # released with its descriptor


def _files(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
        if p.is_file() and p.name != "owner.lock"
    }


def _refused(module: str, command: str, config: Path, message: str) -> None:
    """A second service started on a held state directory exits at once, saying why."""
    second = subprocess.run(
        [PYTHON, "-m", module, command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=service_env(),
    )
    assert second.returncode != 0
    assert message in second.stderr, second.stderr


def test_a_second_server_is_refused_and_offline_status_leaves_a_live_server_alone(
    tmp_path: Path,
) -> None:
    dep = Deployment(tmp_path / "d")
    dep.init_pki()
    dep.add_agent("lk01", {"lk0": 8 << 20})
    cfg = load_server_config(dep.ps_config)
    with dep:
        dep.start_ps()
        dep.start_agent("lk01")
        dep.wait_applied("lk0", 0)
        dep.stop_agent("lk01")
        _refused(
            "process_server.cli",
            "serve",
            dep.ps_config,
            f"{dep.ps_state} is in use by tidemark-ps serve pid",
        )
        assert dep.ps_status()["disks"], "the first server must still answer"
        before = _files(dep.ps_state / "disks")
        status = offline_status(cfg)  # as when the admin socket does not answer in time
        assert status["running"] is True and status["answering"] is False
        assert "in use by tidemark-ps serve" in status["error"] and status["disks"] == []
        assert _files(dep.ps_state / "disks") == before, "a live server's files were touched"
        dep.stop_ps()
        stopped = offline_status(cfg)
        assert stopped["running"] is False
        assert [row["disk"] for row in stopped["disks"]] == ["lk0"]


def test_a_second_agent_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "d")
    dep.init_pki()
    spec = dep.add_agent("lk02", {"lk2": 8 << 20})
    with dep:
        dep.start_ps()
        dep.start_agent("lk02")
        dep.wait_applied("lk2", 0)
        journal = spec.state_dir / "disks" / "lk2"
        before = _files(journal)
        _refused(
            "agent.cli", "run", spec.config, f"{spec.state_dir} is in use by tidemark-agent run pid"
        )
        assert _files(journal) == before, "the second agent touched the first one's files"
        assert dep.agent_status("lk02")["disks"], "the first agent must still answer"
        dep.stop_agent("lk02")
        restarted = dep.start_agent("lk02")  # the lock went with the first agent
        assert restarted.poll() is None
