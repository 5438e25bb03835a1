"""A tiny local admin channel: JSON lines over a unix socket in the state directory.

The CLI (`status`, later `points`, `failover`...) asks the running service through
it. Rule: the socket is created 0600 inside the state directory; a request is one
JSON object of at most 64 KiB, the answer one JSON object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("tidemark.admin")
MAX_REQUEST = 64 << 10
CLOSE_GRACE = 1.0  # seconds a closing server gives the requests in progress to answer
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class AdminServer:
    """Serves JSON requests on a unix socket; ``handlers`` maps a command name to a coroutine."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None
        self._serving: set[asyncio.Task[Any]] = set()  # requests being answered

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_REQUEST
        )
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        """Stop listening; requests in progress get ``CLOSE_GRACE`` to answer (a ``wait``
        answers that the service is stopping), then the loop's end cuts them off."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._serving:
            await asyncio.wait(set(self._serving), timeout=CLOSE_GRACE)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("request must be a JSON object")
                handler = self.handlers.get(str(request.get("cmd")))
                if handler is None:
                    reply: dict[str, Any] = {
                        "ok": False,
                        "error": f"unknown command {request.get('cmd')!r}",
                    }
                else:
                    reply = await handler(request)
            except ValueError as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, asyncio.LimitOverrunError, ConnectionError, OSError) as exc:
            log.warning("event=admin_request_failed error=%r", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            if task is not None:
                self._serving.discard(task)


async def admin_request(
    path: Path, request: dict[str, Any], timeout: float = 30.0
) -> dict[str, Any]:
    """Send one request to a running service. Raises OSError when nothing listens, or when
    the service closes the connection without an answer (it stopped)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(str(path), limit=64 << 20), timeout
    )
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionResetError("the service closed the connection without an answer")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise OSError("bad admin reply")
        return reply
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
