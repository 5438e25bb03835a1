"""Disjoint byte ranges of a disk mapped to values, where the first writer of a byte wins
(``fill``) or the last one does (``assign``).

A point-in-time view needs, for every byte, the oldest undo record written after its point
that covers the byte (that record holds the byte as it was at the point). Undo records are
added oldest first, so "first writer wins" is exactly that rule. The applier's overlay of a
group (which batch of the group wrote a byte last) is "last writer wins". Pure code, no I/O.

Held in a ``sortedcontainers.SortedDict`` (start -> (end, value)): O(log n) inserts and
lookups without writing a balanced tree here; it is the library hypothesis already pulls in.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from sortedcontainers import SortedDict

V = TypeVar("V")


class ExtentMap(Generic[V]):
    """``[start, end) -> value`` pieces that never overlap."""

    def __init__(self) -> None:
        self._pieces: SortedDict = SortedDict()  # start -> (end, value)
        self.covered_bytes = 0

    def __len__(self) -> int:
        return len(self._pieces)

    def fill(self, start: int, end: int, value: V) -> int:
        """Map the parts of ``[start, end)`` not mapped yet to ``value``; returns bytes added."""
        if end <= start:
            return 0
        pieces = self._pieces
        gaps: list[tuple[int, int]] = []
        cursor = start
        index = pieces.bisect_right(start) - 1
        if index < 0:
            index = 0
        keys = pieces.keys()
        while index < len(keys) and cursor < end:
            piece_start = keys[index]
            if piece_start >= end:
                break
            piece_end = pieces[piece_start][0]
            if piece_end <= cursor:
                index += 1
                continue
            if piece_start > cursor:
                gaps.append((cursor, piece_start))
            cursor = max(cursor, piece_end)
            index += 1
        if cursor < end:
            gaps.append((cursor, end))
        added = 0
        for gap_start, gap_end in gaps:
            pieces[gap_start] = (gap_end, value)
            added += gap_end - gap_start
        self.covered_bytes += added
        return added

    def assign(self, start: int, end: int, value: V) -> None:
        """Map all of ``[start, end)`` to ``value``, cutting back whatever was mapped there."""
        if end <= start:
            return
        pieces = self._pieces
        keys = pieces.keys()
        index = max(pieces.bisect_right(start) - 1, 0)
        cut: list[tuple[int, int, V]] = []
        while index < len(keys):
            piece_start = keys[index]
            if piece_start >= end:
                break
            piece_end, old = pieces[piece_start]
            if piece_end > start:
                cut.append((piece_start, piece_end, old))
            index += 1
        for piece_start, piece_end, old in cut:
            del pieces[piece_start]
            self.covered_bytes -= piece_end - piece_start
            if piece_start < start:
                pieces[piece_start] = (start, old)
                self.covered_bytes += start - piece_start
            if piece_end > end:
                pieces[end] = (piece_end, old)
                self.covered_bytes += piece_end - end
        pieces[start] = (end, value)
        self.covered_bytes += end - start

    def fill_many(self, items: Iterable[tuple[int, int, V]]) -> None:
        """``fill`` each item in order (oldest first). Into an empty map the items are laid
        out in one sweep (:func:`first_writer_pieces`) instead of inserted one by one."""
        batch = list(items)
        if not self._pieces and batch:
            pieces = first_writer_pieces(batch)
            self._pieces = SortedDict({s: (e, v) for s, e, v in pieces})
            self.covered_bytes = sum(e - s for s, e, _ in pieces)
            return
        for start, end, value in batch:
            self.fill(start, end, value)

    def lookup(self, start: int, end: int) -> Iterator[tuple[int, int, V | None]]:
        """``[start, end)`` cut into consecutive pieces: ``(s, e, value)``, ``value`` None where
        nothing is mapped."""
        pieces = self._pieces
        keys = pieces.keys()
        cursor = start
        index = max(pieces.bisect_right(start) - 1, 0)
        while cursor < end:
            if index >= len(keys):
                yield cursor, end, None
                return
            piece_start = keys[index]
            piece_end, value = pieces[piece_start]
            if piece_end <= cursor:
                index += 1
                continue
            if piece_start >= end:
                yield cursor, end, None
                return
            if piece_start > cursor:
                yield cursor, piece_start, None
                cursor = piece_start
            stop = min(piece_end, end)
            yield cursor, stop, value
            cursor = stop
            index += 1

    def items(self) -> Iterator[tuple[int, int, V]]:
        """Every mapped piece in disk order."""
        for start, (end, value) in self._pieces.items():
            yield start, end, value


__all__ = ["ExtentMap"]


def first_writer_pieces(items: list[tuple[int, int, V]]) -> list[tuple[int, int, V]]:
    """Disjoint pieces, in disk order, where each byte belongs to the first item (in list
    order) that covers it: a sweep over the items' bounds with a heap of the items covering
    the current position (lowest index first), O(n log n)."""
    bounds: list[tuple[int, int, int]] = []  # (position, 0 = end / 1 = start, item index)
    for index, (start, end, _) in enumerate(items):
        if start < end:
            bounds.append((start, 1, index))
            bounds.append((end, 0, index))
    bounds.sort()
    covering: list[int] = []
    alive = bytearray(len(items))
    out: list[tuple[int, int, V]] = []
    owner = -1  # index of the item owning the bytes from owner_start, -1: none
    owner_start = 0
    k, n = 0, len(bounds)
    while k < n:
        pos = bounds[k][0]
        while k < n and bounds[k][0] == pos:
            _, is_start, index = bounds[k]
            if is_start:
                alive[index] = 1
                heapq.heappush(covering, index)
            else:
                alive[index] = 0
            k += 1
        while covering and not alive[covering[0]]:
            heapq.heappop(covering)
        winner = covering[0] if covering else -1
        if winner != owner:
            if owner >= 0:
                out.append((owner_start, pos, items[owner][2]))
            owner, owner_start = winner, pos
    return out
