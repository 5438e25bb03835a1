"""Wire bytes as the kernel counts them: every TCP connection to one port on loopback, read
with ``ss`` (iproute2), outside the code under test and with nothing in the path.

Why not a proxy (benchmarks/proxy.py): the sync scenario's initial sync is CPU-bound on two
cores, and a counting proxy is a second loopback hop whose pump threads and TCP work run on
those same cores. ``nbdcopy``, the baseline it is compared with, pays for no such hop. In ten
alternating pairs on one image (docs/benchmarks.md, ``sync``), the copy took 3.97 s through
the proxy and 3.33 s without it (medians).

How: ``ss -tinHO state established dport = :PORT`` prints each connection's ``tcp_info``.
Of the connecting side, ``bytes_sent`` (retransmissions included: they crossed the wire
too) is "up" and ``bytes_received`` is "down". The kernel forgets a connection's counts when
it closes, so bytes are counted between two snapshots only when every connection that
carried them is open at both ends of the window, or opened inside it and open at its end.
:func:`wire_between` checks that against the client's own count of connections made, and
raises :class:`WireCountError` rather than report too few bytes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

_ROW = re.compile(r"^\s*\d+\s+\d+\s+(\S+)\s+(\S+)\s")
_SENT = re.compile(r"\bbytes_sent:(\d+)")
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
        sent, received = _SENT.search(line), _RECEIVED.search(line)
        out[(row[1], row[2])] = Counts(
            int(sent[1]) if sent else 0, int(received[1]) if received else 0
        )
    return out


def connections_to(port: int) -> dict[Endpoints, Counts]:
    """The established TCP connections to ``port`` on this host, as their clients see them.
    Raises FileNotFoundError without ``ss``, RuntimeError when it fails."""
    ss = shutil.which("ss")
    if ss is None:
        raise FileNotFoundError("ss (Debian package iproute2) is needed to count wire bytes")
    done = subprocess.run(
        [ss, "-tinHO", "state", "established", f"dport = :{port}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ss exited {done.returncode}: {done.stderr.strip()}")
    return parse_ss(done.stdout)


def wire_between(
    before: dict[Endpoints, Counts], after: dict[Endpoints, Counts], connects: int
) -> Counts:
    """The bytes carried between two snapshots of :func:`connections_to`; ``connects`` is
    how many connections the client says it made in between. Raises WireCountError when
    a connection of ``before`` is gone, or when fewer connections appeared than were made
    (the missing ones closed, and their bytes with them)."""
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


__all__ = ["Counts", "WireCountError", "connections_to", "parse_ss", "wire_between"]
