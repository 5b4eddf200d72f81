"""`RabbitmqMessage` and the RabbitMQ consumer: its settling side (acks and nacks from
any thread, grouped) and the consumer API (``next()``, ``nack``, ``requeue``, ``promote``,
``replace``, ``close``) on top of the reserving side."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import pika
import pika.exceptions

from dq import _sources as runtime
from dq import message as _message
from dq.broker import MessageProxy
from dq.brokers.rabbitmq import _pika
from dq.brokers.rabbitmq.errors import MessageUnroutable, RabbitmqConnectionClosed
from dq.brokers.rabbitmq.publisher import properties_of
from dq.brokers.rabbitmq.reserving import Delivery, ReservingConsumer
from dq.core import policy
from dq.errors import DecodeError
from dq.message import Message
from dq.wire import decode_message, encode_message

if TYPE_CHECKING:
    from dq.brokers.rabbitmq.broker import RabbitmqBroker

__all__ = ["RabbitmqConsumer", "RabbitmqMessage"]

M = TypeVar("M", bound=Message[Any])

_AMQP_ERRORS = (pika.exceptions.AMQPError,)
_MULTIPLE_ACK_SCAN = 256  # at most this many unsettled deliveries: try one multiple ack


class RabbitmqMessage(MessageProxy):
    """A message delivered by a RabbitMQ consumer.

    Attributes:
        redelivered: whether RabbitMQ delivered it before (its channel closed, or a
            consumer rejected it).
    """

    redelivered: bool


class RabbitmqConsumer(ReservingConsumer):
    """A consumer of one RabbitMQ queue, owning its connection and channel.

    It reserves in batches (see `ReservingConsumer`), hands messages out one per
    ``next()``, and takes acks from any thread: the thread that can take the
    connection's lock sends them, others leave them to whoever holds it.
    `BufferedConsumer` gives it the buffer, the held messages and grouped acks; its
    ``__next__`` is its own, to hand out `RabbitmqMessage` proxies (``redelivered``).
    """

    def __init__(
        self, broker: RabbitmqBroker, queue_name: str, prefetch: int, timeout: int
    ) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        broker._open_consumers.add(self)

    def _tag(self, message: MessageProxy) -> Delivery:
        tag = message._tag
        if not isinstance(tag, Delivery):
            raise ValueError(f"{message!r} was not delivered by a RabbitmqBroker consumer")
        return tag

    # -- settling ---------------------------------------------------------------------------

    def _lost(self, tags: Iterable[int], what: str) -> None:
        """Count and log settlements whose channel died (the server redelivers)."""
        tags = list(tags)
        if not tags:
            return
        self.broker._count_lost(len(tags))
        for tag in tags:
            self.broker.logger.warning(
                "Could not %s delivery %d of %r: its channel is closed; RabbitMQ will "
                "redeliver the message.",
                what,
                tag,
                self.queue_name,
            )
        with self._lock:
            for tag in tags:
                self._bodies.pop(tag, None)

    def _drain_outbox(self) -> None:
        """Send queued acks and nacks (call with ``_io`` held)."""
        with self._lock:
            outbox, self._outbox = self._outbox, []
        if not outbox:
            return
        if self._dead or not self.channel.is_open:
            self._dead = True
            self._lost([t for k, t in outbox if k == "ack"], "ack")
            self._lost([t for k, t in outbox if k == "nack"], "nack")
            return
        try:
            # Frames written on the asynchronous channel and flushed once: one write
            # for the whole batch instead of one per ack.
            impl = self._async_channel
            acks = sorted(tag for kind, tag in outbox if kind == "ack")
            with self._lock:
                # Every unsettled delivery up to the last ack is acked here: one frame
                # with ``multiple`` settles them all.
                bodies = self._bodies
                few = acks and len(bodies) <= _MULTIPLE_ACK_SCAN
                below = sum(1 for tag in bodies if tag <= acks[-1]) if few else 0
            if few and below == len(acks):
                impl.basic_ack(acks[-1], multiple=True)
            else:
                for tag in acks:
                    impl.basic_ack(tag)
            for kind, tag in outbox:
                if kind != "ack":
                    impl.basic_nack(tag, requeue=False)
            _pika.flush(self.connection, _always)
        except _AMQP_ERRORS:
            self._dead = True
            self._lost([t for _, t in outbox], "settle")
            return
        with self._lock:
            for _, tag in outbox:
                self._bodies.pop(tag, None)

    def _settle_soon(self, kind: str, tags: list[int]) -> None:
        """Queue acks/nacks and send them now if the connection is free, else wake its
        holder to send them."""
        with self._lock:
            first = not self._outbox
            self._outbox.extend((kind, tag) for tag in tags)
        if self._io.acquire(blocking=False):
            try:
                self._drain_outbox()
            finally:
                self._io.release()
            return
        if first:
            try:
                self.connection.add_callback_threadsafe(self._drain_from_callback)
            except _AMQP_ERRORS:
                with self._lock:
                    outbox, self._outbox = self._outbox, []
                self._dead = True
                self._lost([t for _, t in outbox], kind)

    def _drain_from_callback(self) -> None:
        with self._io:
            self._drain_outbox()

    # -- BufferedConsumer ---------------------------------------------------------------------

    def _send_ack_batch(self, batch: list[Delivery]) -> None:
        self._settle_soon("ack", [d.tag for d in batch])

    def _dead_letter(self, tag: Delivery) -> None:
        self._settle_soon("nack", [tag.tag])
        self._forget([tag])

    # -- the consumer API -----------------------------------------------------------------------

    def __next__(self) -> MessageProxy:
        if self._outbox and self._io.acquire(blocking=False):
            try:
                self._drain_outbox()
            finally:
                self._io.release()
        deadline = time.monotonic() + self.timeout / 1000
        while True:
            with self._lock:
                if self._closed:
                    raise StopIteration
                item = self._buffer.popleft() if self._buffer else None
                if item is not None:
                    self._held[item[0]] = None
            if item is None:
                if not self._fetch(deadline):
                    raise StopIteration
                continue
            delivery, payload = item
            try:
                message = decode_message(payload, _message.global_encoder, Message)
            except DecodeError as e:
                self.broker.logger.error(
                    "Dead-lettering undecodable delivery %d on %r: %s",
                    delivery.tag,
                    self.queue_name,
                    e,
                )
                self._dead_letter(delivery)
                continue
            proxy = RabbitmqMessage(self.broker, message)
            proxy.redelivered = delivery.redelivered
            proxy._tag = delivery
            return proxy

    def nack(self, message: MessageProxy) -> None:
        """Dead-letter ``message`` (``basic.nack`` without requeue: the server moves it
        to ``q.XQ``). Never raises for a dead channel: that is logged and counted."""
        delivery = self._tag(message)

        def send() -> None:
            self._drain_outbox()
            if self._dead or not self.channel.is_open:
                self._dead = True
                self._lost([delivery.tag], "nack")
                return
            try:
                self.channel.basic_nack(delivery.tag, requeue=False)
                # A round trip through the queue: the dead letter is stored on return.
                self.channel.queue_declare(self.queue_name, passive=True)
            except _AMQP_ERRORS:
                self._dead = True
                self._lost([delivery.tag], "nack")
                return
            with self._lock:
                self._bodies.pop(delivery.tag, None)

        try:
            self._on_owner(send)
        except _AMQP_ERRORS:
            self._lost([delivery.tag], "nack")
        finally:
            self._forget([delivery])

    def _replace_deliveries(
        self, pairs: Sequence[tuple[Delivery, str, bytes, pika.BasicProperties]]
    ) -> bool:
        """For each (delivery, queue, payload, properties): publish the copy, confirmed,
        then ack the delivery. Returns False (nothing published) if the channel is dead."""

        def run() -> bool:
            self._drain_outbox()
            if self._dead or not self.channel.is_open:
                self._dead = True
                return False
            for delivery, queue_name, payload, properties in pairs:
                self._republish(queue_name, payload, properties)
                try:
                    self.channel.basic_ack(delivery.tag)
                except _AMQP_ERRORS as e:
                    self._dead = True
                    raise RabbitmqConnectionClosed(e) from e
                with self._lock:
                    self._bodies.pop(delivery.tag, None)
            return True

        try:
            return self._on_owner(run)
        except pika.exceptions.ConnectionWrongStateError:
            self._dead = True
            return False

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Return unprocessed ``messages`` to the tail of their queue: each is
        re-published (same body, confirmed) and only then acked. If the channel died,
        the server returns them itself."""
        deliveries = [self._tag(m) for m in messages]
        if not deliveries:
            return
        try:
            pairs = [
                (d, self.queue_name, self._bodies[d.tag].payload, self._bodies[d.tag].properties)
                for d in deliveries
            ]
            if not self._replace_deliveries(pairs):
                self.broker.logger.debug(
                    "Requeue of %d messages skipped: the channel is closed.", len(deliveries)
                )
        finally:
            self._forget(deliveries)

    def promote(self, message: MessageProxy) -> Message[Any]:
        """Publish the due delayed ``message`` on its canonical queue (confirmed), then
        ack it on the delay queue.

        Returns:
            The promoted copy.

        Raises:
            RabbitmqConnectionClosed: the channel is closed (the server redelivers the
                delayed message).
        """
        delivery = self._tag(message)
        promoted = policy.promoted(message.message)
        payload = encode_message(promoted, _message.global_encoder)
        try:
            ok = self._replace_deliveries(
                [(delivery, promoted.queue_name, payload, self._bodies[delivery.tag].properties)]
            )
        finally:
            self._forget([delivery])
        if not ok:
            raise RabbitmqConnectionClosed(
                f"the channel of the consumer of {self.queue_name!r} is closed"
            )
        return promoted

    def replace(self, message: MessageProxy, new: M, delay: int | None) -> M:
        """Publish ``new`` (after ``delay`` ms; confirmed) and then ack ``message``: how a
        retry is stored. If the channel died, nothing is published and the lost ack is
        counted: the server redelivers ``message``, which runs again.

        Returns:
            ``new`` as stored.
        """
        broker = self.broker
        delivery = self._tag(message)
        stored, payload = broker._prepare(new, delay, runtime.get_clock().now_ms())
        try:
            ok = self._replace_deliveries(
                [(delivery, stored.queue_name, payload, properties_of(stored))]
            )
        finally:
            self._forget([delivery])
        if not ok:
            self._lost([delivery.tag], "replace")
        elif broker._hooks.after_enqueue:
            broker._run_after(broker._hooks.after_enqueue, stored, delay)
        return stored

    def close(self) -> None:
        """Send pending acks, return every message it holds (handed out and unsettled,
        buffered, parked) to the tail of its queue, and close the connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._room.notify_all()
        with contextlib.suppress(*_AMQP_ERRORS):
            self.connection.add_callback_threadsafe(_nothing)  # ends a wait for messages
        try:
            with self._io:
                if self._acks:
                    with self._lock:
                        self._sending = True
                    self._send_acks()
                self._drain_outbox()
                if not self._dead:
                    with contextlib.suppress(RabbitmqConnectionClosed, *_AMQP_ERRORS):
                        self._end_lingering()
                with self._lock:
                    acked = {d.tag for d in self._acks}
                    tags = [d.tag for d in self._held if d.tag not in acked]
                    tags += [d.tag for d, _ in self._buffer]
                    tags += sorted(tag for _, tag in self._parked)
                    self._buffer.clear()
                    self._held.clear()
                    self._parked.clear()
                if tags and not self._dead and self.channel.is_open:
                    try:
                        for tag in tags:
                            body = self._bodies[tag]
                            self._republish(self.queue_name, body.payload, body.properties)
                            self.channel.basic_ack(tag)
                    except (RabbitmqConnectionClosed, MessageUnroutable, *_AMQP_ERRORS):
                        self.broker.logger.warning(
                            "Could not return the messages of %r on close; RabbitMQ "
                            "returns them itself.",
                            self.queue_name,
                            exc_info=True,
                        )
        finally:
            self.broker._open_consumers.discard(self)
            self._close_connection()


def _nothing() -> None:
    """A callback that only wakes the I/O loop."""


def _always() -> bool:
    return True
