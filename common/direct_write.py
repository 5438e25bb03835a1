"""Image writes that bypass the page cache (``O_DIRECT``) where nothing is lost by it.

Two writers use it: the process server's applier (replica files) and the agent (a protected
disk's image, after the write is journaled). A data extent goes straight to the disk when it
is whole 4 KiB blocks, at least ``DIRECT_MIN`` long, and lands entirely in a hole of the
file: the bulk of an initial sync or of a resync, and first writes to fresh regions of a
disk. Such a write has no cached page to keep coherent and no old contents for the undo log
to read back (a hole is recorded as zeros), so the page cache would only cost: every fresh
page-cache page is allocated, filled and later written back, and on a VM that hands free
memory back to its host that is the costliest write there is (docs/operations.md).
Measured on the benchmark VM (`docs/resync.md`): the process server's CPU in a 4 GiB
initial sync went from 6.3-7.9 s to 3.4-3.8 s and its peak RSS from ~270 to ~160 MiB.

Everything else (small or unaligned extents, ranges that hold data, zero extents) takes
the ordinary buffered path. One writer goes further: an initial sync's copy
(process_server/bulk.py) writes every aligned piece directly, data or hole, since nothing
else writes the replica or reads it through the page cache meanwhile (the kernel writes back
and drops any cached page a direct write covers). Durability is unchanged: both paths are made durable by the
file's ``fdatasync`` (one inode), which also flushes the device's cache. Where ``O_DIRECT``
cannot be used (some filesystems), or a direct write fails with ``EINVAL``, the writer turns
itself off and the buffered path carries on.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from collections.abc import Callable
from pathlib import Path

from common.digests import in_hole
from common.durable import pwrite_all

log = logging.getLogger("tidemark.direct_write")

ALIGN = 4096  # offsets, lengths and the buffer's address: any device's logical block size
DIRECT_MIN = 64 << 10  # shorter extents are written through the page cache
BUFFER = 8 << 20  # the aligned buffer extents are copied into (longer ones go in pieces)
IMAGE_BUFFER = 1 << 20  # the agent's, one per protected disk: its memory stays small


class DirectWriter:
    """``O_DIRECT`` writes of aligned extents into holes of one file (a replica, an image)."""

    def __init__(self, path: Path, disk_id: str, buffer_bytes: int = BUFFER) -> None:
        """``buffer_bytes``: the aligned buffer (a multiple of ``ALIGN``; longer extents are
        written in pieces of that size)."""
        self.disk_id = disk_id
        self.written_bytes = 0
        self._fd: int | None = None
        self._buffer: mmap.mmap | None = None
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError as exc:  # not supported here (tmpfs: EINVAL)
            log.info("disk=%s event=direct_writes_off reason=%r", disk_id, exc.strerror)
            return
        self._buffer = mmap.mmap(-1, buffer_bytes)  # page-aligned, faulted in once, reused

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def try_write(
        self, file_fd: int, data: bytes | memoryview, offset: int, *, holes_only: bool = True
    ) -> bool:
        """Write ``data`` at ``offset`` directly if it qualifies (module comment); False:
        the caller writes it through the page cache. ``holes_only`` False: anywhere (an
        initial sync's copy, which nothing else writes or reads from the page cache meanwhile:
        the kernel writes back and drops cached pages a direct write covers). Raises OSError
        on an I/O error."""
        length = len(data)
        if (
            self._fd is None
            or not _qualifies(offset, length)
            or (holes_only and not in_hole(file_fd, offset, offset + length))
        ):
            return False
        return self._guarded(self._write, memoryview(data), offset)

    def buffer_for(self, offset: int, length: int) -> memoryview | None:
        """The aligned buffer's first ``length`` bytes, to decode a piece into before
        :meth:`write_buffer` writes it at ``offset`` (no copy); None where that write would
        not go directly (too short, unaligned, longer than the buffer, or direct writes off)."""
        if self._buffer is None or not _qualifies(offset, length) or length > len(self._buffer):
            return None
        return memoryview(self._buffer)[:length]

    def write_buffer(self, offset: int, length: int) -> bool:
        """Write the first ``length`` bytes of the aligned buffer (filled through
        :meth:`buffer_for`) at ``offset``; False: direct writes turned themselves off
        (``EINVAL``), and the caller writes the bytes, still in the buffer's view, through
        the page cache. Raises OSError on an I/O error."""
        assert self._buffer is not None
        with memoryview(self._buffer) as buffer, buffer[:length] as head:
            return self._guarded(self._write_head, head, offset)

    def _guarded(
        self, write: Callable[[memoryview, int], None], data: memoryview, offset: int
    ) -> bool:
        """``write(data, offset)``; False where the device refused the alignment (``EINVAL``):
        direct writes are off from then on. Raises any other OSError."""
        try:
            write(data, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.warning("disk=%s event=direct_writes_off reason=%r", self.disk_id, exc.strerror)
            self.close()  # alignment the device refuses: buffered from now on (a rewrite
            return False  # of what went through is harmless: the same bytes)
        self.written_bytes += len(data)
        return True

    def _write(self, data: memoryview, offset: int) -> None:
        """Through the aligned buffer, one buffer's length at a time."""
        assert self._buffer is not None
        with memoryview(self._buffer) as buffer:
            for done in range(0, len(data), len(buffer)):
                n = min(len(buffer), len(data) - done)
                buffer[:n] = data[done : done + n]
                self._write_head(buffer[:n], offset + done)

    def _write_head(self, aligned: memoryview, offset: int) -> None:
        """``aligned``: a view of the start of the aligned buffer."""
        assert self._fd is not None
        pwrite_all(self._fd, aligned, offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._buffer is not None:
            with contextlib.suppress(BufferError):  # a view still exported: freed with it
                self._buffer.close()
            self._buffer = None


def _qualifies(offset: int, length: int) -> bool:
    """Long enough and aligned for a direct write."""
    return length >= DIRECT_MIN and not offset % ALIGN and not length % ALIGN


__all__ = ["ALIGN", "DIRECT_MIN", "IMAGE_BUFFER", "DirectWriter"]
