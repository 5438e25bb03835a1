# Identity attacks against a RUNNING process server: no client certificate, certificates from
# another CA or self-signed, a HELLO that lies about the certificate's role, and a validly
# authenticated agent reaching for another agent's disk (REGISTER, BATCH, heartbeat reports).
# Rule kept: a refusal is judged on the wire (no HELLO_OK, the connection closes), on the
# process (still running), on the victim (its replica file is byte-for-byte what it was, its
# session is not fenced, and it keeps replicating to a replica equal to its source image).
"""Authentication and disk ownership on a live process server."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import random
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from benchmarks.deploy import Deployment, Driver
from common.admin import admin_request
from common.tls import client_context
from process_server.pki import init_pki, issue_credentials, load_bundle
from protocol.batch import Extent, encode_batch
from protocol.errors import ErrorCode
from protocol.frames import (
    BatchMsg,
    DiskReport,
    Heartbeat,
    Hello,
    HelloOk,
    Register,
    encode_message,
)
from tests.test_ps_adversarial import RawClient, closed_with, tls_connect, wait_session_closed

ALICE = "alice"
ALICE_DISK = "alice-d"
BOB = "bob"
BOB_DISK = "bob-d"
MT = "mt01"
DISK_SIZE = 4 << 20
BLOCK = 64 << 10
TIMEOUT = 15.0


@dataclass
class Env:
    dep: Deployment
    driver: Driver
    foreign_alice: Path  # a bundle named alice from another deployment's CA
    seed: int = 0

    @property
    def port(self) -> int:
        return self.dep.port

    @property
    def log_path(self) -> Path:
        return self.dep.root / "ps.log"

    def bundle(self, name: str) -> Path:
        return self.dep.root / f"{name}.bundle"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("ps-auth")
    other = tmp_path_factory.mktemp("other-pki")
    init_pki(other / "pki")
    foreign = other / "alice.bundle"
    issue_credentials(other / "pki", ALICE, foreign)
    with Deployment(root) as dep:
        dep.init_pki()
        dep.add_agent(ALICE, {ALICE_DISK: DISK_SIZE})
        dep.add_agent(BOB, {BOB_DISK: DISK_SIZE})  # credentials only: bob is a raw client
        dep.add_agent(MT, {}, role="master-target")
        dep.start_ps()
        driver = Driver(dep, ALICE)
        try:
            yield Env(dep, driver, foreign)
        finally:
            driver.quit()


# --------------------------------------------------------------------------- helpers


async def ps_status(env: Env) -> dict[str, Any]:
    return await admin_request(env.dep.ps_state / "admin.sock", {"cmd": "status"}, timeout=10)


async def alice_row(env: Env) -> dict[str, Any]:
    for row in (await ps_status(env))["disks"]:
        if row["disk"] == ALICE_DISK:
            return dict(row)
    raise AssertionError("the process server does not know alice's disk")


async def alice_write(env: Env) -> int:
    env.seed += 1
    offset = random.Random(env.seed).randrange(0, DISK_SIZE // BLOCK) * BLOCK
    reply = await asyncio.to_thread(
        env.driver.call, op="write", disk=ALICE_DISK, offset=offset, length=BLOCK, seed=env.seed
    )
    assert reply["ok"], reply
    return int(reply["seq"])


def replica_hash(env: Env) -> str:
    return hashlib.sha256(env.dep.replica_path(ALICE_DISK).read_bytes()).hexdigest()


async def alice_settled(env: Env, writes: int = 3) -> dict[str, Any]:
    """Alice writes, drains and her replica equals her source image; returns her status row."""
    last = 0
    for _ in range(writes):
        last = await alice_write(env)
    assert (await asyncio.to_thread(env.driver.call, op="flush", disk=ALICE_DISK))["ok"]
    drained = await asyncio.to_thread(env.driver.call, op="drain", timeout=TIMEOUT)
    assert drained["drained"], drained
    deadline = time.monotonic() + TIMEOUT
    # The state comes from alice's newest heartbeat report: right after her initial sync it
    # may still say "initial-sync" for up to one heartbeat interval.
    while (row := await alice_row(env))["applied_seq"] < last or row["state"] != "replicating":
        assert time.monotonic() < deadline, row
        await asyncio.sleep(0.02)
    source = env.dep.agents[ALICE].disks[ALICE_DISK].read_bytes()
    replica = env.dep.replica_path(ALICE_DISK).read_bytes()
    assert hashlib.sha256(source).digest() == hashlib.sha256(replica).digest(), (
        "alice's replica differs from her source"
    )
    assert row["state"] == "replicating", row
    assert row["applied_seq"] == row["cached_seq"] == last, row
    return row


def alice_session_count(status: dict[str, Any]) -> int:
    return sum(1 for s in status["sessions"] if s["peer"] == ALICE)


class Victim:
    """Alice, quiet during the attack: her replica and watermarks must not move; after it she
    must still own her session and keep replicating."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.row: dict[str, Any] = {}
        self.hash = ""
        self.alice_session: dict[str, Any] = {}

    async def __aenter__(self) -> Victim:
        self.row = await alice_settled(self.env)
        self.hash = replica_hash(self.env)
        status = await ps_status(self.env)
        assert alice_session_count(status) == 1, status["sessions"]
        self.alice_session = next(s for s in status["sessions"] if s["peer"] == ALICE)
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            return
        proc = self.env.dep.ps_proc
        assert proc is not None and proc.poll() is None, "the process server died"
        await asyncio.sleep(0.1)  # give a wrongly accepted batch time to be applied
        assert replica_hash(self.env) == self.hash, "alice's replica changed"
        row = await alice_row(self.env)
        for key in ("cached_seq", "applied_seq", "applied_bytes", "received_batches"):
            assert row.get(key) == self.row.get(key), (key, self.row, row)
        assert row["agent"] == ALICE and row["state"] == "replicating", row
        status = await ps_status(self.env)
        sessions = [s for s in status["sessions"] if s["peer"] == ALICE]
        assert [s["address"] for s in sessions] == [self.alice_session["address"]], (
            "alice's session was fenced or duplicated"
        )
        await alice_settled(self.env)


