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
