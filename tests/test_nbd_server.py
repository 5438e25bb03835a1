"""Live tests of agent/nbd_server.py: a real ProtectedDisk exported over a unix socket and over
loopback TCP, driven by a raw NBD client written here, so malformed and hostile requests can be
sent. The image file is checked directly (hashlib), independent of the code under test."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import struct
import tracemalloc
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.disk import ProtectedDisk
from agent.nbd_server import NbdExport, parse_endpoint
from protocol import nbd

SIZE = 8 << 20
DISK_ID = "disk-1"


# -- a raw client ---------------------------------------------------------------------------------


class Client:
    """Just enough NBD client to speak well and badly; replies are read explicitly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.size = 0
        self.flags = 0
        self.structured = False

    @classmethod
    async def open(cls, export: NbdExport) -> Client:
        ep = export.endpoint
        if ep.kind == "unix":
            reader, writer = await asyncio.open_unix_connection(ep.path)
        else:
            port = urllib.parse.urlsplit(export.address).port
            reader, writer = await asyncio.open_connection(ep.host, port)
        return cls(reader, writer)

    @classmethod
    async def connect(
        cls, export: NbdExport, *, structured: bool = False, name: bytes = DISK_ID.encode()
    ) -> Client:
        c = await cls.open(export)
        greeting = await c.reader.readexactly(18)
        assert struct.unpack(">QQH", greeting) == (nbd.NBDMAGIC, nbd.IHAVEOPT, 3)
        c.writer.write(struct.pack(">I", 3))
        if structured:
            assert (await c.option(nbd.OPT_STRUCTURED_REPLY))[-1][0] == nbd.REP_ACK
            c.structured = True
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        replies = await c.option(nbd.OPT_GO, data)
        assert replies[-1][0] == nbd.REP_ACK, replies
        info = next(d for r, d in replies if r == nbd.REP_INFO and d[:2] == b"\x00\x00")
        _, c.size, c.flags = struct.unpack(">HQH", info)
        return c

    async def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.writer.write(struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, reply, length = struct.unpack(">QIII", await self.reader.readexactly(20))
            assert (magic, opt) == (nbd.OPTION_REPLY_MAGIC, option)
            replies.append((reply, await self.reader.readexactly(length)))
            if reply in (nbd.REP_ACK,) or reply & (1 << 31):
                return replies

    def send(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        handle: int = 1,
        payload: bytes = b"",
        magic: int = nbd.REQUEST_MAGIC,
    ) -> None:
        self.writer.write(struct.pack(">IHHQQI", magic, flags, command, handle, offset, length))
        if payload:
            self.writer.write(payload)

    async def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """One reply: (handle, error, data); a simple reply carries data only on success."""
        head = await self.reader.readexactly(4)
        (magic,) = struct.unpack(">I", head)
        if magic == nbd.SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", await self.reader.readexactly(12))
            data = await self.reader.readexactly(read_length) if read_length and not error else b""
            return handle, error, data
        assert magic == nbd.STRUCTURED_REPLY_MAGIC, hex(magic)
        flags, kind, handle, length = struct.unpack(">HHQI", await self.reader.readexactly(16))
        payload = await self.reader.readexactly(length)
        assert flags == nbd.REPLY_FLAG_DONE
        if kind == nbd.REPLY_TYPE_OFFSET_DATA:
            return handle, 0, payload[8:]
        if kind == nbd.REPLY_TYPE_NONE:
            return handle, 0, b""
        assert kind == nbd.REPLY_TYPE_ERROR, kind
        error, msg_len = struct.unpack_from(">IH", payload)
        assert len(payload) == 6 + msg_len
        return handle, error, b""

    async def request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes = b"",
    ) -> tuple[int, bytes]:
        self.send(command, offset, length, flags=flags, handle=42, payload=payload)
        handle, error, data = await self.reply(length if command == nbd.CMD_READ else 0)
        assert handle == 42
        return error, data

    async def read(self, offset: int, length: int) -> bytes:
        error, data = await self.request(nbd.CMD_READ, offset, length)
        assert error == 0
        return data

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        flags = nbd.CMD_FLAG_FUA if fua else 0
        error, _ = await self.request(nbd.CMD_WRITE, offset, len(data), flags=flags, payload=data)
        assert error == 0

    async def dropped(self) -> bool:
        """True when the server closed the connection (EOF within a few seconds)."""
        try:
            async with asyncio.timeout(5):
                return await self.reader.read(1 << 16) == b""
        except ConnectionError:
            return True

    async def close(self, *, disc: bool = True) -> None:
        if disc and not self.writer.is_closing():
            self.send(nbd.CMD_DISC)
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


