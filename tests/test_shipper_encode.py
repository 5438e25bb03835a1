"""Batches the shipper builds from journal entries: writes, zero extents and references
(resync data read from the image when the batch is built). The expected disk is built here
with plain byte arrays; the batch is decoded with the process server's own decoder."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.journal import JournalEntry
from agent.shipper import disjoint_extents, encode_entries
from protocol.batch import Coalescer, decode_batch

SIZE = 256 << 10
BLOCK = 4 << 10

blocks = st.lists(
    st.sampled_from(["zero", "data", "ones"]), min_size=SIZE // BLOCK, max_size=SIZE // BLOCK
)
entries = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero", "ref"]),
        st.integers(0, SIZE // BLOCK - 1),
        st.integers(1, 16),
        st.binary(min_size=1, max_size=1),
    ),
    min_size=1,
    max_size=12,
)


def _image(kinds: list[str]) -> bytes:
    out = bytearray()
    for i, kind in enumerate(kinds):
        if kind == "data":
            out += bytes([i % 251 + 1]) * 2048 + bytes(2048)  # not all zeros
        else:
            out += bytes(BLOCK) if kind == "zero" else b"\xff" * BLOCK
    return bytes(out)


@given(kinds=blocks, ops=entries)
@settings(max_examples=80, deadline=None)
def test_a_batch_applies_like_its_entries_in_order(kinds: list[str], ops: list) -> None:
    """Applying the decoded batch gives what applying the entries one by one gives (a
    reference carries the image's bytes as read), and a reference's all-zero blocks travel
    as zero extents, never as data."""
    image = _image(kinds)
    expected = bytearray(b"\xee" * SIZE)  # the replica before the batch
    journal: list[JournalEntry] = []
    for seq, (kind, block, count, fill) in enumerate(ops, start=1):
        offset = block * BLOCK
        length = min(count * BLOCK, SIZE - offset)
        if kind == "write":
            data = fill * length
            journal.append(JournalEntry(seq, offset, length, seq, data))
            expected[offset : offset + length] = data
        elif kind == "zero":
            journal.append(JournalEntry(seq, offset, length, seq, None))
            expected[offset : offset + length] = bytes(length)
        else:
            journal.append(JournalEntry(seq, offset, length, seq, None, ref=True))
            expected[offset : offset + length] = image[offset : offset + length]

    def read_image(offset: int, length: int) -> bytes:
        return image[offset : offset + length]

    msg, last, _ = asyncio.run(encode_entries("d0", journal, 1 << 30, 1, None, read_image))
    assert last == len(ops)
    data = b"".join(msg.payload_parts())  # what the frame carries
    replica = bytearray(b"\xee" * SIZE)
    for extent in decode_batch(data).extents:
        if extent.data is None:
            replica[extent.offset : extent.offset + extent.length] = bytes(extent.length)
        else:
            replica[extent.offset : extent.offset + extent.length] = extent.data
            if any(e.ref for e in journal):
                for pos in range(0, extent.length - BLOCK + 1, BLOCK):
                    chunk = extent.data[pos : pos + BLOCK]
                    at = extent.offset + pos
                    covered_by_write = any(
                        e.data is not None and e.offset <= at < e.offset + e.length for e in journal
                    )
                    assert covered_by_write or chunk != bytes(BLOCK), (
                        f"an all-zero block of a reference at {at} travelled as data"
                    )
    assert replica == expected


def test_a_reference_without_an_image_is_refused() -> None:
    with pytest.raises(ValueError, match="reference"):
        asyncio.run(
            encode_entries("d0", [JournalEntry(1, 0, BLOCK, 1, None, ref=True)], 1 << 20, 1)
        )


def test_references_count_toward_the_batch_size() -> None:
    """A batch stops before the reference that would take it past ``max_batch``."""
    journal = [JournalEntry(s, (s - 1) << 20, 1 << 20, s, None, ref=True) for s in range(1, 9)]
    image = b"\x01" * (8 << 20)
    msg, last, raw = asyncio.run(
        encode_entries("d0", journal, 3 << 20, 1, None, lambda o, n: image[o : o + n])
    )
    assert last == 3 and raw == 3 << 20
    assert sum(e.length for e in decode_batch(b"".join(msg.payload_parts())).extents) == 3 << 20


writes_and_zeroes = st.lists(
    st.tuples(
        st.booleans(),  # a write (else a zero extent)
        st.integers(0, 63),  # block
        st.integers(1, 3),  # blocks
        st.booleans(),  # the write's data as a memoryview (a record read back from the file)
    ),
    min_size=1,
    max_size=16,
)


@given(ops=writes_and_zeroes)
@settings(max_examples=300, deadline=None)
def test_disjoint_records_skip_the_coalescer_with_the_same_extents(ops: list) -> None:
    """The shipper's fast path for records that do not overlap gives exactly the Coalescer's
    extents and data bytes; for records that overlap it declines (the Coalescer decides)."""
    journal: list[JournalEntry] = []
    coalescer = Coalescer()
    covered: set[int] = set()
    overlap = False
    for seq, (write, block, count, as_view) in enumerate(ops, start=1):
        offset, length = block * BLOCK, count * BLOCK
        blocks = set(range(block, block + count))
        overlap |= bool(covered & blocks)
        covered |= blocks
        if write:
            data = bytes([seq]) * length
            journal.append(
                JournalEntry(seq, offset, length, seq, memoryview(data) if as_view else data)
            )
            coalescer.add_data(offset, data)
        else:
            journal.append(JournalEntry(seq, offset, length, seq, None))
            coalescer.add_zero(offset, length)
    fast = disjoint_extents(journal)
    if overlap:
        assert fast is None
        return
    assert fast is not None
    extents, raw = fast
    assert extents == coalescer.extents()
    assert raw == coalescer.raw_bytes
    # A run of one record keeps that record's buffer (a view is not copied here: encoding
    # copies it once, or the transport takes it as it is); a merged run is joined once.
    by_place = {(e.offset, e.length): e for e in journal if e.data is not None}
    for e in extents:
        if e.data is None:
            continue
        entry = by_place.get((e.offset, e.length))
        if entry is not None:
            assert e.data is entry.data
        else:
            assert type(e.data) is bytes


def test_a_reference_never_takes_the_fast_path() -> None:
    journal = [
        JournalEntry(1, 0, BLOCK, 1, b"\1" * BLOCK),
        JournalEntry(2, 8 * BLOCK, BLOCK, 2, None, ref=True),
    ]
    assert disjoint_extents(journal) is None
