"""A persisted dirty-region bitmap: where a disk changed while its journal could not record it.

Rule: a set bit is only cleared by a completed resync of its region; the file is
replaced atomically (temp file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import struct
from pathlib import Path

import xxhash

from common.durable import atomic_write
from common.errors import IntegrityError

_HEADER = struct.Struct(">8sQQQ")  # magic, disk size, granularity, xxh3_64 of the bits
_MAGIC = b"TMBITMAP"
DEFAULT_GRANULARITY = 64 << 10


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
        for chunk in range(first, last + 1):
            self.bits[chunk >> 3] |= 1 << (chunk & 7)
        self.changed = True

    def clear(self, offset: int, length: int) -> None:
        """Clear the bits of chunks lying wholly inside the range (they were verified)."""
        first = -(-offset // self.granularity)
        end = offset + length
        last = (end // self.granularity if end < self.size else self.chunks) - 1
        for chunk in range(first, last + 1):
            self.bits[chunk >> 3] &= ~(1 << (chunk & 7)) & 0xFF
        self.changed = True

    @property
    def empty(self) -> bool:
        return not any(self.bits)

    def mark_all(self) -> None:
        for chunk in range(self.chunks):
            self.bits[chunk >> 3] |= 1 << (chunk & 7)
        self.changed = True

    def is_dirty(self, chunk: int) -> bool:
        return bool(self.bits[chunk >> 3] & (1 << (chunk & 7)))

    @property
    def dirty_bytes(self) -> int:
        count = int.from_bytes(self.bits, "little").bit_count()  # in C: status polls this
        return min(count * self.granularity, self.size)

    def regions(self) -> list[tuple[int, int]]:
        """Dirty ``(offset, length)`` ranges, adjacent chunks merged."""
        out: list[tuple[int, int]] = []
        start = None
        for chunk in range(self.chunks + 1):
            dirty = chunk < self.chunks and self.is_dirty(chunk)
            if dirty and start is None:
                start = chunk
            elif not dirty and start is not None:
                begin = start * self.granularity
                out.append((begin, min(chunk * self.granularity, self.size) - begin))
                start = None
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
