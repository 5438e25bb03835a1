"""A recovery point written out as a new sparse raw image (``failover --to FILE``).

The image is written with ``O_DIRECT``, in aligned chunks of ``CHUNK`` bytes: writer threads
write one chunk (up to ``WRITERS`` writes in flight) while the next is filled with the point's
bytes: the replica's (read from its page cache, where the applier left it), undo pieces
(digest-checked), zeros. An image written out is not read back soon, so page-cache pages
would only cost, and on the benchmark VM they cost a lot: a page cache that grows takes ~7 s
of system time per GiB, where ``O_DIRECT`` wrote 2 GiB in ~1.5 s (docs/operations.md).
Ranges without data at the point (replica holes, zeros at the point) stay holes; data runs
are widened to whole 4 KiB blocks, holding the point's bytes there too.

Where ``O_DIRECT`` cannot be used (a filesystem that refuses it; ``EINVAL`` from the device,
at open or mid-way) the whole image is written through the page cache instead: long replica
spans by ``copy_file_range`` (a reflink where the filesystem can), the rest by ``pwritev``,
writeback started as it goes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import mmap
import os
from pathlib import Path
from typing import Any

from agent.failback_state import merge_ranges
from common.digests import data_ranges
from common.direct_write import ALIGN
from common.durable import fsync_dir, pwrite_all, start_writeback
from process_server.pit import PointView

log = logging.getLogger("tidemark.ps.materialise")
CHUNK = 8 << 20  # bytes filled at a time (two such buffers: one filled, one written)
WRITERS = 4  # O_DIRECT writes in flight: a chunk's short runs would each wait for the disk
WRITE_MAX = 2 << 20  # longer runs are cut into writes of this size
KERNEL_COPY_MIN = 64 << 10  # buffered path: replica spans at least this long, copy_file_range
IOV_BATCH = 512  # buffered path: pieces per pwritev
WRITEBACK_STEP = 64 << 20  # buffered path: writeback is started after each such stretch


def materialise(view: PointView, path: Path) -> int:
    """Write ``view`` to a new sparse file at ``path`` (fsynced, then renamed into place);
    returns the data bytes written. Raises IntegrityError (an undo piece fails its digest),
    DiskError (the point is gone), OSError."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, view.size)
        ranges = _data_ranges(view)
        written = _write_direct(view, tmp, fd, ranges)
        if written is None:
            written = _write_buffered(view, fd, ranges)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return written


# ----------------------------------------------------------------- O_DIRECT
def _write_direct(view: PointView, tmp: Path, fd: int, ranges: list[tuple[int, int]]) -> int | None:
    """The image's data by ``O_DIRECT`` (the unaligned tail of an odd-sized disk through
    ``fd``); None where ``O_DIRECT`` cannot be used (nothing is lost: the buffered path
    writes every byte again)."""
    try:
        direct = os.open(tmp, os.O_WRONLY | os.O_DIRECT)
    except OSError as exc:
        log.info("event=to_file_buffered reason=%r", exc.strerror)
        return None
    aligned_end = view.size - view.size % ALIGN
    buffers = [mmap.mmap(-1, CHUNK), mmap.mmap(-1, CHUNK)]  # page-aligned; freed on return
    in_flight: list[list[concurrent.futures.Future[int]]] = [[], []]  # writes from each
    written = 0
    turn = 0
    try:
        with concurrent.futures.ThreadPoolExecutor(WRITERS, "to-file-writer") as writers:
            for start, end in _aligned(ranges, aligned_end):
                for pos in range(start, end, CHUNK):
                    turn ^= 1
                    written += sum(write.result() for write in in_flight[turn])
                    buffer = memoryview(buffers[turn])[: min(CHUNK, end - pos)]
                    runs = _fill(view, buffer, pos)  # while the other buffer is written
                    in_flight[turn] = [
                        writers.submit(_write_run, direct, buffer[a:b], pos + a)
                        for a, b in _split(runs, WRITE_MAX)
                    ]
            written += sum(write.result() for writes in in_flight for write in writes)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        log.warning("event=to_file_buffered reason=%r", exc.strerror)
        return None
    finally:
        os.close(direct)
    tail = [(max(s, aligned_end), e) for s, e in ranges if e > aligned_end]
    if tail:
        written += _write_buffered(view, fd, tail)
    return written