# -- fixtures -------------------------------------------------------------------------------------


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(SIZE)  # sparse: a fresh disk needs no initial resync
    return path


@pytest.fixture
async def disk(tmp_path: Path, image: Path) -> AsyncIterator[ProtectedDisk]:
    d = await ProtectedDisk.open(DISK_ID, image, tmp_path / "journal")
    for offset in range(0, SIZE, 1 << 20):  # random content, so any stray write shows
        await d.write(offset, os.urandom(1 << 20))
    await d.flush()
    yield d
    await d.close()


@pytest.fixture(params=["unix", "tcp"])
def endpoint(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"unix:{tmp_path}/run/nbd.sock" if request.param == "unix" else "tcp:127.0.0.1:0"


@pytest.fixture
async def export(disk: ProtectedDisk, endpoint: str) -> AsyncIterator[NbdExport]:
    async with NbdExport(disk, endpoint) as e:
        yield e


# -- endpoints and lifecycle ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kind", "where"),
    [
        ("unix:/run/x.sock", "unix", "/run/x.sock"),
        ("tcp:127.0.0.1:10809", "tcp", ("127.0.0.1", 10809)),
        ("tcp:[::1]:0", "tcp", ("::1", 0)),
        ("tcp:10809", "tcp", ("127.0.0.1", 10809)),
        ("tcp::10809", "tcp", ("127.0.0.1", 10809)),
        ("tcp:0.0.0.0:1", "tcp", ("0.0.0.0", 1)),
    ],
)
def test_parse_endpoint(spec: str, kind: str, where: object) -> None:
    ep = parse_endpoint(spec)
    assert ep.kind == kind
    assert (ep.path if kind == "unix" else (ep.host, ep.port)) == where


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "unix:",
        "tcp:",
        "tcp:host:",
        "tcp:h:99999",
        "tcp:h:-1",
        "udp:1.2.3.4:5",
        "/tmp/x",
        "tcp:::1:5",
        "tcp:[nope]:5",
        "unix:/" + "x" * 200,
    ],
)
def test_parse_endpoint_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="NBD endpoint"):
        parse_endpoint(spec)


async def test_unix_socket_lifecycle(disk: ProtectedDisk, tmp_path: Path) -> None:
    sock = tmp_path / "deep" / "dir" / "nbd.sock"
    sock.parent.mkdir(parents=True)
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))  # a stale socket file from an earlier run
    stale.close()
    export = NbdExport(disk, f"unix:{sock}")
    await export.start()
    assert export.address == f"nbd+unix:///{DISK_ID}?socket={sock}"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    c = await Client.connect(export)
    await export.close()  # closes live connections too
    assert await c.dropped()
    await c.close(disc=False)
    assert not sock.exists()

    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(FileExistsError):
        await NbdExport(disk, f"unix:{regular}").start()
    assert regular.read_text() == "keep me"


async def test_tcp_address_has_actual_port(disk: ProtectedDisk) -> None:
    async with NbdExport(disk, "tcp:127.0.0.1:0") as export:
        url = urllib.parse.urlsplit(export.address)
        assert url.scheme == "nbd" and url.hostname == "127.0.0.1" and url.path == f"/{DISK_ID}"
        assert url.port and url.port > 0


# -- requests -------------------------------------------------------------------------------------


