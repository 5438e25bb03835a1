"""The pure parts of operations, without processes: sd_notify encoding, the token bucket and the
time-of-day schedule, alert levels and transitions, the metrics made from a status dict, the
status page (escaping, bounded history), the HTTP front's refusals, config keys and reload diffs."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.config import load_agent_config, load_server_config
from common.errors import ConfigError
from common.http_status import HttpServer, Response
from common.metrics import make_registry, render
from common.ops import AGENT_RELOADABLE, RedactingFilter, diff_config, merge_config
from common.rate_limit import (
    BandwidthLimiter,
    TokenBucket,
    cache_pressure_delay,
    limit_at,
    parse_rate,
    parse_schedule,
)
from common.rpo_alerts import AlertTracker
from common.sdnotify import encode, watchdog_interval
from process_server.status_page import MAX_SAMPLES, History, render_page

# ----------------------------------------------------------------- sd_notify


def test_sd_notify_encoding_and_watchdog_env() -> None:
    assert encode({"READY": 1, "STATUS": "two\nlines"}) == b"READY=1\nSTATUS=two lines"
    with pytest.raises(ValueError):
        encode({"ready": 1})
    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}, pid=7) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "7"}, pid=7) == 2.0
    assert watchdog_interval({}, pid=7) is None


# ----------------------------------------------------------------- bandwidth


def test_token_bucket_rate_burst_and_debt() -> None:
    b = TokenBucket(rate=1000, burst=500, now=0.0)
    assert b.delay(0.0) == 0
    b.take(2000, 0.0)  # a batch bigger than the burst passes whole, then is paid back
    assert b.delay(0.0) == pytest.approx(1.5)
    assert b.delay(1.5) == 0
    b.take(100, 1.5)
    assert b.delay(1.5) == pytest.approx(0.1)
    # over a long run, no more than rate * time + burst gets through
    b = TokenBucket(rate=1000, burst=500, now=0.0)
    now, sent = 0.0, 0
    while now < 100:
        now += b.delay(now)
        b.take(300, now)
        sent += 300
    assert sent <= 1000 * now + 500 + 300
    b.set_rate(4000, 4000, now)  # a new rate applies to the debt already owed
    assert b.delay(now) <= 300 / 4000 + 1e-9


def test_schedule_parse_and_time_of_day() -> None:
    sched = parse_schedule(
        [
            {"from": "08:00", "to": "18:00", "limit": "10MiB", "days": "mon-fri"},
            {"from": "22:00", "to": "06:00", "limit": "0"},
        ]
    )
    monday_noon = dt.datetime(2024, 1, 1, 12, 0)  # a Monday
    saturday_noon = dt.datetime(2024, 1, 6, 12, 0)
    assert limit_at(1 << 20, sched, monday_noon) == 10 << 20
    assert limit_at(1 << 20, sched, saturday_noon) == 1 << 20
    assert limit_at(1 << 20, sched, dt.datetime(2024, 1, 2, 23, 0)) == 0  # night: unlimited
    assert limit_at(1 << 20, sched, dt.datetime(2024, 1, 3, 5, 59)) == 0
    assert limit_at(1 << 20, sched, dt.datetime(2024, 1, 3, 6, 0)) == 1 << 20
    assert parse_rate("100Mbit") == 12_500_000
    assert parse_rate("10MiB/s") == 10 << 20
    for bad in (
        [{"from": "8", "to": "18:00", "limit": "1MiB"}],
        [{"from": "08:00", "to": "18:00"}],
        [{"from": "08:00", "to": "18:00", "limit": "1MiB", "days": "someday"}],
        [{"from": "08:00", "to": "08:00", "limit": "1MiB"}],
        "08:00-18:00",
    ):
        with pytest.raises(ValueError):
            parse_schedule(bad)
    with pytest.raises(ValueError):
        parse_rate("1KiB")  # below 4 KiB/s


async def test_limiter_waits_and_a_new_limit_applies_at_once() -> None:
    limiter = BandwidthLimiter(4 << 20)  # 4 MiB/s, burst 4 MiB
    started = time.monotonic()
    await limiter.acquire(4 << 20)
    await limiter.acquire(2 << 20)  # into debt: the next send waits 0.5 s
    assert time.monotonic() - started < 0.35  # no wait (bounds wide for a loaded machine)
    await limiter.acquire(1)
    assert 0.4 < time.monotonic() - started < 2.0
    slow = BandwidthLimiter(4096)
    await slow.acquire(1 << 20)  # 256 s of debt at 4 KiB/s...
    waiter = asyncio.ensure_future(slow.acquire(1))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    slow.set_override(0)  # ...lifted at runtime: the waiting sender goes at once
    await asyncio.wait_for(waiter, 1.0)
    assert slow.status()["throttled_seconds"] > 0


def test_cache_pressure_slows_from_70_percent() -> None:
    assert cache_pressure_delay(0, 1000) == 0 and cache_pressure_delay(700, 1000) == 0
    assert 0 < cache_pressure_delay(750, 1000) < cache_pressure_delay(900, 1000)
    assert cache_pressure_delay(1000, 1000) == cache_pressure_delay(5000, 1000) == 0.1
    assert cache_pressure_delay(10, 0) == 0


# ----------------------------------------------------------------- alerts


def _ps_status(**row: Any) -> dict[str, Any]:
    base = {"agent": "web01", "disk": "d1", "state": "replicating", "rpo_seconds": 0.0}
    base.update(cache_bytes=0, cache_quota=1000)
    base.update(row)
    return {"role": "process-server", "sessions": [], "disks": [base]}


def test_rpo_breach_raised_once_and_cleared() -> None:
    tracker = AlertTracker(lambda disk: 10.0)
    assert tracker.update(_ps_status(rpo_seconds=3), 0) == []
    [t] = tracker.update(_ps_status(rpo_seconds=12), 1)
    assert (t.action, t.alert.kind, t.alert.severity) == ("raised", "rpo_breach", "warning")
    assert "event=alert_raised kind=rpo_breach" in t.log_line()
    assert tracker.update(_ps_status(rpo_seconds=13), 2) == []  # still breached: no new event
    [t] = tracker.update(_ps_status(rpo_seconds=25), 3)
    assert (t.action, t.alert.severity) == ("changed", "critical")
    decorated = tracker.decorate(_ps_status(rpo_seconds=25))
    assert decorated["disks"][0]["rpo_breached"] is True
    assert decorated["alerts"][0]["kind"] == "rpo_breach"
    [t] = tracker.update(_ps_status(rpo_seconds=1), 4)
    assert t.action == "cleared"
    assert tracker.counters["d1"].rpo_breaches == 1
    assert tracker.decorate(_ps_status())["alerts"] == []


def test_cache_levels_70_and_75_percent() -> None:
    tracker = AlertTracker(lambda disk: None)
    assert tracker.update(_ps_status(cache_bytes=690), 0) == []
    [t] = tracker.update(_ps_status(cache_bytes=700), 1)
    assert (t.alert.kind, t.alert.severity, t.alert.threshold) == ("cache_fill", "warning", 0.70)
    [t] = tracker.update(_ps_status(cache_bytes=760), 2)
    assert (t.action, t.alert.severity) == ("changed", "critical")
    [t] = tracker.update(_ps_status(cache_bytes=100), 3)
    assert t.action == "cleared"


def test_journal_overflow_link_grace_and_resync_count() -> None:
    tracker = AlertTracker(lambda disk: None)
    agent: dict[str, Any] = {
        "role": "agent",
        "link": {"connected": False, "last_error": "ConnectionRefusedError"},
        "disks": [
            {
                "disk": "d1",
                "state": "resync-required",
                "resync_reason": "journal-overflow",
                "journal_bytes": 10,
                "journal_quota": 100,
            }
        ],
    }
    kinds = {t.alert.kind for t in tracker.update(agent, 0)}
    assert kinds == {"journal_overflow"}  # the link is down for less than its grace
    kinds = {t.alert.kind for t in tracker.update(agent, 11)}
    assert kinds == {"link_down"}
    agent["link"] = {"connected": True}
    agent["disks"][0]["state"] = "replicating"
    assert {t.action for t in tracker.update(agent, 12)} == {"cleared"}
    assert tracker.active == {}
    assert tracker.counters["d1"].resyncs == 1


# ----------------------------------------------------------------- metrics


def test_metrics_from_status() -> None:
    tracker = AlertTracker(lambda disk: 5.0)
    status = _ps_status(
        rpo_seconds=7.5,
        lag_bytes=4096,
        cache_bytes=760,
        received_bytes=1 << 20,
        received_batches=3,
        applied_seq=9,
        error=None,
        newest_point_ns=time.time_ns() - 2_000_000_000,
    )
    tracker.update(status, 0)
    registry = make_registry(lambda: tracker.decorate(status), tracker)
    body, ctype = render(registry)
    assert ctype.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }
    labels = (("agent", "web01"), ("disk", "d1"))
    assert samples[("tidemark_disk_rpo_seconds", labels)] == 7.5
    assert samples[("tidemark_disk_rpo_target_seconds", labels)] == 5.0
    assert samples[("tidemark_disk_rpo_breached", labels)] == 1.0
    assert samples[("tidemark_disk_rpo_breaches_total", labels)] == 1.0
    assert samples[("tidemark_disk_lag_bytes", labels)] == 4096
    assert samples[("tidemark_disk_received_bytes_total", labels)] == 1 << 20
    assert samples[("tidemark_disk_received_batches_total", labels)] == 3
    assert samples[("tidemark_disk_cache_quota_bytes", labels)] == 1000
    assert samples[("tidemark_disk_quota_fill_ratio", (*labels, ("store", "cache")))] == 0.76
    assert 1.5 < samples[("tidemark_disk_newest_recovery_point_age_seconds", labels)] < 60
    assert samples[("tidemark_disk_state", (*labels, ("state", "replicating")))] == 1.0
    assert samples[("tidemark_disk_state", (*labels, ("state", "error")))] == 0.0
    critical = (("disk", "d1"), ("kind", "cache_fill"), ("severity", "critical"))
    assert samples[("tidemark_alerts_active", critical)] == 1.0


# ----------------------------------------------------------------- status page


def test_status_page_escapes_and_history_is_bounded() -> None:
    evil = '<script>alert("x")</script>'
    status = _ps_status(disk=evil, agent=evil, received_bytes=0)
    status["alerts"] = [
        {"kind": "rpo_breach", "severity": "warning", "disk": evil, "message": evil}
    ]
    status["jobs"] = [{"kind": evil, "disk": "d1", "state": "running", "percent": 40}]
    history = History()
    for i in range(MAX_SAMPLES + 50):
        status["disks"][0]["received_bytes"] = i << 20
        history.add(status, float(i * 10))
    now = float((MAX_SAMPLES + 49) * 10)
    assert len(history.samples[evil]) == MAX_SAMPLES
    assert history.throughput_series(evil, now)[-1][1] == pytest.approx((1 << 20) / 10)
    page = render_page(status, history, {evil: [{"seq": 5, "kind": "manual", "time_ns": 1}]}, now)
    assert "<script" not in page
    assert "&lt;script&gt;" in page and "<svg" in page and "<progress" in page
    history.add({"disks": []}, now + 20)
    assert history.samples == {}  # a vanished disk is forgotten


# ----------------------------------------------------------------- HTTP front


async def test_http_front_refuses_what_it_does_not_serve() -> None:
    from common.config import HostPort

    server = HttpServer(
        HostPort("127.0.0.1", 0), {"/x": lambda q: Response(200, "text/plain", b"x")}, "t"
    )
    await server.start()

    async def ask(raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data

    try:
        assert (await ask(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert b"Content-Security-Policy" in await ask(b"GET /x HTTP/1.1\r\n\r\n")
        assert (await ask(b"POST /x HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await ask(b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await ask(b"\xff\xfe garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert (await ask(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 400"
        )
        head = await ask(b"HEAD /x HTTP/1.1\r\n\r\n")
        assert head.endswith(b"\r\n\r\n")
    finally:
        await server.close()


# ----------------------------------------------------------------- config and reload

AGENT = """
[agent]
name = "web01"
state_dir = "state"
process_server = "127.0.0.1:7700"
credentials = "web01.bundle"
{extra}
[[disk]]
id = "d1"
path = "d1.img"
{disk_extra}
"""


def _agent(tmp: Path, extra: str = "", disk_extra: str = "") -> Path:
    path = tmp / "agent.toml"
    path.write_text(AGENT.format(extra=extra, disk_extra=disk_extra))
    return path


def test_ops_config_keys(tmp_path: Path) -> None:
    cfg = load_agent_config(
        _agent(
            tmp_path,
            'metrics_listen = "127.0.0.1:9101"\nbandwidth_limit = "20MiB"\nrpo_target = "30s"\n'
            'bandwidth_schedule = [{from = "08:00", to = "18:00", limit = "5MiB"}]\n',
            'rpo_target = "10s"',
        )
    )
    assert cfg.metrics_listen is not None and cfg.metrics_listen.port == 9101
    assert cfg.bandwidth_limit == 20 << 20 and cfg.bandwidth_schedule[0].rate == 5 << 20
    assert cfg.rpo_target == 30 and cfg.disks[0].rpo_target == 10
    ps = tmp_path / "ps.toml"
    ps.write_text(
        '[server]\nlisten = "127.0.0.1:7700"\nstate_dir = "s"\npki_dir = "p"\n'
        'status_listen = "127.0.0.1:9100"\nrpo_target = "1m"\n'
        '[server.rpo_targets]\nd1 = "15s"\n'
    )
    scfg = load_server_config(ps)
    assert scfg.status_listen is not None and scfg.rpo_targets == {"d1": 15.0}
    for extra, key in (
        ('bandwidth_limit = "fast"', "agent.bandwidth_limit"),
        (
            'bandwidth_schedule = [{from = "8am", to = "18:00", limit = "1MiB"}]',
            "agent.bandwidth_schedule",
        ),
        ('metrics_listen = "9101"', "agent.metrics_listen"),
        ('rpo_target = "-1s"', "agent.rpo_target"),
    ):
        with pytest.raises(ConfigError) as err:
            load_agent_config(_agent(tmp_path, extra))
        assert str(tmp_path / "agent.toml") in str(err.value) and key in str(err.value)
    ps.write_text(ps.read_text().replace('d1 = "15s"', '"../x" = "15s"'))
    with pytest.raises(ConfigError, match=r"server\.rpo_targets"):
        load_server_config(ps)


def test_reload_diff_applies_only_safe_keys(tmp_path: Path) -> None:
    old = load_agent_config(_agent(tmp_path))
    new = load_agent_config(
        _agent(
            tmp_path,
            'bandwidth_limit = "1MiB"\njournal_quota = "2GiB"\nheartbeat_interval = "2s"',
            'rpo_target = "5s"\npre_snapshot_hook = "sync"\nscan_interval = "1h"',
        )
    )
    applied, refused = diff_config(old, new, AGENT_RELOADABLE)
    assert sorted(applied) == [
        "bandwidth_limit",
        "disk.pre_snapshot_hook",
        "disk.rpo_target",
        "heartbeat_interval",
    ]
    assert sorted(refused) == ["disk.scan_interval", "journal_quota"]
    merged = merge_config(old, new, AGENT_RELOADABLE)
    assert merged.bandwidth_limit == 1 << 20 and merged.heartbeat_interval == 2.0
    assert merged.journal_quota == old.journal_quota  # needs a restart: not applied
    assert merged.disks[0].rpo_target == 5.0 and merged.disks[0].pre_snapshot_hook == ("sync",)
    assert merged.disks[0].scan_interval == old.disks[0].scan_interval


def test_journald_lines_carry_priority_and_stay_one_line() -> None:
    import logging

    from common.ops import JournaldFormatter

    record = logging.LogRecord(
        "tidemark.x", logging.WARNING, "f", 1, "event=a msg=%r", ("x\ny",), None
    )
    line = JournaldFormatter().format(record)
    assert line == "<4>WARNING tidemark.x event=a msg='x\\ny'" and "\n" not in line


def test_redacting_filter() -> None:
    import logging

    record = logging.LogRecord(
        "x",
        logging.INFO,
        "f",
        1,
        "event=x key=%s password=%s",
        ("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----", "hunter2"),
        None,
    )
    RedactingFilter().filter(record)
    assert "MIIE" not in record.getMessage() and "hunter2" not in record.getMessage()


def test_link_metrics_from_an_agent_status() -> None:
    """The agent's link counters, as its status reports them (agent/shipper.py)."""
    status = {
        "role": "agent",
        "name": "web01",
        "disks": [],
        "link": {"connected": False, "connects": 3, "failures": 2, "batches_sent": 7},
    }
    tracker = AlertTracker(lambda disk: 5.0)
    registry = make_registry(lambda: status, tracker)
    body, _ = render(registry)
    samples = {
        s.name: s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
        if not s.labels
    }
    assert samples["tidemark_link_up"] == 0.0
    assert samples["tidemark_link_connects_total"] == 3
    assert samples["tidemark_link_failures_total"] == 2
    assert samples["tidemark_sent_batches_total"] == 7
