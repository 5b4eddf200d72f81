"""`WindowRateLimiter`: at most ``limit`` acquisitions in a sliding window."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dq import _sources as runtime
from dq.rate_limits.rate_limiter import RateLimiter

if TYPE_CHECKING:
    from dq.rate_limits.backend import RateLimiterBackend

__all__ = ["WindowRateLimiter"]


class WindowRateLimiter(RateLimiter):
    """Admit at most ``limit`` acquisitions in the last ``window`` **seconds**.

    Each second has a counter, the key ``"<key>@<unix seconds>"``; an acquisition
    increments the current second's counter unless the counters of the last
    ``window`` seconds already sum to ``limit``. Nothing is released. The window is
    in seconds (not ms, unlike every other duration) because it costs one key per
    second of window.

    Args:
        backend: where the counters live.
        key: the prefix of the counters' keys.
        limit: acquisitions admitted per window.
        window: the window's length, in seconds.

    Raises:
        AssertionError: ``limit`` or ``window`` is below 1 (as Dramatiq).
    """

    def __init__(
        self, backend: RateLimiterBackend, key: str, *, limit: int = 1, window: int = 1
    ) -> None:
        if limit < 1:
            raise AssertionError(f"limit must be a positive integer, got {limit!r}")
        if window < 1:
            raise AssertionError(f"window must be a positive number of seconds, got {window!r}")
        super().__init__(backend, key)
        self.limit = limit
        self.window = window
        self.window_millis = window * 1000

    def _get_keys(self) -> list[str]:
        """Return the keys of the window's counters, the current second's first."""
        now_s = runtime.get_clock().now_ms() // 1000
        return [f"{self.key}@{now_s - i}" for i in range(self.window)]

    def _acquire(self) -> bool:
        keys = self._get_keys()
        return self.backend.incr_and_sum(
            keys[0], self._get_keys, 1, maximum=self.limit, ttl=self.window_millis
        )

    def _release(self) -> None:
        pass
