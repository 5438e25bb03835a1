# Hostile input against a RUNNING process server: a raw TLS client with a valid credential bundle
# speaks frames by hand (garbage, truncated and oversized frames, wrong version, seq gaps and
# replays, corrupt digests, out-of-range extents, out-of-order messages, a lying HELLO) while a
# real agent (benchmarks.driver) replicates through the same server. Rule kept: every attack is
# judged on the wire (the connection closes, ERROR first where the server can still send one), in
# ps.log (a session_closed line naming the problem for *that* connection), on the process (still
# running), on the bystander (its source image and replica are equal, byte for byte) and on the
# attacked disk (its replica file hashes the same before and after).
"""Adversarial frames against a live process server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import xxhash
import zstandard

from benchmarks.deploy import Deployment, Driver
from common.admin import admin_request
from common.tls import CLIENT_SERVER_HOSTNAME, client_context
from process_server.pki import load_bundle
from protocol.batch import CODEC_RAW, CODEC_ZSTD, Extent, Limits, encode_batch, peek_batch_header
from protocol.control import (
    BulkBegin,
    BulkState,
    BulkSync,
    PointMark,
    PointRecorded,
    decode_control,
    encode_control,
)
from protocol.errors import ErrorCode
from protocol.frames import (
    BULK_RAW,
    BULK_ZSTD,
    EOF,
    HEADER,
    MAGIC,
    MAX_DIGEST_REQUESTS,
    PROTOCOL_VERSION,
    Ack,
    BatchMsg,
    BulkData,
    Control,
    DigestRequest,
    ErrorMsg,
    FrameDecoder,
    Heartbeat,
    Hello,
    HelloOk,
    Message,
    MsgType,
    NeedData,
    Register,
    Registered,
    encode_message,
)

GOOD = "alice"
GOOD_DISK = "alice-d"
MAL = "mallory"
MAL_DISK = "mal-d"
DISK_SIZE = 4 << 20
BLOCK = 64 << 10
TIMEOUT = 15.0


# --------------------------------------------------------------------------- raw client


def frame(
    msg_type: int,
    payload: bytes,
    *,
    version: int = PROTOCOL_VERSION,
    flags: int = 0,
    length: int | None = None,
) -> bytes:
    """A frame built by hand with correct checksums (unless the caller corrupts it later)."""
    body = struct.pack(
        ">4sBBHIQ",
        MAGIC,
        version,
        msg_type,
        flags,
        len(payload) if length is None else length,
        xxhash.xxh3_64_intdigest(payload),
    )
    return body + struct.pack(">I", xxhash.xxh32_intdigest(body)) + payload


async def tls_connect(
    port: int, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """TLS to the process server; also returns our local port, known before the handshake
    (the server may close before we could ask the transport)."""
    sock = socket.socket()
    try:
        sock.setblocking(False)
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), TIMEOUT
        )
        local_port = int(sock.getsockname()[1])
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=CLIENT_SERVER_HOSTNAME),
            TIMEOUT,
        )
    except BaseException:
        sock.close()
        raise
    return reader, writer, local_port


class RawClient:
    """A TLS client that speaks replication frames by hand, without the state machine."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        local_port: int,
        log_offset: int,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        # This connection's lines in ps.log: after log_offset, with address=(..., local_port).
        # (Ephemeral ports are reused, so an older line may carry the same address.)
        self.local_port = local_port
        self.log_offset = log_offset

    @classmethod
    async def connect(cls, log_path: Path, port: int, bundle: Path | ssl.SSLContext) -> RawClient:
        ctx = bundle if isinstance(bundle, ssl.SSLContext) else client_context(load_bundle(bundle))
        log_offset = log_path.stat().st_size
        reader, writer, local_port = await tls_connect(port, ctx)
        return cls(reader, writer, local_port, log_offset)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, msg: Message) -> None:
        await self.send_raw(encode_message(msg))

    async def recv(self, timeout: float = TIMEOUT) -> Message | None:
        """The next message from the server, or None once the connection is closed."""
        while True:
            event = self.decoder.next_message()
            if isinstance(event, EOF):
                return None
            if not isinstance(event, NeedData):
                return event
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            except (ConnectionError, ssl.SSLError):
                data = b""
            self.decoder.receive_data(data)

    async def expect(self, cls: type[Message], timeout: float = TIMEOUT) -> Any:
        msg = await self.recv(timeout)
        assert isinstance(msg, cls), f"expected {cls.__name__}, got {msg!r}"
        return msg

    async def expect_closed(self, timeout: float = TIMEOUT) -> list[Message]:
        """Read until the server closes the connection; returns what it sent meanwhile."""
        got: list[Message] = []
        deadline = time.monotonic() + timeout
        while (msg := await self.recv(max(0.1, deadline - time.monotonic()))) is not None:
            got.append(msg)
            assert time.monotonic() < deadline, f"connection still open, got {got}"
        return got

    async def hello(self, name: str = MAL, role: str = "agent") -> HelloOk:
        await self.send(Hello(name, role))
        ok: HelloOk = await self.expect(HelloOk)
        return ok

    async def register(self, disk_id: str = MAL_DISK, size: int = DISK_SIZE) -> int:
        """REGISTER, wait for REGISTERED; returns the server's cached_seq."""
        await self.send(Register(disk_id, size, 0))
        reg: Registered = await self.expect(Registered)
        assert reg.disk_id == disk_id
        return reg.cached_seq

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError, asyncio.TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


