"""Middleware: hooks around every stage of a message's life, and Dramatiq's
default stack."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dq.middleware.age_limit import AgeLimit
from dq.middleware.callbacks import Callbacks
from dq.middleware.current_message import CurrentMessage
from dq.middleware.group_callbacks import GroupCallbacks
from dq.middleware.middleware import Middleware, MiddlewareError, SkipMessage
from dq.middleware.pipelines import Pipelines
from dq.middleware.retries import Retries
from dq.middleware.shutdown import Shutdown, ShutdownNotifications
from dq.middleware.threading import Interrupt, raise_thread_exception
from dq.middleware.time_limit import TimeLimit, TimeLimitExceeded

if TYPE_CHECKING:
    from dq.middleware.asyncio import AsyncIO as AsyncIO
    from dq.middleware.prometheus import Prometheus as Prometheus

# Dramatiq's order.
__all__ = [  # noqa: RUF022
    # Basics
    "Middleware",
    "MiddlewareError",
    "SkipMessage",
    # Threading
    "Interrupt",
    "raise_thread_exception",
    # Middleware
    "AgeLimit",
    "AsyncIO",
    "Callbacks",
    "CurrentMessage",
    "GroupCallbacks",
    "Pipelines",
    "Retries",
    "Shutdown",
    "ShutdownNotifications",
    "TimeLimit",
    "TimeLimitExceeded",
]

#: The middleware classes ``Broker(middleware=None)`` instantiates, in order
#: (Dramatiq's default stack).
default_middleware: list[type[Middleware]] = [
    AgeLimit,
    TimeLimit,
    ShutdownNotifications,
    Callbacks,
    Pipelines,
    Retries,
]


if not TYPE_CHECKING:  # mypy sees the import above, so a typo is still an error

    def __getattr__(name: str) -> Any:
        """Resolve ``AsyncIO`` and ``Prometheus`` on first use.

        ``Prometheus`` is a dq addition (Dramatiq has it only in
        ``dramatiq.middleware.prometheus``): importing its module creates the metrics
        directory, so ``import dq.middleware`` does not; it is not in ``__all__``.
        """
        if name == "Prometheus":
            from dq.middleware.prometheus import Prometheus  # noqa: PLC0415

            return Prometheus
        if name == "AsyncIO":
            # On first use: it imports asyncio (several MB), which a worker without
            # async actors never needs.
            from dq.middleware.asyncio import AsyncIO  # noqa: PLC0415

            return AsyncIO
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
