# A credential bundle as a peer (agent, master target) reads it when it starts. Rule kept: a bundle is used only
# once it has passed every check of process_server.pki.check_bundle (CA, signatures, key match,
# name, role), on the very bytes that are then used. Those checks need `cryptography`, whose
# import is ~40 ms of an agent's ~155 ms start (counted by the initial sync's benchmark), so
# `tidemark-agent run` and `tidemark-mt run` have them made in a forked child, on the other core, while it goes on
# importing and opening its disks; it waits for the verdict before it uses the credentials.
"""Credential bundles: the file's checks, its PEM blocks, and their full check in a child process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import select
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from common.errors import TidemarkError

__all__ = [
    "SERVER_IDENTITY",
    "BundleCheck",
    "Credentials",
    "PemBlocks",
    "PkiError",
    "checked_credentials",
    "read_bundle",
]

log = logging.getLogger("tidemark.credentials")

SERVER_IDENTITY = "tidemark-process-server"
"""DNS SAN of the process server certificate. Clients verify this name, not the address they
dialled, so the process server can be reached by any address."""

MAX_BUNDLE_BYTES = 64 * 1024
_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(?:.*?\r?\n)?-----END \1-----", re.DOTALL)
_LABELS = ["CERTIFICATE", "CERTIFICATE", "PRIVATE KEY"]


class PkiError(TidemarkError):
    """A PKI operation or check failed; the message names the file and the problem."""


@dataclass(frozen=True)
class Credentials:
    """A checked credential bundle: the CA to trust, our certificate and its private key."""

    name: str
    role: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)


class PemBlocks(NamedTuple):
    """A bundle's three PEM blocks, in the order the bundle holds them."""

    ca: bytes
    cert: bytes
    key: bytes


def read_bundle(path: Path) -> PemBlocks:
    """Read a credential bundle and split it, checking the file only (not the certificates).

    Checks: a regular file, not readable by group or others, at most 64 KiB, holding exactly
    the PEM blocks CERTIFICATE (the CA), CERTIFICATE, PRIVATE KEY in that order. Raises
    PkiError naming the file and the failed check."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    except OSError as exc:
        raise PkiError(f"{path}: cannot open credentials: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PkiError(f"{path}: credentials must be a regular file")
        if st.st_mode & 0o077:
            raise PkiError(
                f"{path}: credentials are readable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        data = f.read(MAX_BUNDLE_BYTES + 1)
    if len(data) > MAX_BUNDLE_BYTES:
        raise PkiError(f"{path}: too large for a credential bundle")
    blocks = [(m.group(1).decode(), m.group(0) + b"\n") for m in _PEM_RE.finditer(data)]
    labels = [label for label, _ in blocks]
    if labels != _LABELS:
        raise PkiError(
            f"{path}: expected PEM blocks CERTIFICATE (CA), CERTIFICATE, PRIVATE KEY in that "
            f"order, found {labels or 'none'}"
        )
    return PemBlocks(blocks[0][1], blocks[1][1], blocks[2][1])


CHECK_TIMEOUT = 30.0  # seconds the child is given for its verdict before the check is redone here


class BundleCheck:
    """A bundle's full check (:func:`process_server.pki.check_bundle`), started now and
    awaited later.

    :meth:`start` reads the file in this process (its own checks fail at once), then forks a
    child that imports ``cryptography``, checks those very bytes and writes its verdict to a
    pipe: ``{"name", "role"}`` or ``{"error"}``. :meth:`result` reads it and builds the
    credentials from the bytes read. Where the fork fails, or the child gives no verdict
    (killed, crashed, or silent for CHECK_TIMEOUT), :meth:`result` makes the check itself: the
    child only ever saves time."""

    def __init__(self, path: Path, blocks: PemBlocks, child: tuple[int, int] | None) -> None:
        self.path = path
        self.blocks = blocks
        self._child = child  # (pid, read end of its pipe)

    @classmethod
    def start(cls, path: Path, *, fork: bool = True) -> BundleCheck:
        """Raises PkiError for the file's own checks (:func:`read_bundle`). Call it before the
        process has threads: the child runs only this thread, and imports."""
        path = Path(path)
        blocks = read_bundle(path)
        if not fork:
            return cls(path, blocks, None)
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(r)
            os.close(w)
            log.warning("event=credentials_check_inline reason=%r", exc)
            return cls(path, blocks, None)
        if pid == 0:  # the child: a verdict, then out without running the parent's exit code
            code = 1
            try:
                os.close(r)
                _write_all(w, _verdict(path, blocks))
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        return cls(path, blocks, (pid, r))

    def result(self) -> Credentials:
        """The checked credentials; raises PkiError naming the file and the failed check.
        Blocks until the child's verdict (at most CHECK_TIMEOUT)."""
        verdict = self._collect()
        if verdict is None:
            from process_server.pki import check_bundle

            return check_bundle(self.path, self.blocks)
        if "error" in verdict:
            raise PkiError(verdict["error"])
        b = self.blocks
        return Credentials(verdict["name"], verdict["role"], b.ca, b.cert, b.key)

    def _collect(self) -> dict[str, str] | None:
        if self._child is None:
            return None
        pid, fd = self._child
        self._child = None
        chunks: list[bytes] = []
        try:
            deadline = time.monotonic() + CHECK_TIMEOUT
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    os.kill(pid, signal.SIGKILL)  # silent too long: no verdict
                    chunks.clear()
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
            os.waitpid(pid, 0)
        return _parse_verdict(b"".join(chunks))


async def checked_credentials(check: BundleCheck | None, path: Path) -> Credentials:
    """``check``'s credentials (its verdict waited for in a thread), or, without one, those
    of ``path`` checked now, in this process."""
    if check is None:
        check = BundleCheck.start(path, fork=False)
    return await asyncio.to_thread(check.result)


def _verdict(path: Path, blocks: PemBlocks) -> bytes:
    """The child's answer for :meth:`BundleCheck.result`. Any failure other than the check's
    own PkiError gives no answer (the parent then checks, and reports it as it would)."""
    from process_server.pki import check_bundle

    try:
        creds = check_bundle(path, blocks)
    except PkiError as exc:
        return json.dumps({"error": str(exc)}).encode()
    return json.dumps({"name": creds.name, "role": creds.role}).encode()


def _parse_verdict(data: bytes) -> dict[str, str] | None:
    try:
        verdict = json.loads(data)
    except ValueError:
        return None
    if not isinstance(verdict, dict) or not all(isinstance(v, str) for v in verdict.values()):
        return None
    if set(verdict) in ({"error"}, {"name", "role"}):
        return verdict
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
