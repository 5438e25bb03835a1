"""Wire bytes as the kernel counts them: every TCP connection to one address and port, read
with ``ss`` (iproute2), outside the code under test and with nothing in the path.

Why not a proxy (benchmarks/proxy.py): the sync scenario's initial sync is CPU-bound on two
cores, and a counting proxy is a second loopback hop, with threads and TCP work of its own,
on those same cores; ``nbdcopy``, the baseline it is compared with, has no such hop. What it
costs the copy's wall time is not settled (docs/benchmarks.md, ``sync``, "What runs").

How: ``ss -tinHO state established dst HOST:PORT`` prints each connection's ``tcp_info``.
Of the connecting side, ``bytes_acked`` (less the one its SYN counts) is "up" and
``bytes_received`` is "down": each byte once, as the other side took it (``bytes_sent``
counts a retransmitted segment again); a byte not yet acknowledged at a snapshot counts
in the next. The kernel forgets a connection's counts when it closes, so bytes are counted
between two snapshots only when every connection that carried them is open at both ends
of the window, or opened inside it and open at its end. :func:`wire_between` checks that
against the client's own count of connections made and of attempts that failed. A window
that fails a check raises :class:`WireCountError` rather than report too few bytes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

_ROW = re.compile(r"^\s*\d+\s+\d+\s+(\S+)\s+(\S+)\s")
_ACKED = re.compile(r"\bbytes_acked:(\d+)")
_RECEIVED = re.compile(r"\bbytes_received:(\d+)")

Endpoints = tuple[str, str]  # (local address:port, peer address:port) of the connecting side


class WireCountError(RuntimeError):
    """The bytes of a window cannot all be counted (a connection closed within it)."""


@dataclass(frozen=True)
class Counts:
    """One connection's bytes so far: ``up`` sent by the connecting side, ``down`` received."""

    up: int
    down: int


def parse_ss(text: str) -> dict[Endpoints, Counts]:
    """``ss -tinHO`` output (one connection per line) → counts per connection. A field
    ``ss`` leaves out is 0 (it prints none of a connection that has not sent). Raises
    ValueError on a line that is not a connection's."""
    out: dict[Endpoints, Counts] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        row = _ROW.match(line)
        if row is None:
            raise ValueError(f"not an ss connection line: {line[:120]!r}")
        acked, received = _ACKED.search(line), _RECEIVED.search(line)
        out[(row[1], row[2])] = Counts(
            max(0, int(acked[1]) - 1) if acked else 0,  # the SYN's sequence number
            int(received[1]) if received else 0,
        )
    return out


def connections_to(port: int, host: str = "127.0.0.1") -> dict[Endpoints, Counts]:
    """The established TCP connections to ``host``:``port`` on this host (IPv4), as their
    clients see them. Raises FileNotFoundError without ``ss``, RuntimeError when it fails."""
    ss = shutil.which("ss")
    if ss is None:
        raise FileNotFoundError("ss (Debian package iproute2) is needed to count wire bytes")
    done = subprocess.run(
        [ss, "-tinHO", "state", "established", "dst", f"{host}:{port}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ss exited {done.returncode}: {done.stderr.strip()}")
    return parse_ss(done.stdout)


def wire_between(
    before: dict[Endpoints, Counts],
    after: dict[Endpoints, Counts],
    connects: int,
    failed: int = 0,
) -> Counts:
    """The bytes carried between two snapshots of :func:`connections_to`; ``connects`` is
    how many connections the client says it made in between, ``failed`` how many of its
    attempts and sessions failed. Raises WireCountError when any failed (such a connection
    may have come and gone between the snapshots, bytes and all), when a connection of
    ``before`` is gone, or when the connections that appeared are not as many as were made
    (missing ones closed, their bytes with them; extra ones are not the client's)."""
    if failed:
        raise WireCountError(f"{failed} of the client's sessions failed in the window")
    gone = sorted(set(before) - set(after))
    if gone:
        raise WireCountError(f"connections closed in the window, their bytes uncounted: {gone}")
    new = set(after) - set(before)
    if len(new) != connects:
        raise WireCountError(
            f"{connects} connections made in the window, {len(new)} of them still open: "
            "the bytes of the others cannot be counted"
        )
    up = down = 0
    for key, now in after.items():
        then = before.get(key, Counts(0, 0))
        if now.up < then.up or now.down < then.down:  # a reused address pair
            raise WireCountError(f"counts went back on {key}: {then} then {now}")
        up += now.up - then.up
        down += now.down - then.down
    return Counts(up, down)


__all__ = ["Counts", "Endpoints", "WireCountError", "connections_to", "parse_ss", "wire_between"]
