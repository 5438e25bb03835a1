"""``tidemark-agent``: the agent's command line (run, status, verify, resync, point, wait).

Rule: exit 0 on success, 1 on failure, 2 on usage errors; ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import stage_trace
from common.admin import admin_request
from common.cli import (
    print_disk_table,
    print_json,
    query_status,
    run_loop,
    run_with_progress,
    setup_logging,
)
from common.config import AgentConfig, load_agent_config
from common.credentials import BundleCheck
from common.durable import read_json
from common.errors import TidemarkError
from common.units import duration_option

STATUS_COLUMNS = [
    "disk",
    "state",
    "journaled_seq",
    "acked_seq",
    "lag_bytes",
    "rpo_seconds",
    "journal_bytes",
    "path",
]


wait_timeout = duration_option(lambda s: s > 0, "must be longer than 0 s: {text!r}")
"""``wait --timeout``: a duration longer than 0."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidemark-agent", description="tidemark agent (source server)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("run", help="protect the configured disks and replicate them")
    p.add_argument("--config", required=True, type=Path, help="agent.toml")
    p.add_argument("--log-level", default="INFO")
    p = sub.add_parser("status", help="per-disk replication status")
    p.add_argument("--config", required=True, type=Path, help="agent.toml")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser(
        "verify", help="compare a disk with its replica by digests (exit 1 if they differ)"
    )
    p.add_argument("--config", required=True, type=Path, help="agent.toml")
    p.add_argument("disk", help="disk id")
    p.add_argument("--repair", action="store_true", help="resync the ranges that differ")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = sub.add_parser("resync", help="compare the whole disk by digests and send what differs")
    p.add_argument("--config", required=True, type=Path, help="agent.toml")
    p.add_argument("disk", help="disk id")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--no-wait", action="store_true", help="return at once instead of waiting for the end"
    )
    p = sub.add_parser(
        "point", help="take an app-consistent recovery point now (runs the disk's hooks)"
    )
    p.add_argument("--config", required=True, type=Path, help="agent.toml")
    p.add_argument("disk", help="disk id")
    p.add_argument("--tag", default="", help="a label kept with the point")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser(
        "wait",
        help="wait until disks are protected: initial sync or resync done, and every write "
        "made before the command acknowledged by the process server (exit 1 on the timeout)",
    )
    p.add_argument("--config", required=True, type=Path, help="agent.toml")
    p.add_argument("disks", nargs="*", metavar="DISK", help="disk ids (default: every disk)")
    p.add_argument(
        "--timeout",
        type=wait_timeout,
        default=None,
        help='give up after this long, e.g. "30m"',
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _not_running(cfg: AgentConfig, exc: OSError) -> int:
    """A request that found no agent, or lost it before the answer."""
    print(
        f"error: the agent is not running ({cfg.admin_socket}: {exc.strerror or exc})",
        file=sys.stderr,
    )
    return 1


def _report(reply: dict[str, Any], as_json: bool, lines: Callable[[], list[str]]) -> int:
    """Print an admin reply: as JSON, or ``lines()`` when it succeeded, or its error."""
    if as_json:
        print_json(reply)
    elif reply.get("ok"):
        print("\n".join(lines()))
    else:
        print(f"error: {reply.get('error')}", file=sys.stderr)
    return 0 if reply.get("ok") else 1


async def _run(cfg: AgentConfig, bundle_check: BundleCheck) -> int:
    from agent.service import Agent
    from common.ops import ServiceOps, run_service

    agent = Agent(cfg, bundle_check=bundle_check)
    ops = ServiceOps(agent, cfg, role="agent")  # systemd, SIGHUP, metrics, alerts
    return await run_service(ops, agent.start, agent.stop)


def offline_status(cfg: AgentConfig) -> dict[str, Any]:
    """What the state directory says while the agent is not running."""
    disks = []
    for dc in cfg.disks:
        row: dict[str, Any] = {
            "agent": cfg.name,
            "disk": dc.id,
            "path": str(dc.path),
            "state": "stopped",
        }
        state_file = cfg.state_dir / "disks" / dc.id / "state.json"
        if state_file.exists():
            state = read_json(state_file)
            if state.get("resync_required"):
                row["state"] = "resync-required"
            row["resync_reason"] = state.get("resync_reason")
        journal = cfg.state_dir / "disks" / dc.id / "journal"
        row["journal_bytes"] = (
            sum(p.stat().st_size for p in journal.glob("*.seg")) if journal.is_dir() else 0
        )
        row["journal_quota"] = cfg.journal_quota
        for key in ("journaled_seq", "acked_seq", "applied_seq", "lag_bytes", "rpo_seconds"):
            row.setdefault(key, None)
        disks.append(row)
    return {"role": "agent", "name": cfg.name, "running": False, "disks": disks}


async def _status(config: Path, as_json: bool) -> int:
    cfg = load_agent_config(config)
    status = await query_status(cfg.admin_socket)
    if status is None:
        status = await asyncio.to_thread(offline_status, cfg)
    status.pop("ok", None)
    if as_json:
        print_json(status)
    else:
        link = status.get("link") or {}
        state = "running" if status.get("running") else "not running"
        print(
            f"agent {status.get('name')} ({state}), process server {cfg.process_server}, "
            f"link {'up' if link.get('connected') else 'down'}"
        )
        print_disk_table(status["disks"], STATUS_COLUMNS)
    return 0


async def _verify(config: Path, disk_id: str, repair: bool, as_json: bool) -> int:
    cfg = load_agent_config(config)
    try:
        reply = await run_with_progress(
            cfg.admin_socket,
            {"cmd": "verify", "disk": disk_id, "repair": repair},
            disk_id,
            show=sys.stderr.isatty() and not as_json,
        )
    except OSError as exc:
        return _not_running(cfg, exc)
    return print_verify_report(reply, as_json)


def print_verify_report(reply: dict[str, Any], as_json: bool) -> int:
    """Print a verify report; exit code 0 when equal, 1 when different or failed."""
    if as_json:
        print_json(reply)
    elif not reply.get("ok"):
        print(f"error: {reply.get('error')}", file=sys.stderr)
    else:
        verdict = "EQUAL" if reply["equal"] else f"DIFFERENT ({reply['differing_bytes']} bytes)"
        print(
            f"{reply['disk']}: source and replica at seq {reply['seq']}: {verdict}; "
            f"{reply['bytes_compared']} bytes compared in {reply['seconds']}s"
        )
        for offset, length in reply["differences"][:50]:
            print(f"  differs: offset {offset} length {length}")
        if len(reply["differences"]) > 50:
            print(f"  ... {len(reply['differences']) - 50} more ranges (use --json)")
        if reply.get("repair"):
            print("  repair: the differing ranges are being resynced (see status)")
    return 0 if reply.get("ok") and reply.get("equal") else 1


async def _resync(config: Path, disk_id: str, as_json: bool, wait: bool = True) -> int:
    cfg = load_agent_config(config)
    try:
        reply = await admin_request(cfg.admin_socket, {"cmd": "resync", "disk": disk_id})
        if reply.get("ok") and wait:  # the agent answers once the disk is level (`wait`)
            level = await run_with_progress(
                cfg.admin_socket,
                {"cmd": "wait", "disks": [disk_id]},
                disk_id,
                show=sys.stderr.isatty() and not as_json,
            )
            if not level.get("ok"):
                reply = {**reply, "ok": False, "error": level.get("error")}
            else:
                reply["state"] = level["disks"][0]["state"]
    except OSError as exc:
        return _not_running(cfg, exc)
    return _report(
        reply,
        as_json,
        lambda: [
            f"{disk_id}: {reply['marked_bytes']} bytes compared by digests; "
            f"state {reply.get('state', 'resyncing')}"
        ],
    )


async def _point(config: Path, disk_id: str, tag: str, as_json: bool) -> int:
    cfg = load_agent_config(config)
    try:
        reply = await admin_request(
            cfg.admin_socket, {"cmd": "point", "disk": disk_id, "tag": tag}, timeout=7200
        )
    except OSError as exc:
        return _not_running(cfg, exc)
    return _report(
        reply,
        as_json,
        lambda: [f"{disk_id}: app-consistent point {reply['point_id']} at seq {reply['seq']}"],
    )


async def _wait(config: Path, disk_ids: list[str], timeout: float | None, as_json: bool) -> int:
    cfg = load_agent_config(config)
    request: dict[str, Any] = {"cmd": "wait", "disks": disk_ids or None, "timeout": timeout}
    show = len(disk_ids) == 1 and sys.stderr.isatty() and not as_json
    try:
        reply = await run_with_progress(
            cfg.admin_socket, request, disk_ids[0] if disk_ids else "", show=show
        )
    except OSError as exc:
        return _not_running(cfg, exc)
    return _report(
        reply,
        as_json,
        lambda: [
            f"{row['disk']}: protected through seq {row['target_seq']}" for row in reply["disks"]
        ],
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            setup_logging(args.log_level)
            from common.ops import configure_service_logging

            configure_service_logging()
            stage_trace.enable("agent")
            cfg = load_agent_config(args.config)
            # first: the check runs in a child while this process imports the service
            bundle_check = BundleCheck.start(cfg.credentials)
            try:
                return run_loop(_run(cfg, bundle_check))
            finally:
                bundle_check.close()  # a start that failed before the check was waited for
        if args.command == "status":
            return run_loop(_status(args.config, args.json))
        if args.command == "verify":
            return run_loop(_verify(args.config, args.disk, args.repair, args.json))
        if args.command == "resync":
            return run_loop(_resync(args.config, args.disk, args.json, not args.no_wait))
        if args.command == "point":
            return run_loop(_point(args.config, args.disk, args.tag, args.json))
        if args.command == "wait":
            return run_loop(_wait(args.config, args.disks, args.timeout, args.json))
    except TidemarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