async def test_roundtrip_and_flags(export: NbdExport, image: Path) -> None:
    c = await Client.connect(export)
    assert c.size == SIZE
    assert c.flags == (
        nbd.FLAG_HAS_FLAGS
        | nbd.FLAG_SEND_FLUSH
        | nbd.FLAG_SEND_FUA
        | nbd.FLAG_SEND_TRIM
        | nbd.FLAG_SEND_WRITE_ZEROES
        | nbd.FLAG_CAN_MULTI_CONN
    )
    data = os.urandom(65536)
    await c.write(4096, data, fua=True)
    assert await c.read(4096, 65536) == data
    assert (await c.request(nbd.CMD_WRITE_ZEROES, 8192, 4096, flags=nbd.CMD_FLAG_NO_HOLE))[0] == 0
    assert (await c.request(nbd.CMD_TRIM, 16384, 4096, flags=nbd.CMD_FLAG_FUA))[0] == 0
    assert (await c.request(nbd.CMD_FLUSH))[0] == 0
    expected = data[:4096] + bytes(4096) + data[8192:12288] + bytes(4096) + data[16384:]
    with image.open("rb") as f:
        f.seek(4096)
        assert f.read(65536) == expected
    assert await c.read(4096, 65536) == expected
    await c.close()


async def test_default_export_name_and_unknown(export: NbdExport) -> None:
    c = await Client.connect(export, name=b"")
    assert c.size == SIZE
    await c.close()
    c = await Client.open(export)
    await c.reader.readexactly(18)
    c.writer.write(struct.pack(">I", 3))
    replies = await c.option(nbd.OPT_GO, struct.pack(">I", 5) + b"other" + b"\x00\x00")
    assert replies[-1][0] == nbd.REP_ERR_UNKNOWN
    assert (await c.option(nbd.OPT_LIST))[0] == (nbd.REP_SERVER, b"\x00\x00\x00\x06" + b"disk-1")
    assert (await c.option(nbd.OPT_ABORT))[0][0] == nbd.REP_ACK
    assert await c.dropped()
    await c.close(disc=False)


async def test_bad_magic_drops(export: NbdExport) -> None:
    c = await Client.connect(export)
    c.send(nbd.CMD_READ, 0, 512, magic=0xDEADBEEF)
    assert await c.dropped()
    await c.close(disc=False)


@pytest.mark.parametrize("structured", [False, True])
async def test_errno_replies_keep_the_connection(
    export: NbdExport, image: Path, structured: bool
) -> None:
    before = digest(image)
    c = await Client.connect(export, structured=structured)
    cases = [
        (nbd.CMD_READ, SIZE - 512, 1024, 0, b"", nbd.NBD_EINVAL),
        (nbd.CMD_READ, SIZE, 1, 0, b"", nbd.NBD_EINVAL),
        (nbd.CMD_TRIM, SIZE - 1, 2, 0, b"", nbd.NBD_EINVAL),
        (nbd.CMD_WRITE, SIZE - 1, 2, 0, b"ab", nbd.NBD_ENOSPC),  # payload consumed
        (nbd.CMD_WRITE_ZEROES, SIZE, 512, 0, b"", nbd.NBD_ENOSPC),
        (nbd.CMD_CACHE, 0, 512, 0, b"", nbd.NBD_EINVAL),
        (77, 0, 512, 0, b"", nbd.NBD_EINVAL),
        (nbd.CMD_READ, 0, 512, 0x40, b"", nbd.NBD_EINVAL),
        (nbd.CMD_WRITE, 0, 4, nbd.CMD_FLAG_NO_HOLE, b"xxxx", nbd.NBD_EINVAL),
        (nbd.CMD_READ, 0, 0, 0, b"", nbd.NBD_EINVAL),
        (nbd.CMD_WRITE, 0, 0, 0, b"", nbd.NBD_EINVAL),
        (nbd.CMD_READ, 0, nbd.MAX_PAYLOAD + 1, 0, b"", nbd.NBD_EINVAL),
        (nbd.CMD_FLUSH, 0, 512, 0, b"", nbd.NBD_EINVAL),
    ]
    for handle, (command, offset, length, flags, payload, error) in enumerate(cases, 100):
        c.send(command, offset, length, flags=flags, handle=handle, payload=payload)
        assert await c.reply() == (handle, error, b""), (command, offset, length, flags)
        assert await c.read(0, 512) == image.read_bytes()[:512]  # still usable
    await c.close()
    assert digest(image) == before


