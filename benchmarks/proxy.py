"""A TCP proxy on loopback that counts every byte between agent and process server.

Wire-byte figures (resync cost, initial-sync cost) are measured here, outside the code
under test: TLS records pass through untouched (the agent authenticates the server by its
certificate name, not its address). Runs its own event loop in a background thread.
Rule: it only ever listens on and connects to loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable


class CountingProxy:
    """``127.0.0.1:port`` → ``127.0.0.1:target_port``; ``bytes_up`` is agent → server."""

    def __init__(self, target_port: int, *, listen_port: int = 0) -> None:
        self.target_port = target_port
        self.listen_port = listen_port
        self.port = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="counting-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def total(self) -> int:
        return self.bytes_up + self.bytes_down

    def reset(self) -> None:
        self.bytes_up = self.bytes_down = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(lambda loop, context: None)  # resets are the point here
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool
        ) -> None:
            try:
                while data := await src.read(1 << 16):
                    if upstream:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))
        finally:
            self._writers.difference_update((writer, up_writer))
            for w in (writer, up_writer):
                w.transport.abort()

    def cut(self) -> None:
        """Reset every open connection (the listener stays)."""

        def _cut() -> None:
            for w in list(self._writers):
                w.transport.abort()

        self._loop.call_soon_threadsafe(_cut)

    def close(self) -> None:
        async def close_sockets() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
            for w in list(self._writers):
                w.transport.abort()

        stop_loop_thread(self._loop, self._thread, close_sockets)

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
