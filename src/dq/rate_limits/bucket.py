"""`BucketRateLimiter`: at most ``limit`` acquisitions per fixed time bucket."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dq import _sources as runtime
from dq.rate_limits.rate_limiter import RateLimiter

if TYPE_CHECKING:
    from dq.rate_limits.backend import RateLimiterBackend

__all__ = ["BucketRateLimiter"]


class BucketRateLimiter(RateLimiter):
    """Admit at most ``limit`` acquisitions per bucket of ``bucket`` ms.

    Buckets are aligned on the Unix epoch: the counter of the bucket starting at
    ``start`` ms is the key ``"<key>@<start>"``, which expires with the bucket.
    Nothing is released. Cheap, but bursty: up to ``2 * limit`` acquisitions can
    happen around a bucket boundary; `WindowRateLimiter` smooths that.

    Example: ``BucketRateLimiter(backend, "api", limit=10, bucket=1000)`` admits 10
    calls per second.

    Args:
        backend: where the counters live.
        key: the prefix of the counters' keys.
        limit: acquisitions admitted per bucket.
        bucket: the bucket's length, in ms.

    Raises:
        AssertionError: ``limit`` or ``bucket`` is below 1.
    """

    def __init__(
        self, backend: RateLimiterBackend, key: str, *, limit: int = 1, bucket: int = 1000
    ) -> None:
        if limit < 1:
            raise AssertionError(f"limit must be a positive integer, got {limit!r}")
        if bucket < 1:
            raise AssertionError(f"bucket must be a positive number of ms, got {bucket!r}")
        super().__init__(backend, key)
        self.limit = limit
        self.bucket = bucket

    def current_key(self) -> str:
        """Return the key of the current bucket's counter."""
        now_ms = runtime.get_clock().now_ms()
        return f"{self.key}@{now_ms - now_ms % self.bucket}"

    def _acquire(self) -> bool:
        key = self.current_key()
        if self.backend.add(key, 1, ttl=self.bucket):
            return True
        return self.backend.incr(key, 1, maximum=self.limit, ttl=self.bucket)

    def _release(self) -> None:
        pass
