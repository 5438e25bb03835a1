# A credential bundle as a peer (agent, master target) reads it when it starts. Rule kept: a
# bundle is used only once it has passed every check of process_server.pki.check_bundle (CA,
# signatures, key match, name, role), on the very bytes that are then used. Those checks need
# `cryptography`, whose import is ~40 ms of an agent's ~155 ms start (counted by the initial
# sync's benchmark), so `tidemark-agent run` and `tidemark-mt run` have them made in a forked
# child, on the other core, while they go on importing their service; they wait for the
# verdict before anything uses the credentials.
"""Credential bundles: the file's checks, its PEM blocks, and their full check in a child process."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
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

from common.durable import write_all
from common.errors import TidemarkError

__all__ = [
    "SERVER_IDENTITY",
    "BundleCheck",
    "Credentials",
    "PemBlocks",
    "PkiError",
    "read_bundle",
]

log = logging.getLogger("tidemark.credentials")

SERVER_IDENTITY = "tidemark-process-server"
"""DNS SAN of the process server certificate. Clients verify this name, not the address they
dialled, so the process server can be reached by any address."""

MAX_BUNDLE_BYTES = 64 * 1024
CHECK_TIMEOUT = 30.0  # seconds the child is given for its verdict before the check is made here

_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_BASE64_LINE = re.compile(rb"[A-Za-z0-9+/=]+")
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
    """A bundle's three PEM blocks, in its order, each rewritten from its decoded bytes (64
    base64 characters a line, LF endings): what is checked is what OpenSSL will load."""

    ca: bytes
    cert: bytes
    key: bytes


def read_bundle(path: Path) -> PemBlocks:
    """Read a credential bundle and split it, checking the file only (not the certificates).

    Checks: a regular file, not readable by group or others, at most 64 KiB, holding exactly
    the PEM blocks CERTIFICATE (the CA), CERTIFICATE, PRIVATE KEY in that order, each only
    base64 between its BEGIN and END lines (no PEM headers). Raises PkiError naming the file
    and the failed check."""
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
    found = [(m.group(1).decode(), m.group(2)) for m in _PEM_RE.finditer(data)]
    labels = [label for label, _ in found]
    if labels != _LABELS:
        raise PkiError(
            f"{path}: expected PEM blocks CERTIFICATE (CA), CERTIFICATE, PRIVATE KEY in that "
            f"order, found {labels or 'none'}"
        )
    ca, cert, key = (_canonical(path, label, body) for label, body in found)
    return PemBlocks(ca, cert, key)


def _canonical(path: Path, label: str, body: bytes) -> bytes:
    """One PEM block rebuilt from the base64 ``body`` between its BEGIN and END lines."""
    lines = body.splitlines()
    if not lines or not all(_BASE64_LINE.fullmatch(line) for line in lines):
        raise PkiError(
            f"{path}: the {label} PEM block holds lines that are not base64 "
            "(PEM headers are not accepted)"
        )
    try:
        der = binascii.a2b_base64(b"".join(lines), strict_mode=True)
    except binascii.Error as exc:
        raise PkiError(f"{path}: the {label} PEM block is not valid base64: {exc}") from None
    text = binascii.b2a_base64(der, newline=False)
    wrapped = b"\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label.encode(), wrapped, label.encode())


class BundleCheck:
    """A bundle's full check (:func:`process_server.pki.check_bundle`), started now and
    awaited later.

    :meth:`start` reads the file in this process (its own checks fail at once), then forks a
    child that imports ``cryptography``, checks those very blocks and writes its verdict to a
    pipe: ``{"name", "role"}`` or ``{"error"}``. :meth:`credentials` waits for it and builds
    the credentials from the blocks read. Where the fork fails, or the child gives no verdict
    (killed, crashed, or silent for CHECK_TIMEOUT), the check is made in this process: the
    child only ever saves time. :meth:`close` ends a child whose verdict is not wanted."""

    def __init__(self, path: Path, blocks: PemBlocks, child: tuple[int, int] | None) -> None:
        self.path = path
        self.blocks = blocks
        self._child = child  # (pid, read end of its pipe) until its verdict is read

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
                write_all(w, _verdict(path, blocks))
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        return cls(path, blocks, (pid, r))

    async def credentials(self) -> Credentials:
        """The checked credentials; raises PkiError naming the file and the failed check. The
        verdict is waited for in a thread (at most CHECK_TIMEOUT); a check made here runs on
        the caller's thread (it turns a warning into an error for a moment)."""
        verdict = await asyncio.to_thread(self.verdict) if self._child is not None else None
        return self.credentials_from(verdict)

    def verdict(self) -> dict[str, str] | None:
        """The child's verdict, or None when there is none (no child, or no usable answer).
        Blocks until the child has answered or CHECK_TIMEOUT has passed; the child is reaped."""
        if self._child is None:
            return None
        pid, fd = self._child
        self._child = None
        chunks: list[bytes] = []
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + CHECK_TIMEOUT
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(left * 1000):
                    log.warning("event=credentials_check_silent pid=%d", pid)
                    _kill(pid)
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
            _reap(pid)
        return _parse_verdict(b"".join(chunks))

    def credentials_from(self, verdict: dict[str, str] | None) -> Credentials:
        """Credentials for ``verdict`` (:meth:`verdict`); without one, the check made here."""
        if verdict is None:
            from process_server.pki import check_bundle

            return check_bundle(self.path, self.blocks)
        if "error" in verdict:
            raise PkiError(verdict["error"])
        b = self.blocks
        return Credentials(verdict["name"], verdict["role"], b.ca, b.cert, b.key)

    def close(self) -> None:
        """End a child whose verdict was never read (a start that failed before it)."""
        if self._child is not None:
            pid, fd = self._child
            self._child = None
            os.close(fd)
            _kill(pid)
            _reap(pid)


def _verdict(path: Path, blocks: PemBlocks) -> bytes:
    """The child's answer. Any failure other than the check's own PkiError gives no answer
    (the parent then checks, and reports it as it would)."""
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


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # reaped already (by whoever waits for all)
        os.waitpid(pid, 0)
