"""Batch codec and coalescer: roundtrips, hostile input (only ProtocolError), limits, model test."""

from __future__ import annotations

import contextlib
import itertools
import struct
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.batch import (
    CODEC_RAW,
    CODEC_ZSTD,
    DEFAULT_LIMITS,
    Batch,
    Coalescer,
    Extent,
    Limits,
    decode_batch,
    encode_batch,
    peek_batch_header,
    validate_disk_id,
)
from protocol.errors import ErrorCode, ProtocolError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

disk_ids = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True).filter(
    lambda s: ".." not in s
)


@st.composite
def extent_lists(draw: st.DrawFn, max_extents: int = 12) -> list[Extent]:
    n = draw(st.integers(0, max_extents))
    offset = draw(st.integers(0, 2**40))
    out: list[Extent] = []
    for _ in range(n):
        offset += draw(st.integers(0, 5000))
        length = draw(st.integers(1, 300))
        if draw(st.booleans()):
            data = draw(st.binary(min_size=length, max_size=length))
            out.append(Extent(offset, length, data))
        else:
            out.append(Extent(offset, length, None))
        offset += length
    return out


@st.composite
def batches(draw: st.DrawFn) -> tuple[bytes, dict[str, object]]:
    first = draw(st.integers(1, 2**63))
    args: dict[str, object] = {
        "disk_id": draw(disk_ids),
        "first_seq": first,
        "last_seq": first + draw(st.integers(0, 1000)),
        "extents": draw(extent_lists()),
        "newest_write_ns": draw(st.integers(0, 2**64 - 1)),
        "codec": draw(st.sampled_from([CODEC_RAW, CODEC_ZSTD])),
    }
    return encode_batch(**args), args  # type: ignore[arg-type]


def _layout(encoded: bytes | bytearray) -> tuple[int, int]:
    """(offset of the first_seq field, offset of the extent table)."""
    fields = 7 + encoded[6]
    return fields, fields + 36


def _table_end(encoded: bytes | bytearray) -> int:
    fields, table = _layout(encoded)
    n_extents = struct.unpack_from(">I", encoded, fields + 24)[0]
    return table + 29 * n_extents


@FAST
@given(batches())
def test_roundtrip(case: tuple[bytes, dict[str, object]]) -> None:
    encoded, args = case
    batch = decode_batch(encoded)
    extents = args["extents"]
    assert isinstance(extents, list)
    assert batch.extents == tuple(extents)
    h = batch.header
    assert (h.disk_id, h.first_seq, h.last_seq, h.newest_write_ns, h.codec) == (
        args["disk_id"],
        args["first_seq"],
        args["last_seq"],
        args["newest_write_ns"],
        args["codec"],
    )
    assert h.n_extents == len(extents)
    assert h.raw_bytes == sum(e.length for e in extents if e.data is not None)
    assert peek_batch_header(encoded) == h
    assert decode_batch(memoryview(encoded)) == batch
    assert decode_batch(bytearray(encoded)) == batch


@pytest.mark.parametrize("codec", [CODEC_RAW, CODEC_ZSTD])
def test_zero_only_and_empty_batches(codec: int) -> None:
    zeros = [Extent(0, 4096, None), Extent(2**40, 2**32 - 1, None)]
    for extents in (zeros, []):
        encoded = encode_batch("d0", 5, 9, extents, newest_write_ns=1, codec=codec)
        batch = decode_batch(encoded)
        assert batch.header.raw_bytes == 0 and batch.header.compressed_bytes == 0
        assert list(batch.extents) == extents


def test_zstd_compresses_and_records_content_size() -> None:
    data = b"tidemark" * 8192
    encoded = encode_batch("d", 1, 1, [Extent(0, len(data), data)], newest_write_ns=0)
    header = peek_batch_header(encoded)
    assert header.codec == CODEC_ZSTD and header.compressed_bytes < len(data) // 10
    _, table = _layout(encoded)
    assert zstandard.frame_content_size(encoded[table + 29 :]) == len(data)
    assert decode_batch(encoded).extents[0].data == data


def test_encode_is_thread_safe() -> None:
    payloads = [bytes([i]) * 100_000 + bytes(range(256)) * i for i in range(16)]

    def work(p: bytes) -> bytes | None:
        enc = encode_batch("d", 1, 1, [Extent(0, len(p), p)], newest_write_ns=0, level=3)
        return decode_batch(enc).extents[0].data

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(work, payloads * 4)) == payloads * 4


