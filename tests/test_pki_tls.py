# Tests of the deployment PKI (process_server.pki, its CLI) and the TLS contexts (common.tls):
# real files with real modes, real TLS 1.3 handshakes over 127.0.0.1. Rule kept: every refusal
# is asserted both on the side that refuses and on the server's handler never running.
"""PKI files, credential bundles, the pki CLI, and mutual TLS 1.3 over loopback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import tls
from common.tls import (
    CLIENT_SERVER_HOSTNAME,
    TlsError,
    client_context,
    peer_identity,
    server_context,
)
from process_server import pki
from process_server.pki import (
    SERVER_IDENTITY,
    Credentials,
    PkiError,
    init_pki,
    issue_credentials,
    load_bundle,
    load_revoked_serials,
    revoke,
)
from process_server.pki_cli import add_pki_parser, run_pki

REPO = Path(__file__).resolve().parent.parent


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    init_pki(d)
    return d


@pytest.fixture
def other_pki_dir(tmp_path: Path) -> Path:
    d = tmp_path / "other-pki"
    init_pki(d)
    return d


def _issue(pki_dir: Path, name: str, **kw: object) -> Credentials:
    out = pki_dir.parent / f"{name}-{pki_dir.name}.bundle"
    issue_credentials(pki_dir, name, out, **kw)  # type: ignore[arg-type]
    return load_bundle(out)


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


# --------------------------------------------------------------------------- init / issue


def test_init_writes_files_with_private_modes(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    init_pki(d)
    assert _mode(d) == 0o700
    assert _mode(d / "ca.key") == 0o600
    assert _mode(d / "server.key") == 0o600
    assert {p.name for p in d.iterdir()} == {
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "issued.json",
        ".lock",
    }
    assert json.loads((d / "issued.json").read_text()) == {}


def test_init_certificates_have_the_documented_shape(pki_dir: Path) -> None:
    ca = _cert((pki_dir / "ca.crt").read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature

    server = _cert((pki_dir / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    cn = server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == [SERVER_IDENTITY]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [SERVER_IDENTITY, "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_init_refuses_an_existing_ca_unless_forced(pki_dir: Path) -> None:
    before = (pki_dir / "ca.crt").read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        init_pki(pki_dir)
    assert (pki_dir / "ca.crt").read_bytes() == before
    _issue(pki_dir, "web01")
    init_pki(pki_dir, force=True)
    assert (pki_dir / "ca.crt").read_bytes() != before
    assert json.loads((pki_dir / "issued.json").read_text()) == {}


def test_init_rejects_bad_validity(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="ca_days"):
        init_pki(tmp_path / "p", ca_days=0)
    with pytest.raises(PkiError, match="cert_days"):
        init_pki(tmp_path / "p", cert_days=-1)


def test_issue_and_load_bundle_roundtrip(pki_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "web01.bundle"
    issue_credentials(pki_dir, "web01", out)
    assert _mode(out) == 0o600
    text = out.read_bytes()
    labels = [line for line in text.splitlines() if line.startswith(b"-----BEGIN")]
    assert labels == [
        b"-----BEGIN CERTIFICATE-----",
        b"-----BEGIN CERTIFICATE-----",
        b"-----BEGIN PRIVATE KEY-----",
    ]
    creds = load_bundle(out)
    assert (creds.name, creds.role) == ("web01", "agent")
    assert creds.ca_pem == (pki_dir / "ca.crt").read_bytes()
    assert "PRIVATE" not in repr(creds)

    cert = _cert(creds.cert_pem)
    subject = {a.oid: a.value for a in cert.subject}
    assert subject[NameOID.COMMON_NAME] == "web01"
    assert subject[NameOID.ORGANIZATIONAL_UNIT_NAME] == "agent"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web01"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    issued = json.loads((pki_dir / "issued.json").read_text())
    assert issued == {"web01": [f"{cert.serial_number:x}"]}


def test_issue_master_target_role(pki_dir: Path) -> None:
    creds = _issue(pki_dir, "mt1", role="master-target")
    assert (creds.name, creds.role) == ("mt1", "master-target")


@pytest.mark.parametrize(
    "name",
    ["", "-web", ".web", "_web", "a" * 65, "a/b", "../x", "a b", "wéb", "a\n", SERVER_IDENTITY],
)
def test_issue_rejects_bad_names(pki_dir: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / "x.bundle"
    with pytest.raises(PkiError, match="invalid name"):
        issue_credentials(pki_dir, name, out)
    assert not out.exists()


@pytest.mark.parametrize("name", ["a", "A" * 64, "web01.example_1-x", "9"])
def test_issue_accepts_good_names(pki_dir: Path, name: str) -> None:
    assert _issue(pki_dir, name).name == name


def test_issue_rejects_bad_role_days_and_missing_ca(tmp_path: Path, pki_dir: Path) -> None:
    with pytest.raises(PkiError, match="role"):
        issue_credentials(pki_dir, "web01", tmp_path / "a", role="admin")
    with pytest.raises(PkiError, match="days"):
        issue_credentials(pki_dir, "web01", tmp_path / "a", days=0)
    with pytest.raises(PkiError, match="pki init"):
        issue_credentials(tmp_path / "nowhere", "web01", tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_issue_refuses_to_overwrite_unless_forced(pki_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "web01.bundle"
    issue_credentials(pki_dir, "web01", out)
    first = out.read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        issue_credentials(pki_dir, "web01", out)
    assert out.read_bytes() == first
    issue_credentials(pki_dir, "web01", out, force=True)
    assert out.read_bytes() != first
    assert _mode(out) == 0o600
    assert load_bundle(out).name == "web01"


def test_failed_write_leaves_neither_bundle_nor_temp_file(
    pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(outdir)):
            raise OSError(5, "injected I/O error")
        real_fsync(fd)

    monkeypatch.setattr(pki.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="injected"):
        issue_credentials(pki_dir, "web01", outdir / "web01.bundle")
    assert list(outdir.iterdir()) == []


# --------------------------------------------------------------------------- load_bundle


def test_load_bundle_refuses_group_readable_file(pki_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "web01.bundle"
    issue_credentials(pki_dir, "web01", out)
    os.chmod(out, 0o644)
    with pytest.raises(PkiError, match=r"web01\.bundle.*chmod 600"):
        load_bundle(out)


def _write_bundle(path: Path, *parts: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"".join(parts))
    return path


def test_load_bundle_refuses_a_key_of_another_certificate(pki_dir: Path, tmp_path: Path) -> None:
    a, b = _issue(pki_dir, "web01"), _issue(pki_dir, "web02")
    bad = _write_bundle(tmp_path / "tampered.bundle", a.ca_pem, a.cert_pem, b.key_pem)
    with pytest.raises(PkiError, match=r"tampered\.bundle.*does not match"):
        load_bundle(bad)


def test_load_bundle_refuses_a_certificate_of_another_ca(
    pki_dir: Path, other_pki_dir: Path, tmp_path: Path
) -> None:
    mine, theirs = _issue(pki_dir, "web01"), _issue(other_pki_dir, "web01")
    bad = _write_bundle(tmp_path / "mixed.bundle", mine.ca_pem, theirs.cert_pem, theirs.key_pem)
    with pytest.raises(PkiError, match="not signed by the bundle's CA"):
        load_bundle(bad)


def test_load_bundle_refuses_malformed_layouts(pki_dir: Path, tmp_path: Path) -> None:
    c = _issue(pki_dir, "web01")
    cases = {
        "empty": [b""],
        "garbage": [b"hello\n"],
        "no-key": [c.ca_pem, c.cert_pem],
        "no-ca": [c.cert_pem, c.key_pem],
        "swapped": [c.cert_pem, c.ca_pem, c.key_pem],
        "key-first": [c.key_pem, c.ca_pem, c.cert_pem],
        "two-keys": [c.ca_pem, c.cert_pem, c.key_pem, c.key_pem],
        "broken-base64": [c.ca_pem, c.cert_pem.replace(b"M", b"!", 3), c.key_pem],
    }
    for label, parts in cases.items():
        path = _write_bundle(tmp_path / f"{label}.bundle", *parts)
        with pytest.raises(PkiError, match=rf"{label}\.bundle"):
            load_bundle(path)
    with pytest.raises(PkiError, match="cannot open"):
        load_bundle(tmp_path / "missing.bundle")


# --------------------------------------------------------------------------- revoke


def test_revoke_records_every_serial_of_a_name_once(pki_dir: Path) -> None:
    assert load_revoked_serials(pki_dir) == set()
    first = _cert(_issue(pki_dir, "web01").cert_pem).serial_number
    issue_credentials(pki_dir, "web01", pki_dir.parent / "again.bundle")
    second = _cert(load_bundle(pki_dir.parent / "again.bundle").cert_pem).serial_number
    other = _cert(_issue(pki_dir, "web02").cert_pem).serial_number
    revoke(pki_dir, "web01")
    revoke(pki_dir, "web01")
    assert load_revoked_serials(pki_dir) == {first, second}
    assert other not in load_revoked_serials(pki_dir)
    lines = (pki_dir / "revoked.txt").read_text().splitlines()
    assert sorted(lines) == sorted([f"{first:x}", f"{second:x}"])
    with pytest.raises(PkiError, match="no credentials were issued"):
        revoke(pki_dir, "nobody")


def test_load_revoked_serials_rejects_garbage(pki_dir: Path) -> None:
    (pki_dir / "revoked.txt").write_text("# comment\n\n1f\nnot-hex\n")
    with pytest.raises(PkiError, match=r"revoked\.txt:4"):
        load_revoked_serials(pki_dir)


# --------------------------------------------------------------------------- TLS


@contextlib.asynccontextmanager
async def _tls_server(ctx: ssl.SSLContext) -> AsyncIterator[tuple[int, list[tuple[str, str]]]]:
    """An echo-your-identity server; ``seen`` lists the identities of accepted peers."""
    seen: list[tuple[str, str]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            name, role = peer_identity(writer.get_extra_info("ssl_object"))
            seen.append((name, role))
            await reader.readline()
            writer.write(f"hello {name} {role}\n".encode())
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, seen


async def _exchange(
    port: int, ctx: ssl.SSLContext, hostname: str = CLIENT_SERVER_HOSTNAME
) -> tuple[bytes, tuple[str, str]]:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=hostname
        )
        try:
            server_id = peer_identity(writer.get_extra_info("ssl_object"))
            writer.write(b"ping\n")
            await writer.drain()
            return await reader.readline(), server_id
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _assert_refused(
    port: int,
    ctx: ssl.SSLContext,
    seen: list[tuple[str, str]],
    hostname: str = CLIENT_SERVER_HOSTNAME,
) -> None:
    try:
        reply, _ = await _exchange(port, ctx, hostname)
    except (ssl.SSLError, ConnectionError):
        pass
    else:
        # TLS 1.3: the server checks the client certificate after the client's handshake
        # completed, so the client may only learn of the refusal as a closed connection.
        assert reply == b""
    await asyncio.sleep(0)
    assert seen == []


def test_contexts_are_tls13_only(pki_dir: Path) -> None:
    creds = _issue(pki_dir, "web01")
    for ctx in (server_context(pki_dir), client_context(creds)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert client_context(creds).check_hostname
    # Only our CA is trusted, never the system store.
    assert [c["subject"] for c in server_context(pki_dir).get_ca_certs()] == [
        c["subject"] for c in client_context(creds).get_ca_certs()
    ]
    assert len(client_context(creds).get_ca_certs()) == 1


async def test_mutual_tls13_handshake_and_identities(pki_dir: Path) -> None:
    agent = _issue(pki_dir, "web01")
    mt = _issue(pki_dir, "mt1", role="master-target")
    async with _tls_server(server_context(pki_dir)) as (port, seen):
        reply, server_id = await _exchange(port, client_context(agent))
        assert reply == b"hello web01 agent\n"
        assert server_id == (SERVER_IDENTITY, "process-server")
        reply, _ = await _exchange(port, client_context(mt))
        assert reply == b"hello mt1 master-target\n"
    assert seen == [("web01", "agent"), ("mt1", "master-target")]


async def test_negotiated_protocol_is_tls13(pki_dir: Path) -> None:
    creds = _issue(pki_dir, "web01")
    async with _tls_server(server_context(pki_dir)) as (port, _seen):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(creds), server_hostname=CLIENT_SERVER_HOSTNAME
        )
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        writer.write(b"ping\n")
        assert await reader.readline() == b"hello web01 agent\n"
        writer.close()
        await writer.wait_closed()


async def test_client_without_certificate_is_refused(pki_dir: Path) -> None:
    creds = _issue(pki_dir, "web01")
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.minimum_version = ssl.TLSVersion.TLSv1_3
    anonymous.load_verify_locations(cadata=creds.ca_pem.decode())
    async with _tls_server(server_context(pki_dir)) as (port, seen):
        await _assert_refused(port, anonymous, seen)


async def test_client_from_another_pki_is_refused(pki_dir: Path, other_pki_dir: Path) -> None:
    stranger = _issue(other_pki_dir, "web01")
    # Trusting our CA too, so only the server's check of the client certificate can refuse.
    ctx = client_context(stranger)
    ctx.load_verify_locations(cafile=pki_dir / "ca.crt")
    async with _tls_server(server_context(pki_dir)) as (port, seen):
        await _assert_refused(port, ctx, seen)


async def test_server_from_another_pki_is_refused_by_the_client(
    pki_dir: Path, other_pki_dir: Path
) -> None:
    creds = _issue(pki_dir, "web01")
    async with _tls_server(server_context(other_pki_dir)) as (port, seen):
        with pytest.raises(ssl.SSLCertVerificationError):
            await _exchange(port, client_context(creds))
        assert seen == []


async def test_client_checks_the_server_identity_not_the_address(pki_dir: Path) -> None:
    creds = _issue(pki_dir, "web01")
    async with _tls_server(server_context(pki_dir)) as (port, seen):
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            await _exchange(port, client_context(creds), hostname="not-the-process-server")
        assert seen == []


async def test_agent_certificate_cannot_impersonate_the_server(pki_dir: Path) -> None:
    web01 = _issue(pki_dir, "web01")
    web02 = _issue(pki_dir, "web02")
    impostor = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stolen = _write_bundle(pki_dir.parent / "stolen.pem", web01.cert_pem, web01.key_pem)
    impostor.load_cert_chain(stolen)
    impostor.load_verify_locations(cafile=pki_dir / "ca.crt")
    impostor.verify_mode = ssl.CERT_REQUIRED
    async with _tls_server(impostor) as (port, seen):
        # Even asking for the impostor's own name: a clientAuth-only certificate is no server.
        with pytest.raises(ssl.SSLCertVerificationError):
            await _exchange(port, client_context(web02), hostname="web01")
        with pytest.raises(ssl.SSLCertVerificationError):
            await _exchange(port, client_context(web02))
        assert seen == []


async def test_client_limited_to_tls12_is_refused(pki_dir: Path) -> None:
    ctx = client_context(_issue(pki_dir, "web01"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with _tls_server(server_context(pki_dir)) as (port, seen):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _exchange(port, ctx)
        assert seen == []


async def test_expired_client_certificate_is_refused(pki_dir: Path) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    expired = _issue(pki_dir, "web01", days=2, _not_valid_before=start)
    assert _cert(expired.cert_pem).not_valid_after_utc < dt.datetime.now(dt.UTC)
    async with _tls_server(server_context(pki_dir)) as (port, seen):
        await _assert_refused(port, client_context(expired), seen)


def test_client_context_key_never_outlives_the_call(
    pki_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = _issue(pki_dir, "web01")
    made: list[tuple[str, int]] = []
    real_mkdtemp = tls.tempfile.mkdtemp

    def recording_mkdtemp(*args: object, **kwargs: object) -> str:
        path = real_mkdtemp(*args, **kwargs)  # type: ignore[call-overload]
        made.append((path, _mode(Path(path))))
        return str(path)

    monkeypatch.setattr(tls.tempfile, "mkdtemp", recording_mkdtemp)
    client_context(creds)
    [(path, mode)] = made
    assert mode == 0o700
    assert not Path(path).exists()
    assert not str(path).startswith(str(pki_dir))


def test_tls_errors(pki_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="server certificate"):
        server_context(tmp_path)
    creds = _issue(pki_dir, "web01")
    other = _issue(pki_dir, "web02")
    with pytest.raises(TlsError, match="certificate and key"):
        client_context(Credentials("web01", "agent", creds.ca_pem, creds.cert_pem, other.key_pem))
    with pytest.raises(TlsError, match="not a TLS connection"):
        peer_identity(None)
    assert issubclass(TlsError, ValueError)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidemark-ps")
    sub = parser.add_subparsers(dest="command", required=True)
    add_pki_parser(sub)
    return parser


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = _parser().parse_args(["pki", *argv])
    assert args.command == "pki"
    code = run_pki(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_flow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, bundle = tmp_path / "pki", tmp_path / "web01.bundle"
    code, out, _ = _run(capsys, "init", "--dir", str(d))
    assert code == 0 and str(d / "ca.key") in out
    code, _, err = _run(capsys, "init", "--dir", str(d))
    assert code == 1 and err.startswith("error: ") and "already exists" in err
    assert _run(capsys, "init", "--dir", str(d), "--force")[0] == 0

    argv = ["issue", "--dir", str(d), "--name", "web01", "--out", str(bundle)]
    code, out, _ = _run(capsys, *argv, "--role", "master-target", "--days", "30")
    assert code == 0 and str(bundle) in out
    assert load_bundle(bundle).role == "master-target"
    code, _, err = _run(capsys, *argv)
    assert code == 1 and "already exists" in err
    assert _run(capsys, *argv, "--force")[0] == 0
    code, _, err = _run(capsys, "issue", "--dir", str(d), "--name=-x", "--out", "y")
    assert code == 1 and "invalid name" in err
    code, _, err = _run(capsys, *argv[:-1], str(tmp_path / "no" / "dir" / "b"))
    assert code == 1 and err.startswith("error: ")

    code, out, _ = _run(capsys, "show", "--dir", str(d))
    assert code == 0 and "web01" in out and "active" in out
    assert _run(capsys, "revoke", "--dir", str(d), "--name", "web01")[0] == 0
    code, out, _ = _run(capsys, "show", "--dir", str(d), "--json")
    summary = json.loads(out)
    assert code == 0
    assert summary["ca"]["subject"].startswith("CN=tidemark CA")
    [entry] = summary["issued"]
    assert entry["name"] == "web01" and not entry["active"] and len(entry["revoked"]) == 2

    assert _run(capsys, "revoke", "--dir", str(d), "--name", "nobody")[0] == 1
    assert _run(capsys, "show", "--dir", str(tmp_path / "empty"))[0] == 1


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["pki"], ["pki", "issue", "--dir", "d"], ["pki", "issue", "--role", "root"]):
        with pytest.raises(SystemExit) as info:
            _parser().parse_args(argv)
        assert info.value.code == 2
    capsys.readouterr()


def test_cli_in_a_fresh_interpreter(tmp_path: Path) -> None:
    script = (
        "import argparse, sys\n"
        "from process_server.pki_cli import add_pki_parser, run_pki\n"
        "p = argparse.ArgumentParser(prog='tidemark-ps')\n"
        "add_pki_parser(p.add_subparsers(dest='command'))\n"
        "sys.exit(run_pki(p.parse_args(sys.argv[1:])))\n"
    )
    d = tmp_path / "pki"
    for argv, code in (
        (["pki", "init", "--dir", str(d)], 0),
        (["pki", "issue", "--dir", str(d), "--name", "web01", "--out", str(tmp_path / "b")], 0),
        (["pki", "issue", "--dir", str(d), "--name", "web01", "--out", str(tmp_path / "b")], 1),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", script, *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == code, proc.stderr
    assert load_bundle(tmp_path / "b").name == "web01"
