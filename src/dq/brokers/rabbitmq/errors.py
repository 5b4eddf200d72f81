"""The RabbitMQ broker's error types: each a dq error and, for connection failures, a
pika ``AMQPConnectionError`` too, so code written for either catches it."""

from __future__ import annotations

from collections.abc import Sequence

import pika.exceptions

from dq.errors import BrokerError, ConnectionClosed, ConnectionFailed

__all__ = ["MessageUnroutable", "RabbitmqConnectionClosed", "RabbitmqConnectionFailed"]


class RabbitmqConnectionClosed(ConnectionClosed, pika.exceptions.AMQPConnectionError):
    """The RabbitMQ connection or channel failed (both a dq `ConnectionClosed` and a
    pika ``AMQPConnectionError``, so code written for either catches it)."""


class RabbitmqConnectionFailed(ConnectionFailed, pika.exceptions.AMQPConnectionError):
    """No connection to RabbitMQ could be opened (every address and attempt failed)."""


class MessageUnroutable(BrokerError):
    """A confirmed publish was returned by the server: no queue took it (its queue was
    deleted). The message was not stored; the queue is declared again on the next
    publish.

    Attributes:
        queue_names: the queues the returned messages were published to.
        message_ids: the ids of the returned messages.
    """

    def __init__(self, queue_names: Sequence[str], message_ids: Sequence[str]) -> None:
        super().__init__(
            f"{len(message_ids)} message(s) could not be routed to {sorted(set(queue_names))} "
            f"(the queue does not exist): {list(message_ids)}"
        )
        self.queue_names = tuple(queue_names)
        self.message_ids = tuple(message_ids)
