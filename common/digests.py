"""XXH3-128 digests of fixed-size chunks of a disk image, used by resync, verify and scan.

Rule: a chunk that lies entirely in a hole (found with SEEK_DATA/SEEK_HOLE) is not read:
its digest is the digest of zeros, the same a read of the hole would give. The last
chunk of a range may be short; its digest covers exactly its bytes.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Container
from dataclasses import dataclass

import xxhash

NOT_HASHED = b""  # chunk_digests' digest of a skipped chunk that holds data (see skip)
READ_SPAN = 4 << 20  # bytes per read, into a pooled buffer (see _take_buffer)
_POOL: list[bytearray] = []  # read buffers given back, reused: a fresh one costs page faults
_POOL_LOCK = threading.Lock()
_POOL_MAX = 4
TRACK_SLICE = 256 << 20  # DigestTracker.start checks for close() this often
TRACK_READ_SPAN = 16 << 20  # larger reads fall out of the L3 cache: 64 MiB is 2.7x slower


@functools.lru_cache(maxsize=64)
def zero_digest(length: int) -> bytes:
    """XXH3-128 of ``length`` zero bytes."""
    return xxhash.xxh3_128_digest(bytes(length))


def is_zero(data: bytes | memoryview) -> bool:
    """All zero bytes? (A non-zero first byte answers at once; else one XXH3 pass.)"""
    return not data or (data[0] == 0 and xxhash.xxh3_128_digest(data) == zero_digest(len(data)))


ZERO_BLOCK = bytes(4 << 10)


def zero_block_runs(data: bytes | bytearray, end: int | None = None) -> list[tuple[int, int, bool]]:
    """``(start, end, zero)`` runs of whole 4 KiB blocks of ``data`` (the last may be short),
    or of its first ``end`` bytes (a reused read buffer): where a copy of image bytes sends
    zeros, or nothing, instead of data, so holes stay holes.

    A block can be zero only if its first and last bytes are: two strided slices (C loops
    over one byte per block) screen every block, and only the blocks that pass are compared
    whole (a ``memcmp`` that stops at their first non-zero byte). A search for a zero block
    anywhere in the data (``bytes.find``) cost the agent's copy 6% of its CPU on data with
    short zero runs (measured with ``perf``, 2026-12-06)."""
    n = len(data) if end is None else end
    if not 0 <= n <= len(data):
        raise ValueError(f"end {n} outside the buffer's {len(data)} bytes")
    block = len(ZERO_BLOCK)
    whole = n // block * block
    firsts = data[0:whole:block]
    lasts = data[block - 1 : whole : block]
    zeros: list[int] = []  # offsets of the zero blocks, in order
    i = firsts.find(0)
    while i >= 0:
        if lasts[i] == 0 and data.startswith(ZERO_BLOCK, i * block):
            zeros.append(i * block)
        i = firsts.find(0, i + 1)
    if whole < n and data.startswith(ZERO_BLOCK[: n - whole], whole):
        zeros.append(whole)
    runs: list[tuple[int, int, bool]] = []
    done = 0  # the runs tile [0, done)
    for start in zeros:
        stop = min(start + block, n)
        if start > done:
            runs.append((done, start, False))
        if runs and runs[-1][2]:  # (start == done here) the zero run before goes on
            runs[-1] = (runs[-1][0], stop, True)
        else:
            runs.append((start, stop, True))
        done = stop
    if done < n:
        runs.append((done, n, False))
    return runs


@dataclass
class DigestResult:
    digests: list[bytes]
    bytes_read: int  # bytes actually read and hashed (holes are skipped)


def in_hole(fd: int, start: int, end: int) -> bool:
    """Is [start, end) entirely a hole? One SEEK_DATA (a lookup where there is data at
    ``start``); where unknown, no."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA) >= end
    except OSError as exc:
        return exc.errno == errno.ENXIO  # no data from start to the end of the file


