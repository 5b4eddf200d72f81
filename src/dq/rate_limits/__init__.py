"""Rate limiters and barriers shared across processes through a backend.

Keys, values and semantics are Dramatiq's, so a dq limiter and a Dramatiq limiter
configured with the same key (on the same server) share one limit.
"""

from __future__ import annotations

from dq.rate_limits.backend import RateLimiterBackend
from dq.rate_limits.barrier import Barrier
from dq.rate_limits.bucket import BucketRateLimiter
from dq.rate_limits.concurrent import ConcurrentRateLimiter
from dq.rate_limits.rate_limiter import RateLimiter, RateLimitExceeded
from dq.rate_limits.window import WindowRateLimiter

# Dramatiq's order.
__all__ = [  # noqa: RUF022
    "RateLimiterBackend",
    "RateLimiter",
    "RateLimitExceeded",
    "Barrier",
    "BucketRateLimiter",
    "ConcurrentRateLimiter",
    "WindowRateLimiter",
]
