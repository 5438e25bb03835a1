# Hostile names and sizes against a RUNNING process server, sent as hand-built frames (so the
# sender's own validation is bypassed): disk ids that try to leave the state directory
# (REGISTER, BATCH, DIGEST_REQUEST, VERIFY_RESULT), and messages whose count or size fields
# claim far more than they carry (heartbeat reports, digest ranges, verify reports, batch
# raw bytes and extent counts, string lengths). Rule kept: each is refused with the expected
# wire code; no file or directory appears anywhere but the logs (the whole deployment tree and
# the places the names point to are compared before and after); the server's RSS does not
# grow by what the fields claim; and it keeps serving.
"""Path traversal and oversized allocations on the wire: refused, nothing created, no growth."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.deploy import Deployment
from process_server.replica import ReplicaDisk, ReplicaError
from protocol.batch import Limits
from protocol.errors import ErrorCode, ProtocolError
from protocol.frames import Hello, HelloOk, MsgType
from tests.test_ps_adversarial import RawClient, closed_with, frame, wait_session_closed

NAME = "mallory"
DISK_SIZE = 4 << 20
PROBE = "tidemark-traversal-probe"


@dataclass
class Env:
    dep: Deployment

    @property
    def port(self) -> int:
        return self.dep.port

    @property
    def log_path(self) -> Path:
        return self.dep.root / "ps.log"

    @property
    def bundle(self) -> Path:
        return self.dep.root / f"{NAME}.bundle"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    # Nested one level, so "../" names from the disks directory still land inside tmp.
    with Deployment(tmp_path_factory.mktemp("sec-input") / "dep") as dep:
        dep.init_pki()
        dep.add_agent(NAME, {"mal-d": DISK_SIZE})
        dep.start_ps()
        yield Env(dep)


def tree(root: Path) -> set[str]:
    """Every path under ``root`` but the logs and the admin socket."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if not rel.endswith(".log"):
                out.add(rel)
    return out


def rss(env: Env) -> int:
    assert env.dep.ps_proc is not None
    text = Path(f"/proc/{env.dep.ps_proc.pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    assert match
    return int(match.group(1)) * 1024


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(raw)) + raw


TRAVERSAL = [
    "..",
    "../" + PROBE,
    "../../" + PROBE,
    "../../../" + PROBE,
    "a/../../" + PROBE,
    "/tmp/" + PROBE,
    ".",
    "./x",
    "a/b",
    "a\\..\\b",
    "x/..",
    "d\x00../x",
    "..%2f" + PROBE,
    "." + PROBE,
    "-" + PROBE,
    "A" + PROBE,
    "x" * 65,
    "",
    "é",
]


async def refused(env: Env, data: bytes, code: ErrorCode, *words: str) -> None:
    client = await RawClient.connect(env.log_path, env.port, env.bundle)
    try:
        await client.send(Hello(NAME, "agent"))
        assert isinstance(await client.recv(), HelloOk)
        await client.send_raw(data)
        await closed_with(client, code)
        await wait_session_closed(env.log_path, client, code.name, *words)
    finally:
        await client.close()


@pytest.mark.parametrize("disk_id", TRAVERSAL, ids=range(len(TRAVERSAL)))
async def test_disk_ids_that_try_to_leave_the_state_directory(env: Env, disk_id: str) -> None:
    root = env.dep.root.parent
    before = tree(root)
    hostile = [
        frame(MsgType.REGISTER, s(disk_id) + struct.pack(">QQ", DISK_SIZE, 0)),
        frame(
            MsgType.BATCH,
            struct.pack(">4sBBB", b"TBAT", 1, 0, len(disk_id.encode()))
            + disk_id.encode()
            + struct.pack(">QQQIII", 1, 1, 0, 0, 0, 0),
        ),
        frame(
            MsgType.DIGEST_REQUEST,
            s(disk_id) + struct.pack(">IQQIQBIH", 1, 0, 4096, 4096, 0, 16, 0, 0),
        ),
        frame(MsgType.VERIFY_RESULT, s(disk_id) + struct.pack(">II", 1, 2) + b"{}"),
    ]
    for data in hostile:
        await refused(env, data, ErrorCode.BAD_MESSAGE)
    assert tree(root) == before, "a file or directory appeared"
    assert not Path("/tmp", PROBE).exists()


