# `tidemark-ps pki ...`: the command-line face of process_server.pki (init, issue, revoke, show).
# Rule kept: argument parsing only here, every check lives in pki.py; a PkiError or OS error
# becomes one `error: ...` line on stderr and exit code 1, success prints what was written.
"""The ``pki`` subcommand of ``tidemark-ps``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from protocol.frames import ROLES

__all__ = ["add_pki_parser", "run_pki"]


def add_pki_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``pki`` (with ``init``, ``issue``, ``revoke``, ``show``) to a subparsers object."""
    parser = subparsers.add_parser(
        "pki",
        help="deployment CA and credentials",
        description="Manage the deployment's CA, the process server certificate and the "
        "credential bundles of agents and master targets.",
    )
    actions = parser.add_subparsers(dest="pki_command", metavar="ACTION", required=True)

    p = actions.add_parser("init", help="create the CA and the process server certificate")
    p.add_argument("--dir", required=True, type=Path, help="PKI directory (created 0700)")
    p.add_argument("--force", action="store_true", help="replace an existing CA")

    p = actions.add_parser("issue", help="issue a credential bundle for an agent or master target")
    p.add_argument("--dir", required=True, type=Path, help="PKI directory")
    p.add_argument("--name", required=True, help="peer name (the agent's configured name)")
    p.add_argument("--out", required=True, type=Path, help="bundle file to write (mode 0600)")
    p.add_argument(
        "--role", choices=sorted(ROLES - {"process-server"}), default="agent", help="default: agent"
    )
    p.add_argument("--days", type=int, default=825, help="validity in days (default: 825)")
    p.add_argument("--force", action="store_true", help="overwrite an existing bundle file")

    p = actions.add_parser("revoke", help="revoke every certificate issued for a name")
    p.add_argument("--dir", required=True, type=Path, help="PKI directory")
    p.add_argument("--name", required=True, help="peer name")

    p = actions.add_parser("show", help="show the CA and the issued names")
    p.add_argument("--dir", required=True, type=Path, help="PKI directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_pki(args: argparse.Namespace) -> int:
    from process_server import pki  # cryptography: loaded only for these commands

    """Run the parsed ``pki`` command; 0 on success, 1 on failure (``error: ...`` on stderr)."""
    try:
        if args.pki_command == "init":
            pki.init_pki(args.dir, force=args.force)
            for name in (pki.CA_CERT, pki.CA_KEY, pki.SERVER_CERT, pki.SERVER_KEY):
                print(f"wrote {args.dir / name}")
        elif args.pki_command == "issue":
            pki.issue_credentials(
                args.dir, args.name, args.out, role=args.role, days=args.days, force=args.force
            )
            print(f"wrote {args.out} ({args.role} {args.name}, valid {args.days} days)")
        elif args.pki_command == "revoke":
            pki.revoke(args.dir, args.name)
            print(f"revoked {args.name}: wrote {args.dir / pki.REVOKED}")
        elif args.pki_command == "show":
            _show(pki.pki_summary(args.dir), as_json=args.json)
        else:
            print(f"error: unknown pki command {args.pki_command!r}", file=sys.stderr)
            return 1
    except (pki.PkiError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _show(summary: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    ca, server = summary["ca"], summary["server"]
    print(f"CA:      {ca['subject']}  expires {ca['not_valid_after']}")
    print(f"         sha256 {ca['sha256']}")
    print(f"server:  {server['subject']}  expires {server['not_valid_after']}")
    issued = summary["issued"]
    if not issued:
        print("issued:  (none)")
    for entry in issued:
        state = "active" if entry["active"] else "revoked"
        print(f"issued:  {entry['name']}  {state}  ({len(entry['serials'])} certificate(s))")
