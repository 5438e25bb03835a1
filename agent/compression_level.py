"""The zstd level of a disk's next batch: as much compression as the link needs, no more.

``compression_level`` (default 1) is the level for a link that limits replication (a WAN:
each byte saved is time saved). When the link waits for the encoder instead (a LAN, a
gateway next door, loopback: the agent's zstd is what limits throughput), the shipper steps
down one level per batch toward ``compression_fast_level`` (default -20; on mixed data zstd
-20 compresses ~1.6x faster than -5 for ~20% less ratio, docs/replication.md). When it waits
for the link (the window of unacknowledged batches is full, or the batch before is still
being sent), or when there is no backlog to hurry, it steps back up, one level per batch.

Signals, per batch, all read by the shipper's producer:

- ``link_bound``: before the batch could go, the producer waited for the window or for
  the sender (the previous batch not yet on its way);
- ``encoder_bound``: the sender was idle, waiting for this batch, while more journal
  records than the batch took were already waiting.

A first sync's copy (agent/bulk_copy.py) always has the rest of the disk behind it, so
"nothing behind" never holds there; it steps up only when its window of unwritten pieces
is full, or after ``patience`` pieces in a row with no signal at all (the link may have
slowed without filling the window: the sender waits in its sends, the readers stay ahead).
The shipper's ``patience`` is 1: a batch with no signal steps up at once.

Levels are zstd's; 0 is not one of them here: ``compression_level = 0`` turns compression
off altogether (the level stays 0), and the fast level is never 0.
"""

from __future__ import annotations


def level_ladder(level: int, fast_level: int) -> list[int]:
    """The levels from fastest to ``level``, one rung per zstd level, 0 left out."""
    if level == 0:
        return [0]
    low = min(fast_level, level)
    return [n for n in range(low, level + 1) if n != 0]


class AdaptiveLevel:
    """The level of the next batch of one disk on one connection (pure: no clock, no I/O)."""

    def __init__(self, level: int, fast_level: int, *, patience: int = 1) -> None:
        self._ladder = level_ladder(level, fast_level)
        self._rung = len(self._ladder) - 1  # a new connection starts at the configured level
        self._patience = max(1, patience)  # batches with no signal before a step up
        self._calm = 0  # batches with no signal since the last step

    @property
    def level(self) -> int:
        return self._ladder[self._rung]

    @property
    def fixed(self) -> bool:
        return len(self._ladder) == 1

    def after_batch(self, *, link_bound: bool, encoder_bound: bool) -> int:
        """Move one rung for what the last batch showed; returns the next batch's level.
        ``link_bound`` wins over ``encoder_bound`` (a link that waited is the bottleneck);
        neither steps up once ``patience`` batches in a row showed neither."""
        if not link_bound and not encoder_bound:
            self._calm += 1
            if self._calm < self._patience:
                return self.level
        self._calm = 0
        if link_bound or not encoder_bound:
            self._rung = min(self._rung + 1, len(self._ladder) - 1)
        else:
            self._rung = max(self._rung - 1, 0)
        return self.level


__all__ = ["AdaptiveLevel", "level_ladder"]
