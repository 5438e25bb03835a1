"""The activity log: which 4 MiB extents of a disk may have writes in flight (as DRBD's AL).

After an unclean stop of the agent or its host, only these extents can differ between
source and replica, so only they are re-verified — not the whole disk.

Rules it keeps:
- An extent is durably in the log *before* the first write to it reaches the image
  (``activate`` persists, then the caller writes).
- An extent leaves the log only after every write to it is durable in the journal and
  the image (``activate`` calls ``sync_data`` before evicting).
- The file has two checksummed slots written alternately, so a torn write of one slot
  leaves the other; the newer valid slot wins on open.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import xxhash

from common.aio import to_thread_outliving_cancel

EXTENT_BYTES = 4 << 20
_SLOT_HEAD = struct.Struct(">8sQIQ")  # magic, generation, count, xxh3_64 of the extent list
_MAGIC = b"TMACTLOG"


class ActivityLog:
    """A bounded LRU set of hot extents, persisted in ``path``."""

    def __init__(
        self, path: Path, disk_size: int, *, capacity: int = 1024, extent_bytes: int = EXTENT_BYTES
    ) -> None:
        self.path = path
        self.disk_size = disk_size
        self.capacity = capacity
        self.extent_bytes = extent_bytes
        self.slot_bytes = _SLOT_HEAD.size + 4 * capacity
        self._active: OrderedDict[int, int] = OrderedDict()  # extent -> clock of its last use
        self._clock = 0
        self._generation = 0
        self._lock = asyncio.Lock()
        self._wanted: Counter[int] = Counter()  # extents writers are waiting to activate
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.persists = 0
        self.evictions = 0

    # ----------------------------------------------------------------- file
    def load(self) -> list[int]:
        """Read the newest valid slot: the extents that were hot when the log was last written."""
        best: tuple[int, list[int]] | None = None
        for slot in (0, 1):
            raw = os.pread(self._fd, self.slot_bytes, slot * self.slot_bytes)
            if len(raw) < _SLOT_HEAD.size:
                continue
            magic, generation, count, digest = _SLOT_HEAD.unpack_from(raw)
            body = raw[_SLOT_HEAD.size : _SLOT_HEAD.size + 4 * count]
            if magic != _MAGIC or count > self.capacity or len(body) != 4 * count:
                continue
            if xxhash.xxh3_64_intdigest(body) != digest:
                continue
            if best is None or generation > best[0]:
                best = (generation, list(struct.unpack(f">{count}I", body)))
        if best is None:
            return []
        self._generation = best[0]
        return best[1]

    def _persist(self, extents: list[int] | None = None) -> None:
        """Write a set (default: the current one) to the other slot and fdatasync it."""
        self._generation += 1
        extents = list(self._active) if extents is None else extents
        if len(extents) > self.capacity:
            raise ValueError(
                f"{len(extents)} extents do not fit an activity log of {self.capacity}"
            )
        body = struct.pack(f">{len(extents)}I", *extents)
        raw = (
            _SLOT_HEAD.pack(_MAGIC, self._generation, len(extents), xxhash.xxh3_64_intdigest(body))
            + body
        )
        os.pwrite(
            self._fd, raw.ljust(self.slot_bytes, b"\0"), (self._generation % 2) * self.slot_bytes
        )
        os.fdatasync(self._fd)
        self.persists += 1

    # ----------------------------------------------------------------- use
    def extents_of(self, offset: int, length: int) -> range:
        return range(
            offset // self.extent_bytes, (offset + max(length, 1) - 1) // self.extent_bytes + 1
        )

    def covers(self, offset: int, length: int) -> bool:
        """True (and the extents marked recently used) when no persist is needed first."""
        active = self._active
        extents = self.extents_of(offset, length)  # one range, walked twice
        for extent in extents:
            if extent not in active:
                return False
        self._clock += 1
        for extent in extents:
            active[extent] = self._clock
            active.move_to_end(extent)
        return True

    @property
    def max_extents_per_write(self) -> int:
        """A single write may activate at most this many extents (callers split larger ones)."""
        return max(1, self.capacity // 4)

    async def activate(
        self,
        offset: int,
        length: int,
        sync_data: Callable[[], Awaitable[None]],
        *,
        also: Iterable[int] = (),
    ) -> None:
        """Make the extents of a write durable in the log before the write proceeds. An extent
        counts as active only once the log on disk holds it; an extent leaves the log only if
        it was not used since every write so far was made durable, and never while the write
        being activated uses it (the log saved for it must cover all of it).

        ``also``: extents about to be written (a pipelining client's next writes), persisted
        with this write's while they fit without evicting, as those other writers wait for."""
        extents = list(self.extents_of(offset, length))
        if len(extents) > self.max_extents_per_write:
            raise ValueError(f"a write spanning {len(extents)} extents must be split")
        wanted = self._wanted
        counted = [*extents, *also]
        for extent in counted:
            wanted[extent] += 1
        try:
            await self._activate(extents, offset, length, sync_data)
        finally:
            for extent in counted:
                wanted[extent] -= 1
                if not wanted[extent]:
                    del wanted[extent]

    async def _activate(
        self,
        extents: list[int],
        offset: int,
        length: int,
        sync_data: Callable[[], Awaitable[None]],
    ) -> None:
        own = set(extents)
        async with self._lock:
            active = self._active
            while True:
                new = [e for e in extents if e not in active]
                if not new:
                    self.covers(offset, length)
                    return
                if len(active) + len(new) <= self.capacity:
                    break
                # The write's own active extents become the most recently used: the eviction
                # below, oldest first, stops before it reaches them.
                self._clock += 1
                for extent in extents:
                    if extent in active:
                        active[extent] = self._clock
                        active.move_to_end(extent)
                mark = self._clock
                await sync_data()  # every write so far is durable
                target = max(0, self.capacity // 2 - len(new))
                while len(active) > target:
                    extent, used = next(iter(active.items()))
                    if used > mark or extent in own:
                        break  # used during the sync (its newest write may not be durable)
                    active.popitem(last=False)  # or by this write
                    self.evictions += 1
            # The extents other writers wait to activate go into the same persist while they
            # fit without evicting: a burst of writes to fresh extents costs one fdatasync,
            # not one each. Their writers find them active and persist nothing.
            room = self.capacity - len(active) - len(new)
            if room > 0:
                new += [e for e in self._wanted if e not in active and e not in own][:room]
            self._clock += 1
            snapshot = [*active, *new]
            # A cancelled writer leaves only once the thread is done: the lock must not let a
            # second persist write the other slot (and the generation) at the same time.
            await to_thread_outliving_cancel(self._persist, snapshot)
            for extent in new:
                active[extent] = self._clock
            for extent in extents:
                active[extent] = self._clock
                active.move_to_end(extent)

    def regions(self, extents: list[int] | None = None) -> list[tuple[int, int]]:
        """``(offset, length)`` of the given (default: active) extents, clipped to the disk."""
        out = []
        for extent in sorted(self._active if extents is None else extents):
            start = extent * self.extent_bytes
            if start < self.disk_size:
                out.append((start, min(self.extent_bytes, self.disk_size - start)))
        return out

    def clear(self) -> None:
        """After a clean stop (everything durable): nothing is in flight."""
        self._active.clear()
        self._persist()

    def close(self) -> None:
        os.close(self._fd)
