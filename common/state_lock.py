"""One process owns a state directory: an advisory lock (``flock``) held for the service's life.

A second server on the same state directory would append to the same logs; an offline reader
(``status`` while the server does not answer its admin socket) would open them for writing,
cutting stale tails a live server is still using. Both check this lock first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from common.errors import TidemarkError

LOCK_NAME = "owner.lock"


class StateDirBusy(TidemarkError):
    """Another live process holds the state directory."""


def hold_state_dir(state_dir: Path, role: str) -> int:
    """Take the state directory's lock (never waits) and return its descriptor; closing the
    descriptor, or the process ending in any way, releases it. Raises StateDirBusy."""
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise StateDirBusy(f"{state_dir} is in use by {holder}") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{role} pid {os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def state_dir_held(state_dir: Path, role: str) -> Iterator[None]:
    """``hold_state_dir`` for the duration of a block."""
    fd = hold_state_dir(state_dir, role)
    try:
        yield
    finally:
        os.close(fd)


__all__ = ["LOCK_NAME", "StateDirBusy", "hold_state_dir", "state_dir_held"]