# --------------------------------------------------------------------------- deployment


@dataclass
class Env:
    dep: Deployment
    driver: Driver
    mal_bundle: Path
    seed: int = 1000
    mal_content: dict[int, bytes] = field(default_factory=dict)  # offset -> bytes we shipped

    @property
    def port(self) -> int:
        return self.dep.port

    @property
    def log_path(self) -> Path:
        return self.dep.root / "ps.log"

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("ps-adversarial")
    with Deployment(root) as dep:
        dep.init_pki()
        dep.add_agent(GOOD, {GOOD_DISK: DISK_SIZE})
        dep.add_agent(MAL, {MAL_DISK: DISK_SIZE})  # credentials only: no agent runs for mallory
        dep.start_ps()
        driver = Driver(dep, GOOD)
        try:
            yield Env(dep, driver, root / f"{MAL}.bundle")
        finally:
            driver.quit()


async def ps_status(env: Env) -> dict[str, Any]:
    return await admin_request(env.dep.ps_state / "admin.sock", {"cmd": "status"}, timeout=10)


async def disk_row(env: Env, disk_id: str) -> dict[str, Any]:
    for row in (await ps_status(env))["disks"]:
        if row["disk"] == disk_id:
            return dict(row)
    raise AssertionError(f"process server does not know disk {disk_id}")


async def wait_applied(env: Env, disk_id: str, seq: int) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        row = await disk_row(env, disk_id)
        if row["applied_seq"] >= seq:
            return row
        assert time.monotonic() < deadline, f"{disk_id}: applied_seq never reached {seq}: {row}"
        await asyncio.sleep(0.02)


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def wait_session_closed(log_path: Path, client: RawClient, *words: str) -> str:
    """The ps.log session_closed line of *this* connection; asserts it names ``words``."""
    pattern = re.compile(
        rf"event=session_closed peer=\S+ address=\('127\.0\.0\.1', {client.local_port}\) "
        r"reason=(.*)$",
        re.MULTILINE,
    )
    deadline = time.monotonic() + TIMEOUT
    while True:
        with log_path.open("rb") as f:
            f.seek(client.log_offset)
            match = pattern.search(f.read().decode(errors="replace"))
        if match:
            reason = match.group(1)
            for word in words:
                assert word.lower() in reason.lower(), f"reason {reason} does not name {word!r}"
            return reason
        assert time.monotonic() < deadline, f"no session_closed for port {client.local_port}"
        await asyncio.sleep(0.02)


