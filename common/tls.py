# TLS contexts for the replication link: TLS 1.3 only, mutual certificates, and the deployment's
# own CA as the only trust anchor (never the system store). Rule kept: a peer is accepted only
# if its certificate chains to that CA; the client checks the process server's fixed identity,
# not the address it dialled; private keys only touch disk in a private, immediately-removed
# temporary directory (stdlib ssl cannot load a key from memory).
"""Server and client ``ssl.SSLContext`` factories and the verified peer's (name, role)."""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from common.credentials import SERVER_IDENTITY
from common.errors import TidemarkError

if TYPE_CHECKING:
    from common.credentials import Credentials

__all__ = [
    "CLIENT_SERVER_HOSTNAME",
    "TlsError",
    "client_context",
    "peer_identity",
    "server_context",
]

CLIENT_SERVER_HOSTNAME = SERVER_IDENTITY
"""Pass as ``server_hostname=`` when connecting to the process server (any address)."""


class TlsError(TidemarkError, ValueError):
    """A TLS context could not be built, or a peer has no usable verified identity."""


def _tls13_only(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # Strict X.509 checks regardless of the Python version's default (3.13 turns them on).
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.verify_mode = ssl.CERT_REQUIRED


def server_context(pki_dir: Path) -> ssl.SSLContext:
    """The process server's context: TLS 1.3 only, ``server.crt``/``server.key`` from
    ``pki_dir``, client certificates required and verified against ``ca.crt`` only.

    Raises TlsError if a file is missing or unreadable, or the key does not match.
    """
    pki_dir = Path(pki_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _tls13_only(ctx)
    # No session tickets: every connection does a full handshake with a client certificate,
    # and there is no ticket key to protect.
    ctx.num_tickets = 0
    cert, key, ca = pki_dir / "server.crt", pki_dir / "server.key", pki_dir / "ca.crt"
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"{cert}, {key}: cannot load the server certificate: {exc}") from exc
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"{ca}: cannot load the CA certificate: {exc}") from exc
    return ctx


def client_context(creds: Credentials) -> ssl.SSLContext:
    """An agent's (or master target's) context: TLS 1.3 only, ``creds.ca_pem`` as the only
    trust anchor, hostname checking on (connect with ``server_hostname=CLIENT_SERVER_HOSTNAME``),
    and the client certificate and key from ``creds``.

    Raises TlsError if the CA, certificate or key cannot be loaded.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _tls13_only(ctx)
    ctx.check_hostname = True
    try:
        ctx.load_verify_locations(cadata=creds.ca_pem.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError) as exc:
        raise TlsError(
            f"credentials {creds.name!r}: cannot load the CA certificate: {exc}"
        ) from exc
    private_dir = tempfile.mkdtemp(prefix="tidemark-tls-")  # mode 0700
    try:
        chain = os.path.join(private_dir, "chain.pem")
        fd = os.open(chain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(creds.cert_pem + creds.key_pem)
        ctx.load_cert_chain(certfile=chain)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(
            f"credentials {creds.name!r}: cannot load the certificate and key: {exc}"
        ) from exc
    finally:
        shutil.rmtree(private_dir, ignore_errors=True)
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> tuple[str, str]:
    """``(CN, OU)`` — name and role — of the peer's verified certificate.

    Use on the server side with ``writer.get_extra_info("ssl_object")``. Raises TlsError (a
    ValueError) if there is no TLS object, no verified peer certificate, or the subject does
    not carry exactly one CN and one OU.
    """
    if ssl_object is None:
        raise TlsError("not a TLS connection")
    cert = ssl_object.getpeercert()
    if not cert:
        raise TlsError("the peer presented no verified certificate")
    found: dict[str, list[str]] = {"commonName": [], "organizationalUnitName": []}
    subject = cert.get("subject", ())
    for rdn in subject if isinstance(subject, tuple) else ():
        for attr in rdn if isinstance(rdn, tuple) else ():
            if isinstance(attr, tuple) and len(attr) == 2 and attr[0] in found:
                found[attr[0]].append(str(attr[1]))
    cns, ous = found["commonName"], found["organizationalUnitName"]
    if len(cns) != 1 or len(ous) != 1 or not cns[0] or not ous[0]:
        raise TlsError(
            f"peer certificate subject must have exactly one CN and one OU, got {cns} and {ous}"
        )
    return cns[0], ous[0]
