"""Recovery points and failover with real processes and NBD clients nobody here wrote.

Every comparison is made outside tidemark: ``qemu-img compare`` over NBD, ``cmp`` of files,
fio's own verify, SHA-256 computed here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.deploy import Deployment

pytestmark = pytest.mark.interop
SIZE = 64 << 20
TOOLS = ["qemu-img", "qemu-io", "fio", "cmp"]


def _require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have {missing} (.ci/run installs them)")
        pytest.skip(f"missing {missing}")


def run(*cmd: str, timeout: float = 120, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


def nbd_uri(disk: str, sock: str | Path) -> str:
    return f"nbd+unix:///{disk}?socket={sock}"


def qemu_write(uri: str, pattern: int, offset: int, length: int, ok: bool = True):
    return run("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", uri, ok=ok)


def ps(dep: Deployment, *args: str, ok: bool = True) -> dict:
    out = dep.cli(
        "process_server.cli", *args, "--config", str(dep.ps_config), "--json", check=False
    )
    reply = json.loads(out.stdout) if out.stdout.strip() else {"stderr": out.stderr}
    if ok:
        assert out.returncode == 0, f"tidemark-ps {args}: {reply} {out.stderr}"
    return reply


def drain(dep: Deployment, agent: str, disk: str, timeout: float = 60) -> int:
    """Wait until the process server applied everything the agent journaled; returns the seq."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = next(r for r in dep.agent_status(agent)["disks"] if r["disk"] == disk)
        if row["acked_seq"] >= row["journaled_seq"]:
            dep.wait_applied(disk, row["journaled_seq"], timeout)
            return int(row["journaled_seq"])
        time.sleep(0.05)
    raise TimeoutError(f"{disk} did not drain")


def wait_replicating(dep: Deployment, agent: str, timeout: float = 60) -> None:
    """Wait until every disk of ``agent`` finished its initial sync (points need that)."""
    deadline = time.monotonic() + timeout
    while {r["state"] for r in dep.agent_status(agent)["disks"]} != {"replicating"}:
        assert time.monotonic() < deadline, dep.agent_status(agent)["disks"]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    _require_tools()
    d = Deployment(tmp_path_factory.mktemp("fo"))
    d.init_pki()
    d.write_ps_config(failover_dir=str(d.root / "fx"), apply_sync_interval="10ms")
    post = d.root / "post-ran"
    d.add_agent(
        "web01",
        {"fo1": SIZE, "fo2": SIZE, "h1": 1 << 20, "h2": 1 << 20, "h3": 1 << 20},
        nbd=True,
        disk_options={
            "fo1": {"crash_consistent_interval": "200ms"},
            "h1": {"pre_snapshot_hook": "sh -c 'exit 3'", "post_snapshot_hook": f"touch {post}-1"},
            "h2": {
                "pre_snapshot_hook": "sleep 30",
                "post_snapshot_hook": f"touch {post}-2",
                "hook_timeout": "1s",
            },
            "h3": {"pre_snapshot_hook": "true", "post_snapshot_hook": f"touch {post}-3"},
        },
    )
    d.start_ps()
    d.start_agent("web01")
    wait_replicating(d, "web01")
    yield d
    d.stop_all()


