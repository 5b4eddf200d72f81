"""`RateLimiterBackend`: the storage primitives every rate limiter is built from."""

from __future__ import annotations

import abc
from collections.abc import Callable

__all__ = ["RateLimiterBackend"]


class RateLimiterBackend(abc.ABC):
    """Base class of rate-limiter backends: a few atomic operations on integer
    counters, plus an optional notification channel used by blocking barriers.

    Keys are used as given (no namespace is added). Every ``ttl`` is in milliseconds;
    a successful write refreshes the key's TTL, and a refused operation writes
    nothing. Arguments are positional, as Dramatiq's (limiters also pass some by
    keyword: keep the names).
    """

    @abc.abstractmethod
    def add(self, key: str, value: int, ttl: int) -> bool:
        """Set ``key`` to ``value`` only if it does not exist.

        Returns:
            Whether the key was set.
        """

    @abc.abstractmethod
    def incr(self, key: str, amount: int, maximum: int, ttl: int) -> bool:
        """Add ``amount`` to ``key`` (a missing key counts as 0) unless the new value
        would exceed ``maximum``.

        Returns:
            Whether the key was incremented.
        """

    @abc.abstractmethod
    def decr(self, key: str, amount: int, minimum: int, ttl: int) -> bool:
        """Subtract ``amount`` from ``key`` (a missing key counts as 0) unless the new
        value would fall below ``minimum``.

        Returns:
            Whether the key was decremented.
        """

    @abc.abstractmethod
    def incr_and_sum(
        self, key: str, keys: Callable[[], list[str]], amount: int, maximum: int, ttl: int
    ) -> bool:
        """Add ``amount`` to ``key`` unless ``key`` itself, or the sum of the keys
        ``keys()`` returns (missing keys count as 0), would then exceed ``maximum``.

        Returns:
            Whether the key was incremented.
        """

    def wait(self, key: str, timeout: int | None) -> bool:
        """Block until `wait_notify` is called on ``key`` or ``timeout`` ms pass.

        Returns:
            Whether a notification arrived (or was already there) in time.

        Raises:
            NotImplementedError: this backend cannot block (the default).
        """
        raise NotImplementedError(f"{type(self).__name__} does not support blocking waits")

    def wait_notify(self, key: str, ttl: int) -> None:  # noqa: B027 - a no-op by default
        """Wake every party waiting on ``key``, and leave a notification that lasts
        ``ttl`` ms for parties that wait later. The default does nothing."""
