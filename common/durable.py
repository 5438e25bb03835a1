"""Durable file helpers: atomic replace, directory fsync, hole punching and group commit.

Rule: nothing is durable until fdatasync (or fsync of its directory for a new or
renamed name) has returned; these helpers make that explicit and never assume it.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)  # the C library Python runs on (find_library: ~2 ms)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 2

_ZEROS = bytes(1 << 20)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``[offset, offset+length)`` back to the disk without waiting
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that a large file's final fsync finds
    little left to do. A hint only: it makes nothing durable, and does nothing where the call
    is missing or fails."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that names created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte of ``data`` is written (a pipe, a file)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably: temp file, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically and durably replace ``path`` with ``obj`` as pretty JSON."""
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    """Read a JSON file written by :func:`atomic_write_json` (raises OSError, ValueError)."""
    with open(path, "rb") as f:
        return json.loads(f.read())


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite until every byte is written (short writes happen on signals and some devices)."""
    n = os.pwrite(fd, data, offset)
    if n == len(data):
        return  # nearly always: one call, no view
    view = memoryview(data)[n:]
    offset += n
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """pread ``length`` bytes; past end of file the missing tail reads as zeros."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            parts.append(bytes(length - got))
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def zero_range(fd: int, offset: int, length: int, *, punch: bool) -> None:
    """Make ``[offset, offset+length)`` read as zeros.

    With ``punch`` the range is deallocated (a hole) where the filesystem can;
    otherwise it stays allocated (ZERO_RANGE). Falls back to writing zeros where
    fallocate is not supported (block devices, some filesystems).
    """
    mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if punch else FALLOC_FL_ZERO_RANGE)
    if length > 0 and _fallocate(fd, mode, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if length > 0 and err not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    end = offset + length
    while offset < end:
        n = min(len(_ZEROS), end - offset)
        pwrite_all(fd, memoryview(_ZEROS)[:n], offset)
        offset += n


class GroupCommit:
    """Share one fdatasync among every caller that asked while it was pending.

    ``mark()`` after each write; ``await commit()`` returns once a sync that
    started after the caller's last ``mark()`` has completed.

    A failed sync is permanent: the kernel reports a writeback error once, and the
    pages it stood for may be lost, so a later sync that succeeds proves nothing.
    Every later ``commit()`` raises (``failed`` tells the owner to refuse writes
    too) until the file is opened again.
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._written = 0
        self._synced = 0
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()  # one sync at a time, even past a cancel
        self._failed: OSError | None = None

    def mark(self) -> None:
        self._written += 1

    @property
    def dirty(self) -> bool:
        return self._synced < self._written

    @property
    def failed(self) -> OSError | None:
        """The error of the sync that failed, if one did."""
        return self._failed

    def _check(self) -> None:
        if self._failed is not None:
            raise OSError(errno.EIO, f"an earlier fdatasync failed: {self._failed}")

    def _sync_recording(self) -> None:
        # Recorded in the thread itself: a caller cancelled meanwhile must not lose it. Under
        # a lock: a sync started after a cancelled caller let go of ``_lock`` waits, then
        # sees the failure, instead of returning 0 for the error the first one consumed.
        with self._thread_lock:
            self._check()
            try:
                self._sync()
            except OSError as exc:
                self._failed = exc
                raise

    def sync_now(self) -> None:
        """In a worker thread: one sync now, a failure recorded as ``commit()`` records it.
        Raises OSError."""
        generation = self._written
        self._sync_recording()
        self._synced = max(self._synced, generation)

    async def commit(self) -> None:
        """Raises OSError (this sync's error, or EIO after an earlier failure)."""
        self._check()
        target = self._written
        if self._synced >= target:
            return
        async with self._lock:
            self._check()
            if self._synced >= target:
                return
            generation = self._written
            await asyncio.to_thread(self._sync_recording)
            self._synced = max(self._synced, generation)
