"""Disjoint byte ranges of a disk mapped to values, where the first writer of a byte wins.

A point-in-time view needs, for every byte, the oldest undo record written after its point
that covers the byte (that record holds the byte as it was at the point). Undo records are
added oldest first, so "first writer wins" is exactly that rule. Pure code, no I/O.

Held in a ``sortedcontainers.SortedDict`` (start -> (end, value)): O(log n) inserts and
lookups without writing a balanced tree here; it is the library hypothesis already pulls in.
"""

from __future__ import annotations

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

    def fill_many(self, items: Iterable[tuple[int, int, V]]) -> None:
        """``fill`` each item in order (oldest first). Items that do not overlap anything,
        the common case, are sorted in one go instead of inserted one by one."""
        batch = list(items)
        if not self._pieces and batch:
            ordered = sorted(batch, key=lambda item: item[0])
            disjoint = all(
                ordered[i][1] <= ordered[i + 1][0] for i in range(len(ordered) - 1)
            ) and all(s < e for s, e, _ in ordered)
            if disjoint:
                self._pieces = SortedDict({s: (e, v) for s, e, v in ordered})
                self.covered_bytes = sum(e - s for s, e, _ in ordered)
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
