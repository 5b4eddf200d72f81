"""`RabbitmqBroker`: Dramatiq's RabbitMQ wire format, explicit connection ownership,
confirmed publishing and safe long delays.

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
"""

from __future__ import annotations

import contextlib
import heapq
import inspect
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, NamedTuple, TypeVar

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.adapters.blocking_connection import _IoloopTimerContext as _Timer

from dq import message as _message
from dq import runtime
from dq.broker import Broker, Consumer, MessageProxy
from dq.brokers._buffered import BufferedConsumer
from dq.brokers._checks import (
    StoredQueueNames,
    check_consume_arguments,
    delayed_if_asked,
    is_whole,
)
from dq.brokers._declarations import LocalDeclarations
from dq.brokers.steps import Cannot, CommandTable, ServerStep
from dq.common import getenv_int
from dq.core import (
    Ack,
    AckMany,
    DeclareQueue,
    Enqueue,
    ExpireDeadLetters,
    ExpireLeases,
    Flush,
    FlushAll,
    Nack,
    Promote,
    Recover,
    Release,
    Renew,
    Replace,
    Requeue,
    Reserve,
    Start,
    policy,
)
from dq.errors import (
    BrokerError,
    ConnectionClosed,
    ConnectionFailed,
    DecodeError,
    QueueJoinTimeout,
    QueueNotFound,
)
from dq.message import Message
from dq.middleware import Middleware
from dq.wire import decode_message, encode_message

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
]

M = TypeVar("M", bound=Message[Any])
R = TypeVar("R")

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
_WRITE_CHUNK = 500  # publishes per buffer handed to pika
_READ_EVERY = 1024  # unconfirmed publishes between reads of what the server sent
_CACHED_METHODS = 1024  # marshalled basic.publish frames kept per channel
_BACKOFF_S = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
_REPLY_TIMEOUT_S = 30.0  # how long a consumer waits for the server to answer a method
_KEEP_CANCELLED = 16  # cancelled consumer tags left in pika's reject set
_MULTIPLE_ACK_SCAN = 256  # at most this many unsettled deliveries: try one multiple ack
_PARAMETER_NAMES = frozenset(
    name
    for name in inspect.signature(pika.ConnectionParameters.__init__).parameters
    if name not in ("self", "_DEFAULT")
)


#: How each core command is carried out on RabbitMQ: one AMQP sequence each, named
#: after the command, or why RabbitMQ cannot (and what happens instead). The server
#: keeps the queues; dq decides what to publish, ack or nack.
COMMANDS: CommandTable = {
    DeclareQueue: ServerStep(
        "queue.declare q, q.DQ, q.XQ", "idempotent declares with Dramatiq's arguments"
    ),
    Enqueue: ServerStep(
        "basic.publish", "one persistent publish (confirmed with confirm_delivery)"
    ),
    Reserve: ServerStep(
        "basic.qos + basic.consume",
        "the server sends up to prefetch unacked deliveries (a subscription; with "
        "exact_reservations, a consume cancelled once the free room arrived)",
    ),
    Ack: ServerStep("basic.ack", "one ack frame"),
    AckMany: ServerStep("basic.ack multiple", "one ack frame settling every tag up to one"),
    Nack: ServerStep(
        "basic.nack requeue=false",
        "the server dead-letters to q.XQ (x-dead-letter-routing-key) in the same step",
    ),
    Requeue: ServerStep("publish confirmed, then basic.ack", "the copy is stored first"),
    Promote: ServerStep("publish to q confirmed, then basic.ack", "the copy is stored first"),
    Replace: ServerStep(
        "publish to q or q.DQ confirmed, then basic.ack", "the retry is stored first"
    ),
    Start: Cannot(
        "RabbitMQ keeps no per-message run state: it counts no deliveries, so there "
        "is no delivery cap (redelivered messages carry the redelivered flag)"
    ),
    Recover: ServerStep(
        "connection close",
        "the server requeues every unacked delivery of a closed channel itself "
        "(no delivery count: RabbitMQ has no cap)",
    ),
    Renew: Cannot(
        "the server tracks live consumers by their connection, not by leases; its "
        "consumer_timeout plays the lease's role (dq re-leases far delays under it)"
    ),
    ExpireLeases: Cannot(
        "no leases: a consumer holding a delivery past consumer_timeout has its channel "
        "closed by the server, which requeues the delivery"
    ),
    ExpireDeadLetters: Cannot(
        "the x-message-ttl argument of q.XQ makes the server drop old dead letters"
    ),
    Flush: ServerStep("queue.purge q, q.DQ, q.XQ", "unacked deliveries stay with consumers"),
    FlushAll: ServerStep("queue.purge of every declared queue", "one flush per queue"),
    Release: ServerStep(
        "publish each held delivery confirmed, then basic.ack; close",
        "what the consumer held is stored at the tail before it is acked",
    ),
}


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


# -- pika plumbing ----------------------------------------------------------------------------


def _flush(connection: BlockingConnection, ready: Callable[[], bool]) -> None:
    """Process I/O on ``connection`` until ``ready()`` (pika's own blocking wait, the
    one every blocking call uses)."""
    flush: Callable[..., None] = getattr(connection, "_flush_output")  # noqa: B009
    flush(ready)


_FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size
_METHOD_ID = struct.Struct(">I")
_CONTENT_HEADER = struct.Struct(">HHQ")  # class, weight, body size
_DELIVER_ID = pika.spec.Basic.Deliver.INDEX
_FRAME_END = 0xCE
_ROOM_LINGER_S = 0.002  # see `_RabbitmqConsumer._wait_for_room`
_HOLD_BACK = 256 * 1024  # bytes of a partly read delivery kept to decode it whole


class _Delivered(NamedTuple):
    """One whole delivery decoded by `parse_delivery`."""

    end: int  # the offset just past its last frame
    frames: int
    method: pika.spec.Basic.Deliver
    properties: pika.spec.BasicProperties
    body: bytes


_INCOMPLETE: Final = "incomplete"  # `_parse_delivery`: the rest has not arrived yet


def _frame_at(data: bytes, offset: int, kind: int, channel: int) -> tuple[int, int] | str | None:
    """The payload's (start, stop) of a whole frame of ``kind`` on ``channel`` at
    ``offset``; None if another frame is there; `_INCOMPLETE` if not all of it is."""
    if len(data) - offset < 7:
        return _INCOMPLETE
    frame_kind, number, size = _FRAME_HEADER.unpack_from(data, offset)
    if frame_kind != kind or number != channel:
        return None
    start = offset + 7
    stop = start + size
    if stop >= len(data):
        return _INCOMPLETE
    if data[stop] != _FRAME_END:
        raise pika.exceptions.InvalidFrameError("Invalid FRAME_END marker")
    return start, stop


def _whole_frame(data: bytes, offset: int) -> int:
    """The size of the frame at ``data[offset]`` if all of it is there, else 0."""
    if len(data) - offset < 7:
        return 0
    size = int(_FRAME_HEADER.unpack_from(data, offset)[2]) + 8
    return size if offset + size <= len(data) else 0


def _is_delivery(data: bytes, offset: int, channel: int) -> bool:
    """Whether a ``basic.deliver`` method frame on ``channel`` starts at ``offset``."""
    return (
        len(data) - offset >= 11
        and _FRAME_HEADER.unpack_from(data, offset)[:2] == (pika.spec.FRAME_METHOD, channel)
        and _METHOD_ID.unpack_from(data, offset + 7)[0] == _DELIVER_ID
    )


def parse_delivery(data: bytes, offset: int, channel: int) -> _Delivered | None:
    """Decode the whole ``basic.deliver`` on ``channel`` that starts at ``data[offset]``
    (its method frame, content header and body frames), or return None when something
    else starts there or not all of it has arrived (pika's reader takes it then).

    pika decodes each frame into objects, runs it through its callback registry and
    reassembles the content: over half of an idle consumer's time between the socket
    waking it and the message reaching the worker. This is the same decoding, written
    for the one frame sequence that matters, with pika's own method and properties
    classes (`_RabbitmqConsumer._read` says when it is used).
    """
    delivered = _parse_delivery(data, offset, channel)
    return delivered if isinstance(delivered, _Delivered) else None


def _parse_delivery(data: bytes, offset: int, channel: int) -> _Delivered | str | None:
    """`parse_delivery`, telling apart a delivery whose frames so far came in order
    and whose rest has not arrived (`_INCOMPLETE`) from anything else (None)."""
    if len(data) - offset >= 11 and not _is_delivery(data, offset, channel):
        return None
    method_frame = _frame_at(data, offset, pika.spec.FRAME_METHOD, channel)
    if not isinstance(method_frame, tuple):
        return method_frame
    start, stop = method_frame
    header = _frame_at(data, stop + 1, pika.spec.FRAME_HEADER, channel)
    if not isinstance(header, tuple):
        return header
    method = pika.spec.Basic.Deliver().decode(data, start + 4)
    header_start, stop = header
    _, _, size = _CONTENT_HEADER.unpack_from(data, header_start)
    properties = pika.spec.BasicProperties()
    properties.decode(data, header_start + 12)
    frames = 2
    parts: list[bytes] = []
    received = 0
    while received < size:
        body = _frame_at(data, stop + 1, pika.spec.FRAME_BODY, channel)
        if not isinstance(body, tuple):
            return body
        body_start, stop = body
        parts.append(data[body_start:stop])
        received += stop - body_start
        frames += 1
    if received != size:
        raise pika.exceptions.BodyTooLongError(received, size)
    return _Delivered(stop + 1, frames, method, properties, b"".join(parts))


def _impl_of(channel: BlockingChannel) -> pika.channel.Channel:
    impl = getattr(channel, "_impl")  # noqa: B009 - the asynchronous channel underneath
    assert isinstance(impl, pika.channel.Channel)
    return impl


