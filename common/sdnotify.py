"""sd_notify(3) for the services: ``READY=1``, ``STATUS=``, ``WATCHDOG=1``, ``RELOADING=1`` and
``STOPPING=1`` as datagrams to ``$NOTIFY_SOCKET`` (systemd ``Type=notify``).

Rules it keeps:
- Without ``$NOTIFY_SOCKET`` every call is a no-op, so the same binary runs under
  systemd, in a container or from a shell.
- A send never blocks the event loop and never raises: a service must not die
  because its supervisor went away. A failure is logged once.
- The watchdog interval is half of ``$WATCHDOG_USEC`` and is honoured only when
  ``$WATCHDOG_PID`` is unset or names this process (as sd_watchdog_enabled(3)).
- The protocol is pure text; :func:`encode` is tested without sockets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("tidemark.sdnotify")
MAX_STATUS = 200  # keep STATUS= short: systemctl shows it on one line


def encode(fields: Mapping[str, str | int]) -> bytes:
    """``{"READY": 1, "STATUS": "x"}`` → ``b"READY=1\\nSTATUS=x"``. Newlines in values are
    replaced (a value must stay one line). Raises ValueError on a bad field name."""
    lines = []
    for key, value in fields.items():
        if not key or not key.replace("_", "").isalnum() or not key.isupper():
            raise ValueError(f"bad sd_notify field name {key!r}")
        text = str(value).replace("\n", " ").replace("\r", " ")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode("utf-8", "replace")


def _address(env: Mapping[str, str]) -> str | None:
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr:
        return None
    if addr.startswith("@"):  # abstract namespace
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    return None  # vsock: and other forms are not used by tidemark's units


def watchdog_interval(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings (half the configured timeout), or None."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    wd_pid = env.get("WATCHDOG_PID", "")
    if wd_pid and wd_pid.isdigit() and int(wd_pid) != (pid if pid is not None else os.getpid()):
        return None
    return int(usec) / 1e6 / 2


class Notifier:
    """One service's channel to systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env)
        self.watchdog_interval = watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._failed = False
        self.last_status = ""
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram; True when it was sent (False without a supervisor)."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto(encode(fields), self.address)
        except OSError as exc:  # includes BlockingIOError: a full queue drops the message
            if not self._failed:
                log.warning("event=sd_notify_failed socket=%r error=%r", self.address, str(exc))
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> None:
        self.last_status = status[:MAX_STATUS]
        self.notify(READY=1, STATUS=self.last_status, MAINPID=os.getpid())

    def status(self, text: str) -> None:
        """Send ``STATUS=`` only when it changed."""
        text = text[:MAX_STATUS]
        if text != self.last_status:
            self.last_status = text
            self.notify(STATUS=text)

    def reloading(self) -> None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(RELOADING=1, STATUS="reloading configuration", MONOTONIC_USEC=monotonic_usec)

    def reloaded(self, status: str) -> None:
        self.last_status = status[:MAX_STATUS]
        self.notify(READY=1, STATUS=self.last_status)

    def stopping(self, status: str = "stopping") -> None:
        self.last_status = status[:MAX_STATUS]
        self.notify(STOPPING=1, STATUS=self.last_status)

    def watchdog(self) -> None:
        self.notify(WATCHDOG=1)

    async def run_watchdog(self, healthy: Callable[[], bool] | None = None) -> None:
        """Ping the watchdog forever (until cancelled) while ``healthy()`` holds. The ping runs
        on the event loop, so a blocked loop stops the pings and systemd restarts the service."""
        if self.watchdog_interval is None or self._sock is None:
            return
        while True:
            if healthy is None or healthy():
                self.watchdog()
            else:
                log.error("event=watchdog_withheld reason=unhealthy")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


__all__ = ["Notifier", "encode", "watchdog_interval"]
