"""The kernel's wire-byte counts (``benchmarks.tcp_bytes``): ``ss`` output parsed, real
loopback connections counted to the byte against what the test itself sent, and a window
whose bytes cannot all be counted refused rather than under-reported."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.tcp_bytes import Counts, WireCountError, connections_to, parse_ss, wire_between
from tests.bench_helpers import loopback_server, require_tools

# As iproute2 6.1 printed it for a loopback connection (one line, wrapped here).
LINE = (
    "0      0      127.0.0.1:41544 127.0.0.1:34085 bbr wscale:10,10 rto:204 rtt:0.029/0.019 "
    "ato:40 mss:65483 pmtu:65535 rcvmss:1234 advmss:65483 cwnd:18 bytes_sent:1000000 "
    "bytes_acked:1000001 bytes_received:1234 segs_out:27 segs_in:21 data_segs_out:24 "
    "data_segs_in:1 send 325156965517bps lastsnd:4 lastrcv:4 lastack:4 delivered:25"
)


def test_a_connection_line_gives_its_endpoints_and_both_directions() -> None:
    assert parse_ss(LINE + "\n\n") == {
        ("127.0.0.1:41544", "127.0.0.1:34085"): Counts(up=1_000_000, down=1234)
    }


def test_counts_ss_leaves_out_are_zero_and_ipv6_addresses_parse() -> None:
    line = "0 0 [::1]:5000 [::1]:6000 cubic wscale:7,7 rto:204 bytes_acked:1 segs_out:2"
    assert parse_ss(line) == {("[::1]:5000", "[::1]:6000"): Counts(0, 0)}


def test_a_line_that_is_not_a_connection_is_refused() -> None:
    with pytest.raises(ValueError, match="not an ss connection line"):
        parse_ss("State Recv-Q Send-Q Local Peer")


@given(st.text(max_size=300))
def test_garbage_gives_counts_or_a_clear_error(text: str) -> None:
    try:
        out = parse_ss(text)
    except ValueError as exc:
        assert "not an ss connection line" in str(exc)
    else:
        assert all(c.up >= 0 and c.down >= 0 for c in out.values())


A, B = ("127.0.0.1:1", "127.0.0.1:9"), ("127.0.0.1:2", "127.0.0.1:9")


def test_a_window_counts_what_each_connection_carried_in_it() -> None:
    before = {A: Counts(100, 10)}
    after = {A: Counts(250, 30), B: Counts(7, 5)}  # A went on, B was made in the window
    assert wire_between(before, after, connects=1) == Counts(157, 25)


def test_a_connection_gone_in_the_window_is_an_error_not_a_smaller_count() -> None:
    with pytest.raises(WireCountError, match="closed in the window"):
        wire_between({A: Counts(1, 1)}, {B: Counts(5, 5)}, connects=1)


def test_a_window_with_a_failed_session_is_an_error_whatever_the_connections_say() -> None:
    with pytest.raises(WireCountError, match="1 of the client's sessions failed"):
        wire_between({A: Counts(1, 1)}, {A: Counts(5, 5)}, connects=0, failed=1)


def test_more_connections_made_than_still_open_is_an_error() -> None:
    with pytest.raises(WireCountError, match="2 connections made in the window, 1"):
        wire_between({}, {B: Counts(5, 5)}, connects=2)
    with pytest.raises(WireCountError, match="0 connections made in the window, 1"):
        wire_between({}, {B: Counts(5, 5)}, connects=0)


def test_counts_that_go_back_are_an_error() -> None:
    with pytest.raises(WireCountError, match="went back"):
        wire_between({A: Counts(100, 10)}, {A: Counts(50, 10)}, connects=0)


@pytest.fixture
def sink_port() -> Iterator[int]:
    """A loopback server that reads everything and replies 1000 bytes once 3,000,000 have
    arrived, 10 more once 3,000,500 have (a reply carries the acknowledgement of what came
    before it: a client that has read it sees its bytes acknowledged)."""

    def serve(conn: socket.socket) -> None:
        with conn:
            got = 0
            while data := conn.recv(1 << 16):
                for mark, reply in ((3_000_000, 1000), (3_000_500, 10)):
                    if got < mark <= got + len(data):
                        conn.sendall(b"r" * reply)
                got += len(data)

    with loopback_server(serve) as port:
        yield port


def test_real_connections_are_counted_to_the_byte(sink_port: int) -> None:
    require_tools("ss")
    before = connections_to(sink_port)
    assert before == {}
    with socket.create_connection(("127.0.0.1", sink_port)) as sock:
        sock.sendall(b"x" * 3_000_000)
        reply = b""
        while len(reply) < 1000:
            reply += sock.recv(4096)
        middle = connections_to(sink_port)
        assert list(middle.values()) == [Counts(3_000_000, 1000)]
        sock.sendall(b"y" * 500)
        assert len(sock.recv(4096)) == 10
        after = connections_to(sink_port)
        assert wire_between(middle, after, connects=0) == Counts(500, 10)
        assert wire_between(before, after, connects=1) == Counts(3_000_500, 1010)
    # Closed: the kernel no longer counts it, and the window says so.
    with pytest.raises(WireCountError):
        wire_between(before, connections_to(sink_port), connects=1)


def test_a_connection_to_another_address_on_the_same_port_is_not_counted(sink_port: int) -> None:
    require_tools("ss")
    with (
        socket.create_server(("127.0.0.2", sink_port)) as other,
        socket.create_connection(("127.0.0.2", sink_port)) as sock,
    ):
        sock.sendall(b"z" * 10_000)
        peer, _ = other.accept()
        with peer:
            got = 0
            while got < 10_000:
                got += len(peer.recv(1 << 16))
            peer.sendall(b"!")  # with it, the acknowledgement of the 10,000
            assert sock.recv(1) == b"!"
            assert connections_to(sink_port) == {}
            assert list(connections_to(sink_port, "127.0.0.2").values()) == [Counts(10_000, 1)]