class _Confirms:
    """Publishing on one channel. In publisher-confirm mode (``confirming``) the
    confirms are tracked here, so a batch of publishes can be sent at once and then
    waited for together (pika's blocking channel waits after every publish).

    Without confirm mode (a broker without ``confirm_delivery``, as Dramatiq's
    channel) publishes are written and the server sends nothing back for them: in
    confirm mode it would track and confirm each one, work that measurably delays
    the deliveries of an idle queue (see docs/rabbitmq.md).
    """

    def __init__(
        self, connection: BlockingConnection, channel: BlockingChannel, *, confirming: bool = True
    ) -> None:
        self.connection = connection
        self.channel = channel
        self.confirming = confirming
        self._impl = _impl_of(channel)
        self._next_tag = 0
        self._outstanding: dict[int, int] = {}  # delivery tag -> index in the batch
        self._nacked: list[int] = []
        self._unread = 0  # unconfirmed publishes since the input was last read
        self._methods: dict[tuple[str, bool], bytes] = {}  # marshalled basic.publish frames
        self._returned: list[tuple[str, bytes]] = []  # (routing key, body)
        self._basic_publish = self._impl.basic_publish
        if not confirming:
            return
        # The server numbers every publish on the channel, also those made on it
        # directly (``broker.channel.basic_publish``): they are counted here too, or
        # every later confirm would be matched to the wrong publish.
        setattr(self._impl, "basic_publish", self._counted_publish)  # noqa: B010
        selected: list[bool] = []
        self._impl.confirm_delivery(
            ack_nack_callback=self._on_confirm, callback=lambda _frame: selected.append(True)
        )
        self._impl.add_on_return_callback(self._on_return)
        _flush(connection, lambda: bool(selected) or channel.is_closed)
        if not selected:
            raise pika.exceptions.ChannelWrongStateError("the channel closed entering confirm mode")

    def _counted_publish(self, *args: Any, **kwargs: Any) -> None:
        self._basic_publish(*args, **kwargs)
        self._next_tag += 1
        self._outstanding[self._next_tag] = -1

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = int(method.delivery_tag)
        if method.multiple:
            tags = [t for t in self._outstanding if t <= tag]
        else:
            tags = [tag] if tag in self._outstanding else []
        nack = isinstance(method, pika.spec.Basic.Nack)
        for t in tags:
            index = self._outstanding.pop(t)
            if nack:
                self._nacked.append(index)

    def _on_return(self, _channel: Any, method: Any, _properties: Any, body: bytes) -> None:
        self._returned.append((str(method.routing_key), bytes(body)))

    def publish(
        self,
        items: Sequence[tuple[str, bytes, pika.BasicProperties]],
        *,
        wait: bool = True,
    ) -> tuple[list[int], list[tuple[str, bytes]]]:
        """Publish ``items`` (routing key, body, properties); with ``wait`` (confirmed
        publishing), with the mandatory flag, then wait for every confirm.

        Without ``wait`` the frames are written and the call returns: the confirms
        (if ``confirming``) arrive later and only `sync` waits for them. ``wait`` needs
        confirm mode.

        Returns:
            The indexes of the items the server nacked, and the (routing key, body) of
            the items it returned as unroutable (both empty without ``wait``).

        Raises:
            pika.exceptions.AMQPError: the channel or connection failed; items before
                the failure may or may not be stored.
        """
        if wait and not self.confirming:
            raise RuntimeError("a publish waits for its confirm on a channel not in confirm mode")
        self._nacked, self._returned = [], []
        for start in range(0, len(items), _WRITE_CHUNK):
            chunk = items[start : start + _WRITE_CHUNK]
            self._write(chunk, mandatory=wait)
            if self.confirming:
                for index in range(start, start + len(chunk)):
                    self._next_tag += 1
                    self._outstanding[self._next_tag] = index if wait else -1
        if not wait:
            # The frames are written (see `_write`). What the server sent (confirms,
            # a close) is read every _READ_EVERY publishes, not after each: reading
            # is most of the cost of a send. `sync`, and `usable` after a second
            # without use, read it too.
            self._unread += len(items)
            if self._unread >= _READ_EVERY or self._transport_busy():
                self._unread = 0
                # Not `_flush`: with nothing left to write it returns without reading.
                self.connection.process_data_events(0)
            return [], []
        self.sync()
        return [i for i in self._nacked if i >= 0], self._returned

    def _write(
        self, items: Sequence[tuple[str, bytes, pika.BasicProperties]], *, mandatory: bool
    ) -> None:
        """Queue the frames of ``items`` for writing, as one buffer.

        pika writes each frame of a publish (method, header, body) with its own system
        call; marshalling them here and handing pika one buffer sends a publish, or a
        whole batch, in one. Without pika's internals (another version), publish one
        by one.
        """
        impl = self._impl
        connection = impl.connection
        emit = getattr(connection, "_output_marshaled_frames", None)
        body_max = getattr(connection, "_body_max_length", None)
        if emit is None or not isinstance(body_max, int) or body_max <= 0:
            for routing_key, body, properties in items:
                self._basic_publish("", routing_key, body, properties, mandatory=mandatory)
            return
        if not impl.is_open:
            raise pika.exceptions.ChannelWrongStateError("the channel is closed")
        number = impl.channel_number
        frames: list[bytes] = []
        methods = self._methods
        for routing_key, body, properties in items:
            method_frame = methods.get((routing_key, mandatory))
            if method_frame is None:
                method = pika.spec.Basic.Publish(
                    exchange="", routing_key=routing_key, mandatory=mandatory
                )
                method_frame = pika.frame.Method(number, method).marshal()
                if len(methods) < _CACHED_METHODS:
                    methods[routing_key, mandatory] = method_frame
            frames.append(method_frame)
            frames.append(pika.frame.Header(number, len(body), properties).marshal())
            for offset in range(0, len(body), body_max):
                frames.append(pika.frame.Body(number, body[offset : offset + body_max]).marshal())
        data = b"".join(frames)
        if not self._send_now(data, len(frames)):
            emit([data])

    def _transport_busy(self, transport: Any = None) -> bool:
        """Whether pika holds data it has not written yet (or has no transport)."""
        if transport is None:
            transport = getattr(self._impl.connection, "_transport", None)
        return bool(getattr(transport, "_tx_buffers", True))

    def _send_now(self, data: bytes, frames: int) -> bool:
        """Write ``data`` to the socket at once when pika has nothing queued before it
        (plain TCP only); what the socket does not take is queued to pika. Return False
        when pika must write it all: pika's own write takes several poller calls."""
        connection = self._impl.connection
        transport = getattr(connection, "_transport", None)
        if type(transport).__name__ != "_AsyncPlaintextTransport" or self._transport_busy(
            transport
        ):
            return False
        sock = getattr(transport, "_sock", None)
        if not isinstance(sock, socket.socket):
            return False
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return False  # pika's write meets the error and closes the connection
        stats: Any = connection  # pika's counters (heartbeats look at them)
        stats.bytes_sent += len(data)
        stats.frames_sent += frames
        if sent < len(data):
            getattr(connection, "_adapter_emit_data")(data[sent:])  # noqa: B009
        return True

    def sync(self) -> None:
        """Wait until the server confirmed everything published on this channel: it
        reached its queues (so their counts include it). Without confirm mode, only
        wait until it is written: a purge sent next on this channel comes after those
        publishes, but a count may not include the last of them yet (RabbitMQ answers
        a count ahead of the deliveries its queue has not filed).

        Raises:
            pika.exceptions.AMQPError: the channel or connection failed.
        """
        channel = self.channel
        _flush(self.connection, lambda: not self._outstanding or channel.is_closed)
        if self._outstanding:
            self._outstanding.clear()
            raise pika.exceptions.ChannelWrongStateError(
                "the channel closed while waiting for publisher confirms"
            )