async def test_oversized_write_drops_without_touching_the_image(
    export: NbdExport, image: Path
) -> None:
    before = digest(image)
    c = await Client.connect(export)
    c.send(nbd.CMD_WRITE, 0, nbd.MAX_PAYLOAD + 1, payload=b"\xff" * 65536)
    assert await c.dropped()
    await c.close(disc=False)
    c = await Client.connect(export)  # the export itself is fine
    assert (await c.request(nbd.CMD_FLUSH))[0] == 0
    await c.close()
    assert digest(image) == before


async def test_client_vanishing_mid_payload(export: NbdExport, image: Path) -> None:
    before = digest(image)
    c = await Client.connect(export)
    c.send(nbd.CMD_WRITE, 0, 1 << 20, handle=5, payload=b"\xee" * ((1 << 20) - 1))
    await c.writer.drain()
    c.writer.transport.abort()
    await c.close(disc=False)
    c = await Client.connect(export)
    assert (await c.request(nbd.CMD_FLUSH))[0] == 0
    assert await c.read(0, 4096) == image.read_bytes()[:4096]
    await c.close()
    assert digest(image) == before


async def test_read_only_is_eperm(disk: ProtectedDisk, endpoint: str, image: Path) -> None:
    before = digest(image)
    disk.read_only = True
    async with NbdExport(disk, endpoint) as export:
        c = await Client.connect(export)
        assert c.flags & nbd.FLAG_READ_ONLY
        assert not c.flags & (nbd.FLAG_SEND_TRIM | nbd.FLAG_SEND_WRITE_ZEROES)
        for command, payload in (
            (nbd.CMD_WRITE, b"z" * 512),
            (nbd.CMD_TRIM, b""),
            (nbd.CMD_WRITE_ZEROES, b""),
        ):
            error, _ = await c.request(command, 0, 512, payload=payload)
            assert error == nbd.NBD_EPERM
        assert await c.read(0, 512) == image.read_bytes()[:512]
        await c.close()
    disk.read_only = False
    assert digest(image) == before


async def test_disk_errors_map_to_their_errno(export: NbdExport, disk: ProtectedDisk) -> None:
    c = await Client.connect(export, structured=True)
    assert await c.read(0, 512)
    await disk.close()  # the disk now refuses everything with ESHUTDOWN
    assert (await c.request(nbd.CMD_READ, 0, 512))[0] == nbd.NBD_ESHUTDOWN
    assert (await c.request(nbd.CMD_WRITE, 0, 3, payload=b"abc"))[0] == nbd.NBD_ESHUTDOWN
    await c.close()


async def test_structured_reads(export: NbdExport, image: Path) -> None:
    c = await Client.connect(export, structured=True)
    c.send(nbd.CMD_READ, 1000, 3000, handle=9)
    head = await c.reader.readexactly(20)
    magic, flags, kind, handle, length = struct.unpack(">IHHQI", head)
    assert (magic, flags, kind, handle, length) == (
        nbd.STRUCTURED_REPLY_MAGIC,
        nbd.REPLY_FLAG_DONE,
        nbd.REPLY_TYPE_OFFSET_DATA,
        9,
        3008,
    )
    body = await c.reader.readexactly(length)
    assert struct.unpack_from(">Q", body)[0] == 1000
    assert body[8:] == image.read_bytes()[1000:4000]
    # A big read goes out as one chunk too.
    big = await c.read(0, 4 << 20)
    assert big == image.read_bytes()[: 4 << 20]
    # Writes still get simple replies (allowed by the spec once structured replies are on).
    c.send(nbd.CMD_WRITE, 0, 4, handle=3, payload=b"abcd")
    assert await c.reader.readexactly(16) == nbd.simple_reply(3)
    await c.close()


