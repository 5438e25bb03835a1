"""Stage stamps of every batch on its way from the agent to the replica (a diagnostic).

Off unless the environment names a directory in ``TIDEMARK_STAGE_TRACE`` when a service
starts (``enable``). Then the process appends one line per stamp to
``<dir>/<role>-<pid>.trace``:

    <CLOCK_MONOTONIC ns> <stage> <seq> <value>

Each line is one ``write``, so a killed process loses none it stamped. ``CLOCK_MONOTONIC`` is
one clock for every process of a machine, so the agent's stamps and the process server's
compare. ``benchmarks/stage_trace.py`` reads them (``python -m benchmarks.sync_timeline
--trace``).

Stages; ``seq`` is the batch's last seq unless said:

- agent:
  - ``built``: encoded (value: its raw bytes);
  - ``sent``: written to the link;
  - ``acked``: seq is the durable seq an ACK acknowledged;
  - ``digests_asked`` and ``digests_got``: seq is the resync range's offset (value: the seq
    the replica had to apply first).
- process server:
  - ``received``: taken from the link;
  - ``cached``: appended to the cache;
  - ``durable``: seq is the cache's new durable seq, stamped before an ACK or the applier
    can act on it;
  - ``apply_started``: seq is the applier's seq before a group (value: batches in it);
  - ``applied``: seq is the group's last seq.

Stamps cost a check of one global when off, and are made once per batch, never per write.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TextIO

ENV = "TIDEMARK_STAGE_TRACE"
log = logging.getLogger("tidemark.stage_trace")

_out: TextIO | None = None


def enable(role: str) -> Path | None:
    """Start stamping when ``TIDEMARK_STAGE_TRACE`` is set; returns the file, else None. A
    directory that cannot be written is logged and ignored: a diagnostic never stops a
    service from starting."""
    global _out
    directory = os.environ.get(ENV)
    if not directory:
        return None
    path = Path(directory) / f"{role}-{os.getpid()}.trace"
    disable()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _out = open(path, "a", buffering=1)  # noqa: SIM115 - the process's life; line-buffered
    except OSError as exc:
        log.warning("event=stage_trace_off path=%s error=%r", path, str(exc))
        return None
    log.info("event=stage_trace_on path=%s", path)
    return path


def disable() -> None:
    global _out
    if _out is not None:
        _out.close()
        _out = None


def stamp(stage: str, seq: int, value: int = 0) -> None:
    """One stamp (nothing when tracing is off). Never raises: a full disk ends the trace."""
    global _out
    if _out is None:
        return
    try:
        _out.write(f"{time.monotonic_ns()} {stage} {seq} {value}\n")
    except (OSError, ValueError):
        _out = None


__all__ = ["ENV", "disable", "enable", "stamp"]
