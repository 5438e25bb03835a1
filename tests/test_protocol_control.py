"""Control bodies: every one round-trips, and garbage gets ProtocolError, nothing else."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.control import (
    BulkBegin,
    BulkState,
    BulkSync,
    FailbackDigests,
    FailbackDone,
    FailbackRanges,
    FailbackVerify,
    Freeze,
    Frozen,
    PointHeld,
    PointMark,
    PointRecorded,
    PointRelease,
    PointRequest,
    Unfreeze,
    decode_control,
    encode_control,
)
from protocol.errors import ProtocolError
from protocol.frames import Control, FrameDecoder, encode_message

SAMPLES = [
    PointMark("p-1", "web01-root", 42, 1_700_000_000, "crash-consistent", "", "", 0.0),
    PointMark("g:1", "d", 0, 0, "app-consistent", "before upgrade", "app", 1.5),
    PointRecorded("p-1", "web01-root"),
    PointRequest("manual-1", ("a", "b"), "manual", "t", "", 5.0),
    PointHeld(True, {"a": 1, "b": 2}),
    PointHeld(False, {}, "not replicating"),
    PointRelease("manual-1", True, 123),
    Freeze("a", 60.0),
    Frozen("a", True, 9),
    Unfreeze("a"),
    FailbackRanges("a", ((0, 4096), (1 << 40, 1)), False, False, True),
    FailbackDigests("a", 0, 4 << 20, "00" * 32, True),
    FailbackVerify("a", 4 << 20),
    FailbackDone("a", 17),
    BulkBegin("web01-root"),
    BulkSync("a", 0, True),
    BulkSync("a", 2**64 - 1, False),
    BulkState("a", True, 12, 10),
    BulkState("a", False, 3, 3, "the cache is half full"),
]


@pytest.mark.parametrize("body", SAMPLES, ids=lambda b: b.NAME)
def test_every_body_round_trips_through_a_frame(body) -> None:
    frame = encode_message(encode_control(body, 7))
    decoder = FrameDecoder()
    decoder.receive_data(frame)
    msg = decoder.next_message()
    assert isinstance(msg, Control) and msg.request_id == 7
    assert decode_control(msg) == body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
names = st.sampled_from([b.NAME for b in SAMPLES] + ["nope", "point-markx"])


@given(names, st.dictionaries(st.text(max_size=12), json_values, max_size=8))
@settings(max_examples=400, deadline=None)
def test_garbage_bodies_get_protocol_errors_only(name, body) -> None:
    with contextlib.suppress(ProtocolError):
        decode_control(Control(name, 0, json.dumps(body)))


@given(names, st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_non_json_gets_a_protocol_error(name, text) -> None:
    with contextlib.suppress(ProtocolError):
        decode_control(Control(name, 0, text))


@given(st.sampled_from(SAMPLES), st.data())
@settings(max_examples=300, deadline=None)
def test_mutated_fields_are_checked(body, data) -> None:
    doc = json.loads(encode_control(body).body)
    key = data.draw(st.sampled_from(sorted(doc)))
    doc[key] = data.draw(json_values)
    try:
        decoded = decode_control(Control(body.NAME, 0, json.dumps(doc)))
    except ProtocolError:
        return
    assert decode_control(encode_control(decoded)) == decoded  # what is accepted is well-formed
