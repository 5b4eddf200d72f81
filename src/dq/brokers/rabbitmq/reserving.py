"""A RabbitMQ consumer's reserving side: it owns the consumer's connection and channel,
drives the reservation protocol (`dq.brokers.rabbitmq.reservation`) on them to fill the
buffer, and re-leases far delays. `dq.brokers.rabbitmq.consumer` builds the settling
side and the consumer API on it."""

from __future__ import annotations

import contextlib
import functools
import heapq
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import pika
import pika.exceptions
import pika.spec

from dq import _sources as runtime
from dq import message as _message
from dq.brokers._buffered import BufferedConsumer
from dq.brokers.rabbitmq import _pika, reservation
from dq.brokers.rabbitmq.errors import (
    MessageUnroutable,
    RabbitmqConnectionClosed,
    RabbitmqConnectionFailed,
)
from dq.brokers.rabbitmq.publisher import Confirms
from dq.brokers.rabbitmq.reservation import Effect, Phase, Reservation
from dq.core import policy
from dq.message import Message
from dq.wire import decode_message

if TYPE_CHECKING:
    from dq.brokers.rabbitmq.broker import RabbitmqBroker

__all__ = ["Body", "Delivery", "ReservingConsumer"]

R = TypeVar("R")

_AMQP_ERRORS = (pika.exceptions.AMQPError,)
_ROOM_LINGER_S = 0.002  # see `ReservingConsumer._wait_for_room`
_REPLY_TIMEOUT_S = 30.0  # how long a consumer waits for the server to answer a method


class Delivery(NamedTuple):
    """A consumer's handle on one delivery."""

    tag: int
    redelivered: bool


class Body(NamedTuple):
    """What a consumer keeps of an unsettled delivery, to publish it again."""

    payload: bytes
    properties: pika.BasicProperties
    received_ms: int


