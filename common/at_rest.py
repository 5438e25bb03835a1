# At-rest sealing of stored records (the process server's batch cache) with AES-256-GCM under
# keys kept in a key file outside the state directory. Rule kept: a sealed record names the
# key that sealed it, so keys can be rotated (new records use the newest key, old ones still
# open as long as their key stays in the file); the record header, a per-log context (such as
# the disk id) and the caller's associated data (tag and seqs) are authenticated with the
# payload, so a record cannot be altered, moved to another seq or another disk's cache, or
# opened with the wrong key without an IntegrityError.
"""AES-256-GCM sealing of log records, key files and key rotation (see docs/security.md).

Sealed record::

    magic "TSL1" | key id u32 | nonce 12 bytes | ciphertext | GCM tag 16 bytes

Key file (mode 0600, outside the state directory), one key per line, ``#`` comments::

    <key id> <32-byte key, base64>

The highest id is the current key. ``python -m common.at_rest new|rotate|retire|list FILE``
creates, rotates and prunes key files.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import os
import secrets
import stat
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.durable import fsync_dir, write_all
from common.errors import IntegrityError, TidemarkError

__all__ = [
    "KEY_BYTES",
    "OVERHEAD",
    "SEAL_MAGIC",
    "KeyFileError",
    "Keyring",
    "Sealer",
    "add_key",
    "cache_sealer",
    "new_key_file",
    "retire_key",
]

SEAL_MAGIC = b"TSL1"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
TAG_BYTES = 16
_HEAD = struct.Struct(">4sI12s")  # magic, key id, nonce
OVERHEAD = _HEAD.size + TAG_BYTES
MAX_KEY_ID = 2**32 - 1
MAX_KEY_FILE_BYTES = 64 << 10
_HEADER_TEXT = (
    "# tidemark at-rest keys (AES-256-GCM); keep outside the state directory, mode 0600.\n"
    "# One key per line: <id> <32 bytes, base64>. The highest id seals new records; every\n"
    "# listed id still opens the records sealed under it (see docs/security.md).\n"
)


class KeyFileError(TidemarkError, ValueError):
    """A key file is missing, unsafe or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class Keyring:
    """The keys of one key file: ``current_id`` seals, every id opens."""

    path: Path
    keys: dict[int, bytes]

    @property
    def current_id(self) -> int:
        return max(self.keys)

    @classmethod
    def load(cls, path: Path, *, outside: Path | None = None) -> Keyring:
        """Read and check a key file. ``outside``: a directory the file must not be in.

        Raises KeyFileError naming the file: missing or unreadable, not a regular file,
        readable or writable by group or others, inside ``outside``, too large, a malformed
        line (named), a duplicate id, a key that is not 32 bytes, or no key at all.
        """
        path = Path(path)
        if outside is not None:
            real, root = path.resolve(), Path(outside).resolve()
            if real == root or root in real.parents:
                raise KeyFileError(
                    f"{path}: the key file must be kept outside {outside} "
                    "(whoever copies the state directory must not get the key with it)"
                )
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot open the key file: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"{path}: the key file must be a regular file")
            if st.st_mode & 0o077:
                raise KeyFileError(
                    f"{path}: the key file is accessible by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
                )
            raw = f.read(MAX_KEY_FILE_BYTES + 1)
        if len(raw) > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{path}: too large for a key file")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise KeyFileError(f"{path}: a key file is ASCII text") from None
        keys: dict[int, bytes] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[0].isdigit():
                raise KeyFileError(f"{path}:{lineno}: expected '<id> <base64 key>'")
            key_id = int(fields[0])
            if not 1 <= key_id <= MAX_KEY_ID:
                raise KeyFileError(f"{path}:{lineno}: key id {key_id} is not in 1..{MAX_KEY_ID}")
            if key_id in keys:
                raise KeyFileError(f"{path}:{lineno}: key id {key_id} appears twice")
            try:
                key = base64.b64decode(fields[1], validate=True)
            except (binascii.Error, ValueError):
                raise KeyFileError(f"{path}:{lineno}: the key is not base64") from None
            if len(key) != KEY_BYTES:
                raise KeyFileError(
                    f"{path}:{lineno}: key {key_id} has {len(key)} bytes, AES-256 needs {KEY_BYTES}"
                )
            keys[key_id] = key
        if not keys:
            raise KeyFileError(f"{path}: no key in the key file")
        return cls(path, keys)


