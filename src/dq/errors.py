"""dq's exception hierarchy (Dramatiq 2.2.1's, name for name).

``__all__`` is Dramatiq's hierarchy exactly; dq's own additions (`InvalidQueueName`,
`BrokerOutOfMemory`) subclass its classes and are imported from here by name.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = [
    "ActorNotFound",
    "BrokerConnectionError",
    "BrokerError",
    "ConnectionClosed",
    "ConnectionFailed",
    "DecodeError",
    "DramatiqError",
    "QueueJoinTimeout",
    "QueueNotFound",
    "RateLimitExceeded",
    "Retry",
]


class DramatiqError(Exception):
    """Base class of every dq error (named as Dramatiq's, for drop-in use).

    Attributes:
        message: what the error was raised with.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return str(self.message) or repr(self.message)


class DecodeError(DramatiqError):
    """Data could not be decoded into a message.

    Attributes:
        data: the raw input.
        error: the underlying exception.
    """

    def __init__(self, message: object, data: Any, error: BaseException | None) -> None:
        super().__init__(message)
        self.data = data
        self.error = error


class BrokerError(DramatiqError):
    """Base class of broker errors."""


class ActorNotFound(BrokerError):
    """No actor of that name is declared on the broker."""


class QueueNotFound(BrokerError):
    """No queue of that name is declared on the broker."""


class InvalidQueueName(QueueNotFound, ValueError):
    """A message cannot be stored on that queue name (dq, not Dramatiq): it names a
    dead-letter queue or collides with a broker's own keys
    (`dq.core.policy.stored_queue_problem` says why)."""


class BrokerOutOfMemory(BrokerError):
    """The broker's server refused to store anything more: it is out of memory (dq,
    not Dramatiq; Redis at ``maxmemory`` with ``noeviction``). Nothing was stored."""


class QueueJoinTimeout(DramatiqError):
    """``join`` timed out (a direct child of DramatiqError, as in Dramatiq)."""


class BrokerConnectionError(BrokerError):
    """Base class of broker connection errors."""


class ConnectionFailed(BrokerConnectionError):
    """A connection to the broker could not be opened."""


class ConnectionClosed(BrokerConnectionError):
    """A connection to the broker was lost."""


class RateLimitExceeded(DramatiqError):
    """A rate limit was exceeded."""


class Retry(DramatiqError):
    """Raise from an actor to retry it without logging an error.

    Attributes:
        delay: the delay in ms before the retry, or None for the computed backoff.
    """

    def __init__(self, message: str = "", delay: int | None = None) -> None:
        super().__init__(message)
        self.delay = delay


def __getattr__(name: str) -> Any:
    if name == "ConnectionError":
        warnings.warn(
            "dq.errors.ConnectionError is deprecated; use BrokerConnectionError",
            DeprecationWarning,
            stacklevel=2,
        )
        return BrokerConnectionError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