def _properties(message: Message[Any]) -> pika.BasicProperties:
    priority = message.options.get("broker_priority")
    return pika.BasicProperties(
        delivery_mode=2, priority=priority if isinstance(priority, int) else None
    )


class _Publisher:
    """One thread's publishing connection and channel (see `RabbitmqBroker.publishers`)."""

    def __init__(self, broker: RabbitmqBroker) -> None:
        self.broker = broker
        self.thread = threading.current_thread()
        self.connection = broker._connect()
        self.channel, self.confirms = self._open_channel()
        self.used = time.monotonic()

    def _open_channel(self) -> tuple[BlockingChannel, _Confirms]:
        # In confirm mode only with confirm_delivery, as Dramatiq's (see `_Confirms`).
        channel = self.connection.channel()
        return channel, _Confirms(self.connection, channel, confirming=self.broker.confirm_delivery)

    @property
    def usable(self) -> bool:
        """Whether the connection is open. After a second without use, pending I/O is
        processed first: a close from the server (missed heartbeats) shows up then,
        rather than as an unconfirmed publish written into a dead socket."""
        now = time.monotonic()
        if now - self.used > 1.0 and self.connection.is_open:
            try:
                self.connection.process_data_events(0)
            except _AMQP_ERRORS:
                return False
        self.used = now
        return bool(self.connection.is_open)

    def ensure_channel(self) -> None:
        """Open a new channel if the server closed the last one (a 404, a 406)."""
        if self.channel.is_closed:
            self.channel, self.confirms = self._open_channel()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection
            if self.connection.is_open:
                self.connection.close()


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
        self.parameters: list[pika.ConnectionParameters | pika.URLParameters] = _parameters(
            url, parameters, kwargs
        )
        self.confirm_delivery = bool(confirm_delivery)
        self.max_priority = max_priority
        self.consumer_timeout = consumer_timeout
        self.exact_reservations = bool(exact_reservations)
        #: Longest time (ms) a consumer holds a delivery unacked: half the server's limit.
        self.lease = consumer_timeout // 2
        self.join_min_successes = 10
        self.publishers: dict[int, _Publisher] = {}
        self._publishers_lock = threading.Lock()
        self._queue_names = StoredQueueNames()
        self._declarations = LocalDeclarations(self._queue_names)
        self._ensured: set[str] = set()  # canonical queues declared on the server
        self._consumers: set[_RabbitmqConsumer] = set()
        self._stats_lock = threading.Lock()
        self.lost_settlements = 0
        self.re_leased = 0

    # -- connections ----------------------------------------------------------------------

    @property
    def consumer_class(self) -> type[Consumer]:
        """The class of this broker's consumers."""
        return _RabbitmqConsumer

    def _connect(self) -> BlockingConnection:
        """Open a connection, trying each address in order (each with its own
        ``connection_attempts`` and ``retry_delay``).

        Raises:
            RabbitmqConnectionFailed: none could be opened.
        """
        try:
            return BlockingConnection(self.parameters)
        except _AMQP_ERRORS as e:
            raise RabbitmqConnectionFailed(
                f"could not connect to RabbitMQ at {_addresses(self.parameters)}: {e!r}"
            ) from e

    def _publisher(self) -> _Publisher:
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
        publisher = _Publisher(self)
        with self._publishers_lock:
            stale = [(i, p) for i, p in self.publishers.items() if not p.thread.is_alive()]
            for i, _ in stale:
                del self.publishers[i]
            self.publishers[ident] = publisher
        for _, p in stale:
            p.close()
        return publisher

    def _discard(self, publisher: _Publisher) -> None:
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
                items = [(m.queue_name, payload, _properties(m)) for m, payload in todo]
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
        return _RabbitmqConsumer(self, queue_name, prefetch, timeout)

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
        consumers = [c for c in list(self._consumers) if policy.q_name(c.queue_name) == name]
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


