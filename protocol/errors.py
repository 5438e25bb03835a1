"""Protocol errors: every malformed or illegal input in ``protocol/`` raises ``ProtocolError``.

Rule: a ``ProtocolError`` always carries the ``ErrorCode`` that goes on the wire in an
``ERROR`` frame, so the I/O shells catch one exception type and close with that code.
"""

from __future__ import annotations

import enum

from common.errors import TidemarkError

__all__ = ["ErrorCode", "ProtocolError"]


class ErrorCode(enum.IntEnum):
    """Wire error codes (u16 in an ``ERROR`` frame)."""

    BAD_MAGIC = 1
    BAD_VERSION = 2
    BAD_CHECKSUM = 3
    FRAME_TOO_LARGE = 4
    BAD_MESSAGE = 5
    UNKNOWN_TYPE = 6
    UNEXPECTED = 7
    AUTH = 8
    SEQ_GAP = 9
    DIGEST = 10
    LIMIT = 11
    INTERNAL = 12
    DISK = 13
    SHUTDOWN = 14


class ProtocolError(TidemarkError):
    """A peer (or a caller) broke the protocol; ``code`` is the wire code to report."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[ProtocolError], tuple[ErrorCode, str]]:
        return (type(self), (self.code, self.message))
