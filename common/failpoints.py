"""Failpoints: named places in the product code where a test can SIGKILL the process.

As in FoundationDB / TiKV, a failpoint is one call, ``failpoint("undo.after_record")``, at a
moment where a crash matters. Unless the environment variable ``TIDEMARK_FAILPOINTS`` was set
when this module was imported, the call is a no-op costing one global check. When it was set,
e.g. ``TIDEMARK_FAILPOINTS="undo.after_record=3,points.before_insert=1"``, the 3rd hit of
``undo.after_record`` kills its own process with SIGKILL (no cleanup, no flush: a ``kill -9``
at exactly that moment). A line naming the failpoint is written to stderr first, so the
process's log tells which failpoint fired. Used by ``tests/test_crash_matrix.py``.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "TIDEMARK_FAILPOINTS"

# Every failpoint placed in the product code, with where it is (docs/reliability.md, Crashes).
FAILPOINTS: dict[str, str] = {
    # agent (benchmarks.driver / tidemark-agent)
    "journal.after_append": "agent/journal.py: a write record appended, not yet fdatasync'ed",
    "journal.before_sync": "agent/journal.py: before the journal's fdatasync (FLUSH/FUA)",
    "journal.after_sync": "agent/journal.py: journal fdatasync'ed, FLUSH not yet acknowledged",
    "shipper.after_send": "agent/shipper.py: a batch sent, its ACK not yet received",
    "shipper.after_ack": "agent/shipper.py: ACK received, journal not yet released",
    "bulk.after_begin": "agent/bulk_copy.py: the process server holds the disk's batches for "
    "a copy, nothing copied yet",
    # process server (and master target: same receiver and applier)
    "cache.after_durable": "process_server/server.py: cache fdatasync'ed, ACK not yet sent",
    "undo.after_record": "process_server/undo.py: undo record appended, not yet fdatasync'ed",
    "applier.after_undo_sync": "process_server/replica.py: undo durable, replica not written",
    "applier.after_replica_write": "process_server/replica.py: replica written (page cache)",
    "bulk.after_sync": "process_server/bulk.py: copied pieces fdatasync'ed, bulk-state not "
    "yet sent",
    "bulk.before_fence_lifted": "process_server/bulk.py: the copy's last pieces durable, the "
    "fence still saved",
    "applier.before_applied_saved": "process_server/replica.py: replica fdatasync'ed, "
    "applied_seq not yet saved",
    "points.before_insert": "process_server/points.py: marker checked, catalog row not written",
    "points.after_insert": "process_server/points.py: catalog row written, reply not sent",
    "failover.after_overlay": "process_server/failover.py: overlay and export up, record "
    "not yet saved",
    "failover.commit.before_merge": "process_server/failover.py: state 'committing' saved, "
    "rolled-back ranges saved, replica not yet rolled back",
    "failover.commit.after_merge": "process_server/failover.py: replica rolled back and "
    "overlay merged, state 'committed' not yet saved",
    "failback.delta.after_append": "process_server/failback.py: delta appended to the "
    "failover journal, not yet fdatasync'ed or recorded",
    "failback.delta.after_sync": "process_server/failback.py: delta durable, not yet recorded",
    "failback.swap.before_retire": "process_server/failback.py: planned failback verified, "
    "failover not yet retired",
    "failback.swap.after_retire": "process_server/failback.py: failover retired, seq "
    "numbering not yet restarted",
    "failback.swap.before_done": "process_server/failback.py: seq restarted, FailbackDone "
    "not yet sent",
    # master target
    "mt.cache.after_durable": "master_target/service.py: reverse batch durable, ACK not sent",
    "mt.finish.before_reset": "master_target/service.py: FailbackDone received, agent state "
    "not yet reset",
}


def _parse(spec: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, count = item.partition("=")
        out[name.strip()] = max(1, int(count)) if count.strip() else 1
    return out


_ARMED: dict[str, int] = _parse(os.environ.get(ENV, ""))
ENABLED: bool = bool(_ARMED)
_hits: dict[str, int] = {}
_lock = threading.Lock()


def failpoint(name: str) -> None:
    """SIGKILL this process at the armed hit of ``name``; otherwise do nothing."""
    if ENABLED:
        _hit(name)


def _hit(name: str) -> None:
    target = _ARMED.get(name)
    if target is None:
        return
    with _lock:
        n = _hits[name] = _hits.get(name, 0) + 1
    if n == target:
        os.write(2, f"failpoint {name} hit {n}: SIGKILL pid {os.getpid()}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENABLED", "ENV", "FAILPOINTS", "failpoint"]
