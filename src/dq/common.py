"""Small helpers Dramatiq exposes in ``dramatiq.common``."""

from __future__ import annotations

import os
import queue as _queue
import time
from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

from dq import _sources as runtime
from dq.core.policy import backoff_ms, dq_name, q_name, xq_name
from dq.errors import QueueJoinTimeout

__all__ = [
    "compute_backoff",
    "current_millis",
    "dq_name",
    "getenv_int",
    "iter_queue",
    "join_all",
    "join_queue",
    "q_name",
    "xq_name",
]

T = TypeVar("T")


def compute_backoff(
    attempts: int,
    *,
    factor: int = 5,
    jitter: bool = True,
    max_backoff: int = 2000,
    max_exponent: int = 32,
) -> tuple[int, int]:
    """Return ``(attempts + 1, backoff_ms)``: Dramatiq's exponential backoff with jitter.

    The formula lives in `dq.core.policy.backoff_ms`; this draws its random numbers.
    """
    return attempts + 1, backoff_ms(
        attempts,
        factor=factor,
        max_backoff=max_backoff,
        max_exponent=max_exponent,
        jitter=jitter,
        draw=runtime.get_random().random(),
        cap_draw=runtime.get_random().random(),
    )


def current_millis() -> int:
    """Return the runtime clock's time in ms since the epoch."""
    return runtime.get_clock().now_ms()


def iter_queue(queue: _queue.Queue[T]) -> Iterator[T]:
    """Yield items from ``queue`` until it is empty, without blocking."""
    while True:
        try:
            yield queue.get_nowait()
        except _queue.Empty:
            return


def join_queue(queue: _queue.Queue[T], timeout: float | None = None) -> None:
    """Wait until every item put on ``queue`` was marked done.

    Args:
        queue: the queue.
        timeout: seconds to wait at most; None waits forever.

    Raises:
        QueueJoinTimeout: the timeout passed first.
    """
    if timeout is None:
        queue.join()
        return
    deadline = time.monotonic() + timeout
    with queue.all_tasks_done:
        while queue.unfinished_tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QueueJoinTimeout(f"queue join timed out after {timeout} seconds")
            queue.all_tasks_done.wait(remaining)


class _Joinable(Protocol):
    def join(self, *, timeout: int | None = ...) -> None: ...


def join_all(joinables: Iterable[_Joinable], timeout: int | None) -> None:
    """Join each of ``joinables`` within one shared budget of ``timeout`` ms."""
    deadline = None if timeout is None else time.monotonic() + timeout / 1000
    for joinable in joinables:
        left = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        joinable.join(timeout=left)


def getenv_int(name: str) -> int | None:
    """Return environment variable ``name`` as an int, or None when it is unset.

    Raises:
        ValueError: it is set but is not an integer (the message names it).
    """
    value = os.getenv(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None