async def test_pipelined_requests(export: NbdExport, image: Path) -> None:
    c = await Client.connect(export)
    blocks = {i: os.urandom(4096) for i in range(64)}
    for i, data in blocks.items():
        c.send(nbd.CMD_WRITE, i * 8192, 4096, handle=i, payload=data, flags=(i % 3 == 0))
    seen = set()
    for _ in blocks:
        handle, error, _ = await c.reply()
        assert error == 0
        seen.add(handle)
    assert seen == set(blocks)
    for i in blocks:
        c.send(nbd.CMD_READ, i * 8192, 4096, handle=1000 + i)
    for _ in blocks:
        handle, error, data = await c.reply(4096)
        assert error == 0 and data == blocks[handle - 1000]
    assert (await c.request(nbd.CMD_FLUSH))[0] == 0
    content = image.read_bytes()
    assert all(content[i * 8192 : i * 8192 + 4096] == d for i, d in blocks.items())
    await c.close()


async def test_a_burst_of_writes_is_journaled_together_in_order(
    export: NbdExport, disk: ProtectedDisk, image: Path
) -> None:
    """Writes sent in one burst are journaled in groups (fewer journal writes than writes),
    one record each, in the order sent, and reach the image in that order: of two writes to
    the same block, the later one stays. A bad request in the middle gets its errno and the
    writes around it are done."""
    groups: list[int] = []
    append_many = disk.journal.log.append_many

    def counting(records):  # type: ignore[no-untyped-def]
        groups.append(len(records))
        return append_many(records)

    disk.journal.log.append_many = counting  # type: ignore[method-assign]
    c = await Client.connect(export)
    first = disk.journaled_seq + 1
    writes = [(i * 4096, os.urandom(4096)) for i in range(40)]
    writes.insert(20, (5 * 4096, os.urandom(4096)))  # rewrites block 5 after its first write
    for handle, (offset, data) in enumerate(writes):
        c.send(nbd.CMD_WRITE, offset, 4096, handle=handle, payload=data)
    c.send(nbd.CMD_WRITE, SIZE, 4096, handle=999, payload=bytes(4096))  # past the end
    c.send(nbd.CMD_WRITE, 50 * 4096, 4096, handle=1000, payload=b"z" * 4096)
    replies = {}
    for _ in range(len(writes) + 2):
        handle, error, _ = await c.reply()
        replies[handle] = error
    assert replies.pop(999) != 0
    assert set(replies.values()) == {0} and len(replies) == len(writes) + 1
    assert sum(groups) == len(writes) + 1 and len(groups) < len(writes), groups
    entries = disk.journal.read(first, 1 << 30)
    assert [(e.seq, e.offset, bytes(e.data or b"")) for e in entries] == [
        (seq, offset, data)
        for seq, (offset, data) in enumerate([*writes, (50 * 4096, b"z" * 4096)], first)
    ]
    content = image.read_bytes()
    expected = dict(writes)  # the later write of block 5 wins
    assert all(content[offset : offset + 4096] == data for offset, data in expected.items())
    assert content[50 * 4096 : 51 * 4096] == b"z" * 4096
    await c.close()


async def test_a_burst_larger_than_the_budget_and_ended_by_disc_is_all_done(
    disk: ProtectedDisk, image: Path, tmp_path: Path
) -> None:
    """A burst of 40 writes against a budget of 4 requests in flight (a group is cut where the
    budget runs out), then DISC in the same send, replies never read: every write is
    journaled, in the order sent, and in the image once the connection is gone."""
    async with NbdExport(disk, f"unix:{tmp_path}/s.sock", max_inflight_requests=4) as export:
        c = await Client.connect(export)
        first = disk.journaled_seq + 1
        writes = [(i * 4096, os.urandom(4096)) for i in range(40)]
        for handle, (offset, data) in enumerate(writes):
            c.send(nbd.CMD_WRITE, offset, 4096, handle=handle, payload=data)
        c.send(nbd.CMD_DISC)
        await c.writer.drain()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await c.reader.read(1 << 16):  # the server closes once everything is done
                pass
        entries = disk.journal.read(first, 1 << 30)
        assert [(e.offset, bytes(e.data or b"")) for e in entries] == writes
        content = image.read_bytes()
        assert all(content[o : o + 4096] == d for o, d in writes)
        c.writer.close()


