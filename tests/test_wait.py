"""``tidemark-agent wait``: returns once the named disks are protected up to the moment it was
asked (initial sync done, every earlier write acknowledged), exit 1 on its timeout, while the
disks go on being written; checked against the process server's own status and ``cmp``."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cli import wait_timeout
from agent.service import _wait_disks, _wait_timeout
from benchmarks.deploy import AgentSpec, Deployment, Driver
from common.admin import admin_request

MiB = 1 << 20


def make_image(path: Path, size: int, seed: int) -> None:
    """Random 1 MiB runs over half of the image, holes elsewhere."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, MiB):
            if rnd.random() < 0.5:
                f.seek(offset)
                f.write(rnd.randbytes(MiB))


def protected_image(
    dep: Deployment, tmp_path: Path, size: int, seed: int
) -> tuple[AgentSpec, Path]:
    """An image of ``size`` bytes (``make_image``) as disk d1 of agent a1, not started."""
    image = tmp_path / "src.img"
    make_image(image, size, seed)
    return dep.add_agent("a1", {"d1": image}), image


def cmp(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def wait_cli(dep: Deployment, agent: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = str(dep.agents[agent].config)
    return dep.cli("agent.cli", "wait", "--config", config, *args, check=False)


def ps_row(dep: Deployment, disk: str) -> dict:
    return next(r for r in dep.ps_status()["disks"] if r["disk"] == disk)


@pytest.fixture
def dep(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path / "d")
    d.init_pki()
    yield d
    d.stop_all()


def test_wait_times_out_without_the_process_server_then_returns_once_synced(
    dep: Deployment, tmp_path: Path
) -> None:
    _, image = protected_image(dep, tmp_path, 64 * MiB, seed=1)
    dep.start_agent("a1")  # no process server yet: the initial sync cannot run

    t0 = time.monotonic()
    out = wait_cli(dep, "a1", "d1", "--timeout", "1s")
    assert out.returncode == 1, out
    assert time.monotonic() - t0 >= 1.0
    assert "not protected within 1 s: d1 (initial-sync)" in out.stderr

    dep.start_ps()
    out = wait_cli(dep, "a1", "--json", "--timeout", "120s")  # every disk
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["ok"] and [r["disk"] for r in reply["disks"]] == ["d1"]
    assert reply["disks"][0]["state"] == "replicating" and reply["disks"][0]["protected"]
    # A bulk initial copy is durable in the replica before the disk leaves initial-sync, and
    # nothing was written meanwhile: the replica is the image now, without waiting more.
    assert cmp(image, dep.replica_path("d1"))


def test_wait_covers_the_writes_made_before_it_while_writes_go_on(
    dep: Deployment, tmp_path: Path
) -> None:
    _, image = protected_image(dep, tmp_path, 32 * MiB, seed=2)
    dep.start_ps()
    driver = Driver(dep, "a1")
    stop = threading.Event()
    lock = threading.Lock()

    def write(seed: int) -> int:
        with lock:
            reply = driver.call(
                op="write", disk="d1", offset=(seed * 65536) % (32 * MiB), length=65536, seed=seed
            )
            assert reply["ok"], reply
            return int(driver.call(op="status")["status"]["disks"][0]["journaled_seq"])

    during: list[int] = []  # journaled seqs of the writes made while the wait ran

    def keep_writing() -> None:
        seed = 1000
        while not stop.is_set():
            during.append(write(seed))
            seed += 1
            time.sleep(0.005)

    try:
        out = wait_cli(dep, "a1", "d1", "--timeout", "120s")
        assert out.returncode == 0, out.stderr
        before = max(write(i) for i in range(50))  # journaled before the wait is asked
        writer = threading.Thread(target=keep_writing)
        writer.start()
        try:
            out = wait_cli(dep, "a1", "d1", "--json", "--timeout", "60s")
        finally:
            stop.set()
            writer.join()
        assert out.returncode == 0, out.stderr  # it returned while the disk was still written
        assert during and during[-1] > before, "no write went on during the wait"
        row = json.loads(out.stdout)["disks"][0]
        assert row["target_seq"] >= before and row["acked_seq"] >= row["target_seq"]
        # The process server's own account: everything through the target is cached there.
        assert ps_row(dep, "d1")["cached_seq"] >= row["target_seq"]
        final = int(driver.call(op="status")["status"]["disks"][0]["journaled_seq"])
        assert driver.call(op="flush", disk="d1")["ok"]
        out = wait_cli(dep, "a1", "d1", "--timeout", "60s")
        assert out.returncode == 0, out.stderr
        assert "d1: protected through seq" in out.stdout
        dep.wait_applied("d1", final)
        assert cmp(image, dep.replica_path("d1"))
    finally:
        driver.quit()


def test_wait_refuses_what_it_cannot_wait_for(dep: Deployment, tmp_path: Path) -> None:
    protected_image(dep, tmp_path, 8 * MiB, seed=3)

    out = wait_cli(dep, "a1", "d1", "--timeout", "5s")  # the agent is not running
    assert out.returncode == 1 and "not running" in out.stderr, out

    dep.start_ps()
    dep.start_agent("a1")
    out = wait_cli(dep, "a1", "nope", "--timeout", "5s")
    assert out.returncode == 1 and "no disk 'nope' on this agent" in out.stderr, out
    for bad in ("0", "-1s", "soon"):
        out = wait_cli(dep, "a1", "d1", "--timeout", bad)
        assert out.returncode == 2 and "--timeout" in out.stderr, (bad, out)


def test_wait_ends_when_the_agent_stops(dep: Deployment, tmp_path: Path) -> None:
    spec, _ = protected_image(dep, tmp_path, 8 * MiB, seed=4)
    dep.start_agent("a1")  # no process server: the disk never gets protected

    async def wait_through_a_stop() -> dict:
        # The request itself, not the CLI: a CLI still starting when the agent stops would
        # find no socket, and the test would be about a race instead of the answer.
        reader, writer = await asyncio.open_unix_connection(str(spec.state_dir / "admin.sock"))
        try:
            writer.write(json.dumps({"cmd": "wait", "disks": ["d1"]}).encode() + b"\n")
            await writer.drain()
            await asyncio.sleep(1.0)
            assert not reader.at_eof()  # still waiting
            await asyncio.to_thread(dep.stop_agent, "a1")
            return dict(json.loads(await asyncio.wait_for(reader.readline(), 30)))
        finally:
            writer.close()

    reply = asyncio.run(wait_through_a_stop())
    assert reply["ok"] is False and reply["error"] == "the agent is stopping", reply
    assert reply["disks"][0]["disk"] == "d1" and not reply["disks"][0]["protected"]


def test_malformed_wait_requests_get_a_clear_error(dep: Deployment, tmp_path: Path) -> None:
    spec, _ = protected_image(dep, tmp_path, 8 * MiB, seed=5)
    dep.start_agent("a1")
    sock = spec.state_dir / "admin.sock"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"disks": "d1"}, "bad request: disks must be a list of disk ids"),
        ({"disks": [1]}, "bad request: disks must be a list of disk ids"),
        ({"disks": []}, "no disk to wait for"),
        ({"timeout": 0}, "bad request: timeout must be a positive number of seconds"),
        ({"timeout": -3}, "bad request: timeout must be a positive number of seconds"),
        ({"timeout": True}, "bad request: timeout must be a positive number of seconds"),
        ({"timeout": "1s"}, "bad request: timeout must be a positive number of seconds"),
        ({"timeout": float("nan")}, "bad request: timeout must be a positive number of seconds"),
    ]
    for extra, error in cases:
        reply = asyncio.run(admin_request(sock, {"cmd": "wait", **extra}, timeout=10))
        assert reply == {"ok": False, "error": error}, (extra, reply)
    # the agent is still there and answers
    reply = asyncio.run(admin_request(sock, {"cmd": "wait", "timeout": 0.05}, timeout=10))
    assert not reply["ok"] and reply["error"].startswith("not protected within 0.05 s: d1 ")