class ReservingConsumer(BufferedConsumer[Delivery]):
    """The reserving side of a consumer of one RabbitMQ queue, owning its connection
    and channel: every pika call on them is made under ``_io``; a thread that finds it
    taken hands its work to the holder (`_on_owner`).

    Raises:
        RabbitmqConnectionClosed: the server could not be reached.
    """

    broker: RabbitmqBroker

    def __init__(
        self, broker: RabbitmqBroker, queue_name: str, prefetch: int, timeout: int
    ) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self._room = threading.Condition(self._lock)
        self._io = threading.RLock()  # held by whoever uses the connection
        self._bodies: dict[int, Body] = {}  # every unsettled delivery's payload
        self._parked: list[tuple[int, int]] = []  # (re-lease time ms, tag), a heap
        self._outbox: list[tuple[str, int]] = []  # ("ack" | "nack", tag) to send
        self._dead = False
        self._qos: int | None = None  # the per-consumer prefetch set on the channel
        self._lingering: str | None = None  # the tag of a consume left open (_reserve)
        self._consumes: dict[str, Reservation] = {}  # by tag, until cancelled and done
        self._qos_replies: deque[Callable[[], None] | None] = deque()  # per basic.qos sent
        self._is_delay = policy.is_delay_queue(queue_name)
        try:
            self.connection = broker._connect(reading=True)
            self.channel = self.connection.channel()
            self._async_channel = _pika.impl_of(self.channel)
            _pika.read_deliveries(self.connection, self._async_channel)
            number = self._async_channel.channel_number
            # basic.qos and basic.cancel are sent without pika's blocking RPC (see
            # `_reserve`): their answers come here.
            callbacks = self._async_channel.callbacks
            callbacks.add(number, pika.spec.Basic.QosOk, self._on_qos_ok, one_shot=False)
            callbacks.add(number, pika.spec.Basic.CancelOk, self._on_cancel_ok, one_shot=False)
            self._confirms = Confirms(self.connection, self.channel)
            broker._ensure(self.channel, policy.q_name(queue_name))
        except RabbitmqConnectionFailed as e:
            raise RabbitmqConnectionClosed(e) from e
        except _AMQP_ERRORS as e:
            self._close_connection()
            raise RabbitmqConnectionClosed(e) from e

    @property
    def _outstanding(self) -> int:
        return len(self._buffer) + len(self._held) + len(self._parked)

    def _drain_outbox(self) -> None:
        """Send queued acks and nacks (call with ``_io`` held): the settling side's."""
        raise NotImplementedError

    def _close_connection(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection
            if self.connection.is_open:
                self.connection.close()

    # -- running code on the connection -------------------------------------------------------

    def _on_owner(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` (pika calls) with the connection to itself: at once if its lock is
        free, else handed to the holder through pika's thread-safe callback (pumping
        the connection here whenever the holder lets go of it)."""
        if self._io.acquire(blocking=False):
            try:
                return fn()
            finally:
                self._io.release()
        box: list[tuple[bool, Any]] = []
        done = threading.Event()

        def task() -> None:
            try:
                box.append((True, fn()))
            except BaseException as e:
                box.append((False, e))
            finally:
                done.set()

        self.connection.add_callback_threadsafe(task)
        while not done.wait(0.01):
            if self._io.acquire(blocking=False):
                try:
                    if not done.is_set():
                        self.connection.process_data_events(0)
                finally:
                    self._io.release()
        ok, value = box[0]
        if ok:
            return value  # type: ignore[no-any-return]  # what fn returned
        raise value

    def _pump(self, until: Callable[[], bool], seconds: float) -> bool:
        """Process I/O until ``until()`` holds or ``seconds`` passed, running what
        other threads handed to the connection (acks, tasks) as it comes; return
        ``until()`` (call with ``_io``)."""
        return _pika.pump(self.connection, self.channel, until, seconds)

    def _failure(self, e: Exception) -> RabbitmqConnectionClosed:
        """Mark the consumer dead after pika error ``e``; return what to raise (a 404
        means the queue was deleted: it is declared again on next use)."""
        self._dead = True
        if getattr(e, "reply_code", None) == 404:
            self.broker._ensured.discard(policy.q_name(self.queue_name))
        return RabbitmqConnectionClosed(e)

    def _check_alive(self) -> None:
        """Process pending I/O (heartbeats, a close from the server, callbacks of other
        threads) and raise if the connection or channel is gone (call with ``_io``)."""
        if not self._dead:
            try:
                self.connection.process_data_events(0)
            except _AMQP_ERRORS:
                self._dead = True
        if self._dead or not self.channel.is_open or not self.connection.is_open:
            self._dead = True
            raise RabbitmqConnectionClosed(
                f"the connection of the consumer of {self.queue_name!r} is closed"
            )

    # -- filling the buffer -------------------------------------------------------------------

    def _room_freed(self) -> None:
        with self._room:
            self._room.notify_all()

    def _lingering_consume(self) -> Reservation | None:
        return self._consumes.get(self._lingering) if self._lingering is not None else None

    def _fetch(self, deadline: float) -> bool:
        """Reserve up to the free prefetch (see `_reserve`), waiting until ``deadline``
        for a message when none is ready; return whether the buffer has items."""
        if not self.broker.exact_reservations:
            return self._stream(deadline)
        while True:
            subscription = self._lingering_consume()
            if subscription is None or not subscription.subscribed:
                self._wait_for_room(deadline)
            with self._io:
                self._check_alive()
                try:
                    self._drain_outbox()
                    self._release_parked()
                    subscription = self._lingering_consume()
                    if subscription is not None and subscription.subscribed and not self._closed:
                        if self._buffer:
                            return True
                        wait = self._wait_s(deadline)
                        if wait > 0:
                            self._pump(lambda: bool(self._buffer) or self._closed, wait)
                            if self._buffer:
                                return True
                            if time.monotonic() < deadline and not self._closed:
                                continue  # a parked delivery is due
                        # Nothing came within the consumer's timeout: the subscription
                        # ends, and the next call reserves afresh.
                    self._end_lingering()
                except _AMQP_ERRORS as e:
                    raise self._failure(e) from e
                with self._lock:
                    if self._buffer:  # what a lingering consume delivered
                        return True
                    room = self.prefetch - self._outstanding
                if room < self._min_batch:
                    if time.monotonic() >= deadline or self._closed:
                        return False
                    continue
                wait = self._wait_s(deadline)
                got = self._reserve(room, wait if not self._closed else 0.0)
                if self._buffer:
                    return True
                if not got and time.monotonic() >= deadline:
                    return False

    def _wait_for_room(self, deadline: float, *, subscribed: bool = False) -> None:
        """Wait until at least half the prefetch is free or a message is buffered (or
        ``deadline``, a due parked delivery, acks to send, or close).

        ``subscribed``: the server may have sent deliveries for the room there is;
        while some is free, wait at most `_ROOM_LINGER_S`, then read them. Otherwise
        a caller holding all but part of the prefetch, with no ack to come, would
        wait out its timeout with a message unread on the socket.
        """
        with self._lock:
            while (room := self.prefetch - self._outstanding) < self._min_batch and not (
                self._buffer
            ):
                remaining = self._wait_s(deadline)
                if remaining <= 0 or self._closed or self._outbox:
                    return
                if subscribed and room > 0:
                    if not self._room.wait(min(remaining, _ROOM_LINGER_S)):
                        return
                else:
                    self._room.wait(remaining)

    def _stream(self, deadline: float) -> bool:
        """`_fetch` without exact reservations: one consume, with the prefetch as its
        limit, for the consumer's life (opened on first use); wait until ``deadline``
        for what the server sends.

        While less than half the prefetch is free it waits for room, not on the
        socket: the server sends a message for each ack meanwhile, and they are then
        read in one go rather than one wake-up each. It waits so at most
        `_ROOM_LINGER_S` when no room frees up, then reads what came."""
        while True:
            self._wait_for_room(deadline, subscribed=True)
            if self._buffer:
                return True
            with self._io:
                if self._dead or not self._async_channel.is_open or not self.connection.is_open:
                    self._check_alive()  # raises
                try:
                    self._drain_outbox()
                    self._release_parked()
                    if self._lingering is None and not self._closed:
                        self._open_consume(self.prefetch, subscribe=True)
                    wait = self._wait_s(deadline)
                    if wait > 0 and not self._closed:
                        self._pump(lambda: bool(self._buffer) or self._closed, wait)
                except _AMQP_ERRORS as e:
                    raise self._failure(e) from e
                if wait <= 0:  # the socket was not read: notice a close from the server
                    self._check_alive()  # (and read what came)
                if self._buffer:
                    return True
                if self._closed or time.monotonic() >= deadline:
                    return False

    def _end_lingering(self) -> None:
        """Cancel the consume a reservation left open, taking what it delivered until
        the server's cancel-ok (call with ``_io``)."""
        tag, self._lingering = self._lingering, None
        consume = self._consumes.get(tag) if tag is not None else None
        if consume is not None and not consume.cancelled and self.channel.is_open:
            self._end(consume.tag)

    def _end(self, tag: str) -> None:
        """Cancel consume ``tag`` and wait for the cancel-ok (call with ``_io``)."""
        self._send_cancel(tag)
        if not self._pump(lambda: self._consumes[tag].cancelled, _REPLY_TIMEOUT_S):
            self._dead = True
            raise RabbitmqConnectionClosed(
                f"the server did not answer the cancel of a consume of {self.queue_name!r}"
            )

    def _wait_s(self, deadline: float) -> float:
        """Seconds until ``deadline`` or the next parked delivery's re-lease."""
        wait = deadline - time.monotonic()
        if self._parked:
            wait = min(wait, max(0.0, (self._parked[0][0] - runtime.get_clock().now_ms()) / 1000))
        return wait

    def _read_sent(self) -> None:
        """Read every delivery the server sent this consumer before now: one round trip
        on its channel (a ``basic.qos`` that changes nothing: its answer follows what
        was sent before it). Skipped when another thread holds the connection (it is
        reading it) or no consume is open (nothing can be on the way)."""
        consume = self._lingering_consume()
        qos = self._qos
        if self._dead or self._closed or consume is None or consume.cancelled or qos is None:
            return
        if not self._io.acquire(blocking=False):
            return
        try:
            if not self.channel.is_open:
                return
            answered: list[bool] = []
            self._send_qos(qos, lambda: answered.append(True))
            self._pump(lambda: bool(answered), _REPLY_TIMEOUT_S)
        except _AMQP_ERRORS:
            self._dead = True
        finally:
            self._io.release()

    def _take(self, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
        """Record one delivery: buffered to hand out, or parked (a far delay)."""
        tag = int(method.delivery_tag)
        now = runtime.get_clock().now_ms()
        with self._lock:
            self._bodies[tag] = Body(bytes(body), properties, now)
            delivery = Delivery(tag, bool(method.redelivered))
            if self._is_delay:
                eta = _eta_of(body)
                if eta is not None and eta > now + self.broker.lease:
                    heapq.heappush(self._parked, (now + self.broker.lease, tag))
                    return
            self._buffer.append((delivery, bytes(body)))
            self._room.notify()  # a waiter for room takes it (read by another thread)

    # -- the reservation protocol's I/O -------------------------------------------------------

    def _reserve(self, room: int, wait_s: float) -> int:
        """Reserve up to ``room`` messages in one go; if none is ready, wait up to
        ``wait_s`` for the first. Return how many were reserved (call with ``_io``).

        The protocol is `dq.brokers.rabbitmq.reservation`'s. Deliveries that race the
        cancel are taken too (the cancel-ok comes after the last of them; pika's own
        cancel would reject them), so the cancel is waited for only when fewer than
        ``room`` arrived. The qos, the consume and the cancel are written without
        waiting for the answers pika's blocking calls wait for: a full batch costs one
        round trip.

        When nothing was ready and the first message came while waiting, the consume
        stays open (`_lingering`): with the whole prefetch free it becomes a
        subscription, as Dramatiq's consumers are, kept while the consumer keeps
        finding messages (`_fetch`); otherwise the next reservation cancels it.
        """
        consumes = self._consumes
        try:
            tag = self._open_consume(room)
            if not self._pump(lambda: consumes[tag].answered, _REPLY_TIMEOUT_S):
                self._dead = True
                raise RabbitmqConnectionClosed(
                    f"the server did not answer a reservation on {self.queue_name!r}"
                )
            if consumes[tag].phase is Phase.NONE_READY:
                came = self._pump(lambda: consumes[tag].arrived > 0 or self._closed, wait_s)
                consume = consumes[tag]
                if came and not consume.full and not self._closed:
                    consumes[tag] = reservation.subscribe(consume, room == self.prefetch)
                    self._lingering = tag
                    return consume.arrived
            if not consumes[tag].full and self.channel.is_open:
                self._end(tag)
        except _AMQP_ERRORS as e:
            raise self._failure(e) from e
        if self.channel.is_closed:
            self._dead = True
            raise RabbitmqConnectionClosed(
                f"the channel of the consumer of {self.queue_name!r} was closed by the server"
            )
        return consumes[tag].arrived

    def _open_consume(self, room: int, *, subscribe: bool = False) -> str:
        """Send [``basic.qos``] and ``basic.consume``; the marker follows the
        consume-ok. With ``subscribe``, no marker: the consume stays open as the
        consumer's subscription (`_lingering`). Return its tag (call with ``_io``)."""
        for done in [t for t, c in self._consumes.items() if c.cancelled]:
            del self._consumes[done]
        if self._qos != room:
            self._send_qos(room, None)
            self._qos = room
        consume = self._async_channel.basic_consume
        tag = str(consume(self.queue_name, self._on_message, callback=self._on_consume_ok))
        self._consumes[tag] = Reservation(tag, room, subscribed=subscribe)
        if subscribe:
            self._lingering = tag
        return tag

    def _apply(self, step: tuple[Reservation, Effect | None]) -> None:
        """Keep the reservation a transition returned and carry out its effect."""
        consume, effect = step
        self._consumes[consume.tag] = consume
        if effect is Effect.SEND_CANCEL:
            # Without telling pika, which would reject every delivery arriving after
            # the call: the server's cancel-ok follows the last delivery of the
            # consume, and they are all taken.
            self._async_channel.send_method(pika.spec.Basic.Cancel(consumer_tag=consume.tag))

    def _on_message(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._take(method, properties, body)
        self._apply(reservation.delivered(self._consumes[method.consumer_tag]))

    def _on_marker(self, tag: str) -> None:
        self._apply(reservation.marker_returned(self._consumes[tag]))

    def _on_consume_ok(self, frame: Any) -> None:
        # The blocking channel marks every consume-ok in a one-shot result of its own
        # (for its basic_consume); it must not stay set.
        _pika.reset_consume_ok(self.channel)
        consume = self._consumes.get(str(frame.method.consumer_tag))
        if consume is not None and not consume.subscribed:
            self._send_qos(consume.room, functools.partial(self._on_marker, consume.tag))

    def _send_qos(self, prefetch: int, then: Callable[[], None] | None) -> None:
        """Send ``basic.qos`` without waiting; ``then`` runs when its ok comes."""
        self._qos_replies.append(then)
        self._async_channel.send_method(pika.spec.Basic.Qos(prefetch_count=prefetch))

    def _on_qos_ok(self, _frame: Any) -> None:
        then = self._qos_replies.popleft() if self._qos_replies else None
        if then is not None:
            then()

    def _send_cancel(self, tag: str) -> None:
        """Send ``basic.cancel`` for consume ``tag`` (once)."""
        self._apply(reservation.cancel(self._consumes[tag]))

    def _on_cancel_ok(self, frame: Any) -> None:
        tag = str(frame.method.consumer_tag)
        self._async_channel.forget(tag)
        consume = self._consumes.get(tag)
        if consume is not None:
            self._consumes[tag] = reservation.cancel_ok(consume)

    # -- re-leasing far delays ---------------------------------------------------------------

    def _release_parked(self) -> None:
        """Re-publish parked deliveries whose lease is up, then ack them (call with
        ``_io`` held)."""
        now = runtime.get_clock().now_ms()
        while self._parked and self._parked[0][0] <= now:
            _, tag = self._parked[0]
            body = self._bodies[tag]
            self._republish(self.queue_name, body.payload, body.properties)
            try:
                self.channel.basic_ack(tag)
            except _AMQP_ERRORS as e:
                self._dead = True
                raise RabbitmqConnectionClosed(e) from e
            with self._lock:
                heapq.heappop(self._parked)
                self._bodies.pop(tag, None)
            self.broker._count_re_leased()
            self._room_freed()

    def _republish(self, queue_name: str, payload: bytes, properties: pika.BasicProperties) -> None:
        """Publish a copy on this consumer's channel and wait for its confirm."""
        try:
            self.broker._ensure(self.channel, policy.q_name(queue_name))
            nacked, returned = self._confirms.publish([(queue_name, payload, properties)])
        except _AMQP_ERRORS as e:
            self._dead = True
            raise RabbitmqConnectionClosed(e) from e
        if returned:
            self.broker._ensured.discard(policy.q_name(queue_name))
            raise MessageUnroutable([queue_name], [_message_id_of(payload)])
        if nacked:
            raise RabbitmqConnectionClosed(f"the server nacked a publish to {queue_name!r}")


def _eta_of(payload: bytes) -> int | None:
    """The eta of an encoded message, or None (no eta, or undecodable)."""
    try:
        return policy.message_eta_ms(decode_message(payload, _message.global_encoder, Message))
    except Exception:  # undecodable, or a bad eta: __next__ deals with it
        return None


def _message_id_of(payload: bytes) -> str:
    try:
        return decode_message(payload, _message.global_encoder, Message).message_id
    except Exception:  # only for an error message
        return "?"
