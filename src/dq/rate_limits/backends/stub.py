"""`StubBackend`: an in-memory rate-limiter backend, for tests and single processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from dq.rate_limits.backend import RateLimiterBackend

__all__ = ["StubBackend"]

#: Purge expired keys when the store grows past this many (then past twice the
#: number left), so short-lived bucket keys do not pile up.
_PURGE_AT = 1024


class StubBackend(RateLimiterBackend):
    """Counters in a dict under one lock, with TTLs on the monotonic clock.

    It behaves as the Redis backend does, notifications included: a `wait_notify`
    leaves a notification that lasts its TTL, so a party that waits after the
    barrier cleared returns at once (Dramatiq's stub would miss it and time out).
    `wait` accepts ``timeout=None`` (wait as long as it takes).
    """

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self._changed = threading.Condition(self.mutex)
        #: key -> (value, monotonic expiry in seconds)
        self.db: dict[str, tuple[int, float]] = {}
        #: notification key -> monotonic expiry in seconds
        self._events: dict[str, float] = {}
        self._purge_at = _PURGE_AT

    def add(self, key: str, value: int, ttl: int) -> bool:
        with self.mutex:
            if self._get(key) is not None:
                return False
            self._put(key, value, ttl)
            return True

    def incr(self, key: str, amount: int, maximum: int, ttl: int) -> bool:
        with self.mutex:
            value = (self._get(key) or 0) + amount
            if value > maximum:
                return False
            self._put(key, value, ttl)
            return True

    def decr(self, key: str, amount: int, minimum: int, ttl: int) -> bool:
        with self.mutex:
            value = (self._get(key) or 0) - amount
            if value < minimum:
                return False
            self._put(key, value, ttl)
            return True

    def incr_and_sum(
        self, key: str, keys: Callable[[], list[str]], amount: int, maximum: int, ttl: int
    ) -> bool:
        names = keys()  # user code: called outside the lock
        with self.mutex:
            value = (self._get(key) or 0) + amount
            if value > maximum:
                return False
            if amount + sum(self._get(k) or 0 for k in names) > maximum:
                return False
            self._put(key, value, ttl)
            return True

    def wait(self, key: str, timeout: int | None) -> bool:
        """Block until ``key`` has a live notification, or ``timeout`` ms pass
        (None: no limit).

        Raises:
            ValueError: ``timeout`` is negative.
        """
        if timeout is not None and timeout < 0:
            raise ValueError(f"wait timeout must be None or >= 0 ms, got {timeout!r}")
        with self._changed:
            return self._changed.wait_for(
                lambda: self._events.get(key, 0.0) > time.monotonic(),
                None if timeout is None else timeout / 1000,
            )

    def wait_notify(self, key: str, ttl: int) -> None:
        with self._changed:
            self._events[key] = time.monotonic() + ttl / 1000
            self._changed.notify_all()

    def _get(self, key: str) -> int | None:
        entry = self.db.get(key)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    def _put(self, key: str, value: int, ttl: int) -> None:
        now = time.monotonic()
        self.db[key] = (value, now + ttl / 1000)
        if len(self.db) > self._purge_at:
            self.db = {k: entry for k, entry in self.db.items() if entry[1] > now}
            self._events = {k: expiry for k, expiry in self._events.items() if expiry > now}
            self._purge_at = max(_PURGE_AT, 2 * len(self.db))
