"""The benchmarks' counting proxy (``benchmarks.proxy.CountingProxy``, splice-based): bytes pass
through unchanged and are counted exactly in each direction; ``cut`` breaks the open
connections and the listener stays; ``close`` ends every thread and the port."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from benchmarks.proxy import CountingProxy
from tests.bench_helpers import loopback_server


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A loopback server that sends back every byte reversed in blocks (not a mirror of the
    proxy: the reply is computed from what arrived)."""

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data[::-1])

    with loopback_server(serve) as port:
        yield port


def test_bytes_pass_unchanged_and_are_counted(echo_port: int) -> None:
    payload = os.urandom(5 << 20)
    with (
        CountingProxy(echo_port) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port)) as sock,
    ):
        received = bytearray()
        for i in range(0, len(payload), 1 << 20):
            block = payload[i : i + (1 << 20)]
            sock.sendall(block)
            reply = _recv_exact(sock, len(block))
            received += reply
            assert sorted(reply) == sorted(block)  # same bytes (the echo reverses its reads)
        assert proxy.bytes_up == len(payload)
        assert proxy.bytes_down == len(payload)
        assert proxy.total == 2 * len(payload)
        assert proxy.connections == 1
        proxy.reset()
        sock.sendall(b"abc")
        assert _recv_exact(sock, 3) == b"cba"
        assert (proxy.bytes_up, proxy.bytes_down) == (3, 3)


def test_cut_breaks_connections_and_keeps_listening(echo_port: int) -> None:
    with CountingProxy(echo_port) as proxy:
        first = socket.create_connection(("127.0.0.1", proxy.port))
        first.sendall(b"x")
        assert _recv_exact(first, 1) == b"x"
        proxy.cut()
        first.settimeout(10)
        with pytest.raises((ConnectionError, OSError)):  # EOF (ConnectionError) or a reset
            first.sendall(b"y")
            _recv_exact(first, 1)
        first.close()
        with socket.create_connection(("127.0.0.1", proxy.port)) as second:
            second.sendall(b"hello")
            assert _recv_exact(second, 5) == b"olleh"
        assert proxy.connections == 2


def _proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("counting-proxy")]


def test_close_ends_threads_and_port(echo_port: int) -> None:
    assert _proxy_threads() == []
    proxy = CountingProxy(echo_port)
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.sendall(b"ping")
    assert _recv_exact(sock, 4) == b"gnip"
    proxy.close()
    sock.settimeout(10)
    with contextlib.suppress(ConnectionResetError):  # a reset, or...
        assert sock.recv(1) == b""  # ...EOF; never data, never a hang
    sock.close()
    assert _proxy_threads() == []  # the accept loop and both pumps are gone
    proxy.close()  # a second close is harmless
    proxy.cut()  # and so is a cut after it
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
