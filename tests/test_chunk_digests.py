"""chunk_digests: read or mapped, with holes, a short file or a pipe, every digest equals an
XXH3-128 computed here from a plain read; data_ranges never calls a range with data a hole."""

from __future__ import annotations

import os
from pathlib import Path

import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.digests import NOT_HASHED, chunk_digests, data_ranges, zero_digest
from common.durable import zero_range

CHUNK = 64 << 10
BLOCK = 4 << 10


def expected_digests(path: Path, offset: int, length: int, size: int) -> list[bytes]:
    """Independent of the code under test: the file read whole, zero-padded to ``size``."""
    data = path.read_bytes()[:size].ljust(size, b"\0")
    end = min(offset + length, size)
    return [
        xxhash.xxh3_128_digest(data[pos : min(pos + CHUNK, end)])
        for pos in range(offset, end, CHUNK)
    ]


layouts = st.lists(  # (block index, kind): data written, or a hole punched
    st.tuples(st.integers(0, 255), st.sampled_from(["data", "hole"])), max_size=40
)


@given(
    layouts,
    st.integers(0, 15).map(lambda c: c * CHUNK),
    st.integers(1, 20 * CHUNK),
    st.integers(-3, 3),
    st.sampled_from([CHUNK, 3 * CHUNK, 4 << 20]),
    st.booleans(),
    st.booleans(),
)
@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_digests_equal_a_plain_read(
    tmp_path: Path,
    layout,
    offset: int,
    length: int,
    short: int,
    span: int,
    mapped: bool,
    prefill: bool,
) -> None:
    size = 256 * BLOCK * 4  # 4 MiB: 64 chunks
    path = tmp_path / "img"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        if prefill:  # fully allocated (data_ranges skips SEEK_HOLE) until a hole is punched
            os.pwrite(fd, os.urandom(size), 0)
        for index, kind in layout:
            pos = index * 4 * BLOCK
            if kind == "data":
                os.pwrite(fd, os.urandom(4 * BLOCK), pos)
            else:
                zero_range(fd, pos, 4 * BLOCK, punch=True)
        # A file shorter than the disk (a replica or image not yet grown): past its end the
        # digests are those of zeros, and no page past the end is ever mapped.
        if short:
            os.ftruncate(fd, size - abs(short) * 3 * BLOCK - 100)
        result = chunk_digests(fd, offset, length, CHUNK, size, span, mapped=mapped)
    finally:
        os.close(fd)
    assert result.digests == expected_digests(path, offset, length, size)


def test_a_fully_allocated_file_is_all_data_and_a_sparse_one_keeps_its_holes(
    tmp_path: Path,
) -> None:
    full = tmp_path / "full"
    full.write_bytes(os.urandom(8 * CHUNK))
    sparse = tmp_path / "sparse"
    with sparse.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(os.urandom(CHUNK))
    fd = os.open(full, os.O_RDONLY)
    try:
        assert data_ranges(fd, CHUNK, 5 * CHUNK) == [(CHUNK, 5 * CHUNK)]
        assert data_ranges(fd, CHUNK, CHUNK) == []
    finally:
        os.close(fd)
    fd = os.open(sparse, os.O_RDONLY)
    try:
        ranges = data_ranges(fd, 0, 64 << 20)
        # Whatever the filesystem's allocation unit, the written chunk is inside the data
        # found, and most of the file is known to be a hole.
        assert any(s <= 32 << 20 and e >= 32 * (1 << 20) + CHUNK for s, e in ranges)
        assert sum(e - s for s, e in ranges) < 8 << 20
    finally:
        os.close(fd)


def test_a_device_is_read_not_mapped() -> None:
    """Not a regular file (a block device in production; /dev/zero here): read, not mapped."""
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        result = chunk_digests(fd, 0, 3 * CHUNK, CHUNK, 3 * CHUNK, mapped=True)
    finally:
        os.close(fd)
    assert result.digests == [xxhash.xxh3_128_digest(bytes(CHUNK))] * 3
    assert result.bytes_read == 3 * CHUNK


def test_skipped_chunks_are_not_hashed_holes_still_get_the_zero_digest(tmp_path: Path) -> None:
    """``skip``: a skipped chunk holding data gets NOT_HASHED and is not read; a skipped hole
    still gets the digest of zeros (it equals a zero replica chunk); the others as usual."""
    path = tmp_path / "img"
    with open(path, "wb") as f:
        f.truncate(8 * CHUNK)
        for i in (0, 1, 5):  # data in chunks 0, 1 and 5; holes elsewhere
            f.seek(i * CHUNK)
            f.write(os.urandom(CHUNK))
    size = 8 * CHUNK
    expected = expected_digests(path, 0, size, size)
    fd = os.open(path, os.O_RDONLY)
    try:
        if data_ranges(fd, 0, size) == [(0, size)]:
            return  # this filesystem keeps no holes: nothing to tell apart
        for mapped in (False, True):
            every = chunk_digests(fd, 0, size, CHUNK, size, mapped=mapped, skip={0, 1, 2, 5})
            assert every.digests[0] == every.digests[1] == every.digests[5] == NOT_HASHED
            assert every.digests[2] == zero_digest(CHUNK)  # a skipped hole
            assert every.digests[3:5] + every.digests[6:] == expected[3:5] + expected[6:]
            assert every.bytes_read == 0
            some = chunk_digests(fd, 0, size, CHUNK, size, mapped=mapped, skip={1})
            assert some.digests[1] == NOT_HASHED
            assert [d for i, d in enumerate(some.digests) if i != 1] == [
                d for i, d in enumerate(expected) if i != 1
            ]
    finally:
        os.close(fd)