def _addresses(parameters: Sequence[pika.ConnectionParameters | pika.URLParameters]) -> str:
    return ", ".join(f"{p.host}:{p.port}" for p in parameters)


def _parameters(
    url: str | list[str] | None,
    parameters: list[dict[str, Any]] | None,
    kwargs: dict[str, Any],
) -> list[pika.ConnectionParameters | pika.URLParameters]:
    """The connection parameters of the constructor's arguments (see `RabbitmqBroker`)."""
    unknown = sorted(set(kwargs) - _PARAMETER_NAMES)
    if unknown:
        raise TypeError(
            f"RabbitmqBroker got unexpected keyword argument(s) {unknown}: they are not "
            f"pika.ConnectionParameters keywords ({sorted(_PARAMETER_NAMES)})"
        )
    if url is not None:
        if parameters is not None:
            raise RuntimeError(
                "RabbitmqBroker takes 'url' or 'parameters', not both: give the addresses "
                "as a list of URLs, or as a list of parameter dicts"
            )
        given: list[object] = list(url.split(";") if isinstance(url, str) else url)
        if not all(isinstance(u, str) for u in given):
            raise TypeError(f"url must be a string or a list of strings, got {url!r}")
        urls = [str(u).strip() for u in given if str(u).strip()]
        if not urls:
            raise ValueError(f"url names no address: {url!r}")
        result: list[pika.ConnectionParameters | pika.URLParameters] = []
        for u in urls:
            params = pika.URLParameters(u)
            for key, value in kwargs.items():
                setattr(params, key, value)  # pika validates each value
            result.append(params)
        return result
    if parameters is not None:
        if kwargs:
            raise RuntimeError(
                f"RabbitmqBroker takes 'parameters' or connection keywords, not both (got "
                f"{sorted(kwargs)})"
            )
        given_parameters: list[object] = list(parameters)
        if not all(isinstance(p, dict) for p in given_parameters):
            raise TypeError(
                f"parameters must be a list of dicts of pika.ConnectionParameters keywords, "
                f"got {parameters!r}"
            )
        return [pika.ConnectionParameters(**p) for p in parameters]
    return [pika.ConnectionParameters(**{"host": "127.0.0.1", **kwargs})]


# -- the consumer ---------------------------------------------------------------------------


class _Delivery(NamedTuple):
    """A consumer's handle on one delivery."""

    tag: int
    redelivered: bool


class RabbitmqMessage(MessageProxy):
    """A message delivered by a RabbitMQ consumer.

    Attributes:
        redelivered: whether RabbitMQ delivered it before (its channel closed, or a
            consumer rejected it).
    """

    redelivered: bool


class _Body(NamedTuple):
    payload: bytes
    properties: pika.BasicProperties
    received_ms: int


class _Consume:
    """One ``basic.consume`` of a consumer, and where it stands."""

    __slots__ = (
        "arrived",
        "cancel_sent",
        "cancelled",
        "none_ready",
        "room",
        "subscribed",
        "tag",
    )

    def __init__(self, room: int) -> None:
        self.tag = ""
        self.room = room  # its prefetch: it never has more unacked deliveries than this
        self.arrived = 0  # deliveries so far
        self.none_ready = False  # the marker came back before any delivery
        self.cancel_sent = False
        self.cancelled = False  # the cancel-ok came back: nothing more arrives
        self.subscribed = False  # kept open while the consumer pulls (see `_fetch`)

    @property
    def full(self) -> bool:
        return self.arrived >= self.room


