"""The pika seam: the one module of dq that touches a private name of pika.

Every private name it uses is listed in `PRIVATE_NAMES`, and a test fails when one of
them is gone from the installed pika; the ``rabbitmq`` extra pins the pika versions
this module was tested with (1.4.x). Nothing of pika's is patched at run time:

* `connect` opens a ``BlockingConnection`` on a subclass of pika's ``SelectConnection``
  (its ``_impl_class`` argument) whose channels are `Channel`, a subclass of pika's
  that tells dq of every ``basic.publish`` made on it (`Channel.on_publish`: the
  confirm tracker numbers publishes as the server does);
* a consumer's connection is a `ReadingConnection`, whose reader decodes whole
  deliveries itself (`dq.brokers.rabbitmq.frames`) and hands every other frame to
  pika's reader, whole;
* `flush`, `pump` and `write` are pika's blocking wait, its event loop with a timer,
  and a write of many frames in one system call.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, NamedTuple

import pika
import pika.channel
import pika.connection
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.adapters.blocking_connection import _IoloopTimerContext as _Timer
from pika.adapters.select_connection import SelectConnection
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport

from dq.brokers.rabbitmq.frames import INCOMPLETE, Delivered, read_delivery, whole_frame

__all__ = [
    "PRIVATE_NAMES",
    "Channel",
    "PrivateName",
    "ReadingConnection",
    "body_max",
    "connect",
    "connection_of",
    "flush",
    "impl_of",
    "pump",
    "read_deliveries",
    "reset_consume_ok",
    "socket_of",
    "transport_busy",
    "write",
]


class PrivateName(NamedTuple):
    """A private name of pika this module uses.

    Attributes:
        owner: the dotted path of the module, class or function that has it.
        name: the name.
        where: ``module`` (a module attribute), ``class`` (on the class), ``instance``
            (set on each instance by ``__init__``) or ``parameter`` (of a function).
    """

    owner: str
    name: str
    where: Literal["module", "class", "instance", "parameter"]


_BLOCKING = "pika.adapters.blocking_connection"
_TRANSPORT = "pika.adapters.utils.io_services_utils._AsyncPlaintextTransport"

#: Every private name of pika used here (tested against the installed pika).
PRIVATE_NAMES: Final = (
    PrivateName(f"{_BLOCKING}.BlockingConnection.__init__", "_impl_class", "parameter"),
    PrivateName(f"{_BLOCKING}.BlockingConnection", "_flush_output", "class"),
    PrivateName(f"{_BLOCKING}.BlockingConnection", "_impl", "instance"),
    PrivateName(f"{_BLOCKING}.BlockingConnection", "_ready_events", "instance"),
    PrivateName(_BLOCKING, "_IoloopTimerContext", "module"),
    PrivateName(f"{_BLOCKING}.BlockingChannel", "_impl", "instance"),
    PrivateName(f"{_BLOCKING}.BlockingChannel", "_closing_reason", "instance"),
    PrivateName(f"{_BLOCKING}.BlockingChannel", "_basic_consume_ok_result", "instance"),
    PrivateName("pika.connection.Connection", "_create_channel", "class"),
    PrivateName("pika.connection.Connection", "_on_data_available", "class"),
    PrivateName("pika.connection.Connection", "_output_marshaled_frames", "class"),
    PrivateName("pika.connection.Connection", "_adapter_emit_data", "class"),
    PrivateName("pika.connection.Connection", "_body_max_length", "instance"),
    PrivateName("pika.adapters.base_connection.BaseConnection", "_transport", "instance"),
    PrivateName("pika.adapters.utils.io_services_utils", "_AsyncPlaintextTransport", "module"),
    PrivateName(_TRANSPORT, "_tx_buffers", "instance"),
    PrivateName(_TRANSPORT, "_sock", "instance"),
    PrivateName("pika.channel.Channel", "_send_method", "class"),
    PrivateName("pika.channel.Channel", "_consumers", "instance"),
    PrivateName("pika.channel.Channel", "_cancelled", "instance"),
    PrivateName("pika.channel.Channel", "_content_assembler", "instance"),
    PrivateName("pika.channel.ContentFrameAssembler", "_method_frame", "instance"),
)

_KEEP_CANCELLED = 16  # cancelled consumer tags left in pika's reject set
_HOLD_BACK = 256 * 1024  # bytes of a partly read delivery kept to decode it whole


class Channel(pika.channel.Channel):
    """pika's asynchronous channel, telling dq of each ``basic.publish`` made on it."""

    #: Called after every ``basic_publish`` (set by the channel's confirm tracker).
    on_publish: Callable[[], None] | None = None

    def __init__(
        self,
        connection: pika.connection.Connection,
        channel_number: int,
        on_open_callback: Callable[[Channel], object],
    ) -> None:
        super().__init__(connection, channel_number, on_open_callback)
        self._forgotten: deque[str] = deque()  # the last tags `forget` put in pika's set

    def basic_publish(
        self,
        exchange: str,
        routing_key: str,
        body: str | bytes,
        properties: pika.spec.BasicProperties | None = None,
        mandatory: bool = False,
    ) -> None:
        """pika's publish; then `on_publish`."""
        super().basic_publish(exchange, routing_key, body, properties, mandatory)
        if self.on_publish is not None:
            self.on_publish()

    @property
    def consumers(self) -> dict[str, Callable[..., object]]:
        """pika's message callbacks of this channel, by consumer tag."""
        consumers: dict[str, Callable[..., object]] = getattr(self, "_consumers")  # noqa: B009
        return consumers

    def send_method(self, method: pika.spec.Basic.Qos | pika.spec.Basic.Cancel) -> None:
        """Write ``method`` with none of pika's bookkeeping (its answer comes to the
        callbacks registered for it)."""
        getattr(self, "_send_method")(method)  # noqa: B009

    def forget(self, tag: str) -> None:
        """Drop consumer ``tag`` after its cancel-ok (dq sent the cancel itself). pika
        rejects (requeues) deliveries of the tags in its cancelled set, should any come
        after the cancel-ok; only the last few stay there."""
        self.consumers.pop(tag, None)
        cancelled: set[str] = getattr(self, "_cancelled")  # noqa: B009
        cancelled.add(tag)
        self._forgotten.append(tag)
        if len(self._forgotten) > _KEEP_CANCELLED:
            cancelled.discard(self._forgotten.popleft())