def assert_ps_alive(env: Env) -> None:
    assert env.dep.ps_proc is not None
    assert env.dep.ps_proc.poll() is None, "the process server died"


async def good_write(env: Env) -> int:
    """One write of the bystander at a seed-chosen block; returns its seq."""
    seed = env.next_seed()
    offset = random.Random(seed).randrange(0, DISK_SIZE // BLOCK) * BLOCK
    reply = await asyncio.to_thread(
        env.driver.call, op="write", disk=GOOD_DISK, offset=offset, length=BLOCK, seed=seed
    )
    assert reply["ok"], reply
    return int(reply["seq"])


async def bystander_writes(env: Env, n: int = 6) -> int:
    """The legitimate agent writes while the attack runs; returns its last seq."""
    seq = 0
    for _ in range(n):
        seq = await good_write(env)
        await asyncio.sleep(0.01)
    return seq


async def assert_bystander_replicates(env: Env, writer: asyncio.Task[int]) -> None:
    """The bystander's writes during and after the attack reach its replica, byte for byte."""
    await writer
    last = await good_write(env)
    assert (await asyncio.to_thread(env.driver.call, op="flush", disk=GOOD_DISK))["ok"]
    drained = await asyncio.to_thread(env.driver.call, op="drain", timeout=TIMEOUT)
    assert drained["drained"], drained
    await wait_applied(env, GOOD_DISK, last)
    source = env.dep.agents[GOOD].disks[GOOD_DISK].read_bytes()
    replica = env.dep.replica_path(GOOD_DISK).read_bytes()
    assert hashlib.sha256(source).digest() == hashlib.sha256(replica).digest(), (
        "bystander replica differs from its source"
    )
    row = await disk_row(env, GOOD_DISK)
    assert row["state"] == "replicating", row


def mal_batch(first: int, offset: int, seed: int) -> bytes:
    """Encode a valid one-extent batch for mallory's disk; returns the batch bytes."""
    data = random.Random(seed).randbytes(BLOCK)
    return encode_batch(
        MAL_DISK, first, first, [Extent(offset, BLOCK, data)], newest_write_ns=time.time_ns()
    )


async def seed_mal_disk(env: Env) -> None:
    """Make mallory's replica exist and hold data (once per module), so hashes mean something."""
    if env.mal_content:
        return
    client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
    try:
        await client.hello()
        cached = await client.register()
        for i in range(3):
            data = random.Random(i).randbytes(BLOCK)
            batch = encode_batch(
                MAL_DISK,
                cached + 1,
                cached + 1,
                [Extent(i * BLOCK, BLOCK, data)],
                newest_write_ns=time.time_ns(),
            )
            await client.send(BatchMsg.from_data(batch))
            ack: Ack = await client.expect(Ack)
            assert ack.durable_seq == cached + 1
            cached += 1
            env.mal_content[i * BLOCK] = data
        await wait_applied(env, MAL_DISK, cached)
    finally:
        await client.close()
    with env.dep.replica_path(MAL_DISK).open("rb") as f:
        for offset, data in env.mal_content.items():
            f.seek(offset)
            assert f.read(len(data)) == data, f"seed data at {offset} did not reach the replica"


@dataclass
class Attack:
    """Before/after bookkeeping shared by every scenario."""

    env: Env
    mal_hash: str = ""
    mal_row: dict[str, Any] = field(default_factory=dict)
    writer: asyncio.Task[int] | None = None

    async def __aenter__(self) -> Attack:
        await seed_mal_disk(self.env)
        self.mal_row = await disk_row(self.env, MAL_DISK)
        assert self.mal_row["applied_seq"] == self.mal_row["cached_seq"], self.mal_row
        self.mal_hash = file_hash(self.env.dep.replica_path(MAL_DISK))
        self.writer = asyncio.create_task(bystander_writes(self.env))
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        assert self.writer is not None
        if exc_type is not None:
            self.writer.cancel()
            with contextlib.suppress(BaseException):
                await self.writer
            return
        assert_ps_alive(self.env)
        await assert_bystander_replicates(self.env, self.writer)
        await asyncio.sleep(0.1)  # let an applier that wrongly got work run
        row = await disk_row(self.env, MAL_DISK)
        for key in ("cached_seq", "applied_seq", "applied_bytes", "received_batches"):
            assert row[key] == self.mal_row[key], (key, self.mal_row, row)
        assert row["error"] is None, row
        assert file_hash(self.env.dep.replica_path(MAL_DISK)) == self.mal_hash, (
            "the attacked replica changed"
        )
        assert_ps_alive(self.env)


async def closed_with(
    client: RawClient, code: ErrorCode | None, *, error_frame: bool = False
) -> None:
    """The server closes the connection; whatever it sent first is at most ERROR(code).

    ``error_frame``: the ERROR frame is required (the server refused a well-formed message,
    so its side of the protocol is still healthy enough to say why).
    """
    got = await client.expect_closed()
    errors = [m for m in got if isinstance(m, ErrorMsg)]
    others = [m for m in got if not isinstance(m, ErrorMsg | Ack | Heartbeat)]
    assert not others, got
    if error_frame:
        assert errors, f"no ERROR frame before the close, got {got}"
    if code is not None and errors:
        assert errors[-1].code == code, errors
    assert len(errors) <= 1, errors


# --------------------------------------------------------------------------- scenarios

GARBAGE = {
    "zeros": bytes(64),
    "http": b"GET / HTTP/1.1\r\nHost: tidemark\r\n\r\n",
    "random": random.Random(7).randbytes(300),
    "ff": b"\xff" * 1024,
    "magic-then-junk": MAGIC + random.Random(8).randbytes(60),
}


@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
@pytest.mark.parametrize("name", sorted(GARBAGE))
async def test_garbage_bytes_close_only_that_connection(
    env: Env, name: str, after_hello: bool
) -> None:
    junk = GARBAGE[name]
    async with Attack(env):
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            if after_hello:
                await client.hello()
                await client.register()
            await client.send_raw(junk)
            expected = ErrorCode.BAD_CHECKSUM if junk.startswith(MAGIC) else ErrorCode.BAD_MAGIC
            await closed_with(client, expected)
            await wait_session_closed(env.log_path, client, "protocol error", expected.name)
        finally:
            await client.close()


def _payload_checksum_corrupted() -> bytes:
    good = encode_message(Hello(MAL, "agent"))
    return good[:-1] + bytes([good[-1] ^ 0x01])


async def test_bad_payload_checksum(env: Env) -> None:
    async with Attack(env):
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            await client.send_raw(_payload_checksum_corrupted())
            await closed_with(client, ErrorCode.BAD_CHECKSUM)
            await wait_session_closed(env.log_path, client, "BAD_CHECKSUM", "payload")
        finally:
            await client.close()


@pytest.mark.parametrize("cut", ["in-header", "in-payload", "batch-in-payload"])
async def test_truncated_frame_then_eof(env: Env, cut: str) -> None:
    async with Attack(env):
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            if cut == "batch-in-payload":
                await client.hello()
                cached = await client.register()
                whole = encode_message(BatchMsg.from_data(mal_batch(cached + 1, 0, 99)))
                part = whole[: len(whole) // 2]
            else:
                whole = encode_message(Hello(MAL, "agent"))
                part = whole[:10] if cut == "in-header" else whole[: HEADER.size + 3]
            await client.send_raw(part)
            await asyncio.sleep(0.05)
        finally:
            await client.close()  # close_notify, then EOF: the frame never completes
        await wait_session_closed(env.log_path, client, "truncated")


@pytest.mark.parametrize("length", [2**32 - 1, 36 * 2**20 + 1], ids=["4GiB", "limit+1"])
@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
async def test_oversized_length_refused_before_buffering(
    env: Env, length: int, after_hello: bool
) -> None:
    async with Attack(env):
        rss_before = _rss(env)
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            if after_hello:
                await client.hello()
                await client.register()
            # A checksummed header announcing the length, then a little of the "payload".
            head = frame(MsgType.BATCH, b"", length=length)
            await client.send_raw(head + bytes(4096))
            await closed_with(client, ErrorCode.FRAME_TOO_LARGE)
            await wait_session_closed(env.log_path, client, "FRAME_TOO_LARGE")
        finally:
            await client.close()
        # Nothing close to the announced size was reserved.
        assert _rss(env) - rss_before < 32 << 20


def _rss(env: Env) -> int:
    assert env.dep.ps_proc is not None
    text = Path(f"/proc/{env.dep.ps_proc.pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    assert match
    return int(match.group(1)) * 1024


@pytest.mark.parametrize("version", [9, 0, 255])
async def test_wrong_protocol_version(env: Env, version: int) -> None:
    async with Attack(env):
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            hello = Hello(MAL, "agent")
            await client.send_raw(frame(MsgType.HELLO, hello._encode(), version=version))
            await closed_with(client, ErrorCode.BAD_VERSION)
            await wait_session_closed(env.log_path, client, "BAD_VERSION", f"version {version}")
        finally:
            await client.close()


async def test_unknown_flags_and_type(env: Env) -> None:
    async with Attack(env):
        for data, code in (
            (frame(MsgType.HELLO, Hello(MAL, "agent")._encode(), flags=1), ErrorCode.BAD_MESSAGE),
            (frame(77, b"x" * 10), ErrorCode.UNKNOWN_TYPE),
        ):
            client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
            try:
                await client.send_raw(data)
                await closed_with(client, code)
                await wait_session_closed(env.log_path, client, code.name)
            finally:
                await client.close()


@pytest.mark.parametrize("skip", [2, 100])
async def test_batch_skipping_a_seq(env: Env, skip: int) -> None:
    async with Attack(env):
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            await client.hello()
            cached = await client.register()
            batch = mal_batch(cached + skip, 0, 5)
            await client.send(BatchMsg.from_data(batch))
            await closed_with(client, ErrorCode.SEQ_GAP, error_frame=True)
            await wait_session_closed(env.log_path, client, "SEQ_GAP")
        finally:
            await client.close()
        # The disk is not wedged: the next legitimate batch is still expected at cached + 1.
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            await client.hello()
            assert await client.register() == cached
        finally:
            await client.close()


async def test_replayed_batch_acked_again_not_applied_twice(env: Env) -> None:
    await seed_mal_disk(env)
    client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
    try:
        await client.hello()
        cached = await client.register()
        offset = 5 * BLOCK
        old = random.Random(501).randbytes(BLOCK)
        new = random.Random(502).randbytes(BLOCK)
        first = encode_batch(
            MAL_DISK, cached + 1, cached + 1, [Extent(offset, BLOCK, old)], newest_write_ns=1
        )
        second = encode_batch(
            MAL_DISK,
            cached + 2,
            cached + 2,
            [Extent(offset, BLOCK, new)],
            newest_write_ns=2,
            codec=CODEC_ZSTD,
        )
        for batch, seq in ((first, cached + 1), (second, cached + 2)):
            await client.send(BatchMsg.from_data(batch))
            ack: Ack = await client.expect(Ack)
            assert (ack.disk_id, ack.durable_seq) == (MAL_DISK, seq)
        await wait_applied(env, MAL_DISK, cached + 2)
        env.mal_content[offset] = new

        async with Attack(env) as attack:
            # Resend the already-acknowledged older batch, twice: ACK again, store nothing.
            for _ in range(2):
                await client.send(BatchMsg.from_data(first))
                ack = await client.expect(Ack)
                assert (ack.disk_id, ack.durable_seq) == (MAL_DISK, cached + 2)
            # The connection stays open and usable.
            await client.send(Heartbeat(42, ()))
            beat: Heartbeat = await client.expect(Heartbeat)
            assert beat.counter == 42
            assert attack.mal_row["applied_seq"] == cached + 2
        with env.dep.replica_path(MAL_DISK).open("rb") as f:
            f.seek(offset)
            assert f.read(BLOCK) == new, "the replayed batch was applied again"
    finally:
        await client.close()


async def test_batch_with_wrong_digest(env: Env) -> None:
    async with Attack(env):
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            await client.hello()
            cached = await client.register()
            # Raw codec: the data section is the batch's tail, so the flipped byte is data,
            # not zstd framing; the extent table (and its XXH3-128) stays as encoded.
            raw = encode_batch(
                MAL_DISK,
                cached + 1,
                cached + 1,
                [Extent(7 * BLOCK, BLOCK, random.Random(77).randbytes(BLOCK))],
                newest_write_ns=1,
                codec=CODEC_RAW,
            )
            corrupted = bytearray(raw)
            corrupted[-100] ^= 0x01
            # Frame payload checksum is recomputed by encode_message: only the digest is wrong.
            await client.send(BatchMsg.from_data(bytes(corrupted)))
            await closed_with(client, ErrorCode.DIGEST, error_frame=True)
            await wait_session_closed(env.log_path, client, "DIGEST")
        finally:
            await client.close()
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            await client.hello()
            assert await client.register() == cached, "the corrupt batch entered the cache"
        finally:
            await client.close()


_NO_LIMITS = Limits(max_disk_size=2**64)


def unchecked_batch(data: bytes) -> BatchMsg:
    """A BATCH message the sender's own limits would refuse (the server must refuse it too)."""
    return BatchMsg(data, peek_batch_header(data, _NO_LIMITS))


@pytest.mark.parametrize(
    ("extent", "code", "words"),
    [
        # zero extent straddling the end
        (Extent(DISK_SIZE - 4096, 8192, None), ErrorCode.BAD_MESSAGE, "past the end"),
        # data straddling the end
        (Extent(DISK_SIZE - 4096, 8192, b"\x5a" * 8192), ErrorCode.BAD_MESSAGE, "past the end"),
        # data starting exactly at the end
        (Extent(DISK_SIZE, 4096, b"\xa5" * 4096), ErrorCode.BAD_MESSAGE, "past the end"),
        # far beyond any disk the server accepts (refused while peeking the frame)
        (Extent(2**63, 4096, b"\xa5" * 4096), ErrorCode.LIMIT, "beyond disk limit"),
        (Extent(2**64 - 4097, 4096, None), ErrorCode.LIMIT, "beyond disk limit"),
    ],
    ids=["zero-straddle", "data-straddle", "data-at-end", "far", "u64-end"],
)
async def test_extent_past_end_of_disk(
    env: Env, extent: Extent, code: ErrorCode, words: str
) -> None:
    async with Attack(env):
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            await client.hello()
            cached = await client.register()
            batch = encode_batch(
                MAL_DISK, cached + 1, cached + 1, [extent], newest_write_ns=1, codec=CODEC_RAW
            )
            await client.send(unchecked_batch(batch))
            await closed_with(client, code, error_frame=code is ErrorCode.BAD_MESSAGE)
            await wait_session_closed(env.log_path, client, code.name, words)
        finally:
            await client.close()
    size = env.dep.replica_path(MAL_DISK).stat().st_size
    assert size == DISK_SIZE, "the replica file grew"


@pytest.mark.parametrize("size", [DISK_SIZE - 4096, DISK_SIZE * 2, 0])
async def test_register_with_another_size(env: Env, size: int) -> None:
    async with Attack(env):
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            await client.hello()
            await client.send(Register(MAL_DISK, size, 0))
            await closed_with(client, ErrorCode.DISK, error_frame=True)
            await wait_session_closed(env.log_path, client, "DISK", "size")
        finally:
            await client.close()
    assert env.dep.replica_path(MAL_DISK).stat().st_size == DISK_SIZE


@pytest.mark.parametrize("first", ["register", "batch", "heartbeat", "ack", "hello-ok"])
async def test_message_before_hello(env: Env, first: str) -> None:
    async with Attack(env):
        cached = (await disk_row(env, MAL_DISK))["cached_seq"]
        msg: Message = {
            "register": Register(MAL_DISK, DISK_SIZE, 0),
            "batch": BatchMsg.from_data(
                encode_batch(
                    MAL_DISK,
                    cached + 1,
                    cached + 1,
                    [Extent(0, 4096, b"\x11" * 4096)],
                    newest_write_ns=1,
                )
            ),
            "heartbeat": Heartbeat(1, ()),
            "ack": Ack(MAL_DISK, cached + 5),
            "hello-ok": HelloOk(MAL, 1 << 20, 1 << 20),
        }[first]
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            await client.send(msg)
            await closed_with(client, ErrorCode.UNEXPECTED)
            await wait_session_closed(env.log_path, client, "UNEXPECTED")
        finally:
            await client.close()


@pytest.mark.parametrize(
    ("name", "role"),
    [(GOOD, "agent"), ("mallory2", "agent"), (MAL, "master-target"), (MAL, "process-server")],
)
async def test_hello_disagreeing_with_certificate(env: Env, name: str, role: str) -> None:
    async with Attack(env):
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            await client.send(Hello(name, role))
            await closed_with(client, ErrorCode.AUTH, error_frame=True)
            await wait_session_closed(env.log_path, client, "AUTH")
        finally:
            await client.close()
        # Claiming alice's name did not fence alice's session (Attack checks she replicates).


async def test_second_hello_and_server_messages_from_client(env: Env) -> None:
    async with Attack(env):
        for msg in (Hello(MAL, "agent"), Registered(MAL_DISK, 0, 0), Ack(MAL_DISK, 1)):
            client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
            try:
                await client.hello()
                await client.send(msg)
                await closed_with(client, ErrorCode.UNEXPECTED)
                await wait_session_closed(env.log_path, client, "UNEXPECTED")
            finally:
                await client.close()


async def test_many_attacks_at_once(env: Env) -> None:
    """A burst of concurrent bad connections is absorbed without hurting the bystander."""

    async def one(i: int) -> None:
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            junk = random.Random(i).randbytes(64 + i)
            await client.send_raw(junk)
            await closed_with(client, None)
            await wait_session_closed(env.log_path, client, "protocol error")
        finally:
            await client.close()

    async with Attack(env):
        await asyncio.gather(*(one(i) for i in range(20)))


async def test_refusals_are_counted(env: Env) -> None:
    """The running server counts refused connections in its status."""
    before = (await ps_status(env))["rejected_connections"]
    client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
    try:
        await client.send_raw(bytes(64))
        await closed_with(client, ErrorCode.BAD_MAGIC)
        await wait_session_closed(env.log_path, client, "BAD_MAGIC")
    finally:
        await client.close()
    assert (await ps_status(env))["rejected_connections"] == before + 1


# --------------------------------------------------------------------------- resource bounds


async def test_too_many_outstanding_digest_requests_are_refused(env: Env) -> None:
    """A client that floods digest requests (parked on a far-future seq) without reading is
    refused with LIMIT instead of growing the server's memory."""
    await seed_mal_disk(env)
    client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
    try:
        await client.hello()
        cached = await client.register()
        async with Attack(env):
            for i in range(MAX_DIGEST_REQUESTS + 1):
                await client.send(DigestRequest(MAL_DISK, i + 1, 0, DISK_SIZE, 512, cached + 10**6))
            await closed_with(client, ErrorCode.LIMIT, error_frame=True)
    finally:
        await client.close()


async def test_second_register_of_the_same_disk_on_one_connection_is_refused(env: Env) -> None:
    await seed_mal_disk(env)
    client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
    try:
        await client.hello()
        await client.register()
        await client.send(Register(MAL_DISK, DISK_SIZE, 0))
        await closed_with(client, ErrorCode.UNEXPECTED)
    finally:
        await client.close()


async def _bulk_ask(client: RawClient, body: Any, request_id: int) -> BulkState:
    await client.send(encode_control(body, request_id))
    while True:
        msg = await client.recv()
        assert msg is not None, "closed instead of answering"
        if isinstance(msg, Control) and msg.request_id == request_id:
            state = decode_control(msg)
            assert isinstance(state, BulkState), state
            return state


async def test_bulk_piece_with_wrong_digest_writes_nothing(env: Env) -> None:
    """An initial sync's copy piece whose bytes do not match its digest: the connection is
    closed with DIGEST and the replica (the hole the piece aimed at) is untouched; so is a
    zstd frame stating another size than the piece's (a bomb: 64 MiB from a few hundred
    bytes), one whose bytes decode to another digest and one cut short; pieces out of order and past the end of the disk are refused too. The copy is then ended
    from a new connection, so mallory's disk applies batches again."""
    async with Attack(env):
        data = random.Random(99).randbytes(BLOCK)
        digest = xxhash.xxh3_64_intdigest(data)
        flipped = data[:-1] + bytes([data[-1] ^ 1])
        bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # states 64 MiB
        # Decoded straight into the direct writer's buffer (aligned, 64 KiB): checked there
        # before a byte is written.
        packed = zstandard.ZstdCompressor().compress(bytes(BLOCK // 2) + data[: BLOCK // 2])
        cases = [
            ("DIGEST", BulkData(MAL_DISK, 1, 10 * BLOCK, BLOCK, BULK_RAW, digest, flipped)),
            ("another size", BulkData(MAL_DISK, 1, 10 * BLOCK, BLOCK, BULK_ZSTD, digest, bomb)),
            ("digest mismatch", BulkData(MAL_DISK, 1, 10 * BLOCK, BLOCK, BULK_ZSTD, 1, packed)),
            (
                "another length",  # a frame cut short: it states the right size
                BulkData(MAL_DISK, 1, 10 * BLOCK, BLOCK, BULK_ZSTD, digest, packed[:-9]),
            ),
            ("out of order", BulkData(MAL_DISK, 2, 10 * BLOCK, BLOCK, BULK_RAW, digest, data)),
            (
                "past the end",
                BulkData(MAL_DISK, 1, DISK_SIZE - BLOCK // 2, BLOCK, BULK_RAW, digest, data),
            ),
        ]
        for words, piece in cases:
            client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
            try:
                await client.hello()
                await client.register()
                state = await _bulk_ask(client, BulkBegin(MAL_DISK), 7)
                assert state.active, state
                await client.send(piece)
                digest_error = piece.codec == BULK_ZSTD or words == "DIGEST"
                code = ErrorCode.DIGEST if digest_error else ErrorCode.BAD_MESSAGE
                await closed_with(client, code, error_frame=True)
                await wait_session_closed(env.log_path, client, words)
            finally:
                await client.close()
        client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
        try:
            await client.hello()
            await client.register()
            state = await _bulk_ask(client, BulkSync(MAL_DISK, 0, True), 8)
            assert not state.active and state.written == 0, state
        finally:
            await client.close()
        assert not (await disk_row(env, MAL_DISK))["bulk_copy"]


async def test_bulk_copy_is_refused_on_a_disk_with_points(env: Env) -> None:
    """A copy would rewrite the replica under its recovery points with no undo record: the
    process server refuses to begin one (and holds nothing back)."""
    await seed_mal_disk(env)
    client = await RawClient.connect(env.log_path, env.port, env.mal_bundle)
    try:
        await client.hello()
        cached = await client.register()
        mark = PointMark(
            "mal-p1", MAL_DISK, cached, time.time_ns(), "crash-consistent", "", "", 0.0
        )
        await client.send(encode_control(mark))
        while not isinstance(msg := await client.recv(), Control):
            assert msg is not None, "closed instead of recording the point"
        assert isinstance(decode_control(msg), PointRecorded), msg
        state = await _bulk_ask(client, BulkBegin(MAL_DISK), 9)
        assert not state.active and "recovery points" in state.error, state
    finally:
        await client.close()
    assert not (await disk_row(env, MAL_DISK))["bulk_copy"]
