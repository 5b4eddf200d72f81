"""Argument checks the brokers share (one wording for every broker)."""

from __future__ import annotations

from typing import Any, TypeVar

from dq.core import policy
from dq.errors import InvalidQueueName
from dq.message import Message

__all__ = ["StoredQueueNames", "check_consume_arguments", "delayed_if_asked", "is_whole"]

M = TypeVar("M", bound=Message[Any])


def is_whole(value: object, minimum: int) -> bool:
    """Whether ``value`` is an int (not a bool) >= ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def delayed_if_asked(message: M, delay: int | None, now_ms: int) -> M:
    """``message`` as an enqueue with ``delay`` (ms, or None) stores it: the copy on its
    delay queue with an ``eta`` (`dq.core.policy.delayed`), or itself.

    Raises:
        ValueError: ``delay`` is not a whole number of ms >= 0.
    """
    if delay is None:
        return message
    if not is_whole(delay, 0):
        raise ValueError(f"delay must be a whole number of ms >= 0, got {delay!r}")
    return policy.delayed(message, delay_ms=delay, now_ms=now_ms)


def check_consume_arguments(prefetch: object, timeout: object) -> None:
    """Check ``consume``'s arguments.

    Raises:
        ValueError: ``prefetch`` is not an integer >= 1 or ``timeout`` not one >= 0.
    """
    if not is_whole(prefetch, 1):
        raise ValueError(f"prefetch must be an integer >= 1, got {prefetch!r}")
    if not is_whole(timeout, 0):
        raise ValueError(f"timeout must be an integer >= 0 (ms), got {timeout!r}")


class StoredQueueNames:
    """The queue names one broker may store messages on, checked by the core once per
    name (`dq.core.policy.stored_queue_problem`): an enqueue pays a set lookup.

    At most ``limit`` accepted names are remembered; others are checked each time.
    """

    __slots__ = ("_accepted", "_limit")

    def __init__(self, limit: int = 4096) -> None:
        self._accepted: set[str] = set()
        self._limit = limit

    def __contains__(self, queue_name: object) -> bool:
        return queue_name in self._accepted

    def check(self, queue_name: object) -> str:
        """Return ``queue_name`` if a message may be stored on it.

        Raises:
            InvalidQueueName: it names a dead-letter queue (``.XQ``) or collides with a
                broker's own keys (a `QueueNotFound` and a `ValueError`; the message
                names it and says why).
        """
        if isinstance(queue_name, str) and queue_name in self._accepted:
            return queue_name
        problem = policy.stored_queue_problem(queue_name)
        if problem is not None:
            raise InvalidQueueName(f"invalid queue name {queue_name!r}: {problem}")
        assert isinstance(queue_name, str)
        if len(self._accepted) < self._limit:
            self._accepted.add(queue_name)
        return queue_name