# --- hostile input ------------------------------------------------------------------------


def _only_protocol_error(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Batch | None:
    with contextlib.suppress(ProtocolError):
        peek_batch_header(data, limits)
    try:
        return decode_batch(data, limits)
    except ProtocolError:
        return None


@FAST
@given(st.binary(max_size=400))
def test_garbage_raises_only_protocol_error(data: bytes) -> None:
    _only_protocol_error(data)
    _only_protocol_error(b"TBAT\x01" + data)
    _only_protocol_error(b"TBAT\x01\x01\x01d" + data)


def _may_survive(encoded: bytes, pos: int) -> bool:
    """Whether a changed byte at ``pos`` can still leave a valid batch.

    Only the disk id characters, seqs, timestamp, extent offsets and zero-extent lengths
    can take other valid values (the frame checksum covers them on the wire); counts and
    sizes are cross-checked, data and digests are covered by XXH3-128.
    """
    fields, table = _layout(encoded)
    raw = struct.unpack_from(">I", encoded, fields + 28)[0]
    if pos == 5:  # codec: irrelevant when there is no data
        return raw == 0
    if 7 <= pos < fields or fields <= pos < fields + 24:
        return True
    if table <= pos < _table_end(encoded):
        index, rel = divmod(pos - table, 29)
        kind = encoded[table + 29 * index + 12]
        return rel < 8 or (8 <= rel < 12 and kind == 1)
    return False


@FAST
@given(batches(), st.data())
def test_single_byte_mutation(case: tuple[bytes, dict[str, object]], data: st.DataObject) -> None:
    encoded, _ = case
    pos = data.draw(st.integers(0, len(encoded) - 1))
    mutated = bytearray(encoded)
    mutated[pos] ^= data.draw(st.integers(1, 255))
    result = _only_protocol_error(bytes(mutated))
    if not _may_survive(encoded, pos):
        assert result is None


def test_truncations_raise() -> None:
    data = bytes(range(256)) * 4
    encoded = encode_batch(
        "d", 1, 2, [Extent(0, 1024, data), Extent(4096, 10, None)], newest_write_ns=0
    )
    for cut in range(len(encoded)):
        with pytest.raises(ProtocolError):
            decode_batch(encoded[:cut])
    with pytest.raises(ProtocolError):
        decode_batch(encoded + b"\0")


def test_flipped_data_byte_in_raw_batch_is_digest_error() -> None:
    data = b"x" * 4096
    encoded = bytearray(
        encode_batch("d", 1, 1, [Extent(0, 4096, data)], newest_write_ns=0, codec=CODEC_RAW)
    )
    encoded[-100] ^= 0x01
    peek_batch_header(bytes(encoded))  # structure is fine
    with pytest.raises(ProtocolError) as info:
        decode_batch(bytes(encoded))
    assert info.value.code is ErrorCode.DIGEST


@pytest.mark.parametrize("codec", [CODEC_RAW, CODEC_ZSTD])
@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_raw_bytes_lying(codec: int, delta: int) -> None:
    data = bytes(range(256)) * 16
    encoded = bytearray(
        encode_batch("d", 1, 1, [Extent(0, len(data), data)], newest_write_ns=0, codec=codec)
    )
    fields, _ = _layout(encoded)
    raw = struct.unpack_from(">I", encoded, fields + 28)[0]
    struct.pack_into(">I", encoded, fields + 28, raw + delta)
    with pytest.raises(ProtocolError):
        peek_batch_header(bytes(encoded))
    with pytest.raises(ProtocolError):
        decode_batch(bytes(encoded))


def _zstd_with_declared_size(real: bytes, declared: int) -> bytes:
    """A zstd frame holding ``real`` whose header claims ``declared`` bytes (4-byte FCS)."""
    frame = bytearray(zstandard.ZstdCompressor(level=1).compress(real))
    fhd = frame[4]
    assert fhd >> 6 == 2 and fhd & 3 == 0, "expected a 4-byte content size, no dict id"
    fcs_at = 5 if fhd & 0x20 else 6  # single-segment frames have no window descriptor
    struct.pack_into("<I", frame, fcs_at, declared)
    return bytes(frame)


def _replace_section(encoded: bytes, section: bytes) -> bytes:
    fields, _ = _layout(encoded)
    head = bytearray(encoded[: _table_end(encoded)])
    struct.pack_into(">I", head, fields + 32, len(section))
    return bytes(head) + section


def test_decompression_bomb_is_refused_with_bounded_memory() -> None:
    small = b"\0" * 1000
    encoded = encode_batch("d", 1, 1, [Extent(0, 1000, small)], newest_write_ns=0)
    bomb = _zstd_with_declared_size(b"\0" * (64 * 2**20), 1000)
    assert len(bomb) < 64 * 1024
    hostile = _replace_section(encoded, bomb)
    peek_batch_header(hostile)  # nothing visible before decompression
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            decode_batch(hostile)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


def test_zstd_frame_without_content_size_or_with_extra_data_is_refused() -> None:
    data = bytes(range(256)) * 8
    encoded = encode_batch("d", 1, 1, [Extent(0, len(data), data)], newest_write_ns=0)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    with pytest.raises(ProtocolError):
        decode_batch(_replace_section(encoded, no_size))
    _, table = _layout(encoded)
    section = encoded[table + 29 :]
    with pytest.raises(ProtocolError):
        decode_batch(_replace_section(encoded, section + section))
    with pytest.raises(ProtocolError):
        decode_batch(_replace_section(encoded, b"\x28\xb5\x2f\xfd" + b"\xff" * 20))


def test_limits_are_checked_before_decompression() -> None:
    data = b"a" * 5000
    exts = [Extent(0, 5000, data), Extent(10_000, 10, None), Extent(20_000, 1, b"b")]
    encoded = encode_batch("d", 1, 1, exts, newest_write_ns=0)
    cases = [
        Limits(max_extents=2),
        Limits(max_batch_raw_bytes=5000),
        Limits(max_disk_size=20_000),
        Limits(max_frame_bytes=len(encoded) - 1),
    ]
    for limits in cases:
        with pytest.raises(ProtocolError) as info:
            peek_batch_header(encoded, limits)
        assert info.value.code is ErrorCode.LIMIT
    assert decode_batch(encoded, Limits(max_extents=3, max_disk_size=20_001)).extents == tuple(exts)


def _patched_table(encoded: bytes, index: int, fmt: str, rel: int, value: object) -> bytes:
    _, table = _layout(encoded)
    out = bytearray(encoded)
    struct.pack_into(fmt, out, table + 29 * index + rel, value)
    return bytes(out)


def test_bad_extent_tables() -> None:
    exts = [Extent(0, 10, b"0123456789"), Extent(100, 10, None)]
    encoded = encode_batch("d", 1, 1, exts, newest_write_ns=0, codec=CODEC_RAW)
    bad = [
        _patched_table(encoded, 1, ">Q", 0, 5),  # overlaps the first extent
        _patched_table(encoded, 1, ">I", 8, 0),  # empty extent
        _patched_table(encoded, 1, ">B", 12, 7),  # unknown kind
        _patched_table(encoded, 1, ">B", 12, 0),  # zero extent turned data: sum mismatch
        _patched_table(encoded, 1, ">B", 13, 1),  # zero extent with a digest
        _patched_table(encoded, 0, ">Q", 0, 2**64 - 5),  # beyond the disk
    ]
    for data in bad:
        with pytest.raises(ProtocolError):
            peek_batch_header(data)
    hostile = bytearray(encoded)
    hostile[4] = 2
    with pytest.raises(ProtocolError) as info:
        decode_batch(bytes(hostile))
    assert info.value.code is ErrorCode.BAD_VERSION


@pytest.mark.parametrize(
    "kwargs",
    [
        {"disk_id": "Bad"},
        {"disk_id": "a/b"},
        {"first_seq": 0, "last_seq": 0},
        {"first_seq": 5, "last_seq": 4},
        {"codec": 7},
        {"extents": [Extent(0, 3, b"ab")]},
        {"extents": [Extent(0, 0, None)]},
        {"extents": [Extent(-1, 1, None)]},
        {"extents": [Extent(0, 10, None), Extent(5, 10, None)]},
        {"extents": [Extent(10, 1, None), Extent(0, 1, None)]},
        {"extents": [Extent(0, 2**32, None)]},
        {"newest_write_ns": -1},
    ],
)
def test_encode_rejects_invalid_input(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "disk_id": "d",
        "first_seq": 1,
        "last_seq": 1,
        "extents": [],
        "newest_write_ns": 0,
    }
    args.update(kwargs)
    with pytest.raises(ProtocolError) as info:
        encode_batch(**args)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize("good", ["a", "web01-root", "0", "a.b_c-d", "a" * 64, "x.y"])
def test_valid_disk_ids(good: str) -> None:
    assert validate_disk_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "A", "-a", ".a", "a" * 65, "a..b", "a/b", "a\n", "é", "a b", "a\x00"]
)
def test_invalid_disk_ids(bad: str) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_disk_id(bad)
    assert info.value.code is ErrorCode.BAD_MESSAGE