def _aligned(ranges: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """``ranges`` widened to whole ``ALIGN`` blocks below ``limit``, merged."""
    widened = [(s - s % ALIGN, min(limit, _block_end(e))) for s, e in ranges if s < limit]
    return [(s, s + n) for s, n in merge_ranges([(s, e - s) for s, e in widened])]


def _fill(view: PointView, buffer: memoryview, pos: int) -> list[tuple[int, int]]:
    """Fill ``buffer`` with the point's bytes at ``pos``; returns the runs to write
    (``ALIGN``-widened, merged, relative to ``pos``): everything but zeros at the point."""
    runs: list[tuple[int, int]] = []
    end = pos + len(buffer)
    with view.lock:
        view.check_whole()
        for start, stop, piece in view.map.lookup(pos, end):
            at, n = start - pos, stop - start
            if piece is not None and piece.data_pos < 0:
                buffer[at : at + n] = bytes(n)  # zeros at the point: a hole, unless widened
                continue
            if piece is None:
                got = os.preadv(view.replica_fd, [buffer[at : at + n]], start)
                if got < n:  # past the replica's end: zeros
                    buffer[at + got : at + n] = bytes(n - got)
            else:
                buffer[at : at + n] = view.piece_bytes(start, stop, piece)
            if runs and runs[-1][1] >= at - at % ALIGN:
                runs[-1] = (runs[-1][0], _block_end(at + n))
            else:
                runs.append((at - at % ALIGN, _block_end(at + n)))
    return runs


def _block_end(position: int) -> int:
    """``position`` rounded up to a whole ``ALIGN`` block."""
    return -(-position // ALIGN) * ALIGN


def _split(runs: list[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    """``runs`` cut into pieces of at most ``most`` bytes (``ALIGN``-aligned cuts)."""
    return [(a, min(a + most, b)) for s, b in runs for a in range(s, b, most)]


def _write_run(direct: int, data: memoryview, offset: int) -> int:
    pwrite_all(direct, data, offset)
    return len(data)


# ----------------------------------------------------------------- through the page cache
def _write_buffered(view: PointView, fd: int, ranges: list[tuple[int, int]]) -> int:
    written = 0
    flushed = 0  # writeback started up to here
    for start, end in ranges:
        for pos in range(start, end, CHUNK):
            n = min(CHUNK, end - pos)
            with view.lock:
                view.check_whole()
                pieces = list(view.map.lookup(pos, pos + n))
                written += _copy_pieces(view, fd, pieces)
            if pos + n - flushed >= WRITEBACK_STEP:
                start_writeback(fd, flushed, pos + n - flushed)
                flushed = pos + n
    return written


def _copy_pieces(view: PointView, fd: int, pieces: list[tuple[int, int, Any]]) -> int:
    """Write the point's bytes of consecutive ``pieces`` (from ``view.map.lookup``; the caller
    holds ``view.lock``) to ``fd``: long replica spans by ``copy_file_range``, the rest
    gathered into ``pwritev`` calls; returns the bytes written."""
    written = 0
    parts: list[bytes] = []
    parts_start = parts_end = 0

    def flush() -> None:
        nonlocal parts
        if parts:
            _pwritev_all(fd, parts, parts_start)
            parts = []

    for start, end, piece in pieces:
        if piece is not None and piece.data_pos < 0:
            flush()  # zeros at the point: a hole in the new file
            continue
        if piece is None and end - start >= KERNEL_COPY_MIN:
            flush()
            if _copy_range(view.replica_fd, fd, start, end - start):
                written += end - start
                continue
        data = view.piece_bytes(start, end, piece)
        if not parts or parts_end != start or len(parts) >= IOV_BATCH:
            flush()
            parts_start = start
        parts.append(data)
        parts_end = end
        written += end - start
    flush()
    return written


def _pwritev_all(fd: int, parts: list[bytes], offset: int) -> None:
    total = sum(len(p) for p in parts)
    done = os.pwritev(fd, parts, offset)
    if done < total:  # a short write (signals, some devices): the rest one part at a time
        joined = memoryview(b"".join(parts))[done:]
        pwrite_all(fd, joined, offset + done)


def _copy_range(src: int, dst: int, offset: int, length: int) -> bool:
    """``copy_file_range`` of ``[offset, offset+length)`` at the same offset (no user-space
    copy; a reflink where the filesystem can). False where it is not available."""
    copy = getattr(os, "copy_file_range", None)
    if copy is None:
        return False
    done = 0
    try:
        while done < length:
            n = copy(src, dst, length - done, offset + done, offset + done)
            if n <= 0:
                break
            done += n
    except OSError:
        return False
    if done < length:  # past the replica's end: the rest reads as zeros, a hole here
        return done > 0 or length == 0
    return True


def _data_ranges(view: PointView) -> list[tuple[int, int]]:
    """Ranges that may hold data at the point: the replica's data ranges and every undo piece
    holding bytes, merged (everything else reads as zeros)."""
    ranges = [(s, e - s) for s, e in data_ranges(view.replica_fd, 0, view.size)]
    with view.lock:
        ranges.extend((s, e - s) for s, e, piece in view.map.items() if piece.data_pos >= 0)
    return [(s, s + n) for s, n in merge_ranges(ranges)]


__all__ = ["materialise"]
