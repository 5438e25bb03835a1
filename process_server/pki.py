# The deployment's own PKI: one CA, the process server certificate, and one bundle per agent or
# master target. Rule kept: every file is written atomically with its final mode set before it
# becomes visible, private keys are never readable by group or others, and nothing that fails a
# check (name, role, signature, key match, file mode) is ever accepted.
"""Deployment CA, process-server certificate and per-peer credential bundles (EC P-256, SHA-256)."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import ipaddress
import json
import os
import re
import secrets
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.credentials import SERVER_IDENTITY, Credentials, PemBlocks, PkiError, read_bundle
from common.durable import write_all

__all__ = [
    "ROLES",
    "SERVER_IDENTITY",
    "SERVER_ROLE",
    "Credentials",
    "PkiError",
    "check_bundle",
    "init_pki",
    "issue_credentials",
    "load_bundle",
    "load_revoked_serials",
    "pki_summary",
    "revoke",
]

SERVER_ROLE = "process-server"
"""OU of the process server certificate (never accepted in a bundle)."""

ROLES = frozenset({"agent", "master-target"})
"""Roles a credential bundle may carry (in the certificate's OU attribute)."""

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
ISSUED = "issued.json"
REVOKED = "revoked.txt"
_LOCK = ".lock"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RESERVED_NAMES = frozenset({SERVER_IDENTITY, "localhost"})
_CLOCK_SKEW = dt.timedelta(minutes=5)
_MAX_DAYS = 36500


# --------------------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, mode: int, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory: fchmod, fsync, rename,
    fsync the directory. With ``overwrite=False`` an existing ``path`` raises FileExistsError
    (checked atomically by hard-linking the temp file into place)."""
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                # The filesystem has no hard links: fall back to check-then-rename
                # (callers hold the PKI lock, so only outsiders can race us).
                if path.exists():
                    raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(directory)


@contextlib.contextmanager
def _locked(pki_dir: Path) -> Iterator[None]:
    """Serialise PKI writers (init, issue, revoke) with an advisory lock in the directory."""
    if not pki_dir.is_dir():
        raise PkiError(f"{pki_dir}: no PKI directory (run `tidemark-ps pki init --dir {pki_dir}`)")
    fd = os.open(pki_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(
            f"{path}: {what} not found (run `tidemark-ps pki init --dir {path.parent}`)"
        ) from None
    except OSError as exc:
        raise PkiError(f"{path}: cannot read {what}: {exc.strerror}") from exc


def _check_days(days: int, what: str) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= _MAX_DAYS:
        raise PkiError(f"{what} must be a whole number of days in 1..{_MAX_DAYS}, got {days!r}")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise PkiError(
            f"invalid name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )


# --------------------------------------------------------------------------- certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _leaf_cert(
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    role: str,
    sans: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    not_before: dt.datetime,
    days: int,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tidemark"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _load_ca(pki_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = pki_dir / CA_CERT, pki_dir / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path, "CA certificate"))
    except ValueError as exc:
        raise PkiError(f"{cert_path}: not a PEM certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(_read(key_path, "CA key"), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{key_path}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path}: not an EC private key")
    if not _same_public_key(key, cert):
        raise PkiError(f"{key_path}: does not match {cert_path}")
    return cert, key


# --------------------------------------------------------------------------- issued / revoked


def _load_issued(pki_dir: Path) -> dict[str, list[int]]:
    path = pki_dir / ISSUED
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise PkiError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(raw, dict):
        raise PkiError(f"{path}: expected an object {{name: [serial hex, ...]}}")
    issued: dict[str, list[int]] = {}
    for name, serials in raw.items():
        if not isinstance(serials, list) or not all(isinstance(s, str) for s in serials):
            raise PkiError(f"{path}: entry {name!r} is not a list of hex serials")
        try:
            issued[name] = [int(s, 16) for s in serials]
        except ValueError:
            raise PkiError(f"{path}: entry {name!r} holds a serial that is not hex") from None
    return issued


def _write_issued(pki_dir: Path, issued: dict[str, list[int]]) -> None:
    doc = {name: [f"{s:x}" for s in serials] for name, serials in sorted(issued.items())}
    _atomic_write(pki_dir / ISSUED, (json.dumps(doc, indent=2) + "\n").encode(), 0o600)


def load_revoked_serials(pki_dir: Path) -> set[int]:
    """Serials listed in ``pki_dir/revoked.txt`` (none if the file does not exist).

    Blank lines and ``#`` comments are ignored. Raises PkiError if the file is unreadable or a
    line is not a hex serial (naming the line).
    """
    path = pki_dir / REVOKED
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return set()
    except (OSError, UnicodeDecodeError) as exc:
        raise PkiError(f"{path}: unreadable: {exc}") from exc
    serials: set[int] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            serials.add(int(line, 16))
        except ValueError:
            raise PkiError(f"{path}:{lineno}: not a hex serial: {line!r}") from None
    return serials


# --------------------------------------------------------------------------- public API


def init_pki(
    pki_dir: Path,
    *,
    ca_days: int = 3650,
    cert_days: int = 825,
    force: bool = False,
    _not_valid_before: dt.datetime | None = None,
) -> None:
    """Create the deployment CA and the process server certificate in ``pki_dir`` (mode 0700).

    Writes ``ca.crt``, ``ca.key`` (0600), ``server.crt``, ``server.key`` (0600) and an empty
    ``issued.json``; ``force`` replaces an existing CA (every credential issued by the old one
    stops working). ``_not_valid_before`` is for tests (backdated or future CA and server
    certificates). Raises PkiError if a CA already exists and ``force`` is false, or if a
    validity period is out of range; OSError if the directory cannot be created or written.
    """
    _check_days(ca_days, "ca_days")
    _check_days(cert_days, "cert_days")
    pki_dir = Path(pki_dir)
    pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(pki_dir, 0o700)
    with _locked(pki_dir):
        if (pki_dir / CA_KEY).exists() and not force:
            raise PkiError(f"{pki_dir / CA_KEY}: a CA already exists (use --force to replace it)")
        now = (
            _not_valid_before
            if _not_valid_before is not None
            else dt.datetime.now(dt.UTC) - _CLOCK_SKEW
        )
        ca_key = _new_key()
        ca_name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tidemark"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"tidemark CA {secrets.token_hex(4)}"),
            ]
        )
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=ca_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        server_key = _new_key()
        server_cert = _leaf_cert(
            ca_cert=ca_cert,
            ca_key=ca_key,
            key=server_key,
            common_name=SERVER_IDENTITY,
            role=SERVER_ROLE,
            sans=[
                x509.DNSName(SERVER_IDENTITY),
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ],
            usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            not_before=now,
            days=cert_days,
        )
        # ca.key last: it is the "a PKI exists here" marker, so a crash part-way through
        # leaves a directory that a plain re-run (without --force) completes.
        _atomic_write(pki_dir / SERVER_KEY, _key_pem(server_key), 0o600)
        _atomic_write(pki_dir / SERVER_CERT, _cert_pem(server_cert), 0o644)
        _atomic_write(pki_dir / CA_CERT, _cert_pem(ca_cert), 0o644)
        _write_issued(pki_dir, {})
        (pki_dir / REVOKED).unlink(missing_ok=True)
        _atomic_write(pki_dir / CA_KEY, _key_pem(ca_key), 0o600)


def issue_credentials(
    pki_dir: Path,
    name: str,
    out: Path,
    *,
    role: str = "agent",
    days: int = 825,
    force: bool = False,
    _not_valid_before: dt.datetime | None = None,
) -> None:
    """Issue a key and client certificate for ``name`` and write them as one bundle at ``out``.

    The bundle (mode 0600) holds, in order, the CA certificate, the certificate (CN and DNS SAN
    ``name``, OU ``role``, EKU clientAuth) and its PKCS8 private key. The serial is recorded in
    ``issued.json`` before the bundle is written, so every bundle that exists can be revoked.
    ``_not_valid_before`` is for tests (backdated certificates).

    Raises PkiError for an invalid or reserved name, an unknown role, a bad ``days``, a missing
    or broken CA, a missing output directory, or an existing ``out`` without ``force``; OSError
    if ``out`` cannot be written.
    """
    _check_name(name)
    if name in _RESERVED_NAMES:
        raise PkiError(f"invalid name {name!r}: reserved for the process server")
    if role not in ROLES:
        raise PkiError(f"invalid role {role!r}: expected one of {', '.join(sorted(ROLES))}")
    _check_days(days, "days")
    pki_dir, out = Path(pki_dir), Path(out)
    if out.exists() and not force:
        raise PkiError(f"{out}: already exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise PkiError(f"{out}: directory {out.parent} does not exist")
    with _locked(pki_dir):
        ca_cert, ca_key = _load_ca(pki_dir)
        key = _new_key()
        not_before = (
            _not_valid_before
            if _not_valid_before is not None
            else dt.datetime.now(dt.UTC) - _CLOCK_SKEW
        )
        cert = _leaf_cert(
            ca_cert=ca_cert,
            ca_key=ca_key,
            key=key,
            common_name=name,
            role=role,
            sans=[x509.DNSName(name)],
            usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
            not_before=not_before,
            days=days,
        )
        issued = _load_issued(pki_dir)
        issued.setdefault(name, []).append(cert.serial_number)
        _write_issued(pki_dir, issued)
        bundle = _cert_pem(ca_cert) + _cert_pem(cert) + _key_pem(key)
        try:
            _atomic_write(out, bundle, 0o600, overwrite=force)
        except FileExistsError:
            raise PkiError(f"{out}: already exists (use --force to overwrite)") from None


def load_bundle(path: Path) -> Credentials:
    """Read and check a credential bundle written by :func:`issue_credentials`: the file's
    checks (:func:`common.credentials.read_bundle`), then :func:`check_bundle`'s."""
    return check_bundle(Path(path), read_bundle(path))


def check_bundle(path: Path, blocks: PemBlocks) -> Credentials:
    """Check a bundle's PEM blocks (read from ``path``, named in errors): the first is a CA
    certificate, the second a certificate signed by that CA, the third the matching private
    key; the certificate's CN is a valid name and its OU a known role. Raises PkiError naming
    the file and the failed check."""
    try:
        with warnings.catch_warnings():
            # what cryptography only warns about (a serial that is not positive) is refused
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            ca = x509.load_pem_x509_certificate(blocks.ca)
            cert = x509.load_pem_x509_certificate(blocks.cert)
            for parsed in (ca, cert):  # parsed lazily: a damaged part would raise later
                _ = parsed.extensions, parsed.subject, parsed.public_key()
    except (ValueError, UnsupportedAlgorithm, CryptographyDeprecationWarning) as exc:
        raise PkiError(f"{path}: malformed certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(blocks.key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{path}: malformed or encrypted private key: {exc}") from exc

    if not _is_ca(ca):
        raise PkiError(f"{path}: the first certificate is not a CA certificate")
    try:
        ca.verify_directly_issued_by(ca)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(f"{path}: the certificate is not signed by the bundle's CA") from None
    if not _same_public_key(key, cert):
        raise PkiError(f"{path}: the private key does not match the certificate")

    name = _single_attr(cert.subject, NameOID.COMMON_NAME, path, "CN")
    role = _single_attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME, path, "OU")
    if _NAME_RE.fullmatch(name) is None:
        raise PkiError(f"{path}: certificate CN {name!r} is not a valid name")
    if role not in ROLES:
        raise PkiError(f"{path}: certificate role (OU) {role!r} is not one of {sorted(ROLES)}")
    return Credentials(
        name=name, role=role, ca_pem=blocks.ca, cert_pem=blocks.cert, key_pem=blocks.key
    )