def server_trusting_context(env: Env) -> ssl.SSLContext:
    """A client context that verifies the real server but presents no certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = True
    ctx.load_verify_locations(cafile=env.dep.pki / "ca.crt")
    return ctx


def self_signed_chain(directory: Path, name: str, role: str) -> Path:
    """A self-signed certificate with the right-looking subject (CN=name, OU=role)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tidemark"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"self-signed-{name}.pem"
    path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


async def assert_refused_at_tls(env: Env, ctx: ssl.SSLContext) -> None:
    """The handshake or the first read fails; no HELLO_OK; the session handler never runs."""
    log_offset = env.log_path.stat().st_size
    try:
        reader, writer, port = await tls_connect(env.port, ctx)
    except (ssl.SSLError, ConnectionError):
        return  # refused during the handshake
    try:
        writer.write(encode_message(Hello(ALICE, "agent")))
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.drain()
            data = await asyncio.wait_for(reader.read(1 << 16), TIMEOUT)
            assert data == b"", f"the server answered an unauthenticated client: {data!r}"
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)
    await asyncio.sleep(0.1)
    with env.log_path.open("rb") as f:
        f.seek(log_offset)
        log = f.read().decode(errors="replace")
    assert f"address=('127.0.0.1', {port})" not in log, "a session was opened for the client"


# --------------------------------------------------------------------------- TLS identity


async def test_client_without_certificate_is_refused(env: Env) -> None:
    async with Victim(env):
        await assert_refused_at_tls(env, server_trusting_context(env))


async def test_bundle_from_another_ca_is_refused(env: Env) -> None:
    async with Victim(env):
        # As issued: the client trusts only the other CA, so it refuses our server itself.
        with pytest.raises(ssl.SSLCertVerificationError):
            client = await RawClient.connect(env.log_path, env.port, env.foreign_alice)
            await client.close()
        # Trusting our server but presenting the other CA's "alice": the server refuses.
        ctx = client_context(load_bundle(env.foreign_alice))
        ctx.load_verify_locations(cafile=env.dep.pki / "ca.crt")
        await assert_refused_at_tls(env, ctx)


async def test_self_signed_certificate_is_refused(env: Env, tmp_path: Path) -> None:
    async with Victim(env):
        ctx = server_trusting_context(env)
        ctx.load_cert_chain(self_signed_chain(tmp_path, ALICE, "agent"))
        await assert_refused_at_tls(env, ctx)


@pytest.mark.parametrize(
    ("name", "role"), [(MT, "agent"), (ALICE, "agent"), (ALICE, "master-target")]
)
async def test_master_target_certificate_claiming_agent_is_refused(
    env: Env, name: str, role: str
) -> None:
    async with Victim(env):
        client = await RawClient.connect(env.log_path, env.port, env.bundle(MT))
        try:
            await client.send(Hello(name, role))
            await closed_with(client, ErrorCode.AUTH, error_frame=True)
            await wait_session_closed(env.log_path, client, "AUTH", "certificate says mt01")
        finally:
            await client.close()


# --------------------------------------------------------------------------- disk ownership