async def test_a_burst_to_fresh_extents_persists_the_activity_log_once(
    tmp_path: Path,
) -> None:
    """Pipelined writes to sixteen extents the activity log does not hold: the first write
    waits for the log, and the extents of the writes queued behind it go into the same
    persist, so the log is written once or twice, not sixteen times. Requests still take
    effect in the order sent: a zero-write queued after a write to the same fresh block
    leaves it zeroed."""
    image = tmp_path / "fresh.img"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    disk = await ProtectedDisk.open(DISK_ID, image, tmp_path / "state", activity_extents=128)
    try:
        async with NbdExport(disk, f"unix:{tmp_path}/s.sock") as export:
            c = await Client.connect(export)
            al = disk.activity_log
            assert al is not None
            before = al.persists
            blocks = {i: os.urandom(4096) for i in range(16)}
            for i, data in blocks.items():
                c.send(nbd.CMD_WRITE, i * (4 << 20), 4096, handle=i, payload=data)
            c.send(nbd.CMD_WRITE_ZEROES, 3 * (4 << 20), 4096, handle=100)
            for _ in range(len(blocks) + 1):
                handle, error, _ = await c.reply()
                assert error == 0, handle
            assert al.persists - before <= 2, al.persists - before
            assert sorted(al.load()) == list(range(16))
            await c.close()
        content = image.read_bytes()
        for i, data in blocks.items():
            want = bytes(4096) if i == 3 else data
            assert content[i * (4 << 20) : i * (4 << 20) + 4096] == want, i
    finally:
        await disk.close()


