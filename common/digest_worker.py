# The whole-disk hashing pass of common.digests.DigestTracker, run in a child process so that
# it hashes on its own core instead of taking the GIL from the event loop of the process that
# asked (python-xxhash holds the GIL while it hashes). Rule: the output is exactly what
# whole_disk_digests gives, 16 bytes per chunk in disk order, or a non-zero exit.
"""``python -m common.digest_worker FD SIZE CHUNK``: write the XXH3-128 digest of every
``CHUNK``-byte chunk of the first ``SIZE`` bytes of the inherited file descriptor ``FD``
to stdout (holes are not read; their digest is that of zeros)."""

from __future__ import annotations

import contextlib
import os
import sys

from common.digests import whole_disk_digests

NICENESS = 5


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        fd, size, chunk = (int(a) for a in args)
    except ValueError:
        print("usage: python -m common.digest_worker FD SIZE CHUNK", file=sys.stderr)
        return 2
    if size < 0 or chunk <= 0:
        print("digest_worker: SIZE must be >= 0 and CHUNK > 0", file=sys.stderr)
        return 2
    # A background pass: the processes it runs beside (a reverse stream being received,
    # replication) keep their share of the CPU; this one takes what they leave.
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    out = sys.stdout.buffer
    try:
        out.write(b"".join(whole_disk_digests(fd, size, chunk)))
        out.flush()
    except OSError as exc:
        print(f"digest_worker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