def revoke(pki_dir: Path, name: str) -> None:
    """Revoke every certificate issued for ``name``: add their serials to ``revoked.txt``.

    Idempotent (a serial is listed once). Raises PkiError for an invalid name or a name that
    was never issued, or if ``issued.json``/``revoked.txt`` are corrupt; OSError on write failure.
    """
    _check_name(name)
    pki_dir = Path(pki_dir)
    with _locked(pki_dir):
        issued = _load_issued(pki_dir)
        if name not in issued:
            raise PkiError(f"{pki_dir / ISSUED}: no credentials were issued for {name!r}")
        path = pki_dir / REVOKED
        existing = load_revoked_serials(pki_dir)
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            text = ""
        if text and not text.endswith("\n"):
            text += "\n"
        new = [s for s in issued[name] if s not in existing]
        text += "".join(f"{s:x}\n" for s in new)
        _atomic_write(path, text.encode("ascii"), 0o600)


def pki_summary(pki_dir: Path) -> dict[str, Any]:
    """A JSON-ready description of ``pki_dir``: CA and server subjects and validity, and the
    issued names with their serials and revocation state. Raises PkiError if there is no CA or
    a file is corrupt."""
    pki_dir = Path(pki_dir)

    def describe(path: Path, what: str) -> dict[str, Any]:
        try:
            cert = x509.load_pem_x509_certificate(_read(path, what))
        except ValueError as exc:
            raise PkiError(f"{path}: not a PEM certificate: {exc}") from exc
        return {
            "path": str(path),
            "subject": cert.subject.rfc4514_string(),
            "serial": f"{cert.serial_number:x}",
            "not_valid_before": cert.not_valid_before_utc.isoformat(),
            "not_valid_after": cert.not_valid_after_utc.isoformat(),
            "sha256": cert.fingerprint(hashes.SHA256()).hex(),
        }

    revoked = load_revoked_serials(pki_dir)
    return {
        "pki_dir": str(pki_dir),
        "ca": describe(pki_dir / CA_CERT, "CA certificate"),
        "server": describe(pki_dir / SERVER_CERT, "server certificate"),
        "issued": [
            {
                "name": name,
                "serials": [f"{s:x}" for s in serials],
                "revoked": [f"{s:x}" for s in serials if s in revoked],
                "active": any(s not in revoked for s in serials),
            }
            for name, serials in sorted(_load_issued(pki_dir).items())
        ],
    }


# --------------------------------------------------------------------------- helpers


def _same_public_key(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


def _single_attr(name: x509.Name, oid: x509.ObjectIdentifier, path: Path, label: str) -> str:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise PkiError(f"{path}: the certificate must have exactly one {label} attribute")
    return values[0].value
