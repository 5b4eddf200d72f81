"""`BufferedConsumer`: what the Redis and SQLite consumers share.

Both reserve a batch of messages on the server in one step, keep it in a buffer, hand
it out one message per ``next()``, and settle from worker threads. This base class
owns that bookkeeping: the buffer of fetched payloads, the messages handed out and not
settled (in delivery order), dead-lettering of undecodable payloads, and grouped acks
(the thread that finds no batch in flight sends its own ack and every ack that
arrives meanwhile). A subclass says how to fetch, how to send a batch of acks, how
to dead-letter one message, and whom to wake when prefetch room frees up.
"""

from __future__ import annotations

import abc
import threading
import time
from collections import deque
from typing import Generic, TypeVar

from dq import message as _message
from dq.broker import Broker, Consumer, MessageProxy
from dq.errors import DecodeError
from dq.message import Message
from dq.wire import decode_message

__all__ = ["BufferedConsumer"]

T = TypeVar("T")  # the server's handle on a stored message (a Redis id, a SQLite row)


class BufferedConsumer(Consumer, Generic[T], abc.ABC):
    """A consumer that reserves batches and settles from worker threads (see module).

    Args:
        broker: the broker (its logger names undecodable messages).
        queue_name: the queue (or delay queue) consumed.
        prefetch: how many unsettled messages it may hold.
        timeout: ms ``next()`` waits before raising ``StopIteration``.
    """

    def __init__(self, broker: Broker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = prefetch
        self.timeout = timeout
        self._min_batch = max(1, prefetch // 2)
        self._lock = threading.Lock()
        self._buffer: deque[tuple[T, bytes]] = deque()  # fetched, not handed out
        self._held: dict[T, None] = {}  # handed out, not settled (in order)
        self._acks: list[T] = []  # acked, not yet sent
        self._sending = False  # a thread is sending acks
        self._closed = False

    # -- what a subclass provides ------------------------------------------------------

    @abc.abstractmethod
    def _tag(self, message: MessageProxy) -> T:
        """The handle of a message this consumer delivered (`ValueError` otherwise)."""

    @abc.abstractmethod
    def _fetch(self, deadline: float) -> bool:
        """Fill the buffer, waiting until ``deadline`` (monotonic s); return whether
        it has items."""

    @abc.abstractmethod
    def _dead_letter(self, tag: T) -> None:
        """Dead-letter one held message now (it could not be decoded)."""

    @abc.abstractmethod
    def _send_ack_batch(self, batch: list[T]) -> None:
        """Settle ``batch`` as done on the server, in one step."""

    @abc.abstractmethod
    def _room_freed(self) -> None:
        """Wake whoever waits for prefetch room (called without the lock held)."""

    # -- shared ------------------------------------------------------------------------

    def _forget(self, tags: list[T]) -> None:
        """Drop settled ``tags`` from the held messages and wake the waiters."""
        with self._lock:
            for tag in tags:
                self._held.pop(tag, None)
        self._room_freed()

    def __next__(self) -> MessageProxy:
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
            tag, payload = item
            try:
                message = decode_message(payload, _message.global_encoder, Message)
            except DecodeError as e:
                # Never drop it, never loop on it: dead-letter it and go on.
                self.broker.logger.error(
                    "Dead-lettering undecodable message %s on %r: %s", tag, self.queue_name, e
                )
                self._dead_letter(tag)
                continue
            proxy = MessageProxy(self.broker, message)
            proxy._tag = tag
            return proxy

    def ack(self, message: MessageProxy) -> None:
        """Settle ``message`` as done.

        Acks from concurrent threads are sent together: the thread that finds no
        batch in flight sends its own and every ack that arrives meanwhile.

        Raises:
            BrokerConnectionError: the server could not be reached. The unsent acks
                are kept and sent with the next ack or when the consumer closes.
        """
        tag = self._tag(message)
        with self._lock:
            self._acks.append(tag)
            if self._sending:
                return
            self._sending = True
        self._send_acks()

    def _send_acks(self) -> None:
        """Send the pending acks, batch after batch, until none is left (call with
        ``_sending`` set)."""
        while True:
            with self._lock:
                batch, self._acks = self._acks, []
                if not batch:
                    self._sending = False
                    return
            try:
                self._send_ack_batch(batch)
            except BaseException:
                with self._lock:
                    self._acks[:0] = batch
                    self._sending = False
                raise
            self._forget(batch)
