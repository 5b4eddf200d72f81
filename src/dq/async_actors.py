"""Async actors' seam without asyncio: the process's event-loop thread slot, and
`async_to_sync`, which wraps an ``async def`` actor to run on that thread.

`dq.actor` wraps coroutine functions with `async_to_sync` when an actor is declared;
the event-loop thread itself (`dq.asyncio.EventLoopThread`) imports asyncio (several
MB), which a process without async actors never loads.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar

if TYPE_CHECKING:
    from dq.asyncio import EventLoopThread

__all__ = ["async_to_sync", "get_event_loop_thread", "set_event_loop_thread"]

P = ParamSpec("P")
R = TypeVar("R")

_event_loop_thread: EventLoopThread | None = None


def get_event_loop_thread() -> EventLoopThread | None:
    """Return the process's event-loop thread, or None when none is set."""
    return _event_loop_thread


def set_event_loop_thread(thread: EventLoopThread | None) -> None:
    """Install ``thread`` as the process's event-loop thread (None: remove it).

    The AsyncIO middleware does this; call it yourself to run async actors outside a
    `dq.Worker` (for example with `dq.runtime.Runner`).
    """
    global _event_loop_thread  # the process-global slot Dramatiq has
    _event_loop_thread = thread


def async_to_sync(async_fn: Callable[P, Awaitable[R]]) -> Callable[P, R]:
    """Wrap a coroutine function into a function that runs it on the event-loop
    thread and blocks the calling thread until it returns.

    Args:
        async_fn: the coroutine function (or any function returning an awaitable).

    Returns:
        A function with the same parameters that returns the awaited result. It
        raises `RuntimeError` when no event-loop thread is set (add the AsyncIO
        middleware), and re-raises whatever the coroutine raises.
    """

    @functools.wraps(async_fn)
    def run_on_event_loop_thread(*args: P.args, **kwargs: P.kwargs) -> R:
        thread = _event_loop_thread
        if thread is None:
            raise RuntimeError(
                f"Cannot run {getattr(async_fn, '__qualname__', async_fn)!r}: no event-loop "
                "thread is set. Have you added the AsyncIO middleware "
                "(dq.middleware.AsyncIO) to your broker?"
            )
        return thread.run_coroutine(async_fn(*args, **kwargs))

    return run_on_event_loop_thread