def test_test_failover_view_stays_at_its_point_while_replication_goes_on(dep: Deployment):
    spec = dep.agents["web01"]
    source, uri = spec.disks["fo1"], nbd_uri("fo1", spec.nbd["fo1"])
    qemu_write(uri, 0xAA, 0, 8 << 20)
    qemu_write(uri, 0x11, 40 << 20, 1 << 20)
    drain(dep, "web01", "fo1")
    at_point = dep.root / "fo1-at-point.img"
    shutil.copyfile(source, at_point)
    point = ps(dep, "points", "create", "fo1", "--tag", "before-upgrade")
    assert point["ok"] and point["recorded"] and point["kind"] == "manual"
    listed = ps(dep, "points", "list", "fo1")["points"]
    assert any(p["id"] == point["id"] and p["tag"] == "before-upgrade" for p in listed)
    assert any(p["kind"] == "crash-consistent" for p in listed)

    stop = threading.Event()
    failures: list[str] = []

    def keep_writing() -> None:  # the source goes on changing, overwriting what the point holds
        i = 0
        while not stop.is_set():
            out = qemu_write(uri, 0x20 + i % 64, (i % 16) << 20, 1 << 20, ok=False)
            if out.returncode:
                failures.append(out.stderr)
            i += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        time.sleep(0.5)
        sock = dep.root / "t1.sock"
        reply = ps(
            dep, "failover", "fo1", "--test", "--point", point["id"], "--nbd", f"unix:{sock}"
        )
        failover = reply["failovers"][0]
        assert failover["test"] and failover["point"]["id"] == point["id"]
        assert failover["timings_ms"]["total"] > 0
        export = nbd_uri("fo1", sock)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(at_point), export)
        time.sleep(1.0)  # more batches applied to the replica: the view must not move
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(at_point), export)
        status = ps(dep, "status")
        row = next(r for r in status["disks"] if r["disk"] == "fo1")
        assert row["state"] == "replicating" and row["failover"]["test"]
        # The DR side writes to its overlay: fio verifies what it wrote.
        run(
            "fio",
            "--name=dr",
            "--ioengine=nbd",
            f"--uri={export}",
            "--rw=randwrite",
            "--bs=4k",
            "--size=4M",
            "--offset=48M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--iodepth=8",
            timeout=180,
        )
    finally:
        stop.set()
        writer.join()
    assert not failures, failures[:1]
    ps(dep, "failover", "cleanup", "fo1")
    assert ps(dep, "failover", "list")["failovers"] == []
    drain(dep, "web01", "fo1")
    run("cmp", str(source), str(dep.replica_path("fo1")))  # the replica kept converging

    image = dep.root / "fo1-point.img"
    reply = ps(dep, "failover", "fo1", "--point", point["id"], "--to", str(image))
    assert reply["point"]["id"] == point["id"]
    run("cmp", str(at_point), str(image))
    assert os.stat(image).st_blocks * 512 < SIZE  # sparse where the point is


def test_planned_failover_loses_nothing_and_commit_makes_it_live(dep: Deployment):
    spec = dep.agents["web01"]
    source, uri = spec.disks["fo2"], nbd_uri("fo2", spec.nbd["fo2"])
    for i in range(8):
        qemu_write(uri, 0x40 + i, i << 20, 1 << 20)  # acknowledged writes, no drain waited for
    sock = dep.root / "p2.sock"
    reply = ps(dep, "failover", "fo2", "--planned", "--point", "latest", "--nbd", f"unix:{sock}")
    failover = reply["failovers"][0]
    assert failover["planned"] and "freeze_and_drain" in failover["timings_ms"]
    export = nbd_uri("fo2", sock)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), export)
    refused = qemu_write(uri, 0x99, 0, 4096, ok=False)  # the source stopped taking writes
    assert refused.returncode != 0
    assert ps(dep, "status")["disks"][1]["state"] == "failed-over"

    qemu_write(export, 0xCC, 32 << 20, 1 << 20)  # the DR VM writes
    reply = ps(dep, "failover", "commit", "fo2")
    assert reply["state"] == "committed"
    expected = bytearray(Path(source).read_bytes())
    expected[32 << 20 : 33 << 20] = b"\xcc" * (1 << 20)
    expected_path = dep.root / "fo2-expected.img"
    expected_path.write_bytes(expected)
    run("cmp", str(expected_path), str(dep.replica_path("fo2")))  # the replica is the live disk
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected_path), export)
    qemu_write(export, 0xDD, 0, 4096)  # still writable after the commit, straight to the replica
    assert dep.replica_path("fo2").read_bytes()[:4096] == b"\xdd" * 4096
    assert [p["id"] for p in ps(dep, "points", "list", "fo2")["points"]] in ([], ["latest"])


