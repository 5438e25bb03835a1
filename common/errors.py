"""The root of every tidemark exception, so callers can catch "ours" without hiding bugs."""

from __future__ import annotations


class TidemarkError(Exception):
    """Root exception of every tidemark package."""


class ConfigError(TidemarkError):
    """A configuration file, key or value is invalid; the message names file, key and problem."""


class IntegrityError(TidemarkError):
    """Stored data failed its checksum (names the file and offset)."""


class DiskError(TidemarkError):
    """A disk operation failed; ``errno`` is the NBD-friendly errno to report (EIO, ENOSPC, EROFS...)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