class _RabbitmqConsumer(BufferedConsumer[_Delivery]):
    """A consumer of one RabbitMQ queue, owning its connection and channel.

    It reserves in batches (see `_reserve`), hands messages out one per
    ``next()``, and takes acks from any thread: the thread that can take the
    connection's lock sends them, others leave them to whoever holds it.
    `BufferedConsumer` gives it the buffer, the held messages and grouped acks; its
    ``__next__`` is its own, to hand out `RabbitmqMessage` proxies (``redelivered``).
    """

    broker: RabbitmqBroker

    def __init__(
        self, broker: RabbitmqBroker, queue_name: str, prefetch: int, timeout: int
    ) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self._room = threading.Condition(self._lock)
        self._io = threading.RLock()  # held by whoever uses the connection
        self._bodies: dict[int, _Body] = {}  # every unsettled delivery's payload
        self._parked: list[tuple[int, int]] = []  # (re-lease time ms, tag), a heap
        self._outbox: list[tuple[str, int]] = []  # ("ack" | "nack", tag) to send
        self._dead = False
        self._qos: int | None = None  # the per-consumer prefetch set on the channel
        self._lingering: _Consume | None = None  # a consume left open (see _reserve)
        self._consumes: dict[str, _Consume] = {}  # consumes whose cancel-ok has not come
        self._qos_replies: deque[Callable[[], None] | None] = deque()  # per basic.qos sent
        self._forgotten: deque[str] = deque()  # the last cancelled tags (_on_cancel_ok)
        self._is_delay = policy.is_delay_queue(queue_name)
        try:
            self.connection = broker._connect()
            self.channel = self.connection.channel()
            self._impl = _impl_of(self.channel)
            # Frames written with no pika bookkeeping (see `_send_qos`, `_send_cancel`).
            self._send_method: Callable[[Any], None] = getattr(self._impl, "_send_method")  # noqa: B009
            number = self._impl.channel_number
            # basic.qos and basic.cancel are sent without pika's blocking RPC (see
            # `_reserve`): their answers come here.
            self._impl.callbacks.add(number, pika.spec.Basic.QosOk, self._on_qos_ok, one_shot=False)
            self._impl.callbacks.add(
                number, pika.spec.Basic.CancelOk, self._on_cancel_ok, one_shot=False
            )
            self._confirms = _Confirms(self.connection, self.channel)
            self._read_deliveries_here()
            broker._ensure(self.channel, policy.q_name(queue_name))
        except RabbitmqConnectionFailed as e:
            raise RabbitmqConnectionClosed(e) from e
        except _AMQP_ERRORS as e:
            self._close_connection()
            raise RabbitmqConnectionClosed(e) from e
        broker._consumers.add(self)

    def _read_deliveries_here(self) -> None:
        """Have this connection's input go through `_read` first (with pika's
        internals as the pinned version has them; otherwise pika reads everything)."""
        connection = self._impl.connection
        impl = self._impl
        names = ("_frame_buffer", "_on_data_available", "bytes_received", "frames_received")
        if (
            not all(hasattr(connection, n) for n in names)
            or not all(hasattr(impl, n) for n in ("_consumers", "_cancelled", "_content_assembler"))
            or getattr(connection, "_frame_buffer")  # noqa: B009 - mid-frame: leave it to pika
        ):
            return
        self._pika_read: Callable[[bytes], None] = getattr(connection, "_on_data_available")  # noqa: B009
        self._fast_reads = 0  # deliveries `_read` decoded (tests look)
        self._partial = b""  # the start of a frame or delivery still arriving
        setattr(connection, "_on_data_available", self._read)  # noqa: B010

    def _read(self, data: bytes) -> None:
        """Read ``data`` (what the socket gave pika): whole deliveries are decoded here
        (`parse_delivery`) and handed to the callback pika would call, every other
        frame goes to pika's reader, whole.

        A frame that has not fully arrived waits here for the rest, and so does a
        delivery of less than `_HOLD_BACK` bytes: pika's reader never holds part of
        a frame, so the next bytes start with a frame this can read. A bigger
        delivery goes to pika frame by frame (it assembles the content itself;
        gathering it here would copy it once per read). pika's byte and frame
        counters are kept (heartbeats look at them); a delivery for a consumer tag
        that is cancelled or unknown is pika's to handle.
        """
        if self._partial:
            data, self._partial = self._partial + data, b""
        connection: Any = self._impl.connection  # pika's counters are not in its stubs
        impl = self._impl
        assembler = getattr(impl, "_content_assembler")  # noqa: B009
        channel = impl.channel_number
        consumers: dict[str, Any] = getattr(impl, "_consumers")  # noqa: B009
        cancelled: set[str] = getattr(impl, "_cancelled")  # noqa: B009
        offset, end = 0, len(data)
        while offset < end:
            if assembler._method_frame is None:  # pika is not in the middle of a content
                delivered = _parse_delivery(data, offset, channel)
                if isinstance(delivered, _Delivered):
                    tag = delivered.method.consumer_tag
                    callback = consumers.get(tag) if tag is not None else None
                    if callback is None or tag in cancelled:
                        self._pika_read(data[offset : delivered.end])
                    else:
                        connection.bytes_received += delivered.end - offset
                        connection.frames_received += delivered.frames
                        self._fast_reads += 1
                        callback(impl, delivered.method, delivered.properties, delivered.body)
                    offset = delivered.end
                    continue
                if delivered is _INCOMPLETE and end - offset < _HOLD_BACK:
                    break  # the rest of this delivery comes with the next read
            size = _whole_frame(data, offset)
            if not size:
                break
            self._pika_read(data[offset : offset + size])
            offset += size
        if offset < end:
            self._partial = data[offset:]

    @property
    def _outstanding(self) -> int:
        return len(self._buffer) + len(self._held) + len(self._parked)

    def _tag(self, message: MessageProxy) -> _Delivery:
        tag = message._tag
        if not isinstance(tag, _Delivery):
            raise ValueError(f"{message!r} was not delivered by a RabbitmqBroker consumer")
        return tag

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
        self._wait_task(done)
        ok, value = box[0]
        if ok:
            return value  # type: ignore[no-any-return]  # what fn returned
        raise value

    def _wait_task(self, done: threading.Event) -> None:
        while not done.wait(0.01):
            if self._io.acquire(blocking=False):
                try:
                    if not done.is_set():
                        self.connection.process_data_events(0)
                finally:
                    self._io.release()

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
            impl = self._impl
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
            _flush(self.connection, _always)
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

    def _send_ack_batch(self, batch: list[_Delivery]) -> None:
        self._settle_soon("ack", [d.tag for d in batch])

    def _dead_letter(self, tag: _Delivery) -> None:
        self._settle_soon("nack", [tag.tag])
        self._forget([tag])

    def _room_freed(self) -> None:
        with self._room:
            self._room.notify_all()

    def _fetch(self, deadline: float) -> bool:
        """Reserve up to the free prefetch (see `_reserve`), waiting until ``deadline``
        for a message when none is ready; return whether the buffer has items."""
        if not self.broker.exact_reservations:
            return self._stream(deadline)
        while True:
            subscription = self._lingering
            if subscription is None or not subscription.subscribed:
                self._wait_for_room(deadline)
            with self._io:
                self._check_alive()
                try:
                    self._drain_outbox()
                    self._release_parked()
                    subscription = self._lingering
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
                if self._dead or not self._impl.is_open or not self.connection.is_open:
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
        consume, self._lingering = self._lingering, None
        if consume is not None and not consume.cancelled and self.channel.is_open:
            self._end(consume)

    def _end(self, consume: _Consume) -> None:
        """Cancel ``consume`` and wait for the cancel-ok (call with ``_io``)."""
        self._send_cancel(consume)
        self._pump(lambda: consume.cancelled, _REPLY_TIMEOUT_S)
        if not consume.cancelled:
            self._dead = True
            raise RabbitmqConnectionClosed(
                f"the server did not answer the cancel of a consume of {self.queue_name!r}"
            )

    def _pump(self, until: Callable[[], bool], seconds: float) -> bool:
        """Process I/O until ``until()`` holds or ``seconds`` passed, running what
        other threads handed to the connection (acks, tasks) as it comes; return
        ``until()`` (call with ``_io``)."""
        connection = self.connection
        impl = self._impl
        ready: deque[Any] = getattr(connection, "_ready_events")  # noqa: B009
        end = time.monotonic() + seconds
        while not until():
            if impl.is_closed:  # by the server: the reason is raised (a 404, a 406)
                reason = getattr(self.channel, "_closing_reason", None)
                if isinstance(reason, pika.exceptions.AMQPError):
                    raise reason
                raise pika.exceptions.ChannelWrongStateError("the channel is closed")
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            with _Timer(remaining, getattr(connection, "_impl")) as timer:  # noqa: B009
                _flush(
                    connection,
                    lambda: until() or timer.is_ready() or bool(ready) or impl.is_closed,
                )
            if ready:
                connection.process_data_events(0)
        return True

    def _failure(self, e: Exception) -> RabbitmqConnectionClosed:
        """Mark the consumer dead after pika error ``e``; return what to raise (a 404
        means the queue was deleted: it is declared again on next use)."""
        self._dead = True
        if getattr(e, "reply_code", None) == 404:
            self.broker._ensured.discard(policy.q_name(self.queue_name))
        return RabbitmqConnectionClosed(e)

    def _wait_s(self, deadline: float) -> float:
        """Seconds until ``deadline`` or the next parked delivery's re-lease."""
        wait = deadline - time.monotonic()
        if self._parked:
            wait = min(wait, self._parked_wait())
        return wait

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

    def _read_sent(self) -> None:
        """Read every delivery the server sent this consumer before now: one round trip
        on its channel (a ``basic.qos`` that changes nothing: its answer follows what
        was sent before it). Skipped when another thread holds the connection (it is
        reading it) or no consume is open (nothing can be on the way)."""
        consume = self._lingering
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

    def _parked_wait(self) -> float:
        return max(0.0, (self._parked[0][0] - runtime.get_clock().now_ms()) / 1000)

    def _take(self, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
        """Record one delivery: buffered to hand out, or parked (a far delay)."""
        tag = int(method.delivery_tag)
        now = runtime.get_clock().now_ms()
        with self._lock:
            self._bodies[tag] = _Body(bytes(body), properties, now)
            delivery = _Delivery(tag, bool(method.redelivered))
            if self._is_delay:
                eta = _eta_of(body)
                if eta is not None and eta > now + self.broker.lease:
                    heapq.heappush(self._parked, (now + self.broker.lease, tag))
                    return
            self._buffer.append((delivery, bytes(body)))
            self._room.notify()  # a waiter for room takes it (read by another thread)

    def _reserve(self, room: int, wait_s: float) -> int:
        """Reserve up to ``room`` messages in one go; if none is ready, wait up to
        ``wait_s`` for the first. Return how many were reserved (call with ``_io``).

        A consume of prefetch ``room`` takes what is ready: the queue hands it its
        deliveries before it answers the consume, so they all precede the answer to a
        method sent after the consume-ok (a ``basic.qos``, the marker). When ``room``
        arrived, or the marker came back, the consume is cancelled: the consumer holds
        exactly what it reserved. Deliveries that race the cancel are taken too (the
        cancel-ok comes after the last of them; pika's own cancel would reject them),
        so the cancel is waited for only when fewer than ``room`` arrived. The
        qos, the consume and the cancel are written without waiting for the answers
        pika's blocking calls wait for: a full batch costs one round trip.

        When nothing was ready and the first message came while waiting, the consume
        stays open (`_lingering`): with the whole prefetch free it becomes a
        subscription, as Dramatiq's consumers are, kept while the consumer keeps
        finding messages (`_fetch`); otherwise the next reservation cancels it.
        """
        try:
            consume = self._open_consume(room)
            self._pump(
                lambda: consume.full or consume.cancelled or consume.none_ready,
                _REPLY_TIMEOUT_S,
            )
            if not (consume.full or consume.cancelled or consume.none_ready):
                self._dead = True
                raise RabbitmqConnectionClosed(
                    f"the server did not answer a reservation on {self.queue_name!r}"
                )
            if consume.none_ready:
                came = self._pump(lambda: consume.arrived > 0 or self._closed, wait_s)
                if came and not consume.full and not self._closed:
                    consume.subscribed = room == self.prefetch
                    self._lingering = consume
                    return consume.arrived
            if not consume.full and self.channel.is_open:
                self._end(consume)
        except _AMQP_ERRORS as e:
            raise self._failure(e) from e
        if self.channel.is_closed:
            self._dead = True
            raise RabbitmqConnectionClosed(
                f"the channel of the consumer of {self.queue_name!r} was closed by the server"
            )
        return consume.arrived

    def _open_consume(self, room: int, *, subscribe: bool = False) -> _Consume:
        """Send [``basic.qos``] and ``basic.consume``; the marker follows the
        consume-ok. With ``subscribe``, no marker: the consume stays open as the
        consumer's subscription (`_lingering`) (call with ``_io``)."""
        consume = _Consume(room)
        consume.subscribed = subscribe
        consume_ok = getattr(self.channel, "_basic_consume_ok_result")  # noqa: B009

        def on_message(_channel: Any, method: Any, properties: Any, body: bytes) -> None:
            self._take(method, properties, body)
            consume.arrived += 1
            if consume.full and not consume.subscribed:
                self._send_cancel(consume)

        def on_marker() -> None:
            if not consume.arrived:
                consume.none_ready = True  # what comes now came while waiting
            elif not consume.subscribed:
                self._send_cancel(consume)

        def on_consume_ok(_frame: Any) -> None:
            # The blocking channel marks every consume-ok in a one-shot result of its
            # own (for its basic_consume); it must not stay set.
            consume_ok.reset()
            if not subscribe:
                self._send_qos(room, on_marker)

        if self._qos != room:
            self._send_qos(room, None)
            self._qos = room
        consume.tag = str(
            self._impl.basic_consume(self.queue_name, on_message, callback=on_consume_ok)
        )
        self._consumes[consume.tag] = consume
        if subscribe:
            self._lingering = consume
        return consume

    def _send_qos(self, prefetch: int, then: Callable[[], None] | None) -> None:
        """Send ``basic.qos`` without waiting; ``then`` runs when its ok comes."""
        self._qos_replies.append(then)
        self._send_method(pika.spec.Basic.Qos(prefetch_count=prefetch))

    def _on_qos_ok(self, _frame: Any) -> None:
        then = self._qos_replies.popleft() if self._qos_replies else None
        if then is not None:
            then()

    def _send_cancel(self, consume: _Consume) -> None:
        """Send ``basic.cancel`` for ``consume`` without telling pika, which would
        reject every delivery arriving after the call: the server's cancel-ok follows
        the last delivery of the consume, and they are all taken."""
        if not consume.cancel_sent:
            consume.cancel_sent = True
            self._send_method(pika.spec.Basic.Cancel(consumer_tag=consume.tag))

    def _on_cancel_ok(self, frame: Any) -> None:
        tag = str(frame.method.consumer_tag)
        consume = self._consumes.pop(tag, None)
        consumers: dict[str, Any] = getattr(self._impl, "_consumers")  # noqa: B009
        consumers.pop(tag, None)
        # Nothing can come after the cancel-ok; should anything, pika rejects (requeues)
        # deliveries of the tags in its cancelled set. Only the last few stay there.
        cancelled: set[str] = getattr(self._impl, "_cancelled")  # noqa: B009
        cancelled.add(tag)
        self._forgotten.append(tag)
        if len(self._forgotten) > _KEEP_CANCELLED:
            cancelled.discard(self._forgotten.popleft())
        if consume is not None:
            consume.cancelled = True

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
        self, pairs: Sequence[tuple[_Delivery, str, bytes, pika.BasicProperties]]
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
                [(delivery, stored.queue_name, payload, _properties(stored))]
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
            self.broker._consumers.discard(self)
            self._close_connection()

    def _close_connection(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection
            if self.connection.is_open:
                self.connection.close()


def _nothing() -> None:
    """A callback that only wakes the I/O loop."""


def _always() -> bool:
    return True


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
