# Hypothesis fuzzing of the three wire parsers: the frame decoder and connection state machine
# (protocol/frames.py), the batch codec (protocol/batch.py) and the NBD handshake and request
# parser (protocol/nbd.py). Inputs are garbage, and valid encodings mutated (bit flips,
# truncation, splices, hostile numbers written into length and count fields) with the
# checksums recomputed afterwards, so the mutations reach the payload decoders instead of
# stopping at a checksum. Rule kept: whatever the bytes, the only exception is the module's
# protocol error, and memory stays bounded: tracemalloc's peak over each call is compared
# with a bound computed from the input's size (never from a size the input claims).
# A short run is part of the default suite; `-m slow` runs >= 100 000 cases per parser.
"""Fuzzing the frame decoder, the batch codec and the NBD parser, with memory bounds."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from protocol import nbd
from protocol.batch import CODEC_RAW, CODEC_ZSTD, Extent, Limits, decode_batch, encode_batch
from protocol.batch import peek_batch_header as peek
from protocol.errors import ProtocolError
from protocol.frames import (
    BULK_RAW,
    BULK_ZERO,
    BULK_ZSTD,
    EOF,
    Ack,
    BatchMsg,
    BulkData,
    Connection,
    DigestReply,
    DigestRequest,
    DiskReport,
    ErrorMsg,
    FrameDecoder,
    Heartbeat,
    Hello,
    HelloOk,
    NeedData,
    Register,
    Registered,
    VerifyRequest,
    VerifyResult,
    encode_message,
)

SHORT = int(os.environ.get("TIDEMARK_FUZZ_EXAMPLES", "500"))
LONG = int(os.environ.get("TIDEMARK_FUZZ_LONG_EXAMPLES", "100000"))


CHUNK = 10_000  # long runs go in chunks with their own seeds: Hypothesis's memory stays flat


def run_long(strategy: st.SearchStrategy[Any], check: Callable[[Any], None]) -> None:
    """``LONG`` cases of ``strategy`` through ``check``, in chunks of ``CHUNK`` (reproducible:
    each chunk has a fixed seed; a failure prints the case and its blob)."""
    for k in range(max(1, -(-LONG // CHUNK))):

        @seed(k)
        @settings(_settings(min(CHUNK, LONG - k * CHUNK)), database=None)
        @given(strategy)
        def chunk(case: Any) -> None:
            check(case)

        chunk()


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


# Small receiver limits, so that "within the limits" is cheap to reach and to measure.
LIMITS = Limits(
    max_frame_bytes=256 << 10, max_batch_raw_bytes=128 << 10, max_extents=256, max_disk_size=2**40
)


@contextlib.contextmanager
def memory_bound(limit: int, what: str) -> Iterator[None]:
    """The block may allocate at most ``limit`` bytes at its peak (tracemalloc traces only the
    block, so the fuzzer's own allocations are not counted)."""
    if tracemalloc.is_tracing():  # someone else traces: measure above their baseline
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        yield
        peak = tracemalloc.get_traced_memory()[1] - base
    else:
        tracemalloc.start()
        try:
            yield
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak <= limit, f"{what}: peak {peak} bytes above the {limit}-byte bound"


# --------------------------------------------------------------------------- mutations

HOSTILE = [0, 1, 2**7, 2**8 - 1, 2**15, 2**16 - 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` after a few random edits (flip, overwrite with a hostile number, cut, splice)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "number", "cut", "insert", "delete", "dup"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "number":
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.sampled_from(HOSTILE)) % (1 << (8 * width))
            data[pos : pos + width] = value.to_bytes(width, "big")
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


# --------------------------------------------------------------------------- frames

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
names = st.builds(
    lambda a, b: a + b,
    st.sampled_from(_ALNUM + "ABCXYZ"),
    st.text(_ALNUM + "ABCXYZ._-", max_size=20),
).filter(lambda s: ".." not in s)
disk_ids = st.builds(
    lambda a, b: a + b, st.sampled_from(_ALNUM), st.text(_ALNUM + "._-", max_size=20)
).filter(lambda s: ".." not in s)
u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)


@st.composite
def small_batches(draw: st.DrawFn, disk: str | None = None) -> bytes:
    offset = draw(st.integers(0, 2**30))
    extents = []
    for _ in range(draw(st.integers(0, 4))):
        offset += draw(st.integers(0, 4096))
        data = draw(st.one_of(st.none(), st.binary(min_size=1, max_size=300)))
        length = len(data) if data is not None else draw(st.integers(1, 1 << 20))
        extents.append(Extent(offset, length, data))
        offset += length
    first = draw(st.integers(1, 2**40))
    return encode_batch(
        disk or draw(disk_ids),
        first,
        first + draw(st.integers(0, 9)),
        extents,
        newest_write_ns=draw(u64),
        codec=draw(st.sampled_from([CODEC_RAW, CODEC_ZSTD])),
    )


messages = st.one_of(
    st.builds(Hello, names, st.sampled_from(["agent", "master-target", "process-server"])),
    st.builds(HelloOk, names, u32, u32),
    st.builds(Register, disk_ids, st.integers(0, 2**40), u64),
    st.builds(Registered, disk_ids, u64, u64),
    small_batches().map(BatchMsg.from_data),
    st.builds(Ack, disk_ids, u64),
    st.builds(
        Heartbeat,
        u64,
        st.lists(
            st.builds(DiskReport, disk_ids, st.just("replicating"), u64, u64, u64, u64),
            max_size=3,
        ).map(tuple),
    ),
    st.builds(ErrorMsg, st.integers(0, 2**16 - 1), st.text(max_size=40)),
    st.builds(
        DigestRequest, disk_ids, u32, st.integers(0, 2**40), st.just(1 << 20), st.just(4096), u64
    ),
    st.builds(DigestReply, disk_ids, u32, st.just(0), st.just(4096), u64, st.just(bytes(32))),
    st.builds(VerifyRequest, disk_ids, u32, st.booleans()),
    st.builds(VerifyResult, disk_ids, u32, st.just('{"ok": true}')),
    st.builds(
        lambda disk, bulk_id, offset, data, codec, zeros: BulkData(
            disk,
            bulk_id,
            offset,
            zeros if codec == BULK_ZERO else len(data) + (codec == BULK_ZSTD),
            codec,
            xxhash.xxh3_64_intdigest(data),
            b"" if codec == BULK_ZERO else data,
        ),
        disk_ids,
        u64,
        st.integers(0, 2**40),
        st.binary(min_size=1, max_size=300),
        st.sampled_from([BULK_RAW, BULK_ZSTD, BULK_ZERO]),
        st.integers(1, 4 << 20),
    ),
)


def reseal(frame: bytes) -> bytes:
    """Recompute a frame's checksums (payload xxh3_64, header xxh32) after a mutation, with
    the length field made to match the payload, so the payload decoder sees the mutation."""
    if len(frame) < 24:
        return frame
    head = bytearray(frame[:24])
    payload = frame[24:]
    struct.pack_into(">IQ", head, 8, len(payload), xxhash.xxh3_64_intdigest(payload))
    struct.pack_into(">I", head, 20, xxhash.xxh32_intdigest(bytes(head[:20])))
    return bytes(head) + payload


@st.composite
def frame_streams(draw: st.DrawFn) -> bytes:
    """A stream of frames: valid, mutated-then-resealed, mutated raw, or garbage."""
    parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 4))):
        frame = encode_message(draw(messages))
        style = draw(st.sampled_from(["valid", "resealed", "type", "raw", "garbage"]))
        if style == "resealed":
            head, payload = frame[:24], draw(mutated(frame[24:]))
            frame = reseal(head + payload)
        elif style == "type":  # a valid payload under another message type
            frame = reseal(frame[:5] + bytes([draw(st.integers(0, 255))]) + frame[6:])
        elif style == "raw":
            frame = draw(mutated(frame))
        elif style == "garbage":
            frame = draw(st.binary(max_size=64))
        parts.append(frame)
    return b"".join(parts)


def _frame_bound(data: bytes, chunk: int) -> int:
    # One copy of what is buffered, one of a payload, the decoded message's objects
    # (strings, tuples: at most ~16x the bytes they come from), and a fixed slack.
    return 20 * len(data) + 4 * chunk + (64 << 10)


def check_frame_decoder(data: bytes, cuts: list[int], eof: bool, limits: Limits) -> None:
    decoder = FrameDecoder(limits)
    with memory_bound(_frame_bound(data, max(1, len(data))), "FrameDecoder"):
        try:
            for chunk in [*chunked(data, cuts), *([b""] if eof else [])]:
                decoder.receive_data(chunk)
                assert decoder.buffered <= 24 + limits.max_frame_bytes + len(chunk)
                while True:
                    event = decoder.next_message()
                    if isinstance(event, NeedData | EOF):
                        break
        except ProtocolError:
            with pytest.raises(ProtocolError):  # a failed decoder stays failed
                decoder.next_message()


def check_connection(data: bytes, cuts: list[int], role: str, hello_first: bool) -> None:
    conn = Connection(role, LIMITS)  # type: ignore[arg-type]
    if role == "client" and hello_first:
        conn.send(Hello("fuzz", "agent"))
    elif hello_first:
        data = encode_message(Hello("fuzz", "agent")) + data
    with (
        memory_bound(_frame_bound(data, len(data) + 1), "Connection"),
        contextlib.suppress(ProtocolError),
    ):
        for chunk in [*chunked(data, cuts), b""]:
            conn.receive_data(chunk)
            while not isinstance(conn.next_event(), NeedData | EOF):
                pass


frame_inputs = st.tuples(
    st.one_of(frame_streams(), st.binary(max_size=400)),
    st.lists(st.integers(0, 10_000), max_size=8),
    st.booleans(),
    st.sampled_from([LIMITS, Limits()]),  # small limits, and the defaults (48 MiB frames)
)
connection_inputs = st.tuples(
    frame_streams(),
    st.lists(st.integers(0, 10_000), max_size=5),
    st.sampled_from(["client", "server"]),
    st.booleans(),
)


@_settings(SHORT)
@given(frame_inputs)
def test_fuzz_frame_decoder(case: tuple[bytes, list[int], bool, Limits]) -> None:
    check_frame_decoder(*case)


@_settings(SHORT)
@given(connection_inputs)
def test_fuzz_connection_state_machine(case: tuple[bytes, list[int], str, bool]) -> None:
    check_connection(*case)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_fuzz_frame_decoder_long() -> None:
    run_long(frame_inputs, lambda case: check_frame_decoder(*case))


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_fuzz_connection_state_machine_long() -> None:
    run_long(connection_inputs, lambda case: check_connection(*case))


def test_a_huge_announced_frame_allocates_nothing() -> None:
    """A header announcing a frame just under the limit, then a trickle: memory follows the
    bytes received, not the length announced."""
    limits = Limits()
    head = bytearray(encode_message(Ack("d", 1))[:24])
    struct.pack_into(">I", head, 8, limits.max_frame_bytes)
    struct.pack_into(">I", head, 20, xxhash.xxh32_intdigest(bytes(head[:20])))
    decoder = FrameDecoder(limits)
    with memory_bound(256 << 10, "announced 48 MiB frame"):
        decoder.receive_data(bytes(head))
        for _ in range(16):
            decoder.receive_data(bytes(4096))
            assert isinstance(decoder.next_message(), NeedData)
    assert decoder.buffered == 24 + 16 * 4096


# --------------------------------------------------------------------------- batches


@functools.lru_cache(maxsize=64)
def zstd_bomb(declared: int, actual: int) -> bytes:
    """A zstd frame whose header declares ``declared`` bytes but which holds ``actual`` zeros
    (``declared`` < 0: no content size in the header)."""
    cctx = zstandard.ZstdCompressor(write_content_size=declared >= 0)
    frame = bytearray(cctx.compress(bytes(actual)))
    if declared >= 0 and declared != actual:
        # Rewrite the frame content size field (4 or 8 bytes at the end of the frame header).
        fhd = frame[4]
        size_code = fhd >> 6
        single = (fhd >> 5) & 1
        did = (0, 1, 2, 4)[fhd & 3]
        pos = 5 + (0 if single else 1) + did
        width = (1 if single else 0, 2, 4, 8)[size_code]
        value = declared - 256 if width == 2 else declared
        if 0 <= value < (1 << (8 * width)):
            frame[pos : pos + width] = value.to_bytes(width, "little")
    return bytes(frame)


@st.composite
def bomb_batches(draw: st.DrawFn) -> bytes:
    """A batch whose data section is a zstd frame lying about its size, or a header lying
    about raw/compressed bytes and extent counts (checksums of the frame are not involved)."""
    raw = draw(st.integers(1, 4096))
    actual = draw(st.sampled_from([raw, raw * 2, 1 << 20, 8 << 20]))
    declared = draw(st.sampled_from([raw, actual, -1, 2**32 - 1]))
    body = zstd_bomb(declared, actual)
    digest = xxhash.xxh3_128_digest(bytes(raw))
    table = struct.pack(">QIB16s", 0, raw, 0, digest)
    header = struct.pack(">4sBBB", b"TBAT", 1, CODEC_ZSTD, 1) + b"d"
    fields = struct.pack(">QQQIII", 1, 1, 0, 1, raw, len(body))
    return header + fields + table + body


@st.composite
def batch_inputs(draw: st.DrawFn) -> bytes:
    return draw(
        st.one_of(
            small_batches(),
            small_batches().flatmap(mutated),
            bomb_batches(),
            bomb_batches().flatmap(mutated),
            st.binary(max_size=400),
            st.binary(max_size=120).map(lambda b: b"TBAT\x01" + b),
        )
    )


def check_batch(data: bytes) -> None:
    # Decoding may hold the input, the decompressed data (at most max_batch_raw_bytes, checked
    # before decompressing) and a copy per extent; never what a header merely claims.
    bound = 4 * len(data) + 2 * LIMITS.max_batch_raw_bytes + (64 << 10)
    with memory_bound(bound, "decode_batch"):
        try:
            header = peek(data, LIMITS)
        except ProtocolError:
            header = None
        try:
            batch = decode_batch(data, LIMITS)
        except ProtocolError:
            return
    assert header is not None and batch.header == header
    assert sum(len(e.data) for e in batch.extents if e.data is not None) == header.raw_bytes
    assert header.raw_bytes <= LIMITS.max_batch_raw_bytes
    for extent in batch.extents:
        if extent.data is not None:
            assert len(extent.data) == extent.length


@_settings(SHORT)
@given(batch_inputs())
def test_fuzz_batch_codec(data: bytes) -> None:
    check_batch(data)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_fuzz_batch_codec_long() -> None:
    run_long(batch_inputs(), check_batch)


@pytest.mark.parametrize(
    ("declared", "actual"),
    [(4096, 64 << 20), (-1, 64 << 20), (2**32 - 1, 16 << 20)],
    ids=["lies-small", "no-size", "claims-4GiB"],
)
def test_zstd_bombs_are_refused_within_bounded_memory(declared: int, actual: int) -> None:
    raw = 4096
    body = zstd_bomb(declared, actual)
    batch = (
        struct.pack(">4sBBB", b"TBAT", 1, CODEC_ZSTD, 1)
        + b"d"
        + struct.pack(">QQQIII", 1, 1, 0, 1, raw, len(body))
        + struct.pack(">QIB16s", 0, raw, 0, xxhash.xxh3_128_digest(bytes(raw)))
        + body
    )
    with memory_bound(1 << 20, "zstd bomb"), pytest.raises(ProtocolError):
        decode_batch(batch)  # the default limits: 32 MiB of raw bytes allowed


# --------------------------------------------------------------------------- NBD

EXPORT = nbd.ExportInfo("disk-1", 1 << 20)


@st.composite
def nbd_handshakes(draw: st.DrawFn) -> bytes:
    """Client flags then options: well framed with hostile numbers, or garbage."""
    out = struct.pack(">I", draw(st.sampled_from([0, 1, 2, 3, 4, 0xFFFFFFFF])))
    for _ in range(draw(st.integers(0, 6))):
        option = draw(st.sampled_from([*range(0, 13), 0xFFFFFFFF]))
        name = draw(st.sampled_from([b"", b"disk-1", b"nope", b"x" * 5000]))
        infos = draw(st.lists(st.integers(0, 65535), max_size=4))
        data = draw(
            st.one_of(
                st.binary(max_size=40),
                st.just(struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))).map(
                    lambda d, i=infos: d + b"".join(struct.pack(">H", x) for x in i)
                ),
                st.just(struct.pack(">I", len(name)) + name + struct.pack(">I", 0)),
            )
        )
        length = draw(st.one_of(st.just(len(data)), st.sampled_from(HOSTILE[:8])))
        out += struct.pack(">QII", draw(st.sampled_from([nbd.IHAVEOPT, 0])), option, length)
        out += data
    return draw(st.one_of(st.just(out), mutated(out)))


def check_handshake(data: bytes, cuts: list[int], eof: bool) -> None:
    hs = nbd.ServerHandshake(EXPORT)
    sent = 0
    with memory_bound(8 * len(data) + (64 << 10), "ServerHandshake"):
        try:
            for chunk in [*chunked(data, cuts), *([b""] if eof else [])]:
                hs.receive_data(chunk)
                for _ in range(1000):
                    event = hs.next_event()
                    if event is nbd.NEED_DATA:
                        break
                    assert isinstance(
                        event, nbd.OptionReplied | nbd.Ready | nbd.Aborted | nbd.Closed
                    )
                # The shell reads at most this much for the next message: bounded.
                assert hs.bytes_wanted <= nbd.MAX_OPTION_LENGTH + 16
                sent += len(hs.data_to_send())
                if hs.bytes_wanted == 0:
                    break
        except nbd.NbdProtocolError as exc:
            assert exc.drop
    # Replies are bounded by what was asked: at most a few KiB per option.
    assert sent <= (nbd.MAX_OPTIONS + 1) * (nbd.MAX_STRING + 256) + 64


def check_requests(data: bytes, read_only: bool) -> None:
    with memory_bound(64 << 10, "parse_request"):
        for pos in range(0, max(1, len(data)), nbd.REQUEST_SIZE):
            header = data[pos : pos + nbd.REQUEST_SIZE]
            try:
                req = nbd.parse_request(header, size=1 << 20, read_only=read_only)
            except nbd.NbdProtocolError as exc:
                assert exc.drop or exc.errno in (nbd.NBD_EINVAL, nbd.NBD_ENOSPC, nbd.NBD_EPERM)
                assert exc.discard == 0 or (
                    exc.command == nbd.CMD_WRITE and exc.discard <= nbd.MAX_PAYLOAD
                )
                continue
            if req.command != nbd.CMD_DISC:
                assert req.offset + req.length <= 1 << 20
                assert req.length <= nbd.MAX_PAYLOAD


handshake_inputs = st.tuples(
    st.one_of(nbd_handshakes(), st.binary(max_size=300)),
    st.lists(st.integers(0, 20_000), max_size=6),
    st.booleans(),
)
request = struct.Struct(">IHHQQI")
request_inputs = st.tuples(
    st.one_of(
        st.binary(max_size=120),
        st.lists(
            st.builds(
                request.pack,
                st.sampled_from([nbd.REQUEST_MAGIC, nbd.REQUEST_MAGIC, 0]),
                st.sampled_from([0, 1, 2, 4, 8, 16, 0xFFFF]),
                st.integers(0, 12),
                u64,
                st.one_of(st.integers(0, 1 << 20), u64),
                st.one_of(st.integers(0, 1 << 20), u32),
            ),
            max_size=6,
        ).map(b"".join),
    ),
    st.booleans(),
)


@_settings(SHORT)
@given(handshake_inputs)
def test_fuzz_nbd_handshake(case: tuple[bytes, list[int], bool]) -> None:
    check_handshake(*case)


@_settings(SHORT)
@given(request_inputs)
def test_fuzz_nbd_requests(case: tuple[bytes, bool]) -> None:
    check_requests(*case)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_fuzz_nbd_handshake_long() -> None:
    run_long(handshake_inputs, lambda case: check_handshake(*case))


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_fuzz_nbd_requests_long() -> None:
    run_long(request_inputs, lambda case: check_requests(*case))
