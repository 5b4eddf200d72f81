"""`RabbitmqBroker`: Dramatiq's RabbitMQ wire format, explicit connection ownership,
confirmed publishing and safe long delays. This package re-exports the public names
of its modules.

The broker keeps Dramatiq 2.2.1's topology (``../spec/wire.md`` §4), so dq and Dramatiq
processes can share one RabbitMQ: for a canonical queue ``q`` the durable queues ``q``,
``q.DQ`` and ``q.XQ`` on the default exchange, declared with exactly Dramatiq's
arguments; messages published persistently with the routing key of their queue, the
``broker_priority`` option as the AMQP priority, and the envelope as the body.

Where Dramatiq is unsafe, dq fixes it without changing what is on the wire:

* **One owner per connection.** pika is not thread-safe. Each producing thread gets
  its own publisher connection, kept in the visible registry `RabbitmqBroker.publishers`
  (opened on first use, replaced when it broke, closed by `RabbitmqBroker.close`).
  Each consumer owns one connection and one channel; every pika call on them is made
  under the consumer's lock, and a thread that finds the lock taken hands its work to
  the holder through ``add_callback_threadsafe`` (the holder runs it the next time it
  processes events, which a waiting consumer does at once).
* **Settlements never raise into workers.** An ack or nack for a delivery whose
  channel died is logged once, counted in `RabbitmqBroker.lost_settlements`, and
  dropped: the server redelivers the message.
* **Confirms.** With ``confirm_delivery=True`` a publish returns once the server has
  confirmed it, and a publish that cannot be routed (its queue was deleted) raises
  `MessageUnroutable` instead of being lost. `RabbitmqBroker.enqueue_many` publishes a
  whole batch and then waits for its confirms at once.
* **Nothing is acked before what replaces it is stored.** Requeues, promotions of due
  delayed messages, retries (``replace``) and re-leases publish the new copy on the
  consumer's channel in confirm mode (whatever ``confirm_delivery`` says) and only then
  ack the delivery they replace.
* **Two ways to consume.** By default a consumer subscribes once with its prefetch
  as the limit, as Dramatiq's do (checked by a property test of its own). With
  ``exact_reservations=True``, once at least half of its prefetch is free, a consumer
  opens a short ``basic.consume`` with the free room as prefetch, takes what the queue
  sends (waiting up to its timeout for the first message when none is ready) and
  cancels it, so what it holds is exactly what it reserved, as
  `dq.testing.BrokerConformance` checks.
* **Long delays are re-leased.** A delivery of a delay queue whose eta is further away
  than ``lease`` (half of the server's ``consumer_timeout``) is not handed out: the
  consumer parks it, unacked, and ``lease`` ms after it arrived re-publishes the same
  body to the same ``q.DQ`` (confirmed) and acks it. No delivery is held unacked for
  longer than ``lease``, so RabbitMQ never closes the channel for it.

The modules, each with one job:

* `broker`: `RabbitmqBroker` (declarations, publishing with retries, test helpers);
* `commands`: `COMMANDS`, how each command of the core is carried out;
* `errors`: the error types;
* `parameters`: connection parameters from ``url``/``parameters``/keywords;
* `publisher`: a channel's publishes and confirms, a thread's publishing connection;
* `reservation`: the reservation protocol, sans I/O (a frozen record, pure transitions);
* `reserving`: a consumer's connection and the I/O that drives that protocol;
* `consumer`: `RabbitmqMessage` and the consumer's settling side and API;
* `frames`: the AMQP frame codec (no sockets);
* `_pika`: the one module that touches pika's private names.
"""

from __future__ import annotations

from dq.brokers.rabbitmq.broker import (
    DEAD_MESSAGE_TTL,
    DEFAULT_CONSUMER_TIMEOUT,
    MAX_DECLARE_ATTEMPTS,
    MAX_ENQUEUE_ATTEMPTS,
    RabbitmqBroker,
)
from dq.brokers.rabbitmq.commands import COMMANDS
from dq.brokers.rabbitmq.consumer import RabbitmqMessage
from dq.brokers.rabbitmq.errors import (
    MessageUnroutable,
    RabbitmqConnectionClosed,
    RabbitmqConnectionFailed,
)
from dq.brokers.rabbitmq.frames import parse_delivery

__all__ = [
    "COMMANDS",
    "DEAD_MESSAGE_TTL",
    "DEFAULT_CONSUMER_TIMEOUT",
    "MAX_DECLARE_ATTEMPTS",
    "MAX_ENQUEUE_ATTEMPTS",
    "MessageUnroutable",
    "RabbitmqBroker",
    "RabbitmqConnectionClosed",
    "RabbitmqConnectionFailed",
    "RabbitmqMessage",
    "parse_delivery",
]
