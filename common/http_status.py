"""A tiny read-only HTTP/1.1 server on the service's event loop, for ``/metrics`` (Prometheus),
``/api/status`` (JSON) and the process server's status page.

Rules it keeps:
- Read-only: GET and HEAD only; every other method gets 405, and nothing a request
  says reaches the data path.
- Every input is bounded: the request head is at most 8 KiB and must arrive within
  10 seconds, one request per connection (``Connection: close``), at most 64
  connections at once; a bad request gets 400 and the connection is closed.
- Handlers run on the loop (they read the same status dicts the admin socket serves),
  so no lock and no thread is needed; a handler bug becomes a 500 and a log line.
- Pages forbid scripts and outside resources (``Content-Security-Policy``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from common.config import HostPort

log = logging.getLogger("tidemark.http")
MAX_HEAD = 8 << 10
HEAD_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
REASONS |= {500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


Handler = Callable[[dict[str, list[str]]], Response]


def text(status: int, message: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", (message + "\n").encode())


class HttpServer:
    """Serves ``routes`` (path → handler taking the query) on one TCP address."""

    def __init__(self, address: HostPort, routes: dict[str, Handler], name: str) -> None:
        self.address = address
        self.routes = dict(routes)
        self.name = name
        self._server: asyncio.AbstractServer | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self.port = 0
        self.requests = 0

    async def start(self) -> None:
        """Listen. Raises OSError when the address is taken or not local."""
        self._server = await asyncio.start_server(
            self._serve, self.address.host, self.address.port, limit=MAX_HEAD, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "event=http_listening name=%s address=%s:%d paths=%s",
            self.name,
            self.address.host,
            self.port,
            ",".join(sorted(self.routes)),
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            writer.close()
            return
        async with self._slots:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
                method, response = self._respond(head)
                self._write(writer, response, head_only=method == "HEAD")
                await writer.drain()
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                with contextlib.suppress(ConnectionError, OSError):
                    self._write(writer, text(400, "bad request"), head_only=False)
                    await writer.drain()
            except (TimeoutError, ConnectionError, OSError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()

    def _respond(self, head: bytes) -> tuple[str, Response]:
        line = head.split(b"\r\n", 1)[0].decode("ascii")  # UnicodeDecodeError is a ValueError
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ValueError("bad request line")
        method, target = parts[0], parts[1]
        self.requests += 1
        if method not in ("GET", "HEAD"):
            return method, text(405, "read-only: GET and HEAD only")
        url = urlsplit(target)
        handler = self.routes.get(url.path)
        if handler is None:
            return method, text(404, f"no page {url.path!r}; try {', '.join(sorted(self.routes))}")
        try:
            return method, handler(parse_qs(url.query, max_num_fields=16))
        except Exception as exc:  # a page bug must not take the service down; it is logged
            log.error("event=http_handler_failed path=%s error=%r", url.path, exc)
            return method, text(500, "internal error (see the service log)")

    @staticmethod
    def _write(writer: asyncio.StreamWriter, response: Response, *, head_only: bool) -> None:
        reason = REASONS.get(response.status, "Unknown")
        headers = [
            f"HTTP/1.1 {response.status} {reason}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in SECURITY_HEADERS),
        ]
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode())
        if not head_only:
            writer.write(response.body)


__all__ = ["HttpServer", "Response", "text"]
