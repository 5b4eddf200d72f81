"""`RateLimiter`: the base class of limiters, and `RateLimitExceeded`."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from dq.errors import RateLimitExceeded

if TYPE_CHECKING:
    from dq.rate_limits.backend import RateLimiterBackend

__all__ = ["RateLimitExceeded", "RateLimiter"]


class RateLimiter(abc.ABC):
    """Base class of rate limiters: `acquire` takes a slot, the ``with`` block holds it.

    Example::

        limiter = ConcurrentRateLimiter(backend, "distributed-mutex", limit=1)
        with limiter.acquire(raise_on_failure=False) as acquired:
            if not acquired:
                return
            ...

    Args:
        backend: where the limiter's counters live.
        key: the key to limit on (used as given: limiters sharing a key, dq's or
            Dramatiq's, share the limit).
    """

    def __init__(self, backend: RateLimiterBackend, key: str) -> None:
        self.backend = backend
        self.key = key

    @abc.abstractmethod
    def _acquire(self) -> bool:
        """Try to take a slot; return whether it was taken."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Give back a slot `_acquire` took."""

    @contextmanager
    def acquire(self, *, raise_on_failure: bool = True) -> Iterator[bool]:
        """Try to take a slot; the slot, if taken, is given back when the block exits.

        Args:
            raise_on_failure: raise when no slot is free (the default); when False,
                the block runs anyway and receives whether the slot was taken.

        Raises:
            RateLimitExceeded: no slot was free and ``raise_on_failure`` is true
                (inside an actor, this leads to an ordinary retry).
        """
        acquired = False
        try:
            acquired = self._acquire()
            if raise_on_failure and not acquired:
                raise RateLimitExceeded(f"rate limit exceeded for key {self.key!r}")
            yield acquired
        finally:
            if acquired:
                self._release()