class Sealer:
    """Seals and opens records under a keyring, bound to ``context`` (e.g. b"cache:<disk>").

    Thread-safe (AESGCM objects are; nonces are random 96-bit values, one per record, which is
    safe for far more records than one key should ever seal: rotate yearly, see docs).
    """

    overhead = OVERHEAD

    def __init__(self, keyring: Keyring, context: bytes = b"") -> None:
        self.keyring = keyring
        self.context = bytes(context)
        self._current = keyring.current_id
        self._aead = {key_id: AESGCM(key) for key_id, key in keyring.keys.items()}

    def for_context(self, context: bytes) -> Sealer:
        """The same keys, bound to another context (one per log)."""
        return Sealer(self.keyring, context)

    def _aad(self, head: bytes, aad: bytes) -> bytes:
        return b"".join((head, struct.pack(">I", len(self.context)), self.context, aad))

    def seal(self, plaintext: bytes | bytearray | memoryview, aad: bytes = b"") -> bytes:
        """Encrypt and authenticate ``plaintext`` (and ``aad``, not stored) under the current key."""
        head = _HEAD.pack(SEAL_MAGIC, self._current, secrets.token_bytes(NONCE_BYTES))
        nonce = head[8:]
        body = self._aead[self._current].encrypt(nonce, bytes(plaintext), self._aad(head, aad))
        return head + body

    def open(self, sealed: bytes | memoryview, aad: bytes = b"") -> bytes:
        """The plaintext of a sealed record. Raises IntegrityError (not sealed, unknown key id,
        or authentication failure: altered, moved, or sealed with other data or context)."""
        view = memoryview(sealed)
        if len(view) < OVERHEAD:
            raise IntegrityError(f"sealed record of {len(view)} bytes is too short")
        head = bytes(view[: _HEAD.size])
        magic, key_id, nonce = _HEAD.unpack(head)
        if magic != SEAL_MAGIC:
            raise IntegrityError("record is not sealed (no TSL1 header)")
        aead = self._aead.get(key_id)
        if aead is None:
            raise IntegrityError(
                f"record sealed with key id {key_id}, which {self.keyring.path} does not hold "
                "(retired too early, or another key file)"
            )
        try:
            return aead.decrypt(nonce, view[_HEAD.size :], self._aad(head, aad))
        except InvalidTag:
            raise IntegrityError(
                f"sealed record under key id {key_id} fails authentication"
            ) from None

    @staticmethod
    def key_id_of(sealed: bytes | memoryview) -> int | None:
        """The key id a sealed record names (None if it is not sealed)."""
        if len(sealed) < _HEAD.size or bytes(sealed[:4]) != SEAL_MAGIC:
            return None
        return int(_HEAD.unpack(bytes(sealed[: _HEAD.size]))[1])


def cache_sealer(key_file: Path | None, state_dir: Path) -> Sealer | None:
    """The process server's cache sealer for ``server.cache_key_file`` (None: not configured).
    Bind it to one disk with ``for_context(b"cache:" + disk_id)``. Raises KeyFileError."""
    if key_file is None:
        return None
    return Sealer(Keyring.load(key_file, outside=state_dir))


# --------------------------------------------------------------------------- key files


def _format(keys: dict[int, bytes]) -> bytes:
    lines = [f"{key_id} {base64.b64encode(key).decode()}\n" for key_id, key in sorted(keys.items())]
    return (_HEADER_TEXT + "".join(lines)).encode("ascii")


def _write_key_file(path: Path, keys: dict[int, bytes], *, exclusive: bool) -> None:
    """Atomically (temp file, fsync, rename or link, fsync dir) write a 0600 key file."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        try:
            os.fchmod(fd, 0o600)
            write_all(fd, _format(keys))
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)  # FileExistsError if it exists
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(directory)


def new_key_file(path: Path) -> int:
    """Create a key file holding one fresh key; returns its id (1).
    Raises KeyFileError if the file exists or its directory does not."""
    path = Path(path)
    if not path.parent.is_dir():
        raise KeyFileError(f"{path}: directory {path.parent} does not exist")
    try:
        _write_key_file(path, {1: secrets.token_bytes(KEY_BYTES)}, exclusive=True)
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists (use rotate to add a key)") from None
    return 1


def add_key(path: Path) -> int:
    """Rotate: add a fresh key with the next id (it seals from the next start on); returns
    the id. Old keys stay, so everything sealed before still opens. Raises KeyFileError."""
    keyring = Keyring.load(path)
    new_id = keyring.current_id + 1
    if new_id > MAX_KEY_ID:
        raise KeyFileError(f"{path}: no key id left")
    _write_key_file(
        Path(path), {**keyring.keys, new_id: secrets.token_bytes(KEY_BYTES)}, exclusive=False
    )
    return new_id


def retire_key(path: Path, key_id: int) -> None:
    """Remove an old key once nothing sealed under it is stored any more. The current key
    cannot be retired. Raises KeyFileError."""
    keyring = Keyring.load(path)
    if key_id not in keyring.keys:
        raise KeyFileError(f"{path}: no key with id {key_id}")
    if key_id == keyring.current_id:
        raise KeyFileError(f"{path}: key {key_id} is the current key; rotate first")
    keys = {k: v for k, v in keyring.keys.items() if k != key_id}
    _write_key_file(Path(path), keys, exclusive=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m common.at_rest {new,rotate,retire,list} FILE [ID]``: 0 ok, 1 error, 2 usage."""
    parser = argparse.ArgumentParser(
        prog="python -m common.at_rest", description="Manage tidemark at-rest key files."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, help_text in (
        ("new", "create a key file with one fresh key"),
        ("rotate", "add a fresh key that seals new records (old keys still open old ones)"),
        ("list", "list key ids (never the keys); the last one is current"),
    ):
        sub.add_parser(name, help=help_text).add_argument("file", type=Path)
    retire = sub.add_parser("retire", help="remove an old key nothing is sealed under any more")
    retire.add_argument("file", type=Path)
    retire.add_argument("key_id", type=int)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "new":
            print(f"key {new_key_file(args.file)} created in {args.file}")
        elif args.cmd == "rotate":
            print(f"key {add_key(args.file)} added to {args.file}; restart the process server")
        elif args.cmd == "retire":
            retire_key(args.file, args.key_id)
            print(f"key {args.key_id} removed from {args.file}")
        else:
            keyring = Keyring.load(args.file)
            for key_id in sorted(keyring.keys):
                print(f"{key_id}{' current' if key_id == keyring.current_id else ''}")
    except (KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
