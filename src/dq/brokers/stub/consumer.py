"""`_StubConsumer`, the consumer of a `dq.brokers.stub.StubBroker`: it reserves
entries in batches, hands them out, and settles them, each step one `dq.core.apply`
on the broker's state under the broker's lock (see `dq.brokers.stub.COMMANDS`).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from dq import _sources as runtime
from dq import message as _message
from dq.broker import Consumer, MessageProxy
from dq.brokers._checks import delayed_if_asked
from dq.core import (
    Ack,
    Command,
    DeathReason,
    Entry,
    Nack,
    Promote,
    Release,
    Replace,
    Requeue,
    Reserve,
    Start,
    Step,
    apply,
    policy,
)
from dq.core import events as ev
from dq.errors import DecodeError
from dq.message import Message
from dq.wire import decode_message, encode_message

if TYPE_CHECKING:
    from dq.brokers.stub.broker import StubBroker

__all__ = ["_StubConsumer"]

M = TypeVar("M", bound=Message[Any])

_consumer_ids = itertools.count(1)


class _StubConsumer(Consumer):
    """A consumer of one stub queue.

    When its buffer is empty it reserves as many entries as prefetch allows in one
    step (one lock acquisition for a batch), then hands them out one per ``next()``.
    It reserves again only once at least half its prefetch window is free (at least
    one entry), so a busy consumer wakes once per half window, not once per ack.
    Its ``ack``, ``nack``, ``requeue``, ``promote`` and ``replace`` are thread-safe:
    worker threads settle messages directly. `abandon` simulates its death.
    """

    def __init__(self, broker: StubBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = prefetch
        self.timeout = timeout
        self.consumer_id = f"stub-consumer-{next(_consumer_ids)}"
        self._outstanding = 0  # reserved and not settled (buffered ones included)
        self._min_batch = max(1, prefetch // 2)
        self._buffer: deque[Entry] = deque()  # reserved, not yet handed out
        self._closed = False
        self._dead = False  # abandoned: holds what it held until recovered

    def __next__(self) -> MessageProxy:
        broker = self.broker
        buffer = self._buffer
        deadline: float | None = None  # read the clock only when there is a wait
        while True:
            with broker._lock:
                while not buffer:
                    if self._closed:
                        raise StopIteration
                    room = self.prefetch - self._outstanding
                    if room >= self._min_batch:
                        if broker._acks:
                            broker._flush_acks()
                        step = apply(
                            broker._state, Reserve(self.queue_name, self.consumer_id, room)
                        )
                        if step.events:
                            broker._state = step.state
                            (event,) = step.events
                            assert isinstance(event, ev.Reserved)
                            buffer.extend(event.entries)
                            self._outstanding += len(event.entries)
                            break
                    if deadline is None:
                        deadline = time.monotonic() + self.timeout / 1000
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise StopIteration
                    broker._signal_of(self.queue_name).wait(remaining)
                entry = buffer.popleft()
            try:
                message = decode_message(entry.payload, _message.global_encoder, Message)
            except DecodeError as e:
                # Never drop it: dead-letter what cannot be decoded, and go on.
                broker.logger.error(
                    "Dead-lettering undecodable message %s on %r: %s",
                    entry.message_id,
                    self.queue_name,
                    e,
                )
                self._settle(Nack(entry.seq, runtime.get_clock().now_ms(), DeathReason.UNDECODABLE))
                continue
            proxy = MessageProxy(broker, message)
            proxy._tag = entry.seq
            return proxy

    def buffered(self) -> int:
        """How many reserved messages wait in memory for ``next()`` (it returns them
        without waiting); the worker's consumer thread reads it."""
        return len(self._buffer)

    def _settle(self, command: Command, dead: MessageProxy | None = None) -> Step:
        """Apply a settling command and free its prefetch slot, atomically.

        ``dead`` (with a `Nack`) joins the broker's dead letters in the same locked
        step, so a join that sees the queue drained also sees the dead letter.
        """
        broker = self.broker
        self._check_alive()
        with broker._lock:
            if broker._acks:
                broker._flush_acks()
            step = apply(broker._state, command)
            broker._state = step.state
            if dead is not None:
                broker.dead_letters_by_queue[policy.q_name(dead.queue_name)].append(dead)
            self._outstanding -= 1
            if self._outstanding == self.prefetch - self._min_batch:
                # Room for a batch again: wake this queue's consumers (this one).
                broker._signal_of(self.queue_name).notify_all()
            if broker._waiting[0]:  # someone waits on a signal: see whom to wake
                broker._signal(step.effects)
        return step

    def ack(self, message: MessageProxy) -> None:
        """Settle ``message`` as done.

        Raises:
            InvalidTransition: it is not reserved (already settled, requeued, or
                never delivered by a consumer of this broker).
        """
        seq = _seq(message)
        broker = self.broker
        self._check_alive()
        with broker._lock:
            if broker._record_ack(seq):  # applied with the next step (group commit)
                self._outstanding -= 1
                if self._outstanding == self.prefetch - self._min_batch:
                    # Room for a batch again: wake this queue's consumers (this one).
                    broker._signal_of(self.queue_name).notify_all()
                return
        self._settle(Ack(seq))  # the core refuses it: raise its error

    def nack(self, message: MessageProxy) -> None:
        """Dead-letter ``message``, for its ``death_reason``.

        Raises:
            InvalidTransition: it is not reserved.
        """
        command = Nack(_seq(message), runtime.get_clock().now_ms(), message.death_reason)
        self._settle(command, dead=message)

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Return unprocessed ``messages`` to the tail of their queue."""
        for message in messages:
            self._settle(Requeue(_seq(message)))

    def promote(self, message: MessageProxy) -> Message[Any]:
        """Move a held delayed message to its canonical queue in one step.

        Returns:
            The promoted copy as stored (canonical queue, no ``eta``).

        Raises:
            InvalidTransition: ``message`` is not held from a delay queue.
        """
        promoted = policy.promoted(message.message)
        self._settle(
            Promote(_seq(message), promoted, encode_message(promoted, _message.global_encoder))
        )
        return promoted

    def replace(self, message: MessageProxy, new: M, delay: int | None) -> M:
        """Store ``new`` (after ``delay`` ms) in place of ``message`` and forget
        ``message``, in one step (`dq.core.Replace`): how a retry is stored. The
        ``before_enqueue`` hooks run first, ``after_enqueue`` after.

        Returns:
            ``new`` as stored (on the delay queue with an ``eta`` when delayed).

        Raises:
            InvalidTransition: ``message`` is not reserved, or ``new`` is not on its
                queue (or that queue's ``.DQ``).
            InvalidValue: ``new``'s queue name or eta is one the core refuses.
            ValueError: ``delay`` is negative or too long.
        """
        broker = self.broker
        seq = _seq(message)
        stored = delayed_if_asked(new, delay, runtime.get_clock().now_ms())
        broker._check_storable(stored)
        hooks = broker._hooks
        if hooks.before_enqueue:
            broker._run_before(hooks.before_enqueue, stored, delay)
        self._settle(Replace(seq, stored, encode_message(stored, _message.global_encoder)))
        if hooks.after_enqueue:
            broker._run_after(hooks.after_enqueue, stored, delay)
        return stored

    def suspect(self, message: MessageProxy) -> bool:
        """Whether a consumer died holding ``message`` before (its delivery count is at
        least one): a worker runs it alone."""
        return self.broker._state.deliveries.get(_seq(message), 0) > 0

    def started(self, message: MessageProxy, *, alone: bool) -> None:
        """Record that ``message`` starts running (`dq.core.Start`), for the delivery
        cap. Only suspects are recorded: for the others the count after a death is
        the same either way."""
        if not self.suspect(message):
            return
        self._check_alive()
        self.broker._apply(Start(_seq(message), alone))

    def abandon(self) -> None:
        """Die, for tests of recovery: from now on this consumer hands out and settles
        nothing, and what it holds (handed out or buffered) stays reserved under its
        id until `StubBroker.recover` gives it back, as after a crash."""
        broker = self.broker
        with broker._lock:
            if self._closed:
                return
            self._closed = self._dead = True
            self._buffer.clear()
            broker._abandoned[self.consumer_id] = self
            broker._signal_of(self.queue_name).notify_all()

    def _check_alive(self) -> None:
        if self._dead:
            raise RuntimeError(
                f"consumer {self.consumer_id} of {self.queue_name!r} was abandoned (it died): "
                "it settles nothing"
            )

    def close(self) -> None:
        """Close the consumer; whatever it still holds goes back to its queue."""
        broker = self.broker
        with broker._lock:
            if self._closed:
                return
            self._closed = True
            broker._flush_acks()
            step = apply(broker._state, Release(self.consumer_id))
            broker._state = step.state
            self._outstanding = 0
            self._buffer.clear()
            if step.effects:
                broker._signal(step.effects)


def _seq(message: MessageProxy) -> int:
    tag = message._tag
    if not isinstance(tag, int):
        raise ValueError(
            f"{message!r} was not delivered by a StubBroker consumer (it has no delivery tag)"
        )
    return tag
