"""Middleware: hooks around every stage of a message's life, and Dramatiq's
default stack."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dq import _lazy_exports
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


if not TYPE_CHECKING:  # type checkers read the imports above
    # ``Prometheus`` is a dq addition (Dramatiq has it only in
    # ``dramatiq.middleware.prometheus``): importing its module creates the metrics
    # directory, so ``import dq.middleware`` does not; it is not in ``__all__``.
    # ``AsyncIO`` imports asyncio (several MB), which a worker without async actors
    # never needs.
    __getattr__, __dir__ = _lazy_exports(
        __name__,
        {"AsyncIO": "dq.middleware.asyncio", "Prometheus": "dq.middleware.prometheus"},
    )