def test_a_service_that_closes_without_answering_is_an_oserror(tmp_path: Path) -> None:
    async def main() -> None:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.close()

        server = await asyncio.start_unix_server(hang_up, path=str(tmp_path / "s.sock"))
        async with server:
            with pytest.raises(ConnectionResetError, match="without an answer"):
                await admin_request(tmp_path / "s.sock", {"cmd": "status"}, timeout=10)

    asyncio.run(main())


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=500, deadline=None)
@given(disks=json_values, timeout=json_values)
def test_wait_request_fields_are_valid_or_a_value_error(disks: object, timeout: object) -> None:
    request = {"cmd": "wait", "disks": disks, "timeout": timeout}
    disk_list = isinstance(disks, list) and all(isinstance(d, str) for d in disks)
    try:
        got_disks = _wait_disks(request)
    except ValueError:
        assert disks is not None and not disk_list
    else:
        assert (disks is None and got_disks is None) or (disk_list and got_disks == disks)
    positive = isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0
    try:
        got_timeout = _wait_timeout(request)
    except ValueError:
        assert timeout is not None and not positive
    else:
        assert (timeout is None and got_timeout is None) or (positive and got_timeout == timeout)


@settings(max_examples=500, deadline=None)
@given(
    text=st.one_of(
        st.text(max_size=12), st.from_regex(r"-?[0-9.]{1,6}(ms|s|m|h|d)?", fullmatch=True)
    )
)
def test_the_timeout_option_is_a_positive_duration_or_a_usage_error(text: str) -> None:
    try:
        seconds = wait_timeout(text)
    except argparse.ArgumentTypeError as exc:
        assert str(exc)  # a message argparse prints
    else:
        assert seconds > 0
