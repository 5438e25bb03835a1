"""A TCP proxy on loopback that counts every byte between agent and process server.

Wire-byte figures (resync cost, initial-sync cost) are measured here, outside the code
under test: TLS records pass through untouched (the agent authenticates the server by its
certificate name, not its address). The bytes move by ``splice(2)`` through a pipe, in the
kernel, one thread per direction, never through Python (the asyncio copy loop it replaced
was sampled by ``perf`` at about 0.7x the agent's CPU during an initial sync, on the same
two cores). Rule: it only ever listens on and connects to loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import threading
from collections.abc import Awaitable, Callable

SPLICE_BYTES = 1 << 20  # per splice call (the pipe is grown to this size)
_F_SETPIPE_SZ = 1031


class _Link:
    """One proxied connection: the agent's socket and the one to the server. Its sockets
    are shut down and closed under ``lock`` (no shutdown lands on a reused fd number)."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.lock = threading.Lock()
        self.finished = 0
        self.closed = False

    def shutdown(self) -> None:
        """End both directions (wakes both pumps); the peers see the connection end."""
        with self.lock:
            if self.closed:
                return
            for sock in (self.client, self.upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def pump_done(self) -> bool:
        """Called by each pump as it ends; the second one closes both sockets."""
        with self.lock:
            self.finished += 1
            if self.finished < 2:
                return False
            self.closed = True
            for sock in (self.client, self.upstream):
                sock.close()
            return True


class CountingProxy:
    """``127.0.0.1:port`` → ``127.0.0.1:target_port``; ``bytes_up`` is agent → server."""

    def __init__(self, target_port: int, *, listen_port: int = 0) -> None:
        self.target_port = target_port
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", listen_port))
        self.listen_port = listen_port
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []  # the pumps (dead ones pruned)
        self._accepter = threading.Thread(target=self._accept, name="counting-proxy", daemon=True)
        self._accepter.start()

    @property
    def total(self) -> int:
        return self.bytes_up + self.bytes_down

    def reset(self) -> None:
        with self._lock:
            self.bytes_up = self.bytes_down = 0

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self.connections += 1
                self._links.add(link)
                self._threads = [t for t in self._threads if t.is_alive()]
                for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                    thread = threading.Thread(
                        target=self._pump,
                        args=(link, src, dst, up),
                        name="counting-proxy-pump",
                        daemon=True,
                    )
                    self._threads.append(thread)
                    thread.start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        read_end, write_end = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, SPLICE_BYTES)
        try:
            while True:
                n = os.splice(src.fileno(), write_end, SPLICE_BYTES)
                if n == 0:
                    break
                with self._lock:
                    if upstream:
                        self.bytes_up += n
                    else:
                        self.bytes_down += n
                while n:
                    n -= os.splice(read_end, dst.fileno(), n)
        except OSError:
            pass
        finally:
            os.close(read_end)
            os.close(write_end)
            link.shutdown()  # one direction ended: so does the other (as the stream proxy did)
            if link.pump_done():
                with self._lock:
                    self._links.discard(link)

    def cut(self) -> None:
        """Break every open connection: both peers see it end (EOF, or a reset where
        unread data was left); the listener stays."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.shutdown()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links = list(self._links)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for link in links:
            link.shutdown()
        self._accepter.join(10)
        for thread in list(self._threads):
            thread.join(10)

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_loop_thread(
    loop: asyncio.AbstractEventLoop,
    thread: threading.Thread,
    close_sockets: Callable[[], Awaitable[None]],
) -> None:
    """Stop a proxy's event loop running in ``thread``: ``close_sockets`` on the loop, a few
    turns for the pumps to see the aborts, every other task cancelled and awaited, then the
    loop stopped, the thread joined and the loop closed."""

    async def shutdown() -> None:
        await close_sockets()
        for _ in range(3):
            await asyncio.sleep(0)  # let the pumps see the aborts and finish
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
