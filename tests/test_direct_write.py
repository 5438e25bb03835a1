"""Replica writes that bypass the page cache: only aligned extents of at least 64 KiB that
land in a hole go direct, and whatever path a write takes, the file reads back as the
writes applied in order (checked with plain reads of a separate descriptor and a model
built here)."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.direct_write import DIRECT_MIN, DirectWriter
from common.durable import pwrite_all

SIZE = 4 << 20
BLOCK = 4096


def _replica(tmp: Path) -> tuple[Path, int]:
    path = tmp / "replica.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, SIZE)
    return path, fd


def test_only_aligned_extents_into_holes_go_direct(tmp_path: Path) -> None:
    path, fd = _replica(tmp_path)
    writer = DirectWriter(path, "d0")
    if not writer.enabled:
        pytest.skip("O_DIRECT is not available on this filesystem")  # tmpfs before 6.6
    try:
        data = os.urandom(DIRECT_MIN * 2)
        assert writer.try_write(fd, data, 0), "aligned, long enough, into a hole"
        assert not writer.try_write(fd, data, DIRECT_MIN), "half of it lands on data now"
        assert not writer.try_write(fd, data[: DIRECT_MIN - BLOCK], 1 << 20), "too short"
        assert not writer.try_write(fd, data, (1 << 20) + 512), "unaligned offset"
        assert not writer.try_write(fd, data[:-512], 1 << 20), "unaligned length"
        assert writer.written_bytes == len(data)
        with open(path, "rb") as f:  # another descriptor, through the page cache
            assert f.read(len(data)) == data
            assert f.read(BLOCK) == bytes(BLOCK)
    finally:
        writer.close()
        os.close(fd)


def test_a_piece_decoded_into_the_buffer_is_written_from_it(tmp_path: Path) -> None:
    """``buffer_for`` hands out the aligned buffer only where the write would go directly;
    ``write_buffer`` writes what was put there, read back through the page cache."""
    path, fd = _replica(tmp_path)
    writer = DirectWriter(path, "d0", buffer_bytes=1 << 20)
    if not writer.enabled:
        pytest.skip("O_DIRECT is not available on this filesystem")  # tmpfs before 6.6
    try:
        assert writer.buffer_for(0, DIRECT_MIN - BLOCK) is None, "too short"
        assert writer.buffer_for(512, DIRECT_MIN) is None, "unaligned offset"
        assert writer.buffer_for(0, DIRECT_MIN + 512) is None, "unaligned length"
        assert writer.buffer_for(0, (1 << 20) + BLOCK) is None, "longer than the buffer"
        for offset, seed in ((BLOCK, 1), (2 << 20, 2)):  # the buffer reused
            view = writer.buffer_for(offset, DIRECT_MIN * 2)
            assert view is not None and len(view) == DIRECT_MIN * 2
            data = random.Random(seed).randbytes(len(view))
            view[:] = data
            view.release()
            assert writer.write_buffer(offset, len(data))
            with open(path, "rb") as f:  # another descriptor, through the page cache
                f.seek(offset)
                assert f.read(len(data)) == data
                assert f.read(BLOCK) == bytes(BLOCK)
        assert writer.written_bytes == 4 * DIRECT_MIN
    finally:
        writer.close()
        os.close(fd)


def test_a_direct_write_refused_leaves_the_bytes_in_the_view_for_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that refuses the alignment (``EINVAL``): ``write_buffer`` turns direct writes
    off and returns False, and the view the piece was decoded into still holds its bytes,
    which the caller writes through the page cache (process_server/bulk.py)."""
    path, fd = _replica(tmp_path)
    writer = DirectWriter(path, "d0", buffer_bytes=1 << 20)
    if not writer.enabled:
        pytest.skip("O_DIRECT is not available on this filesystem")  # tmpfs before 6.6
    try:
        view = writer.buffer_for(BLOCK, DIRECT_MIN)
        assert view is not None
        data = random.Random(5).randbytes(len(view))
        view[:] = data

        def refuse(fd: int, data: object, offset: int) -> None:
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr("common.direct_write.pwrite_all", refuse)
        assert not writer.write_buffer(BLOCK, len(data))
        monkeypatch.undo()
        assert not writer.enabled and writer.written_bytes == 0
        assert writer.buffer_for(BLOCK, DIRECT_MIN) is None, "off for good"
        assert bytes(view) == data
        pwrite_all(fd, view, BLOCK)
        view.release()
        with open(path, "rb") as f:
            f.seek(BLOCK)
            assert f.read(len(data)) == data
    finally:
        writer.close()
        os.close(fd)


ops = st.lists(
    st.tuples(
        st.integers(0, SIZE // BLOCK - 1),  # block
        st.sampled_from([1, 4, 15, 16, 17, 64, 300]),  # blocks
        st.sampled_from([0, 0, 0, 512]),  # misalignment
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=25,
)


@given(ops=ops)
@settings(max_examples=40, deadline=None)
def test_writes_read_back_as_applied_whatever_path_they_take(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[int, int, int, int]]
) -> None:
    path, fd = _replica(tmp_path_factory.mktemp("direct"))
    writer = DirectWriter(path, "d0")
    model = bytearray(SIZE)
    try:
        for block, blocks, skew, fill in ops:
            offset = block * BLOCK + skew
            length = min(blocks * BLOCK, SIZE - offset)
            data = bytes([fill]) * length
            if not writer.try_write(fd, data, offset):
                pwrite_all(fd, data, offset)
            model[offset : offset + length] = data
        with open(path, "rb") as f:
            assert f.read() == bytes(model)
    finally:
        writer.close()
        os.close(fd)


@settings(max_examples=50, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=20000),
    offset=st.integers(0, 1 << 16),
    cuts=st.lists(st.integers(1, 5000), max_size=6),
)
def test_pwrite_all_finishes_short_writes(
    tmp_path_factory: pytest.TempPathFactory,
    data: bytes,
    offset: int,
    cuts: list[int],
) -> None:
    """A pwrite that writes less than asked (a signal, some devices) is continued where it
    stopped: the file holds every byte at its offset, read back with a plain read."""
    path = tmp_path_factory.mktemp("pw") / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    real, limits = os.pwrite, list(cuts)

    def short(fd_: int, buf: bytes | memoryview, at: int) -> int:
        n = min(len(buf), limits.pop(0)) if limits else len(buf)
        return real(fd_, memoryview(buf)[:n], at)

    try:
        with pytest.MonkeyPatch.context() as m:  # undone after each example
            m.setattr(os, "pwrite", short)
            pwrite_all(fd, data, offset)
        assert os.pread(fd, len(data) + 1, offset) == data
    finally:
        os.close(fd)
