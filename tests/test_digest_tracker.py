"""DigestTracker: after writes that touch their chunks, ``current`` equals a fresh full hash
(computed here by ``chunk_digests`` on a copy), with only the touched chunks re-read."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.digests import DigestTracker, chunk_digests, verify_chunk

SIZE = 1 << 20
CHUNK = 64 << 10

writes = st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 100_000)), max_size=20)


@given(writes, st.booleans())
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_current_equals_a_fresh_hash(tmp_path: Path, ops, during_start: bool) -> None:
    path = tmp_path / "img"
    path.write_bytes(os.urandom(SIZE // 2))
    os.truncate(path, SIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        tracker = DigestTracker(fd, SIZE, CHUNK)
        starter = threading.Thread(target=tracker.start)
        if not during_start:
            starter.start()
            starter.join()
        else:
            starter.start()  # writes race the first hash: their chunks are hashed again
        for offset, length in ops:
            length = min(length, SIZE - offset)
            os.pwrite(fd, os.urandom(length), offset)
            tracker.touch(offset, length)
        starter.join()
        expected = chunk_digests(fd, 0, SIZE, CHUNK, SIZE).digests
        assert tracker.current() == expected
        touched = {o // CHUNK for o, n in ops for o in range(o, min(SIZE, o + n), CHUNK)}
        assert tracker.rehashed_bytes <= (len(touched) + len(ops)) * CHUNK
    finally:
        os.close(fd)


def test_verify_chunk_bounds_the_digest_count() -> None:
    assert verify_chunk(4 << 30) == 64 << 10
    assert (1 << 40) // verify_chunk(1 << 40) <= 65536
