"""``tidemark-ps``: the process server's command line (pki, serve, status, verify, points,
failover).

Rule: exit 0 on success, 1 on failure, 2 on usage errors; ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from common import stage_trace
from common.cli import print_disk_table, print_json, query_status, run_loop, setup_logging
from common.config import load_server_config
from common.errors import TidemarkError
from process_server.pki_cli import add_pki_parser, run_pki
from process_server.points_cli import (
    add_points_parsers,
    run_failback,
    run_failover,
    run_points,
    take_extra_positionals,
)

STATUS_COLUMNS = [
    "agent",
    "disk",
    "state",
    "journaled_seq",
    "acked_seq",
    "applied_seq",
    "lag_bytes",
    "rpo_seconds",
    "cache_bytes",
    "replica_path",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidemark-ps", description="tidemark process server")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_pki_parser(sub)
    p = sub.add_parser("serve", help="run the process server")
    p.add_argument("--config", required=True, type=Path, help="ps.toml")
    p.add_argument("--log-level", default="INFO")
    p = sub.add_parser("status", help="per-disk replication status")
    p.add_argument("--config", required=True, type=Path, help="ps.toml")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser(
        "verify", help="have the disk's agent compare source and replica (exit 1 if they differ)"
    )
    p.add_argument("--config", required=True, type=Path, help="ps.toml")
    p.add_argument("disk", help="disk id")
    p.add_argument("--repair", action="store_true", help="resync the ranges that differ")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_points_parsers(sub)
    return parser


async def _verify(config: Path, disk_id: str, repair: bool, as_json: bool) -> int:
    from agent.cli import print_verify_report
    from common.admin import admin_request

    cfg = load_server_config(config)
    try:
        reply = await admin_request(
            cfg.admin_socket,
            {"cmd": "verify", "disk": disk_id, "repair": repair},
            timeout=7 * 86400,
        )
    except OSError as exc:
        print(
            f"error: the process server is not running ({cfg.admin_socket}: {exc.strerror or exc})",
            file=sys.stderr,
        )
        return 1
    if not reply.get("ok"):
        return print_verify_report(reply, as_json)
    return print_verify_report(reply["report"], as_json)


async def _serve(config: Path) -> int:
    from common.ops import ServiceOps, run_task_service
    from process_server.server import ProcessServer, serve

    cfg = load_server_config(config)
    server = ProcessServer(cfg)
    ops = ServiceOps(server, cfg, role="process-server")  # systemd, SIGHUP, metrics, page
    return await run_task_service(ops, lambda ready: serve(cfg, ready, server), server.stop)


async def _status(config: Path, as_json: bool) -> int:
    from process_server.server import offline_status

    cfg = load_server_config(config)
    status = await query_status(cfg.admin_socket)
    if status is None:
        status = await asyncio.to_thread(offline_status, cfg)
    status.pop("ok", None)
    if status.get("answering") is False:  # a server holds the state but does not answer
        if as_json:
            print_json(status)
        print(f"error: {status['error']}", file=sys.stderr)
        return 1
    if as_json:
        print_json(status)
    else:
        running = "running" if status.get("running") else "not running"
        print(f"process server ({running}), state in {status.get('state_dir')}")
        print_disk_table(status["disks"], STATUS_COLUMNS)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not take_extra_positionals(args, extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "pki":
            return run_pki(args)
        if args.command == "serve":
            setup_logging(args.log_level)
            from common.ops import configure_service_logging

            configure_service_logging()
            stage_trace.enable("ps")
            return run_loop(_serve(args.config))
        if args.command == "status":
            return run_loop(_status(args.config, args.json))
        if args.command == "verify":
            return run_loop(_verify(args.config, args.disk, args.repair, args.json))
        if args.command == "points":
            return run_loop(run_points(args))
        if args.command == "failover":
            return run_loop(run_failover(args))
        if args.command == "failback":
            return run_loop(run_failback(args))
    except TidemarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
