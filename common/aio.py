"""Small asyncio helpers.

Rule: an exception raised inside a TaskGroup reaches callers as the leaf
exception that caused it, so error classification (temporary vs permanent)
works the same with and without task groups.
"""

from __future__ import annotations

import asyncio


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
