"""A persisted dirty-region bitmap: where a disk changed while its journal could not record it.

Rule: a set bit is only cleared by a completed resync of its region; the file is
replaced atomically (temp file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import xxhash

from common.durable import atomic_write
from common.errors import IntegrityError

_HEADER = struct.Struct(">8sQQQ")  # magic, disk size, granularity, xxh3_64 of the bits
_MAGIC = b"TMBITMAP"
DEFAULT_GRANULARITY = 64 << 10
_SOME_SET = re.compile(rb"[^\x00]+")  # runs of bytes with a dirty chunk (found in C)
_ALL_SET = re.compile(rb"\xff+")


class DirtyBitmap:
    """One bit per ``granularity`` bytes of a disk."""

    def __init__(self, size: int, granularity: int = DEFAULT_GRANULARITY) -> None:
        self.size = size
        self.granularity = granularity
        self.bits = bytearray((self.chunks + 7) // 8)
        self.changed = False

    @property
    def chunks(self) -> int:
        return (self.size + self.granularity - 1) // self.granularity

    def mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first = offset // self.granularity
        last = min((offset + length - 1) // self.granularity, self.chunks - 1)
        self._assign(first, last + 1, True)
        self.changed = True

    def clear(self, offset: int, length: int) -> None:
        """Clear the bits of chunks lying wholly inside the range (they were verified)."""
        first = -(-offset // self.granularity)
        end = offset + length
        last = (end // self.granularity if end < self.size else self.chunks) - 1
        self._assign(first, last + 1, False)
        self.changed = True

    def _assign(self, first: int, end: int, dirty: bool) -> None:
        """Chunks [first, end) set or cleared: whole bytes at once, bit by bit at the ends
        (a 2 TiB disk has 32 Mi chunks: one loop step per chunk blocked its event loop for
        seconds)."""
        bits = self.bits
        while first < end and first & 7:
            self._assign_bit(first, dirty)
            first += 1
        whole_end = end & ~7
        if first < whole_end:
            bits[first >> 3 : whole_end >> 3] = (b"\xff" if dirty else b"\x00") * (
                (whole_end - first) >> 3
            )
            first = whole_end
        while first < end:
            self._assign_bit(first, dirty)
            first += 1

    def _assign_bit(self, chunk: int, dirty: bool) -> None:
        if dirty:
            self.bits[chunk >> 3] |= 1 << (chunk & 7)
        else:
            self.bits[chunk >> 3] &= ~(1 << (chunk & 7)) & 0xFF

    @property
    def empty(self) -> bool:
        return not any(self.bits)

    def mark_all(self) -> None:
        self._assign(0, self.chunks, True)
        self.changed = True

    def is_dirty(self, chunk: int) -> bool:
        return bool(self.bits[chunk >> 3] & (1 << (chunk & 7)))

    @property
    def dirty_bytes(self) -> int:
        count = int.from_bytes(self.bits, "little").bit_count()  # in C: status polls this
        return min(count * self.granularity, self.size)

    def regions(self) -> list[tuple[int, int]]:
        """Dirty ``(offset, length)`` ranges, adjacent chunks merged. Clean bytes are skipped
        and all-dirty bytes taken whole in C; Python only steps through mixed bytes."""
        runs: list[list[int]] = []  # [first chunk, end chunk)

        def add(first: int, end: int) -> None:
            if runs and runs[-1][1] == first:
                runs[-1][1] = end
            else:
                runs.append([first, end])

        bits = self.bits
        for some in _SOME_SET.finditer(bits):
            k, stop = some.span()
            while k < stop:
                full = _ALL_SET.match(bits, k, stop)
                if full is not None:
                    add(k * 8, full.end() * 8)
                    k = full.end()
                    continue
                byte = bits[k]
                for bit in range(8):
                    if byte >> bit & 1:
                        add(k * 8 + bit, k * 8 + bit + 1)
                k += 1
        out = []
        for first, end in runs:
            begin = first * self.granularity
            stop_byte = min(min(end, self.chunks) * self.granularity, self.size)
            if stop_byte > begin:
                out.append((begin, stop_byte - begin))
        return out

    def save(self, path: Path) -> None:
        self.changed = False  # before the snapshot: a mark made during the save sets it again
        bits = bytes(self.bits)
        header = _HEADER.pack(_MAGIC, self.size, self.granularity, xxhash.xxh3_64_intdigest(bits))
        atomic_write(path, header + bits, mode=0o600)

    @classmethod
    def load(cls, path: Path) -> DirtyBitmap:
        """Read a saved bitmap (raises OSError, IntegrityError)."""
        raw = path.read_bytes()
        if len(raw) < _HEADER.size:
            raise IntegrityError(f"{path}: short bitmap file")
        magic, size, granularity, digest = _HEADER.unpack_from(raw)
        bitmap = cls(size, granularity) if magic == _MAGIC and granularity > 0 else None
        bits = raw[_HEADER.size :]
        if (
            bitmap is None
            or len(bits) != len(bitmap.bits)
            or xxhash.xxh3_64_intdigest(bits) != digest
        ):
            raise IntegrityError(f"{path}: corrupt dirty bitmap")
        bitmap.bits[:] = bits
        return bitmap