class Connection(SelectConnection):
    """pika's ``SelectConnection``, opening `Channel` channels."""

    def _create_channel(
        self, channel_number: int, on_open_callback: Callable[[Channel], object]
    ) -> Channel:
        return Channel(self, channel_number, on_open_callback)


class ReadingConnection(Connection):
    """A consumer's connection: whole deliveries on `reading` are decoded here (the
    frame codec) and handed to the callback pika would call; every other frame goes
    to pika's reader, whole.

    A frame that has not fully arrived waits here for the rest, and so does a delivery
    of less than `_HOLD_BACK` bytes: pika's reader never holds part of a frame, so the
    next bytes start with a frame this can read. A bigger delivery goes to pika frame
    by frame (it assembles the content itself; gathering it here would copy it once per
    read). pika's byte and frame counters are kept (heartbeats look at them); a
    delivery for a consumer tag that is cancelled or unknown is pika's to handle.
    """

    #: The channel whose deliveries are decoded here (None: all go to pika).
    reading: Channel | None = None
    #: Deliveries decoded here (tests look).
    fast_reads = 0
    #: The start of a frame or delivery still arriving.
    partial = b""
    bytes_received: int
    frames_received: int

    def _on_data_available(self, data_in: bytes) -> None:
        data = self.partial + data_in if self.partial else data_in
        self.partial = b""
        pika_read: Callable[[bytes], None] = super()._on_data_available  # type: ignore[misc]
        channel = self.reading
        offset, end = 0, len(data)
        while offset < end:
            if channel is not None and channel._content_assembler._method_frame is None:  # type: ignore[attr-defined]
                delivered = read_delivery(data, offset, channel.channel_number)
                if isinstance(delivered, Delivered):
                    self._deliver(channel, data, offset, delivered, pika_read)
                    offset = delivered.end
                    continue
                if delivered is INCOMPLETE and end - offset < _HOLD_BACK:
                    break  # the rest of this delivery comes with the next read
            size = whole_frame(data, offset)
            if not size:
                break
            pika_read(data[offset : offset + size])
            offset += size
        if offset < end:
            self.partial = data[offset:]

    def _deliver(
        self,
        channel: Channel,
        data: bytes,
        offset: int,
        delivered: Delivered,
        pika_read: Callable[[bytes], None],
    ) -> None:
        tag = delivered.method.consumer_tag
        callback = channel.consumers.get(tag) if tag is not None else None
        if callback is None or tag in getattr(channel, "_cancelled"):  # noqa: B009
            pika_read(data[offset : delivered.end])
            return
        self.bytes_received += delivered.end - offset
        self.frames_received += delivered.frames
        self.fast_reads += 1
        callback(channel, delivered.method, delivered.properties, delivered.body)


