# TLS identity checks the other suites leave out, each against a RUNNING process server (a real
# `tidemark-ps serve` process) or a real agent: client certificates that are not yet valid or
# already expired, clients limited to TLS 1.2, an agent facing a process server whose own
# certificate expired, an agent facing a server that offers only TLS 1.2 with the genuine
# certificate and key, and revocation of an agent whose session is already open.
# (Other CAs, self-signed and missing certificates, revocation at connect time, role and name
# lies, and other agents' disks are in test_ps_auth.py and test_pki_tls.py.)
# Rule kept: a refusal is judged on the wire (handshake error or closed connection, never a
# HELLO_OK) and in ps.log (no session is ever opened for the refused connection).
"""TLS identity: validity periods, protocol versions and revocation, end to end."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.deploy import Deployment, Driver
from common.tls import CLIENT_SERVER_HOSTNAME, client_context, server_context
from process_server.pki import init_pki, issue_credentials, load_bundle
from protocol.errors import ErrorCode
from protocol.frames import ErrorMsg, Heartbeat, Hello, HelloOk, encode_message
from tests.test_ps_adversarial import RawClient, tls_connect

TIMEOUT = 15.0
NOW = dt.datetime.now(dt.UTC)


@dataclass
class Env:
    dep: Deployment

    @property
    def port(self) -> int:
        return self.dep.port

    @property
    def log_path(self) -> Path:
        return self.dep.root / "ps.log"

    def bundle(self, name: str, **kw: object) -> Path:
        out = self.dep.root / f"{name}.bundle"
        if not out.exists():
            issue_credentials(self.dep.pki, name, out, **kw)  # type: ignore[arg-type]
        return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with Deployment(tmp_path_factory.mktemp("sec-tls")) as dep:
        dep.init_pki()
        dep.start_ps()
        yield Env(dep)


def session_lines(env: Env, since: int, port: int) -> list[str]:
    with env.log_path.open("rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return re.findall(rf"event=session_\w+ .*address=\('127\.0\.0\.1', {port}\).*", text)


async def assert_refused(env: Env, ctx: ssl.SSLContext) -> str:
    """The handshake fails, or the server closes without a word; no session is opened.
    Returns how it was refused."""
    since = env.log_path.stat().st_size
    try:
        reader, writer, port = await tls_connect(env.port, ctx)
    except (ssl.SSLError, ConnectionError) as exc:
        how = f"handshake: {exc}"
    else:
        # TLS 1.3: the server checks the client certificate after the client finished its
        # side of the handshake, so the refusal may arrive as a closed connection.
        try:
            writer.write(encode_message(Hello("intruder", "agent")))
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.drain()
                data = await asyncio.wait_for(reader.read(1 << 16), TIMEOUT)
                assert data == b"", f"the server answered: {data!r}"
            how = "closed"
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError, OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)
        await asyncio.sleep(0.2)
        assert session_lines(env, since, port) == [], "a session was opened"
    assert env.dep.ps_proc is not None and env.dep.ps_proc.poll() is None
    return how


async def assert_accepted(env: Env, bundle: Path, name: str) -> None:
    client = await RawClient.connect(env.log_path, env.port, bundle)
    try:
        await client.send(Hello(name, "agent"))
        assert isinstance(await client.recv(), HelloOk)
    finally:
        await client.close()


# --------------------------------------------------------------------------- client certificates


@pytest.mark.parametrize(
    ("name", "not_before", "days"),
    [
        ("future", NOW + dt.timedelta(days=1), 30),  # not yet valid
        ("expired", NOW - dt.timedelta(days=10), 3),  # valid for 3 days, a week ago
        ("just-expired", NOW - dt.timedelta(days=1, minutes=1), 1),
    ],
)
async def test_client_certificate_outside_its_validity_is_refused(
    env: Env, name: str, not_before: dt.datetime, days: int
) -> None:
    bundle = env.bundle(name, days=days, _not_valid_before=not_before)
    await assert_refused(env, client_context(load_bundle(bundle)))
    # The same name with a certificate valid now is accepted: the validity was the reason.
    fresh = env.dep.root / f"{name}-fresh.bundle"
    issue_credentials(env.dep.pki, name, fresh)
    await assert_accepted(env, fresh, name)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2], ids=["tls1.2"])
async def test_client_below_tls13_is_refused_by_the_running_server(
    env: Env, version: ssl.TLSVersion
) -> None:
    ctx = client_context(load_bundle(env.bundle("old-tls")))
    ctx.minimum_version = version
    ctx.maximum_version = version
    how = await assert_refused(env, ctx)
    assert how.startswith("handshake"), how  # refused before any certificate is looked at
    await assert_accepted(env, env.bundle("old-tls"), "old-tls")


# --------------------------------------------------------------------------- the agent's side


@contextlib.asynccontextmanager
async def impostor(ctx: ssl.SSLContext) -> AsyncIterator[tuple[int, list[str]]]:
    """A TLS server with ``ctx``; ``seen`` records every connection that got past TLS."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(str(writer.get_extra_info("peername")))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    async with server:
        yield server.sockets[0].getsockname()[1], seen


