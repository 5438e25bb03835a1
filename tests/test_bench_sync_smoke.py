"""``tidemark-bench sync --quick --json FILE`` runs end to end (256 MiB images: digest resync
vs rsync and bdsync, initial sync vs nbdcopy into nbdkit), reports sane figures and leaves
nothing behind. bdsync is optional (reported "not available" without it); a missing
nbdkit/nbdcopy/rsync skips only outside CI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks.cli import SCENARIOS, build_parser
from benchmarks.metrics import MIB
from benchmarks.sync import (
    FLOORS,
    INIT_DISK,
    NOT_AVAILABLE,
    QUICK_SIZE,
    RESYNC_DISK,
    TARGET_INITIAL,
    TARGET_RESYNC,
    TOOLS,
    _figures,
    parse_rsync_stats,
    phase_initial,
    phase_resync,
)
from tests.bench_helpers import assert_nothing_left, direct_io_works, require_tools
from tests.bench_helpers import figure_prefixed as _figure

ROOT = Path(__file__).resolve().parent.parent


def test_registered_and_parses(tmp_path: Path) -> None:
    assert SCENARIOS["sync"] == "benchmarks.sync"
    args = build_parser().parse_args(["sync", "--quick"])
    assert args.scenario == "sync" and args.quick and args.bdsync is None
    exe = tmp_path / "bdsync"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert build_parser().parse_args(["sync", "--bdsync", str(exe)]).bdsync == exe.resolve()
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["sync", "--bdsync", str(tmp_path / "nope")])
    assert err.value.code == 2


def test_parse_rsync_stats() -> None:
    text = (
        "Number of files: 1 (reg: 1)\n"
        "Total file size: 268,435,456 bytes\n"
        "Literal data: 9,830,400 bytes\n"
        "Matched data: 258,605,056 bytes\n"
        "Total bytes sent: 9,915,021\n"
        "Total bytes received: 393,241\n"
    )
    assert parse_rsync_stats(text) == {
        "file_bytes": 268_435_456,
        "literal_bytes": 9_830_400,
        "matched_bytes": 258_605_056,
        "sent_bytes": 9_915_021,
        "received_bytes": 393_241,
    }


@pytest.mark.timeout(150)
def test_quick_run_reports_figures_and_cleans_up(tmp_path: Path) -> None:
    require_tools(*TOOLS)
    private_tmp = Path(tempfile.mkdtemp(prefix="tms-smoke-", dir="/tmp"))
    try:
        _run_quick(tmp_path, private_tmp)
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def _run_quick(tmp_path: Path, private_tmp: Path) -> None:
    out = tmp_path / "sync.json"
    env = dict(os.environ, TMPDIR=str(private_tmp), PYTHONPATH=str(ROOT))
    env.pop("TIDEMARK_BENCH_PYSPY", None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cli", "sync", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=140,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert elapsed < 120, f"sync --quick took {elapsed:.1f}s\n{proc.stdout}"

    doc = json.loads(out.read_text())
    assert doc["status"] in {"ok", "targets missed"}
    (result,) = doc["results"]
    assert result["scenario"] == "sync" and result["error"] is None
    assert result["params"]["image_size"] == QUICK_SIZE
    details = result["details"]

    rz = details["resync"]
    tm = rz["tidemark"]
    assert rz["changed_blocks"] == QUICK_SIZE // 4096 // 100
    assert rz["changed_bytes"] == rz["changed_blocks"] * 4096
    assert tm["equal"] is True and rz["rsync"]["equal"] is True
    assert 0 < tm["command_returned_seconds"] <= tm["seconds"] < 60
    # the resync sent what changed, and not much more: data + digests + framing
    assert rz["changed_bytes"] <= tm["wire_bytes"] < 2 * rz["changed_bytes"], tm
    assert tm["agent"]["state"] == "replicating"
    assert tm["ps"]["applied_seq"] >= tm["agent"]["journaled_seq"]
    totals = tm["agent"]["resync_totals"]
    assert totals["done_bytes"] == QUICK_SIZE
    assert rz["changed_bytes"] <= totals["sent_bytes"] < 1.5 * rz["changed_bytes"]
    assert rz["rsync"]["seconds"] > 0 and "--no-whole-file" in rz["rsync"]["command"]
    assert rz["rsync"]["stats"]["literal_bytes"] >= rz["changed_bytes"]
    head = _figure(result, "resync, 1% of 4 KiB blocks")
    assert head["value"] == tm["seconds"] and head["baseline"] > 0
    assert head["ratio"] == pytest.approx(head["value"] / head["baseline"])
    assert head["passed"] in (True, False)
    wire = _figure(result, "resync wire bytes")
    assert wire["passed"] in (True, False) and 1 <= wire["ratio"] < 2
    bd = rz["bdsync"]
    if bd["available"]:
        assert bd["equal"] is True and bd["seconds"] > 0
        assert bd["patch_bytes"] >= rz["changed_bytes"]
    else:
        assert _figure(result, "resync: bdsync")["value"] == NOT_AVAILABLE
    assert _figure(result, "resync: replica / rsync copy")["passed"] is True

    ini = details["initial"]
    assert ini["data_bytes"] == QUICK_SIZE // 2
    assert ini["tidemark"]["equal"] is True and ini["nbdcopy"]["equal"] is True
    # holes stay holes on the replica; the wire carries about the compressed data
    assert ini["tidemark"]["replica_allocated_bytes"] <= ini["source_allocated_bytes"] * 1.05
    assert 0.3 * ini["data_bytes"] < ini["tidemark"]["wire_bytes"] < 0.8 * ini["data_bytes"]
    assert "--flush" in ini["nbdcopy"]["command"]
    # the judged baseline's nbdkit listens on TCP loopback; the unix socket's is reported
    assert ini["nbdcopy"]["transport"] == "tcp" and " nbd://127.0.0.1:" in ini["nbdcopy"]["command"]
    assert "-i 127.0.0.1 -p " in ini["nbdcopy"]["server"]
    unix = ini["nbdcopy_unix"]
    assert unix["transport"] == "unix" and "nbd+unix:///?socket=" in unix["command"]
    assert unix["equal"] is True and "--flush" in unix["command"]
    by_unix = _figure(result, "initial sync: tidemark vs nbdcopy --flush -> nbdkit file, unix")
    assert by_unix["baseline"] == unix["seconds"] and by_unix["value"] == ini["tidemark"]["seconds"]
    init = _figure(result, "initial sync over TLS")
    assert init["target"] == "<= 1.2x nbdcopy, TCP loopback"
    assert init["baseline"] == ini["nbdcopy"]["seconds"] > 0 and init["passed"] in (True, False)
    # --quick times one round; its times are the first round's
    (only,) = ini["rounds"]
    assert only["tidemark_seconds"] == init["value"] == ini["tidemark"]["seconds"]
    assert only["nbdcopy_seconds"] == init["baseline"] and only["equal"] is True
    assert _figure(result, "initial sync: replica / nbdkit copy")["passed"] is True
    # the floors: the same data bytes through a bare TLS copy, plain and with zstd, one block
    # after another and pipelined
    for key, label, _, direct, threads in FLOORS:
        floor = ini[key]
        assert ("--direct" in floor["command"]) is direct
        assert floor["threads"] == threads
        assert floor["direct"] is (direct and direct_io_works(private_tmp))
        assert floor["bytes"] == ini["data_bytes"] and floor["seconds"] > 0
        assert floor["tls_version"] == "TLSv1.3"
        row = _figure(result, f"initial sync floor: bare TLS copy of the data ({label}")
        assert row["value"] == round(floor["seconds"], 3)
        assert row["baseline"] == ini["nbdcopy"]["seconds"]
    versus = _figure(result, "initial sync: tidemark vs the fastest floor")
    assert versus["baseline"] == round(min(ini[key]["seconds"] for key, *_ in FLOORS), 3)

    # Nothing left behind: no files in the temp dir, no process still running.
    assert list(private_tmp.iterdir()) == []
    pids = details["pids"]
    assert {
        "ps-init0",
        "agent-init0",
        "ps-resync0",
        "agent-resync0-2",
        "nbdkit-b",
        "nbdkit-u",
    } <= set(pids)
    assert {"tls_floor-server", "tls_zstd_floor-client"} <= set(pids)
    assert_nothing_left(private_tmp, pids)


@pytest.mark.timeout(120)
def test_each_initial_round_is_timed_compared_and_cleaned_up() -> None:
    """Two rounds on a small image, the order turned by one (nbdcopy first, then tidemark
    first): tidemark and nbdcopy on both transports timed and compared with the source in
    each, each round on a fresh deployment (a later one gone after its round), every process
    accounted for and stopped."""
    require_tools(*TOOLS)
    private_tmp = Path(tempfile.mkdtemp(prefix="tms-rounds-", dir="/tmp"))
    pids: dict[str, int] = {}
    out: dict = {}
    try:
        phase_initial(private_tmp / "i", 32 * MIB, pids, 60.0, out, rounds=2)
        rounds = out["rounds"]
        assert len(rounds) == 2
        assert [r["first"] for r in rounds] == ["nbdcopy", "tidemark"]
        assert [r["order"] for r in rounds] == [
            ["nbdcopy", "tidemark", "nbdcopy_unix"],
            ["tidemark", "nbdcopy_unix", "nbdcopy"],
        ]
        for r in rounds:
            assert r["equal"] is True and r["tidemark_seconds"] > 0 and r["nbdcopy_seconds"] > 0
            assert r["ratio"] == pytest.approx(r["tidemark_seconds"] / r["nbdcopy_seconds"])
            assert r["ratio_unix"] == pytest.approx(
                r["tidemark_seconds"] / r["nbdcopy_unix_seconds"]
            )
        assert rounds[0]["tidemark_seconds"] == out["tidemark"]["seconds"]
        assert rounds[0]["nbdcopy_seconds"] == out["nbdcopy"]["seconds"]
        assert rounds[0]["nbdcopy_unix_seconds"] == out["nbdcopy_unix"]["seconds"]
        assert (out["nbdcopy"]["transport"], out["nbdcopy_unix"]["transport"]) == ("tcp", "unix")
        # the first round's deployment stays for the floors' PKI; a later one is removed
        assert (private_tmp / "i" / "d").is_dir() and not (private_tmp / "i" / "d-2").exists()
        assert {
            f"agent-{INIT_DISK}",
            f"agent-{INIT_DISK}-2",
            f"ps-{INIT_DISK}-2",
            "nbdkit-b",
            "nbdkit-b-2",
            "nbdkit-u",
            "nbdkit-u-2",
        } <= set(pids)
        assert_nothing_left(private_tmp, pids)
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def _initial_details(rounds: list[tuple[float, float, bool]]) -> dict:
    first_tm, first_nc, first_equal = rounds[0]
    copy = {"seconds": first_nc, "equal": first_equal}
    return {
        "initial": {
            "image_size": 4 << 30,
            "data_bytes": 2 << 30,
            "nbdcopy_noflush": {"seconds": 9.0, "equal": True},
            "nbdcopy": copy,
            "tidemark": {"seconds": first_tm, "equal": first_equal, "wire_bytes": 1 << 30},
            "rounds": [
                {
                    "tidemark_seconds": tm,
                    "nbdcopy_seconds": nc,
                    "ratio": tm / nc,
                    "equal": equal,
                }
                for tm, nc, equal in rounds
            ],
        }
    }


def test_initial_target_is_judged_on_the_medians() -> None:
    # one slow round (the first) does not decide: medians 3.0 s vs 2.6 s
    figures = [
        f.__dict__
        for f in _figures(_initial_details([(5.0, 2.0, True), (3.0, 2.6, True), (2.9, 2.8, True)]))
    ]
    result = {"figures": figures}
    head = _figure(result, "initial sync over TLS")
    assert "median of 3" in head["name"]
    assert (head["value"], head["baseline"]) == (3.0, 2.6)
    assert head["ratio"] == pytest.approx(3.0 / 2.6)
    assert 3.0 / 2.6 <= TARGET_INITIAL < 5.0 / 2.0
    assert head["passed"] is True  # the first round alone (2.5x) would have failed
    assert _figure(result, "initial sync rounds")["value"].startswith("5.00/2.00 (2.50x)")
    assert _figure(result, "initial sync: replica / nbdkit copy")["passed"] is True
    # a copy that differs in any round fails the run, whatever the first round said
    figures = [
        f.__dict__ for f in _figures(_initial_details([(3.0, 2.6, True), (3.0, 2.6, False)]))
    ]
    equal = _figure({"figures": figures}, "initial sync: replica / nbdkit copy")
    assert equal["passed"] is False and equal["critical"] is True


def test_the_unix_socket_baseline_is_reported_and_the_tcp_one_judged() -> None:
    """The target is judged against nbdcopy into nbdkit on TCP loopback; the same copy on a
    unix socket (faster) is reported beside it, with its own ratio, and decides nothing."""
    details = _initial_details([(2.4, 2.1, True), (2.6, 2.2, True), (2.5, 2.0, True)])
    ini = details["initial"]
    ini["nbdcopy"]["transport"] = "tcp"
    for row, unix_s in zip(ini["rounds"], (1.9, 1.8, 2.0), strict=True):
        row["nbdcopy_unix_seconds"] = unix_s
        row["ratio_unix"] = row["tidemark_seconds"] / unix_s
    result = {"figures": [f.__dict__ for f in _figures(details)]}
    head = _figure(result, "initial sync over TLS")
    assert (head["value"], head["baseline"]) == (2.5, 2.1)
    assert head["target"] == f"<= {TARGET_INITIAL}x nbdcopy, TCP loopback"
    assert head["passed"] is True  # 1.19x; against the unix socket it would be 1.32x
    unix = _figure(result, "initial sync: tidemark vs nbdcopy --flush -> nbdkit file, unix")
    assert (unix["value"], unix["baseline"]) == (2.5, 1.9)
    assert unix["ratio"] == pytest.approx(2.5 / 1.9) and unix["passed"] is None
    assert "TCP loopback" in _figure(result, "initial sync: nbdcopy --flush")["name"]
    told = _figure(result, "initial sync rounds")
    assert "unix socket" in told["name"]
    assert told["value"].startswith("2.40/2.10 (1.14x); /1.90 (1.26x), 2.60/2.20")


def test_a_json_from_before_the_rounds_still_gives_its_figures() -> None:
    details = _initial_details([(3.0, 2.6, True)])
    del details["initial"]["rounds"]
    result = {"figures": [f.__dict__ for f in _figures(details)]}
    head = _figure(result, "initial sync over TLS")
    assert "one round" in head["name"] and (head["value"], head["baseline"]) == (3.0, 2.6)
    # its baseline ran on a unix socket (no transport recorded then), and says so
    assert head["target"].endswith("unix socket")
    assert "unix socket" in _figure(result, "initial sync: nbdcopy --flush")["name"]
    assert _figure(result, "initial sync: replica / nbdkit copy")["passed"] is True


@pytest.mark.timeout(180)
def test_each_resync_round_is_timed_compared_and_the_baselines_see_the_first_change() -> None:
    """Two resync rounds on a small image, each of its own 1% change: each timed and its
    replica compared with the source; afterwards the source is as the first round left it,
    so rsync brings the pre-change copy level with exactly the first change."""
    require_tools(*TOOLS)
    private_tmp = Path(tempfile.mkdtemp(prefix="tms-rrounds-", dir="/tmp"))
    pids: dict[str, int] = {}
    out: dict = {}
    size = 32 * MIB
    try:
        phase_resync(private_tmp / "r", size, pids, None, 60.0, out, rounds=2)
        rounds = out["rounds"]
        assert len(rounds) == 2
        for r in rounds:
            assert r["equal"] is True and r["seconds"] > 0
            assert r["changed_bytes"] == out["changed_bytes"] == size // 100 // 4096 * 4096
            assert r["changed_bytes"] <= r["wire_bytes"] < 2 * r["changed_bytes"]
        assert rounds[0]["seconds"] == out["tidemark"]["seconds"]
        # The later round's change is undone: rsync sends the first change's blocks as
        # literal data (each 4 KiB block meets one or two of its ~5.7 KiB blocks here: about
        # 2.4x), not the second's too (about 4.8x).
        stats = out["rsync"]["stats"]
        assert out["rsync"]["equal"] is True
        assert out["changed_bytes"] <= stats["literal_bytes"] < 3 * out["changed_bytes"]
        assert {f"agent-{RESYNC_DISK}-2", f"agent-{RESYNC_DISK}-2-2"} <= set(pids)
        assert_nothing_left(private_tmp, pids)
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def _resync_details(rounds: list[tuple[float, int, bool]]) -> dict:
    changed = 40 * MIB
    first_s, first_wire, first_equal = rounds[0]
    return {
        "resync": {
            "image_size": 4 << 30,
            "changed_bytes": changed,
            "tidemark": {"seconds": first_s, "wire_bytes": first_wire, "equal": first_equal},
            "rsync": {"seconds": 20.0, "equal": True, "stats": {}},
            "bdsync": {"seconds": 9.0, "available": True, "equal": True, "patch_bytes": changed},
            "rounds": [
                {"seconds": s, "wire_bytes": w, "changed_bytes": changed, "equal": e}
                for s, w, e in rounds
            ],
        }
    }


def test_resync_target_is_judged_on_the_median_and_wire_on_the_worst_round() -> None:
    changed = 40 * MIB
    details = _resync_details(
        [(3.5, int(1.05 * changed), True), (2.5, int(1.12 * changed), True), (2.7, changed, True)]
    )
    result = {"figures": [f.__dict__ for f in _figures(details)]}
    head = _figure(result, "resync, 1% of 4 KiB blocks")
    assert "median of 3" in head["name"]
    assert (head["value"], head["baseline"]) == (2.7, 9.0)
    assert 2.7 / 9.0 <= TARGET_RESYNC < 3.5 / 9.0
    assert head["passed"] is True  # the first round alone (0.39x) would have failed
    assert _figure(result, "resync rounds")["value"].startswith("3.50 (1.05x), 2.50 (1.12x)")
    wire = _figure(result, "resync wire bytes")
    assert "worst of 3" in wire["name"] and wire["ratio"] == pytest.approx(1.12, abs=0.01)
    assert wire["passed"] is False  # the second round's 1.12x, though the first met 1.1x
    assert _figure(result, "resync: replica / rsync copy")["passed"] is True
    # a replica that differs in any round fails the run
    details = _resync_details([(2.7, changed, True), (2.7, changed, False)])
    equal = _figure(
        {"figures": [f.__dict__ for f in _figures(details)]}, "resync: replica / rsync copy"
    )
    assert equal["passed"] is False and equal["critical"] is True
    assert equal["value"].startswith("NO / yes")


def test_a_resync_json_from_before_the_rounds_still_gives_its_figures() -> None:
    details = _resync_details([(2.7, 40 * MIB, True)])
    del details["resync"]["rounds"]
    result = {"figures": [f.__dict__ for f in _figures(details)]}
    head = _figure(result, "resync, 1% of 4 KiB blocks")
    assert "one round" in head["name"] and head["value"] == 2.7
    assert _figure(result, "resync: replica / rsync copy")["passed"] is True


def test_resync_rounds_that_changed_nothing_still_give_figures() -> None:
    """A disk under 100 blocks changes none at 1%: no ratio, and no division by zero."""
    details = _resync_details([(0.5, 4096, True), (0.4, 4096, True)])
    for r in details["resync"]["rounds"]:
        r["changed_bytes"] = 0
    details["resync"]["changed_bytes"] = 0
    result = {"figures": [f.__dict__ for f in _figures(details)]}
    assert _figure(result, "resync rounds")["value"] == "0.50, 0.40"
    assert _figure(result, "resync wire bytes")["ratio"] is None
