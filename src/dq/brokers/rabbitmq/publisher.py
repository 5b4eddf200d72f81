"""Publishing on RabbitMQ: one channel's publishes and their confirms (`Confirms`), and
one thread's publishing connection (`Publisher`)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import pika
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from dq.brokers.rabbitmq import _pika
from dq.brokers.rabbitmq.frames import publish_frames
from dq.message import Message

__all__ = ["Confirms", "Publisher", "properties_of"]

_WRITE_CHUNK = 500  # publishes per buffer handed to pika
_READ_EVERY = 1024  # unconfirmed publishes between reads of what the server sent
_AMQP_ERRORS = (pika.exceptions.AMQPError,)

#: What to publish: (routing key, body, properties).
Item = tuple[str, bytes, pika.BasicProperties]


def properties_of(message: Message[Any]) -> pika.BasicProperties:
    """The AMQP properties of ``message``: persistent, with its ``broker_priority``."""
    priority = message.options.get("broker_priority")
    return pika.BasicProperties(
        delivery_mode=2, priority=priority if isinstance(priority, int) else None
    )


class Confirms:
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
        self._async_channel = _pika.impl_of(channel)
        self._next_tag = 0
        self._outstanding: dict[int, int] = {}  # delivery tag -> index in the batch
        self._nacked: list[int] = []
        self._unread = 0  # unconfirmed publishes since the input was last read
        self._methods: dict[tuple[str, bool], bytes] = {}  # marshalled basic.publish frames
        self._returned: list[tuple[str, bytes]] = []  # (routing key, body)
        if not confirming:
            return
        # The server numbers every publish on the channel, also those made on it
        # directly (``broker.channel.basic_publish``): they are counted here too, or
        # every later confirm would be matched to the wrong publish.
        self._async_channel.on_publish = self._counted_publish
        selected: list[bool] = []
        self._async_channel.confirm_delivery(
            ack_nack_callback=self._on_confirm, callback=lambda _frame: selected.append(True)
        )
        self._async_channel.add_on_return_callback(self._on_return)
        _pika.flush(connection, lambda: bool(selected) or channel.is_closed)
        if not selected:
            raise pika.exceptions.ChannelWrongStateError("the channel closed entering confirm mode")

    def _counted_publish(self) -> None:
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
        self, items: Sequence[Item], *, wait: bool = True
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
            if self._unread >= _READ_EVERY or _pika.transport_busy(self._async_channel):
                self._unread = 0
                # Not `flush`: with nothing left to write it returns without reading.
                self.connection.process_data_events(0)
            return [], []
        self.sync()
        return [i for i in self._nacked if i >= 0], self._returned

    def _write(self, items: Sequence[Item], *, mandatory: bool) -> None:
        """Write the frames of ``items`` as one buffer: pika writes each frame of a
        publish (method, header, body) with its own system call; one buffer sends a
        publish, or a whole batch, in one."""
        impl = self._async_channel
        if not impl.is_open:
            raise pika.exceptions.ChannelWrongStateError("the channel is closed")
        data, frames = publish_frames(
            impl.channel_number,
            items,
            mandatory=mandatory,
            body_max=_pika.body_max(impl),
            methods=self._methods,
        )
        _pika.write(impl, data, frames)

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
        _pika.flush(self.connection, lambda: not self._outstanding or channel.is_closed)
        if self._outstanding:
            self._outstanding.clear()
            raise pika.exceptions.ChannelWrongStateError(
                "the channel closed while waiting for publisher confirms"
            )


class Publisher:
    """One thread's publishing connection and channel (see `RabbitmqBroker.publishers`).

    Args:
        connection: its connection (it owns it from now on).
        confirming: open channels in confirm mode (a broker's ``confirm_delivery``, as
            Dramatiq's: see `Confirms`).
    """

    def __init__(self, connection: BlockingConnection, *, confirming: bool) -> None:
        self.thread = threading.current_thread()
        self.connection = connection
        self.confirming = confirming
        self.channel, self.confirms = self._open_channel()
        self.used = time.monotonic()

    def _open_channel(self) -> tuple[BlockingChannel, Confirms]:
        channel = self.connection.channel()
        return channel, Confirms(self.connection, channel, confirming=self.confirming)

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
        """Close the connection (errors of a broken one are ignored)."""
        with contextlib.suppress(Exception):  # closing a broken connection
            if self.connection.is_open:
                self.connection.close()