@pytest.mark.parametrize("disk_id", ["..", "../x", "a/b", "/abs", "", "x" * 65])
def test_replica_disk_refuses_hostile_ids_before_touching_files(
    tmp_path: Path, disk_id: str
) -> None:
    disks = tmp_path / "state" / "disks"
    disks.mkdir(parents=True)
    with pytest.raises((ProtocolError, ReplicaError)):
        ReplicaDisk.open(
            disks,
            disk_id,
            limits=Limits(),
            apply_sync_interval=1,
            cache_quota=16 << 20,
            cache_segment=1 << 20,
            create=("x", 1 << 20),
        )
    assert tree(tmp_path) == {"state", "state/disks"}


U64 = 2**64 - 1
U32 = 2**32 - 1
OVERSIZED = {
    # 65535 reports announced, none carried (the cap is 4096)
    "heartbeat-count": (
        frame(MsgType.HEARTBEAT, struct.pack(">QH", 1, 65535)),
        ErrorCode.LIMIT,
    ),
    # 2^64-1 bytes to digest in 512-byte chunks
    "digest-range": (
        frame(
            MsgType.DIGEST_REQUEST,
            s("mal-d") + struct.pack(">IQQIQBIH", 1, 0, U64, 512, 0, 16, 0, 0),
        ),
        ErrorCode.LIMIT,
    ),
    # a 4 GiB verify report announced in a 20-byte message
    "verify-report": (
        frame(MsgType.VERIFY_RESULT, s("mal-d") + struct.pack(">II", 1, U32)),
        ErrorCode.LIMIT,
    ),
    # a batch claiming 4 GiB of raw data
    "batch-raw": (
        frame(
            MsgType.BATCH,
            struct.pack(">4sBBB", b"TBAT", 1, 1, 5)
            + b"mal-d"
            + struct.pack(">QQQIII", 1, 1, 0, 1, U32, 16)
            + struct.pack(">QIB16s", 0, U32, 0, bytes(16))
            + bytes(16),
        ),
        ErrorCode.LIMIT,
    ),
    # a batch claiming 4 billion extents
    "batch-extents": (
        frame(
            MsgType.BATCH,
            struct.pack(">4sBBB", b"TBAT", 1, 0, 5)
            + b"mal-d"
            + struct.pack(">QQQIII", 1, 1, 0, U32, 0, 0),
        ),
        ErrorCode.LIMIT,
    ),
    # a 64 KiB string announced, 3 bytes carried
    "string-length": (
        frame(MsgType.REGISTER, struct.pack(">H", 65535) + b"abc"),
        ErrorCode.BAD_MESSAGE,
    ),
    # an 8 KiB+ selection mask announced (the cap is 8192 bytes)
    "digest-select": (
        frame(
            MsgType.DIGEST_REQUEST,
            s("mal-d") + struct.pack(">IQQIQBIH", 1, 0, 4096, 512, 0, 16, 512, 65535),
        ),
        ErrorCode.LIMIT,
    ),
}


@pytest.mark.parametrize("name", sorted(OVERSIZED))
async def test_claims_of_huge_sizes_are_refused_without_allocating(env: Env, name: str) -> None:
    data, code = OVERSIZED[name]
    before = rss(env)
    for _ in range(5):
        await refused(env, data, code)
    assert rss(env) - before < 16 << 20, "the server's memory grew with what was claimed"
    assert env.dep.ps_proc is not None and env.dep.ps_proc.poll() is None