# --- coalescer ----------------------------------------------------------------------------

SPAN = 512

ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("data"),
            st.integers(0, SPAN - 1),
            st.binary(min_size=0, max_size=64),
        ),
        st.tuples(st.just("zero"), st.integers(0, SPAN - 1), st.integers(0, 64)),
    ),
    max_size=60,
)


def _apply(image: bytearray, extents: list[Extent]) -> None:
    for e in extents:
        image[e.offset : e.offset + e.length] = bytes(e.length) if e.data is None else e.data


@settings(max_examples=400, deadline=None)
@given(ops, st.binary(min_size=SPAN + 128, max_size=SPAN + 128))
def test_coalescer_matches_bytearray_model(
    operations: list[tuple[str, int, bytes | int]], initial: bytes
) -> None:
    model = bytearray(initial)
    co = Coalescer()
    for kind, offset, arg in operations:
        if kind == "data":
            assert isinstance(arg, bytes)
            co.add_data(offset, arg)
            model[offset : offset + len(arg)] = arg
        else:
            assert isinstance(arg, int)
            co.add_zero(offset, arg)
            model[offset : offset + arg] = bytes(arg)
    extents = co.extents()
    image = bytearray(initial)
    _apply(image, extents)
    assert image == model
    # sorted, non-overlapping, non-empty, maximally merged
    for e in extents:
        assert e.length > 0 and (e.data is None or len(e.data) == e.length)
        assert e.data is None or isinstance(e.data, bytes)
    for a, b in itertools.pairwise(extents):
        assert a.offset + a.length <= b.offset
        if a.offset + a.length == b.offset:
            assert (a.data is None) != (b.data is None)
    assert co.n_extents == len(extents)
    assert co.raw_bytes == sum(e.length for e in extents if e.data is not None)
    # the coalesced extents always make a valid batch
    if extents:
        assert list(decode_batch(encode_batch("d", 1, 2, extents, newest_write_ns=0)).extents) == (
            extents
        )


