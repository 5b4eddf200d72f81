"""`StubBroker`, the in-memory broker of `dq.brokers.stub`, and `COMMANDS`, how it
interprets every core command: one `dq.core.apply` under the broker's lock.

It holds one `dq.core.BrokerState` value under one lock. Every operation builds a
command, applies it with `dq.core.apply`, stores the new state, wakes whoever waits
on it and turns the step's events into middleware hooks. Its storage *is* the state
value, so the step's effects need no I/O. Reads (``join``, queue sizes) look at the
current value without copying anything: it is immutable.

Acks are committed in groups: an ack of a reserved entry is recorded under the lock
(and its consumer's prefetch slot freed at once), and the recorded acks are applied
as one `dq.core.AckMany` step by whatever next touches the state: any other command,
a reservation, a join, a read of `StubBroker.state`, or the ack that drains a queue
someone joins. Nothing can observe the state between, so this is the same as
applying each ack at once, for a fraction of the cost.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

from dq import _sources as runtime
from dq import message as _message
from dq.broker import Broker, Consumer, MessageProxy
from dq.brokers._checks import delayed_if_asked
from dq.brokers.steps import Cannot, CommandTable, ServerStep
from dq.brokers.stub.consumer import _StubConsumer
from dq.brokers.stub.signals import Signal
from dq.core import (
    Ack,
    AckMany,
    BrokerState,
    Command,
    DeclareQueue,
    Enqueue,
    ExpireDeadLetters,
    ExpireLeases,
    Flush,
    FlushAll,
    InvalidTransition,
    Nack,
    Promote,
    Recover,
    Release,
    Renew,
    Replace,
    Requeue,
    Reserve,
    Start,
    Status,
    Step,
    apply,
    initial_state,
    policy,
)
from dq.core import events as ev
from dq.core.effects import DeadLetter, Effect, Forget, Purge, PushDelayed, PushReady
from dq.core.machine import pending
from dq.errors import QueueJoinTimeout, QueueNotFound
from dq.message import Message
from dq.middleware import Middleware
from dq.wire import decode_message, encode_message

__all__ = ["COMMANDS", "StubBroker", "StubQueue"]

M = TypeVar("M", bound=Message[Any])

_APPLY = "one dq.core.apply under the broker's lock"

#: How the stub carries out each core command: the state *is* the core's value, so
#: every command is one `dq.core.apply` under the broker's lock.
COMMANDS: CommandTable = {
    DeclareQueue: ServerStep("declare_queue", _APPLY),
    Enqueue: ServerStep("enqueue", _APPLY),
    Reserve: ServerStep("next", _APPLY + " (a batch of up to the free prefetch)"),
    Ack: ServerStep("ack", _APPLY + " (recorded, applied with the next step as AckMany)"),
    AckMany: ServerStep("ack", _APPLY + " (the recorded acks, in order)"),
    Nack: ServerStep("nack", _APPLY),
    Requeue: ServerStep("requeue", _APPLY),
    Promote: ServerStep("promote", _APPLY),
    Replace: ServerStep("replace", _APPLY + " (after the before_enqueue hooks)"),
    Start: ServerStep("started", _APPLY + " (for suspects only: the count is the same)"),
    Recover: ServerStep("recover", _APPLY + " (for a consumer that was abandoned)"),
    Renew: Cannot(
        "stub reservations have no lease: they last until settled, released or recovered"
    ),
    ExpireLeases: Cannot("stub reservations have no lease (a dead consumer is recovered)"),
    ExpireDeadLetters: Cannot(
        "stub dead letters are kept until flushed: a test reads them all (dead_letters_by_queue)"
    ),
    Flush: ServerStep("flush", _APPLY),
    FlushAll: ServerStep("flush_all", _APPLY),
    Release: ServerStep("close", _APPLY + " (a consumer closed)"),
}


class StubQueue:
    """A read-only view of one stub queue (Dramatiq's stub exposes ``Queue`` objects)."""

    __slots__ = ("_broker", "name")

    def __init__(self, broker: StubBroker, name: str) -> None:
        self._broker = broker
        self.name = name

    def qsize(self) -> int:
        """Return how many messages wait on this queue (not counting reserved ones)."""
        queue = self._broker.state.queues.get(policy.q_name(self.name))
        if queue is None:
            return 0
        return len(queue.delayed if policy.is_delay_queue(self.name) else queue.ready)

    def empty(self) -> bool:
        """Return whether no message waits on this queue."""
        return self.qsize() == 0

    __len__ = qsize

    def __repr__(self) -> str:
        return f"<StubQueue {self.name!r} size={self.qsize()}>"


class StubBroker(Broker):
    """An in-memory broker for tests.

    Args:
        middleware: as for `Broker`.
        fail_fast_default: the default of ``join``'s ``fail_fast``.
        max_deliveries: the delivery cap `recover` applies: a message of a canonical
            queue whose consumers died holding it this many times (as
            `dq.core.policy.deliveries_after_death` counts) is dead-lettered; 0
            disables it, else at least 2.

    Attributes:
        dead_letters_by_queue: dead-lettered messages (with the exception that killed
            them) by canonical queue name.

    Raises:
        ValueError: ``max_deliveries`` is not 0 or an integer >= 2.
    """

    def __init__(
        self,
        middleware: list[Middleware] | None = None,
        *,
        fail_fast_default: bool = True,
        max_deliveries: int = policy.DEFAULT_MAX_DELIVERIES,
    ) -> None:
        problem = policy.delivery_cap_problem(max_deliveries)
        if problem is not None:
            raise ValueError(problem)
        self.max_deliveries = max_deliveries
        self._abandoned: dict[str, _StubConsumer] = {}  # dead, not recovered yet
        self._state: BrokerState = initial_state()
        self._lock = threading.Lock()
        # Who waits for what, all on the one lock: consumers of each queue (and delay
        # queue) wait on that queue's signal; joins wait on `_settled`.
        self._signals: dict[str, Signal] = {}
        self._waiting = [0]  # threads waiting on any signal (skip signalling when 0)
        self._settled = Signal(self._lock, self._waiting)
        # Acks recorded and not applied yet (see the module docstring): their seqs in
        # order, the same as a set, and how many there are per canonical queue.
        self._acks: list[int] = []
        self._acked: set[int] = set()
        self._acks_by_queue: dict[str, int] = {}
        self.dead_letters_by_queue: defaultdict[str, list[MessageProxy]] = defaultdict(list)
        self.fail_fast_default = fail_fast_default
        self._dead_letters_raised: dict[str, int] = {}  # by queue: raised by a join
        super().__init__(middleware)

    # -- the interpreter -------------------------------------------------------------

    @property
    def state(self) -> BrokerState:
        """The current core state (an immutable value: safe to read at any time)."""
        if self._acks:
            with self._lock:
                self._flush_acks()
        return self._state

    def _record_ack(self, seq: int) -> bool:
        """Record an ack of ``seq`` to apply later; return False (recording nothing)
        when the core would refuse it, so the caller applies it now and gets the
        error. Call with the lock held.

        `Ack` is valid exactly for a reserved or held entry (its rows in the table), so
        a reservation not acked already is the test.
        """
        reservation = self._state.reserved.get(seq)
        if reservation is None or seq in self._acked:
            return False
        name = reservation.entry.queue_name
        if name.endswith(policy.DELAY_SUFFIX):
            name = name[:-3]
        self._acks.append(seq)
        self._acked.add(seq)
        count = self._acks_by_queue.get(name, 0) + 1
        self._acks_by_queue[name] = count
        if self._settled._waiters:
            # A join waits: apply the acks now if this one drains the queue.
            queue = self._state.queues[name]
            if queue.in_flight == count and queue.pending == count:
                self._flush_acks()
        return True

    def _flush_acks(self) -> None:
        """Apply the recorded acks in one step (call with the lock held)."""
        if not self._acks:
            return
        step = apply(self._state, AckMany(tuple(self._acks)))
        self._state = step.state
        self._acks = []
        self._acked.clear()
        self._acks_by_queue.clear()
        if self._waiting[0]:
            self._signal(step.effects)

    def _apply(self, command: Command, then: Callable[[], None] | None = None) -> Step:
        """Apply ``command`` under the lock, store the new state and wake waiters.

        ``then`` runs in the same locked step (to keep this interpreter's own views,
        such as its dead-letter lists, in step with the state).

        Raises:
            QueueNotFound: the command addresses an undeclared queue.
            InvalidTransition: any other command the core refuses.
        """
        with self._lock:
            if self._acks:
                self._flush_acks()
            try:
                step = apply(self._state, command)
            except InvalidTransition as e:
                if e.status in (Status.UNDECLARED, Status.DEAD_LETTER_QUEUE):
                    raise QueueNotFound(_queue_of(command)) from None
                raise
            self._state = step.state
            if then is not None:
                then()
            if step.effects and self._waiting[0]:
                self._signal(step.effects)
        return step

    def _signal_of(self, queue_name: str) -> Signal:
        """The signal consumers of ``queue_name`` wait on (made on first use)."""
        signal = self._signals.get(queue_name)
        if signal is None:
            signal = self._signals.setdefault(queue_name, Signal(self._lock, self._waiting))
        return signal

    def _signal(self, effects: tuple[Effect, ...]) -> None:
        """Wake whoever waits on what ``effects`` changed (call with the lock held)."""
        for effect in effects:
            kind = type(effect)
            if kind is PushReady or kind is PushDelayed:
                assert isinstance(effect, PushReady | PushDelayed)
                signal = self._signals.get(effect.row[1])
                if signal is not None:
                    signal.notify_all()
            elif self._settled._waiters and (kind is Forget or kind is DeadLetter or kind is Purge):
                assert isinstance(effect, Forget | DeadLetter | Purge)
                # Joins wait for a queue to drain: wake them only when it has.
                name = effect.queue_name if isinstance(effect, Purge) else effect.entry.queue_name
                queue = self._state.queues[policy.q_name(name)]
                if not queue.in_flight and not queue.pending:  # in_flight: the cheap test
                    self._settled.notify_all()

    # -- Broker API --------------------------------------------------------------------

    def declare_queue(self, queue_name: str) -> None:
        """Declare ``queue_name`` and its delay queue (a no-op when declared).

        The declare hooks get the canonical name (as ``after_declare_queue`` does on
        every dq broker), even when ``queue_name`` is its ``.DQ``.

        Raises:
            QueueNotFound: ``queue_name`` names a dead-letter queue (``.XQ``).
            InvalidValue: no message may be stored on ``queue_name``
                (`dq.core.policy.check_queue_name`).
        """
        if queue_name.endswith(policy.DEAD_SUFFIX):
            raise QueueNotFound(queue_name)
        if policy.q_name(queue_name) in self._state.queues:
            return
        policy.check_queue_name(queue_name, stored=True)
        self._run_before(self._hooks.before_declare_queue, policy.q_name(queue_name))
        step = self._apply(DeclareQueue(queue_name))
        for event in step.events:
            if isinstance(event, ev.QueueDeclared):
                self.queues[event.queue_name] = StubQueue(self, event.queue_name)
                self._run_after(self._hooks.after_declare_queue, event.queue_name)
            elif isinstance(event, ev.DelayQueueDeclared):
                self.queues[event.queue_name] = StubQueue(self, event.queue_name)
                self.delay_queues.add(event.queue_name)
                self._run_after(self._hooks.after_declare_delay_queue, event.queue_name)

    def enqueue(self, message: M, *, delay: int | None = None) -> M:
        """Store ``message``; with ``delay`` (ms), a copy on ``q.DQ`` with an ``eta``.

        Returns:
            The message as stored.

        Raises:
            QueueNotFound: its queue is not declared, or is a dead-letter queue.
            InvalidValue: its queue name is one no message may be stored on
                (`dq.core.policy.check_queue_name`), or its ``eta`` is not valid
                (`dq.core.policy.eta_problem`); a ``ValueError``.
            TypeError: it is not serialisable by the global encoder (nothing is stored).
            ValueError: ``delay`` is negative, or too long (the eta passes year 9999).
        """
        if delay is not None:
            message = delayed_if_asked(message, delay, runtime.get_clock().now_ms())
        self._check_storable(message)
        hooks = self._hooks
        if hooks.before_enqueue:
            self._run_before(hooks.before_enqueue, message, delay)
        step = self._apply(Enqueue(message, encode_message(message, _message.global_encoder)))
        if hooks.after_enqueue:
            for event in step.events:
                if isinstance(event, ev.Enqueued):
                    self._run_after(hooks.after_enqueue, message, delay)
        return message

    def _check_storable(self, message: Message[Any]) -> None:
        """Refuse, before any hook runs, a message that cannot be stored as it is.

        Raises:
            QueueNotFound: its queue is a dead-letter queue or not declared.
            InvalidValue: a queue name or eta the core refuses.
        """
        name = message.queue_name
        if name.endswith(policy.DEAD_SUFFIX):
            raise QueueNotFound(name)
        policy.check_queue_name(name, stored=True)
        if policy.q_name(name) not in self._state.queues:
            raise QueueNotFound(name)
        if policy.is_delay_queue(name):
            policy.message_eta_ms(message)

    def abandon(self, consumer: Consumer) -> str:
        """Make ``consumer`` (one of this broker's) die, for tests of recovery: it hands
        out and settles nothing from now on, and what it holds stays reserved until
        `recover`. Returns its id.

        Raises:
            TypeError: ``consumer`` is not a StubBroker consumer.
        """
        if not isinstance(consumer, _StubConsumer) or consumer.broker is not self:
            raise TypeError(f"{consumer!r} is not a consumer of this StubBroker")
        consumer.abandon()
        return consumer.consumer_id

    def recover(self, consumer_id: str | None = None, *, now_ms: int | None = None) -> int:
        """Give back what a dead consumer held (`dq.core.Recover`): each message to the
        tail of its queue with its delivery count updated, or dead-lettered once the
        count reaches ``max_deliveries``.

        Args:
            consumer_id: the dead consumer; None: every abandoned consumer not
                recovered yet (`_StubConsumer.abandon`).
            now_ms: the time of any dead letters (default: the runtime clock).

        Returns:
            How many messages came back or were dead-lettered.
        """
        ids = sorted(self._abandoned) if consumer_id is None else [consumer_id]
        now = runtime.get_clock().now_ms() if now_ms is None else now_ms
        count = 0
        for dead in ids:
            with self._lock:
                self._abandoned.pop(dead, None)
                if self._acks:
                    self._flush_acks()
                step = apply(self._state, Recover(dead, now, self.max_deliveries))
                self._state = step.state
                killed = [e.entry for e in step.events if isinstance(e, ev.DeadLettered)]
                for entry in killed:  # in the same locked step: a join sees both
                    proxy = MessageProxy(
                        self, decode_message(entry.payload, _message.global_encoder, Message)
                    )
                    self.dead_letters_by_queue[policy.q_name(entry.queue_name)].append(proxy)
                if step.effects and self._waiting[0]:
                    self._signal(step.effects)
            for entry in killed:
                self.logger.error(
                    "Dead-lettered message %s on %r: its consumers died holding it %d times "
                    "(max_deliveries).",
                    entry.message_id,
                    entry.queue_name,
                    self.max_deliveries,
                )
            count += len(step.events)
        return count

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 100) -> Consumer:
        """Return a consumer of ``queue_name`` (a queue or its ``.DQ``).

        Args:
            queue_name: the queue.
            prefetch: how many unsettled messages the consumer may hold.
            timeout: ms ``next()`` waits before raising ``StopIteration``.

        Raises:
            QueueNotFound: the queue is not declared.
            ValueError: ``prefetch`` < 1 or ``timeout`` < 0.
        """
        if policy.q_name(queue_name) not in self._state.queues or queue_name.endswith(
            policy.DEAD_SUFFIX
        ):
            raise QueueNotFound(queue_name)
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch!r}")
        if timeout < 0:
            raise ValueError(f"timeout must be >= 0 ms, got {timeout!r}")
        return _StubConsumer(self, queue_name, prefetch, timeout)

    def flush(self, queue_name: str) -> None:
        """Drop the waiting messages and dead letters of ``queue_name`` and its ``.DQ``.

        Reserved messages stay with their consumers.

        Raises:
            QueueNotFound: the queue is not declared.
        """
        name = policy.q_name(queue_name)

        def forget_dead_letters() -> None:
            self.dead_letters_by_queue.pop(name, None)
            self._dead_letters_raised.pop(name, None)

        self._apply(Flush(queue_name), then=forget_dead_letters)

    def flush_all(self) -> None:
        """Drop every waiting message and every dead letter."""

        def forget_dead_letters() -> None:
            for dead in self.dead_letters_by_queue.values():
                dead.clear()
            self._dead_letters_raised.clear()

        self._apply(FlushAll(), then=forget_dead_letters)

    def join(
        self, queue_name: str, *, timeout: int | None = None, fail_fast: bool | None = None
    ) -> None:
        """Block until ``queue_name`` and its ``.DQ`` have no unfinished messages.

        Args:
            queue_name: the queue.
            timeout: ms to wait at most; None waits forever.
            fail_fast: when true, re-raise the exception of the first message
                dead-lettered on this queue that no earlier join has raised (None means
                the broker's ``fail_fast_default``). Each dead letter is raised once,
                so an old failure does not fail every later join (as in Dramatiq,
                until ``flush_all``).

        Raises:
            QueueNotFound: the queue is not declared.
            QueueJoinTimeout: ``timeout`` passed first.
        """
        name = policy.q_name(queue_name)
        if name not in self._state.queues:
            raise QueueNotFound(queue_name)
        should_fail_fast = self.fail_fast_default if fail_fast is None else fail_fast
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        with self._lock:
            while True:
                self._flush_acks()
                if not pending(self._state, name):
                    break
                if deadline is None:
                    self._settled.wait(None)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueJoinTimeout(queue_name)
                self._settled.wait(remaining)
        if should_fail_fast:
            dead = self.dead_letters_by_queue.get(name, [])
            raised = self._dead_letters_raised.get(name, 0)
            if len(dead) > raised:
                self._dead_letters_raised[name] = len(dead)
                exception = dead[raised]._exception
                raise (exception or Exception("Message failed with unknown error")) from None

    @property
    def dead_letters(self) -> list[MessageProxy]:
        """Every dead-lettered message, by queue."""
        return [m for messages in self.dead_letters_by_queue.values() for m in messages]


def _queue_of(command: Command) -> str:
    if isinstance(command, Enqueue):
        return command.message.queue_name
    return str(getattr(command, "queue_name", "?"))
