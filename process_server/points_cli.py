"""``tidemark-ps points`` and ``tidemark-ps failover``: recovery points and failover, asked of
the running process server over its admin socket.

    tidemark-ps points list   --config F DISK|--group G [--json]
    tidemark-ps points create --config F DISK|--group G [--tag T] [--app-consistent] [--json]
    tidemark-ps failover --config F DISK|--group G --point P [--test] [--planned] [--to FILE]
                         [--nbd ENDPOINT] [--json]
    tidemark-ps failover cleanup|commit --config F DISK [--json]
    tidemark-ps failover list --config F [--json]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

from common.admin import admin_request
from common.cli import print_json
from common.config import load_server_config

FAILOVER_ACTIONS = ("cleanup", "commit", "list")


def add_points_parsers(sub: Any) -> None:
    p = sub.add_parser("points", help="list or create recovery points")
    p.add_argument("target", nargs="*", help="list|create, then a disk id (or --group)")
    p.add_argument("--config", required=True, type=Path, help="ps.toml")
    p.add_argument("--group", help="a consistency group of the configuration")
    p.add_argument("--tag", default="", help="create: a label kept with the point")
    p.add_argument(
        "--app-consistent", action="store_true", help="create: run the agents' snapshot hooks"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser(
        "failover",
        help="fail over to a recovery point (or: failover cleanup|commit|list)",
        description="DISK|--group G --point P [--test] [--planned] [--to FILE]; "
        "or 'failover cleanup DISK', 'failover commit DISK', 'failover list'.",
    )
    p.add_argument("target", nargs="*", help="DISK, or cleanup DISK / commit DISK / list")
    p.add_argument("--config", required=True, type=Path, help="ps.toml")
    p.add_argument("--group", help="fail over every disk of a consistency group")
    p.add_argument(
        "--point",
        default="latest",
        help="latest | latest-processed | latest-app-consistent | POINT_ID | TIME "
        "(ISO 8601 or epoch seconds: the newest point at or before it)",
    )
    p.add_argument("--test", action="store_true", help="test failover: replication goes on")
    p.add_argument("--planned", action="store_true", help="stop source writes and drain first")
    p.add_argument("--to", type=Path, help="write the point out as a sparse raw image instead")
    p.add_argument("--nbd", help='export endpoint ("unix:/path.sock" or "tcp:HOST:PORT")')
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser(
        "failback",
        help="the reverse stream's state, or with --planned: finish the failback of a disk",
    )
    p.add_argument("disk", help="disk id")
    p.add_argument("--config", required=True, type=Path, help="ps.toml")
    p.add_argument(
        "--planned",
        action="store_true",
        help="stop DR writes, ship the last delta, verify by digests, swap roles back",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the drain")
    p.add_argument("--json", action="store_true", help="print one JSON object")


async def _ask(config: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    cfg = load_server_config(config)
    try:
        return await admin_request(cfg.admin_socket, request, timeout=7 * 86400)
    except OSError as exc:
        print(
            f"error: the process server is not running ({cfg.admin_socket}: {exc.strerror or exc})",
            file=sys.stderr,
        )
        return None


def _usage(message: str) -> int:
    print(f"usage error: {message}", file=sys.stderr)
    return 2


def _time(ns: int | None) -> str:
    if not ns:
        return "-"
    moment = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _finish(reply: dict[str, Any] | None, as_json: bool, show: Any) -> int:
    if reply is None:
        return 1
    if as_json:
        print_json(reply)
    elif not reply.get("ok"):
        print(f"error: {reply.get('error', 'failed')}", file=sys.stderr)
    else:
        show(reply)
    return 0 if reply.get("ok") else 1


def take_extra_positionals(args: argparse.Namespace, extra: list[str]) -> bool:
    """argparse stops filling a ``*`` positional at the first option: ``points list --config F
    DISK`` leaves DISK over. Such leftovers join ``target``; False when one is an option."""
    if any(item.startswith("-") for item in extra) or not hasattr(args, "target"):
        return not extra
    args.target = [*args.target, *extra]
    return True


async def run_points(args: argparse.Namespace) -> int:
    if not args.target or args.target[0] not in ("list", "create"):
        return _usage("points list|create DISK|--group G")
    args.action = args.target[0]
    args.disk = args.target[1] if len(args.target) == 2 else None
    if len(args.target) > 2 or bool(args.disk) == bool(args.group):
        return _usage("name one disk or --group")
    target = {"group": args.group} if args.group else {"disk": args.disk}
    if args.action == "list":
        reply = await _ask(args.config, {"cmd": "points", **target})
        return _finish(reply, args.json, _print_points)
    kind = "app-consistent" if args.app_consistent else "manual"
    reply = await _ask(
        args.config, {"cmd": "point-create", "kind": kind, "tag": args.tag, **target}
    )
    return _finish(
        reply,
        args.json,
        lambda r: print(f"point {r['id']} ({r['kind']}) at {r['seqs']} held {r['hold_ms']:.1f} ms"),
    )


def _print_points(reply: dict[str, Any]) -> None:
    rows = reply["points"]
    print(f"{len(rows)} recovery points")
    for p in rows:
        seq = p.get("seq", p.get("seqs"))
        print(
            f"  {_time(p['time_ns'])}  {p['kind']:<16} {p['id']:<40} seq={seq} {p.get('tag', '')}"
        )


async def run_failover(args: argparse.Namespace) -> int:
    target = list(args.target)
    if target and target[0] in FAILOVER_ACTIONS:
        action = target.pop(0)
        if action == "list":
            reply = await _ask(args.config, {"cmd": "status"})
            if reply is not None:
                reply = {"ok": True, "failovers": reply.get("failovers", [])}
            return _finish(reply, args.json, _print_failovers)
        if len(target) != 1:
            return _usage(f"failover {action} takes one disk id")
        reply = await _ask(args.config, {"cmd": f"failover-{action}", "disk": target[0]})
        return _finish(reply, args.json, lambda r: print(f"{action}: {r.get('disk')} done"))
    if bool(target) == bool(args.group) or len(target) > 1:
        return _usage("name one disk or --group")
    if args.test and args.planned:
        return _usage("--test and --planned do not go together")
    request = {
        "cmd": "failover",
        "point": args.point,
        "test": args.test,
        "planned": args.planned,
        "to": str(args.to.resolve()) if args.to else None,
        "nbd": args.nbd,
        **({"group": args.group} if args.group else {"disk": target[0]}),
    }
    reply = await _ask(args.config, request)
    return _finish(reply, args.json, _print_failovers)


async def run_failback(args: argparse.Namespace) -> int:
    reply = await _ask(
        args.config,
        {"cmd": "failback", "disk": args.disk, "planned": args.planned, "timeout": args.timeout},
    )

    def show(r: dict[str, Any]) -> None:
        if args.planned:
            print(
                f"{r['disk']}: failed back; {r['wire_bytes']} bytes on the wire; forward "
                f"protection resumes at seq {r['next_seq']} ({r['timings']['total_ms']:.0f} ms)"
            )
        else:
            print(
                f"{r['disk']}: {r.get('state')}; acked {r.get('acked_seq')} of "
                f"{r.get('journal_last_seq')}, {r.get('lag_bytes')} bytes behind"
            )

    return _finish(reply, args.json, show)


def _print_failovers(reply: dict[str, Any]) -> None:
    if "path" in reply:
        t = reply["timings_ms"]
        print(
            f"{reply['disk']}: point {reply['point']['id']} (seq {reply['point']['seq']}) "
            f"written to {reply['path']} ({reply['data_bytes']} data bytes) in {t['total']:.0f} ms"
        )
        return
    for f in reply.get("failovers", []):
        kind = "test failover" if f["test"] else "failover"
        print(
            f"{f['disk']}: {kind} {f['id']} [{f['state']}] to point {f['point']['id']} "
            f"(seq {f['point']['seq']}, {_time(f['point']['time_ns'])})"
        )
        print(f"  export: {f['nbd']}")
        steps = ", ".join(f"{k} {v:.1f} ms" for k, v in f.get("timings_ms", {}).items())
        print(f"  RTO: {steps}")


__all__ = [
    "add_points_parsers",
    "run_failback",
    "run_failover",
    "run_points",
    "take_extra_positionals",
]
