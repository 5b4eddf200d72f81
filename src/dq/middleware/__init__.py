"""Middleware: hooks around every stage of a message's life."""

from __future__ import annotations

from dq.middleware.middleware import Middleware, MiddlewareError, SkipMessage

__all__ = ["Middleware", "MiddlewareError", "SkipMessage", "default_middleware"]

#: The middleware classes ``Broker(middleware=None)`` installs, in order. Dramatiq's
#: default stack (AgeLimit, TimeLimit, ShutdownNotifications, Callbacks, Pipelines,
#: Retries) is added by the worker issue; until then it is empty.
default_middleware: list[type[Middleware]] = []
