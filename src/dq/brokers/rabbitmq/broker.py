"""`RabbitmqBroker`: declarations, publishing with retries, consumers and test helpers
on RabbitMQ, in Dramatiq 2.2.1's topology (the package docstring says what it keeps and
what it fixes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final, TypeVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from dq import _sources as runtime
from dq import message as _message
from dq.broker import Broker, Consumer
from dq.brokers._checks import (
    StoredQueueNames,
    check_consume_arguments,
    delayed_if_asked,
    is_whole,
)
from dq.brokers._declarations import LocalDeclarations
from dq.brokers.rabbitmq import parameters as _parameters
from dq.brokers.rabbitmq.consumer import RabbitmqConsumer
from dq.brokers.rabbitmq.errors import (
    MessageUnroutable,
    RabbitmqConnectionClosed,
    RabbitmqConnectionFailed,
)
from dq.brokers.rabbitmq.publisher import Publisher, properties_of
from dq.common import getenv_int
from dq.core import policy
from dq.errors import QueueJoinTimeout, QueueNotFound
from dq.message import Message
from dq.middleware import Middleware
from dq.wire import encode_message

__all__ = [
    "DEAD_MESSAGE_TTL",
    "DEFAULT_CONSUMER_TIMEOUT",
    "MAX_DECLARE_ATTEMPTS",
    "MAX_ENQUEUE_ATTEMPTS",
    "RabbitmqBroker",
]

M = TypeVar("M", bound=Message[Any])

#: How long RabbitMQ keeps a dead letter (ms): env ``dramatiq_dead_message_ttl``, else
#: 7 days. Every process sharing the queues must agree (it is a queue argument).
DEAD_MESSAGE_TTL: Final = getenv_int("dramatiq_dead_message_ttl") or 604_800_000
#: Attempts (the first included) of a publish that meets connection errors.
MAX_ENQUEUE_ATTEMPTS: Final = 6
#: Attempts (the first included) of a queue declaration that meets connection errors.
MAX_DECLARE_ATTEMPTS: Final = 2
#: RabbitMQ's default ``consumer_timeout`` (ms): 30 minutes.
DEFAULT_CONSUMER_TIMEOUT: Final = 1_800_000

_AMQP_ERRORS = (pika.exceptions.AMQPError,)
_BACKOFF_S = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)


class RabbitmqBroker(Broker):
    """A broker on RabbitMQ, wire-compatible with Dramatiq 2.2.1.

    Args:
        confirm_delivery: publish in confirm mode with the mandatory flag: `enqueue`
            returns once the server stored the message, and raises
            `MessageUnroutable` when no queue took it.
        url: an AMQP URL, several separated by ``;``, or a list of URLs: pika tries
            them in order (fail-over). ``kwargs`` refine each URL's parameters.
        middleware: as for `Broker`.
        max_priority: adds ``x-max-priority`` to the queues (1..255), so the
            ``broker_priority`` message option orders them on the server.
        parameters: a list of dicts of ``pika.ConnectionParameters`` keywords, tried in
            order (not with ``url``, nor with ``kwargs``).
        consumer_timeout: the server's ``consumer_timeout`` (ms). Consumers never hold
            a delivery unacked for more than half of it (`lease`).
        exact_reservations: how consumers take messages. False (the default): as
            Dramatiq's, each consumer subscribes once, with its prefetch as the limit,
            and the server sends a message whenever an ack frees room. True: a consumer
            takes messages only when ``next()`` asks for them (as many as its free
            prefetch, in one batch), so it never holds a message it did not ask for:
            the reservation model of `dq.core`, which `dq.testing.BrokerConformance`
            checks; about half as fast on a busy queue (a round trip per batch).
        **kwargs: ``pika.ConnectionParameters`` keywords. Without ``url`` and
            ``parameters`` the host defaults to ``127.0.0.1``.

    Raises:
        ValueError: ``max_priority`` is not in 1..255, or ``consumer_timeout`` is not an
            integer >= 2.
        RuntimeError: ``url`` and ``parameters`` (or ``parameters`` and ``kwargs``) are
            both given.
        TypeError: a keyword is not a pika connection parameter (the message names it).

    Attributes:
        parameters: the pika connection parameters, in fail-over order.
        publishers: thread id -> that thread's publishing connection and channel.
        lost_settlements: acks and nacks dropped because their channel had died (the
            server redelivers those messages).
        re_leased: deliveries of delay queues re-published because their eta was
            further away than `lease`.
        join_min_successes: the default of `join`'s ``min_successes``.
    """

    def __init__(
        self,
        *,
        confirm_delivery: bool = False,
        url: str | list[str] | None = None,
        middleware: list[Middleware] | None = None,
        max_priority: int | None = None,
        parameters: list[dict[str, Any]] | None = None,
        consumer_timeout: int = DEFAULT_CONSUMER_TIMEOUT,
        exact_reservations: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(middleware)
        if max_priority is not None and not (
            is_whole(max_priority, 1) and int(max_priority) <= 255
        ):
            raise ValueError("max_priority must be a value between 0 and 255")
        if not is_whole(consumer_timeout, 2):
            raise ValueError(
                f"consumer_timeout must be an integer >= 2 (ms, the server's setting), "
                f"got {consumer_timeout!r}"
            )
        self.parameters: list[_parameters.Parameters] = _parameters.from_arguments(
            url, parameters, kwargs
        )
        self.confirm_delivery = bool(confirm_delivery)
        self.max_priority = max_priority
        self.consumer_timeout = consumer_timeout
        self.exact_reservations = bool(exact_reservations)
        #: Longest time (ms) a consumer holds a delivery unacked: half the server's limit.
        self.lease = consumer_timeout // 2
        self.join_min_successes = 10
        self.publishers: dict[int, Publisher] = {}
        self._publishers_lock = threading.Lock()
        self._queue_names = StoredQueueNames()
        self._declarations = LocalDeclarations(self._queue_names)
        self._ensured: set[str] = set()  # canonical queues declared on the server
        self._open_consumers: set[RabbitmqConsumer] = set()
        self._stats_lock = threading.Lock()
        self.lost_settlements = 0
        self.re_leased = 0

    # -- connections ----------------------------------------------------------------------

    @property
    def consumer_class(self) -> type[Consumer]:
        """The class of this broker's consumers."""
        return RabbitmqConsumer

    def _connect(self, *, reading: bool = False) -> BlockingConnection:
        """Open a connection, trying each address in order (each with its own
        ``connection_attempts`` and ``retry_delay``); with ``reading``, a consumer's.

        Raises:
            RabbitmqConnectionFailed: none could be opened.
        """
        return _parameters.connect(self.parameters, reading=reading)

    def _open_publisher(self) -> Publisher:
        """A new publisher for the calling thread (in confirm mode only with
        ``confirm_delivery``, as Dramatiq's: see `Confirms`).

        Raises:
            RabbitmqConnectionFailed: its connection could not be opened.
        """
        return Publisher(self._connect(), confirming=self.confirm_delivery)

    def _publisher(self) -> Publisher:
        """The calling thread's publisher, opened on first use and replaced if its
        connection broke."""
        ident = threading.get_ident()
        publisher = self.publishers.get(ident)
        if publisher is not None and publisher.thread is threading.current_thread():
            if publisher.usable:
                try:
                    publisher.ensure_channel()
                    return publisher
                except _AMQP_ERRORS:
                    pass
            self._discard(publisher)
        elif publisher is not None:  # a dead thread's id was reused
            self._discard(publisher)
        publisher = self._open_publisher()
        with self._publishers_lock:
            stale = [(i, p) for i, p in self.publishers.items() if not p.thread.is_alive()]
            for i, _ in stale:
                del self.publishers[i]
            self.publishers[ident] = publisher
        for _, p in stale:
            p.close()
        return publisher

    def _discard(self, publisher: Publisher) -> None:
        """Close and forget a publisher (its connection broke, or its thread ended)."""
        with self._publishers_lock:
            for ident, p in list(self.publishers.items()):
                if p is publisher:
                    del self.publishers[ident]
        publisher.close()

    @property
    def connection(self) -> BlockingConnection:
        """The calling thread's publishing connection (opened on first use).

        Raises:
            RabbitmqConnectionFailed: it could not be opened.
        """
        return self._publisher().connection

    @property
    def channel(self) -> BlockingChannel:
        """The calling thread's publishing channel (in confirm mode with
        ``confirm_delivery``).

        Raises:
            RabbitmqConnectionFailed: its connection could not be opened.
        """
        return self._publisher().channel

    def close(self) -> None:
        """Close every publisher connection (consumers are closed by their owners
        first; a worker's `stop` does that). AMQP errors are ignored. A later publish
        opens a new connection, as with Dramatiq."""
        with self._publishers_lock:
            publishers, self.publishers = list(self.publishers.values()), {}
        for publisher in publishers:
            publisher.close()

    # -- declarations ------------------------------------------------------------------------

    def declare_queue(self, queue_name: str, *, ensure: bool = False) -> None:
        """Declare ``queue_name`` (a queue or its ``.DQ``) and its delay queue in this
        process, running the declare hooks (a running Worker starts consuming both).

        Args:
            queue_name: the queue.
            ensure: also create ``q``, ``q.DQ`` and ``q.XQ`` on the server now (else
                that happens on the first publish or consume).

        Raises:
            InvalidQueueName: no message may be stored on ``queue_name`` (a ``.XQ``
                name, or one colliding with a broker's keys): a `QueueNotFound` and a
                `ValueError` saying why.
            RabbitmqConnectionClosed: ``ensure`` and the server could not be reached.
        """
        self._declarations.declare(self, queue_name)
        if ensure:
            name = policy.q_name(queue_name)
            for attempt in range(MAX_DECLARE_ATTEMPTS):
                try:
                    self._ensure(self._publisher().channel, name)
                    return
                except _AMQP_ERRORS as e:
                    self._discard_current()
                    if attempt + 1 >= MAX_DECLARE_ATTEMPTS:
                        raise RabbitmqConnectionClosed(e) from e
                    time.sleep(_BACKOFF_S[attempt + 1])

    def _discard_current(self) -> None:
        publisher = self.publishers.get(threading.get_ident())
        if publisher is not None:
            self._discard(publisher)

    def queue_arguments(self, queue_name: str) -> dict[str, Any]:
        """The arguments ``queue_name`` (``q``, ``q.DQ`` or ``q.XQ``) is declared with:
        exactly Dramatiq's."""
        if queue_name.endswith(policy.DEAD_SUFFIX):
            return {"x-message-ttl": DEAD_MESSAGE_TTL}
        arguments: dict[str, Any] = {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": policy.xq_name(queue_name),
        }
        if self.max_priority:
            arguments["x-max-priority"] = self.max_priority
        return arguments

    def _declare_on(self, channel: BlockingChannel, queue_name: str) -> int:
        """Declare one queue with its arguments; return its ready-message count."""
        frame = channel.queue_declare(
            queue=queue_name, durable=True, arguments=self.queue_arguments(queue_name)
        )
        return int(frame.method.message_count)

    def _ensure(self, channel: BlockingChannel, canonical: str, *, force: bool = False) -> None:
        """Create ``canonical``, its ``.DQ`` and ``.XQ`` on the server (once per process
        unless ``force``)."""
        if canonical in self._ensured and not force:
            return
        for name in (canonical, policy.dq_name(canonical), policy.xq_name(canonical)):
            self._declare_on(channel, name)
        self._ensured.add(canonical)

    # -- publishing ---------------------------------------------------------------------------

    def _prepare(self, message: M, delay: int | None, now_ms: int) -> tuple[M, bytes]:
        """The copy to store (on ``q.DQ`` with an eta when delayed) and its bytes, after
        the ``before_enqueue`` hooks.

        Raises:
            InvalidQueueName: no message may be stored on its queue (a ``.XQ`` name,
                or one colliding with a broker's keys).
            InvalidValue: its delayed eta is one the core refuses.
        """
        self._queue_names.check(message.queue_name)
        message = delayed_if_asked(message, delay, now_ms)
        if policy.is_delay_queue(message.queue_name):
            policy.message_eta_ms(message)
        if self._hooks.before_enqueue:
            self._run_before(self._hooks.before_enqueue, message, delay)
        return message, encode_message(message, _message.global_encoder)

    def enqueue(self, message: M, *, delay: int | None = None) -> M:
        """Publish ``message``; with ``delay`` (ms), a copy on ``q.DQ`` with an ``eta``.

        The queue need not be declared in this process: its three queues are created
        on the server on the first publish (no declare hooks run, so a running Worker
        does not start consuming it).

        Returns:
            The message as stored.

        Raises:
            ValueError: ``delay`` is not a whole number of ms >= 0.
            QueueNotFound: it is addressed to a dead-letter queue (``.XQ``).
            InvalidValue: its queue name is one no message may be stored on (a broker
                key, ``.msgs``...), or its eta is not valid; nothing is published.
            MessageUnroutable: ``confirm_delivery`` and no queue took it.
            RabbitmqConnectionClosed: every attempt met a connection error.
        """
        stored, payload = self._prepare(message, delay, runtime.get_clock().now_ms())
        self._publish([(stored, payload)])
        if self._hooks.after_enqueue:
            self._run_after(self._hooks.after_enqueue, stored, delay)
        return stored

    def enqueue_many(self, messages: Iterable[M], *, delay: int | None = None) -> list[M]:
        """Publish many messages at once; with ``confirm_delivery``, every publish is
        sent first and the confirms are then awaited together.

        Returns:
            The messages as stored, in the order given.

        Raises:
            ValueError, TypeError: as `enqueue`; nothing is published.
            MessageUnroutable: ``confirm_delivery`` and some messages were returned
                (the others are stored).
            RabbitmqConnectionClosed: every attempt met a connection error.
        """
        now = runtime.get_clock().now_ms()
        prepared = [self._prepare(message, delay, now) for message in messages]
        if prepared:
            self._publish(prepared)
        result = [stored for stored, _ in prepared]
        if self._hooks.after_enqueue:
            for stored in result:
                self._run_after(self._hooks.after_enqueue, stored, delay)
        return result

    def _publish(self, prepared: Sequence[tuple[Message[Any], bytes]]) -> None:
        """Publish on the calling thread's channel, retrying connection errors with
        backoff; with confirms, only what was not confirmed is sent again."""
        todo = list(prepared)
        for attempt in range(MAX_ENQUEUE_ATTEMPTS):
            if attempt:
                time.sleep(_BACKOFF_S[attempt])
            try:
                publisher = self._publisher()
                channel = publisher.channel
                for canonical in {policy.q_name(m.queue_name) for m, _ in todo}:
                    self._ensure(channel, canonical)
                items = [(m.queue_name, payload, properties_of(m)) for m, payload in todo]
                nacked, returned = publisher.confirms.publish(items, wait=self.confirm_delivery)
            except RabbitmqConnectionFailed as e:
                if attempt + 1 >= MAX_ENQUEUE_ATTEMPTS:
                    raise RabbitmqConnectionClosed(e) from e
                continue
            except _AMQP_ERRORS as e:
                self._discard_current()
                if attempt + 1 >= MAX_ENQUEUE_ATTEMPTS:
                    raise RabbitmqConnectionClosed(e) from e
                self.logger.debug("Publish failed (%r); retrying [%d].", e, attempt + 1)
                continue
            if returned:
                for routing_key, _ in returned:
                    self._ensured.discard(policy.q_name(routing_key))
                bodies = {payload: m.message_id for m, payload in todo}
                raise MessageUnroutable(
                    [key for key, _ in returned], [bodies.get(body, "?") for _, body in returned]
                )
            if not nacked:
                return
            todo = [todo[i] for i in nacked]
            self.logger.warning("The server nacked %d publishes; sending them again.", len(todo))
        raise RabbitmqConnectionClosed(
            f"the server nacked {len(todo)} publishes {MAX_ENQUEUE_ATTEMPTS} times"
        )

    # -- consuming ----------------------------------------------------------------------------

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """Return a consumer of ``queue_name`` (a queue or its ``.DQ``) with its own
        connection; declares the queue (locally and on the server) first.

        Args:
            queue_name: the queue.
            prefetch: how many unsettled messages the consumer may hold.
            timeout: ms ``next()`` waits before raising ``StopIteration``.

        Raises:
            QueueNotFound: ``queue_name`` names a dead-letter queue.
            ValueError: ``prefetch`` < 1 or ``timeout`` < 0.
            RabbitmqConnectionClosed: the server could not be reached.
        """
        if queue_name.endswith(policy.DEAD_SUFFIX):
            raise QueueNotFound(queue_name)
        check_consume_arguments(prefetch, timeout)
        self.declare_queue(queue_name)
        return RabbitmqConsumer(self, queue_name, prefetch, timeout)

    def _count_lost(self, n: int = 1) -> None:
        with self._stats_lock:
            self.lost_settlements += n

    def _count_re_leased(self) -> None:
        with self._stats_lock:
            self.re_leased += 1

    # -- helpers ----------------------------------------------------------------------------

    def get_queue_message_counts(self, queue_name: str) -> tuple[int, int, int]:
        """Return the ready-message counts of ``q``, ``q.DQ`` and ``q.XQ`` (declaring
        them as Dramatiq does; unacked messages are not counted). A test helper.

        With ``confirm_delivery`` the counts include every message this thread
        published. Without it, as in Dramatiq, they may miss one published a moment
        ago: RabbitMQ answers a count ahead of the deliveries its queue has not filed
        yet (`join` with two checks or more, ``idle_time`` apart, is not affected).

        Raises:
            RabbitmqConnectionClosed: the server could not be reached.
        """
        name = policy.q_name(queue_name)
        try:
            publisher = self._publisher()
            publisher.confirms.sync()
            channel = publisher.channel
            counts = [
                self._declare_on(channel, n)
                for n in (name, policy.dq_name(name), policy.xq_name(name))
            ]
        except _AMQP_ERRORS as e:
            self._discard_current()
            raise RabbitmqConnectionClosed(e) from e
        self._ensured.add(name)
        return counts[0], counts[1], counts[2]

    def flush(self, queue_name: str) -> None:
        """Drop the ready messages of ``q``, ``q.DQ`` and ``q.XQ`` (unacked ones stay
        with their consumers). Missing queues are skipped.

        Raises:
            RabbitmqConnectionClosed: the server could not be reached.
        """
        name = policy.q_name(queue_name)
        for target in (name, policy.dq_name(name), policy.xq_name(name)):
            try:
                publisher = self._publisher()
                publisher.confirms.sync()
                publisher.channel.queue_purge(target)
            except pika.exceptions.ChannelClosedByBroker:
                continue  # a 404: the next call opens a new channel
            except _AMQP_ERRORS as e:
                self._discard_current()
                raise RabbitmqConnectionClosed(e) from e

    def flush_all(self) -> None:
        """Flush every queue declared in this process."""
        for name in sorted(self.queues):
            self.flush(name)

    def unsettled(self, queue_name: str) -> int:
        """How many messages of ``q`` and ``q.DQ`` this process's consumers hold
        (reserved or parked, not yet acked or nacked)."""
        name = policy.q_name(queue_name)
        consumers = [c for c in list(self._open_consumers) if policy.q_name(c.queue_name) == name]
        for consumer in consumers:
            # What the server already sent a subscription is unacked there and not in
            # its ready count: read it in first, or a join would not see it.
            consumer._read_sent()
        return sum(c._outstanding for c in consumers)

    def join(
        self,
        queue_name: str,
        min_successes: int | None = None,
        idle_time: int = 100,
        *,
        timeout: int | None = None,
    ) -> None:
        """Block until ``q`` and ``q.DQ`` have no ready message and this process's
        consumers hold none of theirs, in ``min_successes`` consecutive checks
        ``idle_time`` ms apart (Dramatiq's test helper; dead letters are not counted).
        Unacked messages of other processes are invisible, and so, without
        ``confirm_delivery``, may be a message published a moment before the first
        check (see `get_queue_message_counts`): more checks make that less likely
        to matter.

        Args:
            queue_name: the queue.
            min_successes: consecutive empty checks needed (default
                `join_min_successes`, 10).
            idle_time: ms between two checks.
            timeout: ms to wait at most; None waits forever.

        Raises:
            QueueJoinTimeout: ``timeout`` passed first.
            RabbitmqConnectionClosed: the server could not be reached.
        """
        needed = self.join_min_successes if min_successes is None else min_successes
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        successes = 0
        while True:
            ready, delayed, _ = self.get_queue_message_counts(queue_name)
            if ready + delayed + self.unsettled(queue_name) == 0:
                successes += 1
                if successes >= needed:
                    return
            else:
                successes = 0
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueJoinTimeout(queue_name)
                time.sleep(min(idle_time / 1000, remaining))
            else:
                time.sleep(idle_time / 1000)