async def test_agent_refuses_a_server_offering_only_tls12(env: Env) -> None:
    """The genuine server certificate and key, but TLS 1.2 at most: the agent says no."""
    ctx = server_context(env.dep.pki)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    agent = client_context(load_bundle(env.bundle("picky")))
    async with impostor(ctx) as (port, seen):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1", port, ssl=agent, server_hostname=CLIENT_SERVER_HOSTNAME
                ),
                TIMEOUT,
            )
        assert seen == []


def test_agent_refuses_a_process_server_whose_certificate_expired(tmp_path: Path) -> None:
    """A real agent against a real process server whose certificate (from the right CA)
    expired: nothing is registered, nothing replicated, the agent says why."""
    with Deployment(tmp_path) as dep:
        init_pki(dep.pki, ca_days=30, cert_days=2, _not_valid_before=NOW - dt.timedelta(days=5))
        dep.write_ps_config()
        dep.add_agent("web01", {"web01-d": 1 << 20})
        dep.start_ps()
        driver = Driver(dep, "web01")
        try:
            deadline = time.monotonic() + TIMEOUT
            while True:
                link = driver.call(op="status")["status"]["link"]
                if link["last_error"]:
                    break
                assert time.monotonic() < deadline, link
                time.sleep(0.05)
            assert "certificate has expired" in link["last_error"], link
            assert link["connects"] == 0 and link["failures"] >= 1, link
            assert driver.call(op="write", disk="web01-d", offset=0, length=4096, seed=1)["ok"]
            while True:  # it goes on trying, and failing, with a write waiting
                later = driver.call(op="status")["status"]["link"]
                if later["failures"] > link["failures"]:
                    break
                assert time.monotonic() < deadline, later
                time.sleep(0.05)
            assert later["connects"] == 0, later
        finally:
            driver.quit()
        assert "session_opened" not in (dep.root / "ps.log").read_text()
        assert not (dep.ps_state / "disks" / "web01-d").exists(), "a replica was created"


# --------------------------------------------------------------------------- revocation


async def test_revoking_an_agent_ends_its_open_session(env: Env) -> None:
    bundle = env.bundle("dave")
    client = await RawClient.connect(env.log_path, env.port, bundle)
    try:
        await client.send(Hello("dave", "agent"))
        assert isinstance(await client.recv(), HelloOk)
        await asyncio.to_thread(
            env.dep.cli,
            "process_server.cli",
            "pki",
            "revoke",
            "--dir",
            str(env.dep.pki),
            "--name",
            "dave",
        )
        # Within a few seconds of heartbeats the server should close the revoked session.
        reply: object = None
        for counter in range(20):
            with contextlib.suppress(ConnectionError):  # closed already: its ERROR is buffered
                await client.send(Heartbeat(counter, ()))
            reply = await client.recv(timeout=2.0)
            if not isinstance(reply, Heartbeat):
                break
            await asyncio.sleep(0.1)
        assert isinstance(reply, ErrorMsg), "the session of a revoked agent is still open"
        assert reply.code == ErrorCode.AUTH and "revoked" in reply.message, reply
        assert await client.recv(timeout=2.0) is None, "the connection stayed open"
    finally:
        await client.close()
    log = env.log_path.read_text()
    assert "event=session_revoked peer=dave" in log
    assert "reason='certificate revoked'" in log
