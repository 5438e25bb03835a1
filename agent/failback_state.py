"""What a stopped agent knows about a disk during failback, read and reset on the source site
by the master target (the agent must not run on a disk the master target is writing).

- ``source_divergence``: the extents the source wrote that the failover point may not hold:
  every record still in the agent's journal (not acknowledged by the process server, or
  acknowledged after the point) and every dirty-bitmap region. None when the agent's state is
  gone (the host was rebuilt): then only a digest comparison can tell.
- ``reset_after_failback``: once the source equals the DR disk again, the journal is emptied
  and restarts at the process server's next seq, with a clean state: the agent resumes forward
  protection without a resync.
"""

from __future__ import annotations

from pathlib import Path

from agent.dirty_bitmap import DirtyBitmap
from agent.disk import ACTIVITY_LOG_FILE, BITMAP_FILE, STATE_FILE
from agent.journal import decode_entry
from common.durable import atomic_write_json, fsync_dir, read_json
from common.segment_log import Cursor, SegmentLog

JOURNAL_DIR = "journal"


def source_divergence(state_dir: Path) -> list[tuple[int, int]] | None:
    """Extents the agent journaled (or marked dirty) for one disk; None without its state."""
    state_path = state_dir / STATE_FILE
    journal_dir = state_dir / JOURNAL_DIR
    if not state_path.exists() or not journal_dir.is_dir():
        return None
    state = read_json(state_path)
    ranges: list[tuple[int, int]] = []
    log = SegmentLog.open(journal_dir)
    try:
        cursor = Cursor()
        seq = log.first_seq
        while seq <= log.last_seq:
            records = log.read_records(seq, 16 << 20, cursor)
            if not records:
                break
            for record in records:
                entry = decode_entry(record)
                ranges.append((entry.offset, entry.length))
                seq = record.last_seq + 1
    finally:
        log.close()
    bitmap = state_dir / BITMAP_FILE
    if state.get("resync_required") and bitmap.exists():
        ranges.extend(DirtyBitmap.load(bitmap).regions())
    elif state.get("resync_required"):
        ranges.append((0, int(state["size"])))  # a resync with no bitmap covers the whole disk
    return merge_ranges(ranges)


def reset_after_failback(state_dir: Path, next_seq: int) -> None:
    """Empty the agent's journal (restarting at ``next_seq``) and record a clean, level state."""
    state_path = state_dir / STATE_FILE
    state = read_json(state_path)
    journal_dir = state_dir / JOURNAL_DIR
    if journal_dir.is_dir():
        for segment in journal_dir.glob("*.seg"):
            segment.unlink()
        fsync_dir(journal_dir)
    SegmentLog.open(journal_dir, base_seq=next_seq).close()
    for name in (BITMAP_FILE, ACTIVITY_LOG_FILE):
        path = state_dir / name
        if path.exists():
            path.unlink()
    fsync_dir(state_dir)
    state.update(
        clean=True,
        resync_required=False,
        resync_reason=None,
        overflowed=False,
        unclean_floor=None,
        initially_empty=False,
        failback_reset_seq=next_seq,
    )
    atomic_write_json(state_path, state)


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, adjacent ranges joined."""
    out: list[tuple[int, int]] = []
    for start, length in sorted(r for r in ranges if r[1] > 0):
        end = start + length
        if out and start <= out[-1][0] + out[-1][1]:
            prev_start, prev_len = out[-1]
            out[-1] = (prev_start, max(prev_start + prev_len, end) - prev_start)
        else:
            out.append((start, length))
    return out


__all__ = ["merge_ranges", "reset_after_failback", "source_divergence"]
