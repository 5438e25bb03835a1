"""``tidemark-mt``: the master target's command line (failback arrives with its own issue)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tidemark-mt",
        description="tidemark master target (source site, failback). The failback capability "
        "is not built yet: this command has no subcommands so far.",
    )
    parser.parse_args(argv)
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