def test_coalescer_sequential_writes_are_cheap() -> None:
    co = Coalescer()
    block = bytes(range(256)) * 16
    t0 = time.perf_counter()
    for i in range(50_000):
        co.add_data(i * 4096, block)
        assert co.n_extents == 1
    for i in range(0, 50_000, 7):  # overwrite some blocks inside the merged run
        co.add_zero(i * 4096 + 100, 10)
    extents = co.extents()
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0
    assert co.raw_bytes == 50_000 * 4096 - 10 * len(range(0, 50_000, 7))
    assert len(extents) == 2 * len(range(0, 50_000, 7)) + 1


def test_coalescer_later_records_win_and_merge() -> None:
    co = Coalescer()
    co.add_data(0, b"aaaa")
    co.add_data(4, b"bbbb")
    co.add_zero(2, 4)
    co.add_zero(6, 2)
    co.add_data(100, b"x")
    co.add_zero(200, 0)
    co.add_data(300, b"")
    assert co.extents() == [
        Extent(0, 2, b"aa"),
        Extent(2, 6, None),
        Extent(100, 1, b"x"),
    ]
    assert co.raw_bytes == 3 and co.n_extents == 3
    co.add_data(0, b"z" * 200)
    assert co.extents() == [Extent(0, 200, b"z" * 200)]
    with pytest.raises(ProtocolError):
        co.add_data(-1, b"a")
    with pytest.raises(ProtocolError):
        co.add_zero(0, -1)


def test_coalescer_copies_mutable_input() -> None:
    co = Coalescer()
    buf = bytearray(b"abcd")
    co.add_data(0, buf)  # type: ignore[arg-type]
    buf[0] = ord("z")
    assert co.extents() == [Extent(0, 4, b"abcd")]


def test_digest_is_xxh3_128_of_data() -> None:
    data = b"hello world"
    encoded = encode_batch("d", 1, 1, [Extent(7, len(data), data)], newest_write_ns=0)
    _, table = _layout(encoded)
    assert encoded[table + 13 : table + 29] == xxhash.xxh3_128_digest(data)