def connect(
    parameters: Sequence[pika.connection.Parameters], *, reading: bool = False
) -> BlockingConnection:
    """Open a blocking connection (trying each address in order) whose channels are
    `Channel`; with ``reading``, on a `ReadingConnection`.

    Raises:
        pika.exceptions.AMQPError: no address could be reached.
    """
    impl_class: Any = ReadingConnection if reading else Connection
    return BlockingConnection(parameters, _impl_class=impl_class)


def impl_of(channel: BlockingChannel) -> Channel:
    """The asynchronous channel underneath a blocking one opened by `connect`."""
    impl = getattr(channel, "_impl")  # noqa: B009
    assert isinstance(impl, Channel)
    return impl


def connection_of(connection: BlockingConnection) -> Connection:
    """The asynchronous connection underneath a blocking one opened by `connect`."""
    impl = getattr(connection, "_impl")  # noqa: B009
    assert isinstance(impl, Connection)
    return impl


def read_deliveries(connection: BlockingConnection, channel: Channel) -> None:
    """Have the deliveries of ``channel`` decoded by ``connection``'s own reader (a
    connection opened by `connect` with ``reading``)."""
    impl = connection_of(connection)
    assert isinstance(impl, ReadingConnection)
    impl.reading = channel


def flush(connection: BlockingConnection, ready: Callable[[], bool]) -> None:
    """Process I/O on ``connection`` until ``ready()`` (pika's own blocking wait, the
    one every blocking call uses)."""
    getattr(connection, "_flush_output")(ready)  # noqa: B009


def pump(
    connection: BlockingConnection,
    channel: BlockingChannel,
    until: Callable[[], bool],
    seconds: float,
) -> bool:
    """Process I/O until ``until()`` holds or ``seconds`` passed, running what other
    threads handed to the connection (``add_callback_threadsafe``) as it comes; return
    ``until()``.

    Raises:
        pika.exceptions.AMQPError: the server closed the channel (its reason: a 404, a
            406), or the connection failed.
    """
    impl = impl_of(channel)
    ready: deque[Any] = getattr(connection, "_ready_events")  # noqa: B009
    loop = getattr(connection, "_impl")  # noqa: B009
    end = time.monotonic() + seconds
    while not until():
        if impl.is_closed:
            reason = getattr(channel, "_closing_reason", None)
            if isinstance(reason, pika.exceptions.AMQPError):
                raise reason
            raise pika.exceptions.ChannelWrongStateError("the channel is closed")
        remaining = end - time.monotonic()
        if remaining <= 0:
            return False
        with _Timer(remaining, loop) as timer:
            flush(connection, lambda: until() or timer.is_ready() or bool(ready) or impl.is_closed)
        if ready:
            connection.process_data_events(0)
    return True


def reset_consume_ok(channel: BlockingChannel) -> None:
    """Clear the blocking channel's record of a consume-ok: it keeps one for its own
    ``basic_consume``, set by every consume-ok, which must not stay set when dq sent
    the consume on the asynchronous channel."""
    getattr(channel, "_basic_consume_ok_result").reset()  # noqa: B009


def body_max(channel: Channel) -> int:
    """The largest body frame payload on ``channel``'s connection."""
    size: int = getattr(channel.connection, "_body_max_length")  # noqa: B009
    return size


def transport_busy(channel: Channel) -> bool:
    """Whether pika holds data it has not written yet on ``channel``'s connection (or
    has no transport: it is closed)."""
    transport = getattr(channel.connection, "_transport", None)
    return transport is None or bool(getattr(transport, "_tx_buffers"))  # noqa: B009


def write(channel: Channel, data: bytes, frames: int) -> None:
    """Write ``data`` (``frames`` marshalled frames) on ``channel``'s connection.

    pika writes each frame with its own system call, after several poller calls. On
    plain TCP with nothing queued before it, this sends the buffer at once and queues
    only what the socket did not take; otherwise (TLS, or data pending) pika writes it.
    """
    connection: Any = channel.connection  # pika's counters are not in its stubs
    transport = getattr(connection, "_transport", None)
    if isinstance(transport, _AsyncPlaintextTransport) and not transport_busy(channel):
        sock: socket.socket = getattr(transport, "_sock")  # noqa: B009
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = -1  # pika's write meets the error and closes the connection
        if sent >= 0:
            connection.bytes_sent += len(data)
            connection.frames_sent += frames
            if sent < len(data):
                getattr(connection, "_adapter_emit_data")(data[sent:])  # noqa: B009
            return
    getattr(connection, "_output_marshaled_frames")([data])  # noqa: B009


def socket_of(connection: BlockingConnection) -> socket.socket:
    """The client end of ``connection``'s TCP connection (tests look)."""
    sock: socket.socket = getattr(getattr(connection_of(connection), "_transport"), "_sock")  # noqa: B009
    return sock