async def test_a_write_waits_while_a_point_holds_the_disk(
    export: NbdExport, disk: ProtectedDisk, image: Path
) -> None:
    """A plain WRITE arriving while a recovery point holds the gate is neither journaled nor
    answered until the hold ends; then it lands after the point's seq, and in the image."""
    c = await Client.connect(export)
    cut = await disk.hold()
    data = os.urandom(4096)
    c.send(nbd.CMD_WRITE, 8192, 4096, handle=7, payload=data)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(c.reply(), 0.2)
    assert disk.journaled_seq == cut, "a held write was journaled"
    disk.release()
    handle, error, _ = await asyncio.wait_for(c.reply(), 5)
    assert (handle, error) == (7, 0)
    assert disk.journaled_seq == cut + 1
    with open(image, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == data
    await c.close()


async def test_multi_conn_flush(export: NbdExport, tmp_path: Path) -> None:
    a = await Client.connect(export)
    b = await Client.connect(export)
    data = os.urandom(1 << 16)
    await a.write(0, data)  # acknowledged on A ...
    assert (await b.request(nbd.CMD_FLUSH))[0] == 0  # ... flushed through B
    assert await b.read(0, 1 << 16) == data
    # An independent reader (not our code) sees the bytes in the image file.
    with (tmp_path / "disk.img").open("rb") as f:
        assert f.read(1 << 16) == data
    await a.close()
    await b.close()


async def test_disc_finishes_outstanding_requests(export: NbdExport, image: Path) -> None:
    c = await Client.connect(export)
    data = os.urandom(1 << 20)
    c.send(nbd.CMD_WRITE, 0, len(data), handle=1, payload=data, flags=nbd.CMD_FLAG_FUA)
    c.send(nbd.CMD_DISC)
    assert await c.reply() == (1, 0, b"")
    assert await c.dropped()
    await c.close(disc=False)
    assert image.read_bytes()[: len(data)] == data


# -- resource bounds ------------------------------------------------------------------------------


async def test_backpressure_when_the_client_does_not_read(
    disk: ProtectedDisk, tmp_path: Path
) -> None:
    """A client that pipelines reads but never reads replies cannot make the server buffer:
    the server stops reading its requests, so the client's own sends block."""
    limit = 4 << 20
    async with NbdExport(disk, f"unix:{tmp_path}/s.sock", max_inflight_bytes=limit) as export:
        c = await Client.connect(export)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()

            async def flood() -> None:
                for i in range(200_000):  # 50 GiB of replies if nothing pushed back
                    c.send(nbd.CMD_READ, 0, 256 << 10, handle=i)
                    await c.writer.drain()

            sender = asyncio.ensure_future(flood())
            await asyncio.sleep(1.0)
            assert not sender.done()  # blocked: the server stopped reading
            _, peak = tracemalloc.get_traced_memory()
            assert peak < limit + (16 << 20), peak
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        finally:
            tracemalloc.stop()
        c.writer.transport.abort()
        await c.close(disc=False)
        c = await Client.connect(export)  # the export survives
        assert await c.read(0, 512)
        await c.close()


async def test_backpressure_when_refused_writes_are_not_read(
    disk: ProtectedDisk, tmp_path: Path
) -> None:
    """Writes refused with an errno (a frozen disk: a planned failover) whose replies the
    client never reads: each error reply is larger than its request, and still the server
    stops reading once its replies back up, so the client's own sends block."""
    async with NbdExport(disk, f"unix:{tmp_path}/s.sock") as export:
        c = await Client.connect(export)
        disk.frozen = True
        try:
            sent = 0

            async def flood() -> None:
                nonlocal sent
                for i in range(10_000_000):  # 160 MB of error replies if nothing pushed back
                    c.send(nbd.CMD_WRITE, 0, 1, handle=i, payload=b"x")
                    await c.writer.drain()
                    sent += 1

            sender = asyncio.ensure_future(flood())
            await asyncio.sleep(1.5)
            clock = asyncio.get_running_loop().time
            deadline = clock() + 30  # (a loaded machine is slower)
            while True:
                stalled_at = sent
                await asyncio.sleep(0.5)
                if sent == stalled_at or clock() > deadline:
                    break
            assert sent == stalled_at, "the client's sends never blocked"
            (conn_writer,) = export._connections.values()
            buffered = conn_writer.transport.get_write_buffer_size()
            assert buffered < 1 << 20, f"{buffered} bytes of replies queued in the server"
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        finally:
            disk.frozen = False
        c.writer.transport.abort()
        await c.close(disc=False)


async def test_memory_bounded_under_deep_write_queue(disk: ProtectedDisk, tmp_path: Path) -> None:
    """QD64 of max-size FUA writes: payload held by the server stays within the byte budget."""
    payload, budget = 2 << 20, 4 << 20
    async with NbdExport(
        disk, f"unix:{tmp_path}/s.sock", max_payload=payload, max_inflight_bytes=budget
    ) as export:
        c = await Client.connect(export)
        data = os.urandom(payload)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()

            async def writes() -> None:
                for i in range(64):
                    c.send(nbd.CMD_WRITE, 0, payload, handle=i, payload=data, flags=1)
                    await c.writer.drain()

            async def replies() -> None:
                for _ in range(64):
                    assert (await c.reply())[1] == 0

            await asyncio.gather(writes(), replies())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # budget + one payload being read (+ its copy) + client-side buffers + the journal's
        # bounded in-memory tail of recent records; unbounded would be 128 MiB
        assert peak < budget + 6 * payload + (4 << 20) + disk.journal.tail_limit, peak
        await c.close()


async def test_concurrent_fua_writes_on_a_disk_awaiting_resync(tmp_path: Path) -> None:
    image = tmp_path / "full.img"
    image.write_bytes(os.urandom(SIZE))  # not sparse: the disk starts in resync-required mode
    disk = await ProtectedDisk.open(DISK_ID, image, tmp_path / "j")
    try:
        async with NbdExport(disk, f"unix:{tmp_path}/s.sock") as export:
            c = await Client.connect(export)
            for i in range(32):
                c.send(nbd.CMD_WRITE, i * 4096, 512, handle=i, payload=b"q" * 512, flags=1)
            errors = [(await c.reply())[1] for _ in range(32)]
            await c.close()
        assert errors == [0] * 32
    finally:
        await disk.close()
