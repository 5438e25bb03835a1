"""``tidemark-mt``: the master target's command line (source site, failback).

    tidemark-mt run    --config mt.toml     receive the reverse stream (systemd: Type=notify)
    tidemark-mt status --config mt.toml [--json]

Rule: exit 0 on success, 1 on failure, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from common.cli import print_disk_table, print_json, query_status, run_loop, setup_logging
from common.config import MasterTargetConfig, load_mt_config
from common.credentials import BundleCheck
from common.errors import TidemarkError
from common.sdnotify import Notifier


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidemark-mt", description="tidemark master target (source site, failback)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("run", help="receive the reverse stream and apply it to the source disks")
    p.add_argument("--config", required=True, type=Path, help="mt.toml")
    p.add_argument("--log-level", default="INFO")
    p = sub.add_parser("status", help="per-disk failback status")
    p.add_argument("--config", required=True, type=Path, help="mt.toml")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


async def _run(cfg: MasterTargetConfig, bundle_check: BundleCheck) -> int:
    from master_target.service import MasterTarget

    mt = MasterTarget(cfg, bundle_check=bundle_check)
    notifier = Notifier()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, mt.stop)
    ready = asyncio.Event()
    task = asyncio.ensure_future(mt.run(ready))
    waiter = asyncio.ensure_future(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    watchdog = None
    if ready.is_set():
        notifier.ready(f"failing back {len(mt.disks)} disk(s)")
        watchdog = asyncio.ensure_future(notifier.run_watchdog())
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    try:
        await task
    except TidemarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if watchdog is not None:
            watchdog.cancel()
    notifier.stopping()
    return 0


async def _status(config: Path, as_json: bool) -> int:
    from master_target.service import status_offline

    cfg = load_mt_config(config)
    status = await query_status(cfg.admin_socket) or status_offline(cfg)
    status.pop("ok", None)
    if as_json:
        print_json(status)
    else:
        running = "running" if status.get("running") else "not running"
        print(f"master target ({running})")
        print_disk_table(status["disks"], ["disk", "state", "cached_seq", "applied_seq", "path"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            setup_logging(args.log_level)
            cfg = load_mt_config(args.config)
            # first: the check runs in a child while this process imports the service
            bundle_check = BundleCheck.start(cfg.credentials)
            try:
                return run_loop(_run(cfg, bundle_check))
            finally:
                bundle_check.close()  # a start that failed before the check was waited for
        if args.command == "status":
            return run_loop(_status(args.config, args.json))
    except TidemarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
