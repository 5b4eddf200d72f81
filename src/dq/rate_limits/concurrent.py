"""`ConcurrentRateLimiter`: at most ``limit`` holders at once."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dq.rate_limits.rate_limiter import RateLimiter

if TYPE_CHECKING:
    from dq.rate_limits.backend import RateLimiterBackend

__all__ = ["ConcurrentRateLimiter"]


class ConcurrentRateLimiter(RateLimiter):
    """Let at most ``limit`` holders inside at once (``limit=1``: a distributed mutex).

    The key holds the number of current holders, as a decimal integer; a holder that
    dies without releasing keeps its slot until the key's TTL runs out.

    Args:
        backend: where the counter lives.
        key: the counter's key.
        limit: the most holders at once.
        ttl: ms the counter lives after its last change.

    Raises:
        AssertionError: ``limit`` is below 1 (as Dramatiq).
    """

    def __init__(
        self, backend: RateLimiterBackend, key: str, *, limit: int = 1, ttl: int = 900000
    ) -> None:
        if limit < 1:
            raise AssertionError(f"limit must be a positive integer, got {limit!r}")
        super().__init__(backend, key)
        self.limit = limit
        self.ttl = ttl

    def _acquire(self) -> bool:
        if self.backend.add(self.key, 1, ttl=self.ttl):
            return True
        return self.backend.incr(self.key, 1, maximum=self.limit, ttl=self.ttl)

    def _release(self) -> None:
        self.backend.decr(self.key, 1, minimum=0, ttl=self.ttl)