@pytest.mark.parametrize("size", [DISK_SIZE, DISK_SIZE * 2])
async def test_agent_cannot_register_another_agents_disk(env: Env, size: int) -> None:
    async with Victim(env):
        client = await RawClient.connect(env.log_path, env.port, env.bundle(BOB))
        try:
            await client.hello(BOB)
            await client.send(Register(ALICE_DISK, size, 10**6))
            await closed_with(client, ErrorCode.AUTH, error_frame=True)
            await wait_session_closed(env.log_path, client, "AUTH", "belongs to another agent")
        finally:
            await client.close()


def forged_batch(seq: int) -> BatchMsg:
    data = random.Random(seq).randbytes(BLOCK)
    return BatchMsg.from_data(
        encode_batch(ALICE_DISK, seq, seq, [Extent(0, BLOCK, data)], newest_write_ns=1)
    )


@pytest.mark.parametrize("own_disk_first", [False, True], ids=["bare", "after-own-register"])
async def test_agent_cannot_write_another_agents_disk(env: Env, own_disk_first: bool) -> None:
    async with Victim(env) as victim:
        client = await RawClient.connect(env.log_path, env.port, env.bundle(BOB))
        try:
            await client.hello(BOB)
            if own_disk_first:
                await client.register(BOB_DISK)
            # The very seq alice's next batch would carry: the one most likely to be taken.
            await client.send(forged_batch(victim.row["cached_seq"] + 1))
            await closed_with(client, ErrorCode.UNEXPECTED)
            await wait_session_closed(env.log_path, client, "UNEXPECTED", ALICE_DISK)
        finally:
            await client.close()


async def test_agent_cannot_write_another_agents_disk_after_refused_register(env: Env) -> None:
    """A REGISTER refused, then a pipelined BATCH: neither reaches alice's disk."""
    async with Victim(env) as victim:
        client = await RawClient.connect(env.log_path, env.port, env.bundle(BOB))
        try:
            await client.hello(BOB)
            await client.send_raw(
                encode_message(Register(ALICE_DISK, DISK_SIZE, 0))
                + encode_message(forged_batch(victim.row["cached_seq"] + 1))
            )
            await closed_with(client, ErrorCode.AUTH, error_frame=True)
            await wait_session_closed(env.log_path, client, "AUTH")
        finally:
            await client.close()


async def test_heartbeat_reports_for_another_agents_disk_are_ignored(env: Env) -> None:
    async with Victim(env):
        row = await alice_row(env)
        client = await RawClient.connect(env.log_path, env.port, env.bundle(BOB))
        try:
            await client.hello(BOB)
            lie = DiskReport(ALICE_DISK, "resync-required", 10**9, 0, 1 << 40, 1)
            await client.send(Heartbeat(7, (lie,)))
            beat: Heartbeat = await client.expect(Heartbeat)
            assert beat.counter == 7
        finally:
            await client.close()
        after = await alice_row(env)
        assert after["state"] == "replicating", after
        assert after["journaled_seq"] == row["journaled_seq"], after
        assert after["lag_bytes"] == 0 and after["rpo_seconds"] == 0, after


async def test_log_names_the_refused_identity(env: Env) -> None:
    """The AUTH refusal in ps.log says who was refused (the certificate's name)."""
    client = await RawClient.connect(env.log_path, env.port, env.bundle(BOB))
    try:
        await client.hello(BOB)
        await client.send(Register(ALICE_DISK, DISK_SIZE, 0))
        await closed_with(client, ErrorCode.AUTH, error_frame=True)
        await wait_session_closed(env.log_path, client, "AUTH")
    finally:
        await client.close()
    line = re.search(
        rf"event=session_closed peer=(\S+) address=\('127\.0\.0\.1', {client.local_port}\)",
        env.log_path.read_bytes()[client.log_offset :].decode(errors="replace"),
    )
    assert line and line.group(1) == BOB


# --------------------------------------------------------------------------- revocation


async def test_revoked_certificate_is_refused(env: Env) -> None:
    """`tidemark-ps pki revoke` takes effect for the next connection, without a restart."""
    carol = "carol"
    bundle = env.dep.root / f"{carol}.bundle"
    issue_credentials(env.dep.pki, carol, bundle)
    async with Victim(env):
        client = await RawClient.connect(env.log_path, env.port, bundle)
        try:
            await client.send(Hello(carol, "agent"))
            ok = await client.recv()
            assert isinstance(ok, HelloOk), ok  # not revoked yet: accepted
        finally:
            await client.close()
        await asyncio.to_thread(
            env.dep.cli,
            "process_server.cli",
            "pki",
            "revoke",
            "--dir",
            str(env.dep.pki),
            "--name",
            carol,
        )
        client = await RawClient.connect(env.log_path, env.port, bundle)
        try:
            await client.send(Hello(carol, "agent"))
            await closed_with(client, ErrorCode.AUTH, error_frame=True)
            await wait_session_closed(env.log_path, client, "AUTH", "revoked")
        finally:
            await client.close()
