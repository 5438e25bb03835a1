"""Small asyncio helpers.

Rules: an exception raised inside a TaskGroup reaches callers as the leaf
exception that caused it, so error classification (temporary vs permanent)
works the same with and without task groups; a cancellation is never lost
(see :func:`wait_event`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def first_leaf(group: BaseExceptionGroup) -> BaseException:  # type: ignore[type-arg]
    """The first non-cancellation leaf of an exception group (or the first leaf)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if not isinstance(leaf, asyncio.CancelledError):
            return leaf
    return leaves[0] if leaves else group


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``event``; True if it is set, False on timeout.

    Use this, not ``asyncio.wait_for(event.wait(), timeout)``: on Python 3.11 ``wait_for``
    returns normally when its task is cancelled just after the event was set, so the
    cancellation is lost and a task group waiting for that task to end waits forever. Here
    there is no inner task, and a cancellation always propagates.
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def to_thread_outliving_cancel(
    func: Callable[..., T], *args: Any, on_abandoned: Callable[[T], None] | None = None
) -> T:
    """``asyncio.to_thread(func, *args)``, except that a cancelled caller returns (re-raising
    the cancellation) only once the thread is done: a thread cannot be stopped, so what it
    works on must not be closed or handed on under it. ``on_abandoned`` gets a result the
    cancelled caller no longer takes (to close it, say)."""
    work = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await asyncio.wait({work})
        if on_abandoned is not None and not work.cancelled() and work.exception() is None:
            on_abandoned(work.result())
        raise


class ProtocolWaits:
    """The waiting half of an asyncio protocol, for the coroutines that use it: one reader
    waiting for data (``_await_data``, woken by ``_wake``) and writers waiting while the
    transport is over its high-water mark (``_await_writable``, woken by the transport's
    ``resume_writing``, failed by ``_fail_writers`` when the connection is lost)."""

    def __init__(self) -> None:
        self._data_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def _fail_writers(self, message: str) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError(message))
        self._drain_waiters.clear()

    async def _await_writable(self) -> None:
        if not self._writing_paused:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _wake(self) -> None:
        waiter = self._data_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _await_data(self) -> None:
        waiter = self._data_waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._data_waiter = None