def data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Allocated ``(offset, end)`` ranges of [start, end); the whole range if unknown.

    A range taken for data that holds a hole only costs its read (a hole reads as zeros),
    never a wrong digest. So a file with as many blocks as bytes is all data: no SEEK_HOLE,
    which on ext4 walks every extent up to the next hole, i.e. to the end of such a file,
    at each call."""
    try:
        st = os.fstat(fd)
    except OSError:
        return [(start, end)] if start < end else []
    return _data_ranges(fd, start, end, st)


def _data_ranges(fd: int, start: int, end: int, st: os.stat_result) -> list[tuple[int, int]]:
    whole = [(start, end)] if start < end else []
    if not stat.S_ISREG(st.st_mode) or st.st_blocks * 512 >= st.st_size:
        return whole  # a device (its lseek may not know holes at all) or a full file
    out: list[tuple[int, int]] = []
    pos = start
    try:
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            if data >= end:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            if hole <= data:  # no progress: trust nothing more, read the rest
                out.append((data, end))
                break
            out.append((data, min(hole, end)))
            pos = hole
    except OSError:
        return [(start, end)]  # no SEEK_DATA here (block device, old fs): read everything
    return out


def chunk_digests(
    fd: int,
    offset: int,
    length: int,
    chunk: int,
    size: int,
    read_span: int = READ_SPAN,
    *,
    mapped: bool = False,
    skip: Container[int] = (),
) -> DigestResult:
    """Digests of the chunks of [offset, offset+length) (clipped to ``size``), read
    ``read_span`` bytes at a time. Raises OSError.

    ``mapped``: hash straight from the page cache through a read-only ``MAP_POPULATE``
    mapping of each span instead of copying it into a buffer (about 1.8x faster on a
    cached image). Only for a regular file the caller owns and never shrinks (a mapped page
    past a truncated end would raise SIGBUS): the agent's image, the process server's
    replica. Spans past the file's current end, and anything not a regular file, are read.

    ``skip``: indices (within the range) of chunks whose digest the caller does not need
    because it compares them with zeros: a hole still gets the zero digest, a chunk holding
    data gets ``NOT_HASHED`` (equal to no digest) and is not read.
    """
    end = min(offset + length, size)
    st = os.fstat(fd)
    ranges = _data_ranges(fd, offset, end, st)
    file_end = st.st_size if mapped and stat.S_ISREG(st.st_mode) else 0  # how far to map
    digests: list[bytes] = []
    read = 0
    r = 0
    pos = offset
    # One pooled buffer for every read, taken at the first read (a range of holes reads
    # nothing): a fresh multi-MiB buffer per read costs page faults, and a zero-filled one
    # takes them while holding the GIL.
    owned: bytearray | None = None
    mapping: mmap.mmap | None = None
    buf = memoryview(b"")
    buf_start = 0
    try:
        while pos < end:
            cend = min(pos + chunk, end)
            while r < len(ranges) and ranges[r][1] <= pos:
                r += 1
            if r >= len(ranges) or ranges[r][0] >= cend:
                digests.append(zero_digest(cend - pos))
            elif skip and (pos - offset) // chunk in skip:
                digests.append(NOT_HASHED)
            else:
                if not (buf_start <= pos and cend <= buf_start + len(buf)):
                    span = min(max(read_span, cend - pos), end - pos)  # never grows: end - pos
                    buf.release()
                    if mapping is not None:
                        mapping.close()
                        mapping = None
                    if pos + span <= file_end:
                        base = pos - pos % mmap.ALLOCATIONGRANULARITY
                        mapping = mmap.mmap(
                            fd,
                            pos + span - base,
                            flags=mmap.MAP_SHARED | _MAP_POPULATE,
                            prot=mmap.PROT_READ,
                            offset=base,
                        )
                        buf = memoryview(mapping)[pos - base :]
                    else:
                        if owned is None:
                            owned = _take_buffer(span)
                        buf = memoryview(owned)[:span]
                        got = os.preadv(fd, [buf], pos)
                        if got < span:
                            buf[got:] = bytes(span - got)  # past the end of the file: zeros
                    buf_start = pos
                    read += span
                digests.append(xxhash.xxh3_128_digest(buf[pos - buf_start : cend - buf_start]))
            pos = cend
    finally:
        buf.release()
        if mapping is not None:
            mapping.close()
        if owned is not None:
            _give_buffer(owned)
    return DigestResult(digests, read)


_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _take_buffer(size: int) -> bytearray:
    with _POOL_LOCK:
        for index, candidate in enumerate(_POOL):
            if len(candidate) >= size:
                return _POOL.pop(index)
    return bytearray(size)


def _give_buffer(buffer: bytearray) -> None:
    with _POOL_LOCK:
        if len(_POOL) < _POOL_MAX:
            _POOL.append(buffer)


def whole_disk_digests(
    fd: int, size: int, chunk: int, cancelled: Callable[[], bool] = lambda: False
) -> list[bytes]:
    """Every chunk's digest of the first ``size`` bytes of ``fd`` (DigestTracker's pass, in
    this process or in ``common.digest_worker``), checking ``cancelled`` between slices.
    Raises OSError (ECANCELED when cancelled)."""
    digests: list[bytes] = []
    span = max(chunk, (TRACK_SLICE // chunk) * chunk)
    for offset in range(0, size, span):
        if cancelled():
            raise OSError(errno.ECANCELED, "digest tracker closed")
        digests += chunk_digests(fd, offset, span, chunk, size, TRACK_READ_SPAN).digests
    return digests


class DigestTracker:
    """Full-disk chunk digests kept current cheaply: hashed once (``start``, a thread), then
    only the chunks written since (``touch``, called *after* each write) are hashed again in
    ``current``. Failback verifies whole disks this way without reading them at cut-over."""

    def __init__(self, fd: int, size: int, chunk: int) -> None:
        self.fd = fd
        self.size = size
        self.chunk = chunk
        self._digests: list[bytes] | None = None
        self._dirty: set[int] = set()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self.rehashed_bytes = 0

    def start(self) -> None:
        """Hash every chunk (run in a thread; ``touch`` may run meanwhile), in a child process
        (``common.digest_worker``) where one can be started, else here. A failure or
        :meth:`close` ends the pass; :meth:`current` then raises."""
        try:
            digests = self._hash_in_child()
            if digests is None:
                digests = self._hash_here()
            with self._lock:
                self._digests = digests
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._ready.set()

    def _hash_in_child(self) -> list[bytes] | None:
        """The pass in a child process (its own core, not this process's GIL); None when no
        child can be started."""
        cmd = [sys.executable, "-m", "common.digest_worker", str(self.fd), str(self.size)]
        try:
            child = subprocess.Popen(
                [*cmd, str(self.chunk)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(self.fd,),
            )
        except OSError:
            return None
        self._child = child
        if self._closed:
            child.kill()
        out, err = child.communicate()
        if self._closed:
            raise OSError(errno.ECANCELED, "digest tracker closed")
        count = -(-self.size // self.chunk)
        if child.returncode != 0 or len(out) != 16 * count:
            raise OSError(
                errno.EIO,
                f"digest worker exited {child.returncode} with {len(out)} of {16 * count} "
                f"bytes: {err.decode(errors='replace').strip()[-300:]}",
            )
        return [out[i : i + 16] for i in range(0, len(out), 16)]

    def _hash_here(self) -> list[bytes]:
        return whole_disk_digests(self.fd, self.size, self.chunk, lambda: self._closed)

    def close(self) -> None:
        """Stop a pass in progress (the child is killed; in-process, at the next slice): the
        fd may be closed once :meth:`start` has returned."""
        self._closed = True
        child = self._child
        if child is not None and child.poll() is None:
            child.kill()

    def touch(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first, last = offset // self.chunk, (offset + length - 1) // self.chunk
        with self._lock:
            self._dirty.update(range(first, last + 1))

    def current(self) -> list[bytes]:
        """Every chunk's digest now (run in a thread, with the writers stopped)."""
        self._ready.wait()
        if self._error is not None:
            raise OSError(errno.EIO, f"the disk could not be hashed: {self._error}")
        with self._lock:
            dirty, self._dirty = sorted(self._dirty), set()
            digests = self._digests
        assert digests is not None
        for index in dirty:
            start = index * self.chunk
            digests[index] = chunk_digests(
                self.fd, start, self.chunk, self.chunk, self.size
            ).digests[0]
            self.rehashed_bytes += min(self.chunk, self.size - start)
        return list(digests)


def verify_chunk(size: int, max_digests: int = 65536) -> int:
    """The chunk size that covers ``size`` with at most ``max_digests`` digests (64 KiB up)."""
    chunk = max(64 << 10, -(-size // max_digests))
    return -(-chunk // 4096) * 4096