def test_app_consistent_points_run_hooks_and_never_fake_a_point(dep: Deployment):
    post = dep.root / "post-ran"
    failed = ps(dep, "points", "create", "h1", "--app-consistent", ok=False)
    assert not failed["ok"] and "exit status 3" in failed["error"]
    assert Path(f"{post}-1").exists()  # the post hook ran after the failed pre hook

    started = time.monotonic()
    hung = ps(dep, "points", "create", "h2", "--app-consistent", ok=False)
    assert not hung["ok"] and "timed out" in hung["error"]
    assert time.monotonic() - started < 15
    assert Path(f"{post}-2").exists()

    for disk in ("h1", "h2"):
        kinds = {p["kind"] for p in ps(dep, "points", "list", disk)["points"]}
        assert "app-consistent" not in kinds

    spec = dep.agents["web01"]
    qemu_write(nbd_uri("h3", spec.nbd["h3"]), 0x33, 0, 65536)
    good = ps(dep, "points", "create", "h3", "--app-consistent", "--tag", "db-checkpoint")
    assert good["ok"] and Path(f"{post}-3").exists()
    points = ps(dep, "points", "list", "h3")["points"]
    assert [p["tag"] for p in points if p["kind"] == "app-consistent"] == ["db-checkpoint"]
    # The documented argument order (options first, then the disk) works as well.
    out = dep.cli("process_server.cli", "points", "list", "--config", str(dep.ps_config), "h3")
    assert "db-checkpoint" in out.stdout
    image = dep.root / "h3-point.img"
    ps(dep, "failover", "h3", "--point", "latest-app-consistent", "--to", str(image))
    run("cmp", str(spec.disks["h3"]), str(image))
    again = ps(dep, "failover", "h3", "--point", "latest", "--to", str(image), ok=False)
    assert not again["ok"] and "never overwrites" in again["error"]

    # The agent's own command (what its app_consistent_interval schedule runs) does the same.
    agent = ["agent.cli", "point", "--config", str(spec.config), "--json"]
    out = dep.cli(*agent, "h1", check=False)
    assert out.returncode == 1 and "exit status 3" in json.loads(out.stdout)["error"]
    out = dep.cli(*agent, "h3", "--tag", "from-agent")
    assert json.loads(out.stdout)["ok"]
    deadline = time.monotonic() + 30
    while "from-agent" not in {p["tag"] for p in ps(dep, "points", "list", "h3")["points"]}:
        assert time.monotonic() < deadline, "the agent's point never reached the catalog"
        time.sleep(0.05)


def test_points_and_a_test_failover_survive_a_process_server_kill(dep: Deployment):
    spec = dep.agents["web01"]
    source, uri = spec.disks["fo1"], nbd_uri("fo1", spec.nbd["fo1"])
    qemu_write(uri, 0x55, 8 << 20, 4 << 20)
    drain(dep, "web01", "fo1")
    at_point = dep.root / "fo1-before-kill.img"
    shutil.copyfile(source, at_point)
    point = ps(dep, "points", "create", "fo1", "--tag", "before-kill")
    sock = dep.root / "k1.sock"
    ps(dep, "failover", "fo1", "--test", "--point", point["id"], "--nbd", f"unix:{sock}")
    for i in range(6):  # acknowledged writes while the process server dies mid-stream
        qemu_write(uri, 0x60 + i, (i * 3) << 20, 2 << 20)
        if i == 2:
            dep.kill_ps()
            dep.start_ps()
    drain(dep, "web01", "fo1", timeout=120)
    run("cmp", str(source), str(dep.replica_path("fo1")))
    export = nbd_uri("fo1", sock)  # the restarted server brought the test failover back
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(at_point), export)
    ps(dep, "failover", "cleanup", "fo1")
    image = dep.root / "fo1-after-kill.img"
    ps(dep, "failover", "fo1", "--point", point["id"], "--to", str(image))
    run("cmp", str(at_point), str(image))


def test_a_failover_that_cannot_export_leaves_nothing_behind(dep: Deployment):
    blocker = dep.root / "not-a-socket"
    blocker.write_text("a regular file where the export socket should go")
    failed = ps(
        dep, "failover", "h3", "--point", "latest-processed", "--nbd", f"unix:{blocker}", ok=False
    )
    assert not failed["ok"] and "not a socket" in failed["error"]
    row = next(r for r in ps(dep, "status")["disks"] if r["disk"] == "h3")
    assert row["state"] == "replicating" and "failover" not in row  # not fenced, not listed
    spec = dep.agents["web01"]
    qemu_write(nbd_uri("h3", spec.nbd["h3"]), 0x77, 4096, 4096)  # and still replicating
    drain(dep, "web01", "h3")
    run("cmp", str(spec.disks["h3"]), str(dep.replica_path("h3")))


def test_a_test_failover_needs_the_undo_log(tmp_path: Path):
    _require_tools()
    d = Deployment(tmp_path / "noundo")
    with d:
        d.init_pki()
        d.write_ps_config(undo=False)
        d.add_agent("n1", {"nu": 1 << 20})
        d.start_ps()
        d.start_agent("n1")
        wait_replicating(d, "n1")
        reply = ps(
            d,
            "failover",
            "nu",
            "--test",
            "--point",
            "latest",
            "--nbd",
            f"unix:{d.root}/x.sock",
            ok=False,
        )
        assert not reply["ok"] and "undo log" in reply["error"]
        assert ps(d, "points", "list", "nu")["points"] == []  # no history, no points
