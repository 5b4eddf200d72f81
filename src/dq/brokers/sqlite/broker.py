"""`SqliteBroker`, the broker class of `dq.brokers.sqlite`: options, declarations,
enqueueing, consumers, the keeper thread and reads, over a `Database`.

The SQL lives in `dq.brokers.sqlite.database` (one method per server step), the
consumer in `dq.brokers.sqlite.consumer`; see `dq.brokers.sqlite` for the design.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from typing import Any, Final, TypeVar

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
from dq.brokers.sqlite.consumer import SqliteConsumer
from dq.brokers.sqlite.database import Database, Row, wall_ms
from dq.brokers.sqlite.recovery import Recovery
from dq.core import DeathReason, policy
from dq.errors import QueueJoinTimeout
from dq.message import Message
from dq.middleware import Middleware
from dq.wire import encode_message

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "DEFAULT_DEAD_MESSAGE_TTL",
    "DEFAULT_LEASE",
    "DEFAULT_POLL_INTERVAL",
    "SqliteBroker",
]

#: How long a reservation lasts without renewal (ms).
DEFAULT_LEASE: Final = 30_000
#: How long a dead letter is kept (ms): 7 days.
DEFAULT_DEAD_MESSAGE_TTL: Final = 604_800_000
#: How often an idle consumer looks for messages stored by other processes (ms).
DEFAULT_POLL_INTERVAL: Final = 100
#: How long a transition waits for a locked database in all (ms).
DEFAULT_BUSY_TIMEOUT: Final = 30_000

#: How many valid queue names a broker remembers as checked (the hot path skips the check).
_CHECKED_NAMES: Final = 4096

M = TypeVar("M", bound=Message[Any])


class _Keeper(threading.Thread):
    """Renews this broker's leases, recovers expired ones, expires dead letters."""

    def __init__(self, broker: SqliteBroker) -> None:
        super().__init__(name="dq-sqlite-keeper", daemon=True)
        self.broker = weakref.ref(broker)
        self.interval = broker.sweep_interval / 1000
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            broker = self.broker()
            if broker is None:
                return
            try:
                broker._keeper_tick()
            except Exception:
                broker.logger.warning("SQLite keeper tick failed; retrying.", exc_info=True)
            del broker
            if self.stopped.wait(self.interval):
                return


class SqliteBroker(Broker):
    """A persistent broker in one SQLite file, for one machine.

    Args:
        path: the database file (created when missing).
        middleware: as for `Broker`.
        lease: ms a reservation lasts unless its broker's keeper renews it.
        dead_message_ttl: ms a dead letter is kept.
        poll_interval: ms between two looks of an idle consumer for messages stored
            by other processes (enqueues in this process wake it at once).
        sweep_interval: ms between two keeper ticks (lease renewal, recovery, dead
            letter expiry); default ``lease // 3``.
        busy_timeout: ms a transition waits, in all, for a database locked by other
            connections before it raises `DatabaseBusy`.
        max_deliveries: the delivery cap: a message whose consumers died running it
            this many times (as `dq.core.policy.deliveries_after_death` counts them:
            a bystander is never charged) is dead-lettered with the reason
            ``max_deliveries`` instead of being delivered again; 0: no cap, else at
            least 2 (default `dq.core.policy.DEFAULT_MAX_DELIVERIES`).

    Raises:
        DatabaseUnavailable: the file cannot be opened or written, or is not a dq
            database (the message names the path).
        ValueError: an option is out of range.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "dq.sqlite3",
        *,
        middleware: list[Middleware] | None = None,
        lease: int = DEFAULT_LEASE,
        dead_message_ttl: int = DEFAULT_DEAD_MESSAGE_TTL,
        poll_interval: int = DEFAULT_POLL_INTERVAL,
        sweep_interval: int | None = None,
        busy_timeout: int = DEFAULT_BUSY_TIMEOUT,
        max_deliveries: int = policy.DEFAULT_MAX_DELIVERIES,
    ) -> None:
        for name, value, minimum in (
            ("lease", lease, 3),
            ("dead_message_ttl", dead_message_ttl, 0),
            ("poll_interval", poll_interval, 1),
            ("busy_timeout", busy_timeout, 0),
        ):
            if not is_whole(value, minimum):
                raise ValueError(f"{name} must be an integer >= {minimum} (ms), got {value!r}")
        problem = policy.delivery_cap_problem(max_deliveries)
        if problem is not None:
            raise ValueError(problem)
        if sweep_interval is None:
            sweep_interval = lease // 3
        elif not is_whole(sweep_interval, 1):
            raise ValueError(
                f"sweep_interval must be a positive integer (ms), got {sweep_interval!r}"
            )
        self.path = os.fspath(path)
        self.lease = lease
        self.dead_message_ttl = dead_message_ttl
        self.poll_interval = poll_interval
        self.sweep_interval = sweep_interval
        self.busy_timeout = busy_timeout
        self.max_deliveries = max_deliveries
        self.broker_id = uuid.uuid4().hex
        self._database = Database(self.path, busy_timeout)
        self._checked_names = StoredQueueNames(_CHECKED_NAMES)  # names accepted
        self._declarations = LocalDeclarations(self._checked_names)
        # Wakes this process's waiting consumers and joins; the generation counts changes.
        self._changed = threading.Condition(threading.Lock())
        self._generation = 0
        self._consumers: weakref.WeakSet[SqliteConsumer] = weakref.WeakSet()
        self._keeper: _Keeper | None = None
        self._keeper_lock = threading.Lock()
        self._closed = False
        super().__init__(middleware)
        self._database.open()

    # -- waking ------------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake this process's waiting consumers and joins."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def _wait(self, generation: int, timeout: float) -> None:
        """Wait for a change after ``generation``, or ``timeout`` seconds."""
        with self._changed:
            if self._generation == generation:
                self._changed.wait(timeout)

    # -- threads ----------------------------------------------------------------------------

    def _start_keeper(self) -> None:
        with self._keeper_lock:
            if self._closed:
                raise RuntimeError("this SqliteBroker is closed")
            keeper = self._keeper
            if keeper is None or not keeper.is_alive():  # none, or lost through fork
                self._keeper = _Keeper(self)
                self._keeper.start()

    def _stop_keeper(self) -> None:
        """Stop the keeper thread (its consumers' leases then run out)."""
        with self._keeper_lock:
            keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.stopped.set()
            if keeper is not threading.current_thread():
                keeper.join(5)

    def close(self) -> None:
        """Stop the keeper thread and close this thread's connection (consumers are
        closed by their owners first; a worker's ``stop`` does that). Other threads'
        connections close when their threads end."""
        with self._keeper_lock:
            self._closed = True
        self._stop_keeper()
        self._notify()
        self._database.close()

    # -- maintenance ----------------------------------------------------------------------

    def _keeper_tick(self) -> None:
        """One keeper tick: renew this broker's leases, expire lapsed ones, drop old
        dead letters.

        The time the expiry compares leases with is read before anything waits for
        the write lock: a lease that lapsed only because the database stayed locked
        (its holder could not renew it either) is not held against its holder.
        """
        asked = wall_ms()
        self.renew_leases()
        self.expire_leases(asked)
        self.expire_dead_letters()

    def renew_leases(self) -> int:
        """Extend the leases of every row this broker's open consumers hold (the
        keeper does it every ``sweep_interval`` ms); return how many were renewed.

        This is the `Renew` step of every live consumer of this broker at once."""
        pid = os.getpid()  # not the consumers of a parent process (fork)
        ids = [c.consumer_id for c in list(self._consumers) if not c._closed and c.pid == pid]
        if not ids:
            return 0
        return self._database.renew(ids, self.lease)

    def expire_leases(self, now_ms: int | None = None) -> int:
        """Recover every row whose lease ended before ``now_ms`` (default: now), in
        one transaction (`ExpireLeases`): each goes back to the tail of its queue
        with its delivery count updated, or, over ``max_deliveries``, to the dead
        letters with the reason ``max_deliveries`` (logged with its message id).

        Returns:
            How many rows came back to their queue.
        """
        now = wall_ms() if now_ms is None else now_ms
        return self._recovered(
            self._database.expire_leases(now, self.max_deliveries),
            "Returned %d messages whose consumer's lease expired to their queues.",
        )

    #: Dramatiq-era name of `expire_leases`.
    recover = expire_leases

    def recover_consumer(self, consumer_id: str, now_ms: int | None = None) -> int:
        """Declare the consumer ``consumer_id`` dead (`Recover`): every row it holds
        goes back to its queue with its delivery count updated, or over
        ``max_deliveries`` to the dead letters, in one transaction. Its later
        settlements change nothing (they are logged as lost).

        Returns:
            How many rows came back to their queue.
        """
        now = wall_ms() if now_ms is None else now_ms
        return self._recovered(
            self._database.recover(consumer_id, now, self.max_deliveries),
            "Returned %d messages of a consumer declared dead to their queues.",
        )

    def _recovered(self, done: Recovery, returned: str) -> int:
        """Log what a recovery did and wake this process's consumers."""
        for event in done.dead:
            entry = event.entry
            self.logger.error(
                "Dead-lettered message %s of %r (row %d), reason %s: its consumer died "
                "running it %d times (max_deliveries=%d).",
                entry.message_id,
                policy.q_name(entry.queue_name),
                entry.seq,
                event.reason.value,
                event.deliveries,
                self.max_deliveries,
            )
        if done.returned:
            self.logger.warning(returned, done.returned)
        if done.returned or done.dead:
            self._notify()
        return done.returned

    def expire_dead_letters(self, now_ms: int | None = None) -> int:
        """Drop dead letters older than ``dead_message_ttl``; return how many."""
        now = runtime.get_clock().now_ms() if now_ms is None else now_ms
        return self._database.expire_dead_letters(now - self.dead_message_ttl)

    # -- declarations -------------------------------------------------------------------------

    def declare_queue(self, queue_name: str) -> None:
        """Declare ``queue_name`` and its delay queue in this process.

        Nothing is written to the database; the declare hooks run (a running Worker
        starts consumers for both). Declaring twice is a no-op.

        Raises:
            InvalidQueueName: no message may be stored on ``queue_name`` (a ``.XQ``
                name, or one colliding with a broker's keys): a `QueueNotFound` and a
                `ValueError` that says why (`dq.core.policy.stored_queue_problem`).
        """
        self._declarations.declare(self, queue_name)

    def _check_queue(self, queue_name: str) -> None:
        """Check that a message may be stored on ``queue_name`` (a queue or its
        ``.DQ``), as the core says; names found good are remembered.

        Raises:
            InvalidQueueName: it names a dead-letter queue (``.XQ``) or collides
                with a broker's keys (a `QueueNotFound` and a `ValueError` naming it
                and why).
        """
        self._checked_names.check(queue_name)

    # -- enqueueing ------------------------------------------------------------------------

    def _priority(self, actor_name: str) -> int:
        actor = self.actors.get(actor_name)
        return 0 if actor is None else int(actor.priority)

    def _prepare(
        self, message: M, delay: int | None, now_ms: int, *, hooks: bool = True
    ) -> tuple[M, Row]:
        """The copy to store (on ``q.DQ`` with an eta when delayed, by the policy) and
        its row, after the ``before_enqueue`` hooks.

        Raises:
            QueueNotFound, ValueError: see `_check_queue`; ValueError also for a
                delay that is negative or too long, or a delayed message whose eta
                the core refuses (`dq.core.policy.eta_ms`, `message_eta_ms`).
        """
        queue_name = message.queue_name
        if queue_name not in self._checked_names:
            self._check_queue(queue_name)
        message = delayed_if_asked(message, delay, now_ms)
        if hooks and self._hooks.before_enqueue:
            self._run_before(self._hooks.before_enqueue, message, delay)
        payload = encode_message(message, _message.global_encoder)
        # As the core's Enqueue: an entry of a delay queue has its eta (a bad one is
        # refused), a ready one none.
        queue_name = message.queue_name
        eta = policy.message_eta_ms(message) if queue_name.endswith(policy.DELAY_SUFFIX) else None
        row = (
            message.queue_name,
            message.message_id,
            self._priority(message.actor_name),
            eta,
            payload,
        )
        return message, row

    def enqueue(self, message: M, *, delay: int | None = None) -> M:
        """Store ``message``; with ``delay`` (ms), a copy on ``q.DQ`` with an ``eta``.

        The queue need not be declared in this process (another process may run its
        actors).

        Returns:
            The message as stored.

        Raises:
            ValueError: ``delay`` is not a whole number of ms >= 0, or so long that
                the eta would pass `dq.core.policy.MAX_ETA_MS`; the queue name is
                one no message may be stored on (the message says why).
            TypeError: it is not serialisable by the global encoder.
            QueueNotFound: it names a dead-letter queue.
            DatabaseBusy, DatabaseUnavailable (DatabaseFull): nothing was stored.
        """
        stored, row = self._prepare(message, delay, runtime.get_clock().now_ms())
        self._database.enqueue((row,))
        self._notify()
        if self._hooks.after_enqueue:
            self._run_after(self._hooks.after_enqueue, stored, delay)
        return stored

    def enqueue_many(self, messages: Iterable[M], *, delay: int | None = None) -> list[M]:
        """Store many messages in one transaction: all or none.

        Returns:
            The messages as stored, in the order given.

        Raises:
            ValueError, TypeError, QueueNotFound, DatabaseBusy, DatabaseUnavailable:
                as `enqueue`; nothing of the batch was stored.
        """
        now = runtime.get_clock().now_ms()
        prepared = [self._prepare(message, delay, now) for message in messages]
        if not prepared:
            return []
        self._database.enqueue([row for _, row in prepared])
        self._notify()
        stored_messages = [stored for stored, _ in prepared]
        after_enqueue = self._hooks.after_enqueue
        if after_enqueue:
            for stored in stored_messages:
                self._run_after(after_enqueue, stored, delay)
        return stored_messages

    # -- consuming ------------------------------------------------------------------------

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """Return a consumer of ``queue_name`` (a queue or its ``.DQ``); starts this
        broker's keeper thread on first use.

        Raises:
            QueueNotFound: ``queue_name`` names a dead-letter queue.
            ValueError: ``prefetch`` < 1 or ``timeout`` < 0, or no message may be
                stored on ``queue_name`` (the message says why).
        """
        self._check_queue(queue_name)
        check_consume_arguments(prefetch, timeout)
        consumer = SqliteConsumer(self, queue_name, prefetch, timeout)
        self._consumers.add(consumer)
        self._start_keeper()
        return consumer

    # -- reading -----------------------------------------------------------------------------

    def flush(self, queue_name: str) -> None:
        """Drop the waiting messages of ``queue_name`` and its ``.DQ``, and its dead
        letters, in one transaction. Messages reserved by consumers stay with them."""
        name = policy.q_name(queue_name)
        self._database.flush(name)
        self._notify()

    def flush_all(self) -> None:
        """Drop every waiting message and every dead letter in the file (of every
        queue, declared here or not), in one transaction."""
        self._database.flush_all()
        self._notify()

    def qsize(self, queue_name: str) -> int:
        """How many messages of ``queue_name`` and its ``.DQ`` are stored (waiting or in
        flight, in any process)."""
        name = policy.q_name(queue_name)
        rows = self._database.read(
            "SELECT count(*) FROM dq_messages WHERE queue IN (?, ?)", (name, policy.dq_name(name))
        )
        return int(rows[0][0])

    def join(self, queue_name: str, *, timeout: int | None = None) -> None:
        """Block until ``queue_name`` and its ``.DQ`` hold no stored message (waiting
        or in flight, in any process). A test helper.

        Raises:
            QueueJoinTimeout: ``timeout`` ms passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        interval = self.poll_interval / 1000
        while True:
            generation = self._generation
            if self.qsize(queue_name) == 0:
                return
            wait = interval
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueJoinTimeout(queue_name)
                wait = min(wait, remaining)
            self._wait(generation, wait)

    def dead_letters_of(self, queue_name: str) -> list[tuple[str, bytes, int]]:
        """The dead letters of a queue (canonical name, or its ``.DQ``/``.XQ``), oldest
        first: (message_id, payload, ms time of the nack)."""
        rows = self._database.read(
            "SELECT message_id, payload, dead_at FROM dq_dead WHERE queue = ? ORDER BY seq",
            (policy.q_name(queue_name),),
        )
        return [(str(mid), bytes(payload), int(at)) for mid, payload, at in rows]

    def dead_letter_reasons_of(self, queue_name: str) -> list[tuple[str, DeathReason]]:
        """Why each dead letter of a queue died, oldest first: (message_id, reason).

        A reason this version of dq does not know (written by a newer one, or by
        hand) reads as `DeathReason.NACKED`; the raw text stays in ``dq_dead.reason``.
        """
        rows = self._database.read(
            "SELECT message_id, reason FROM dq_dead WHERE queue = ? ORDER BY seq",
            (policy.q_name(queue_name),),
        )
        return [(str(mid), _REASONS.get(reason, DeathReason.NACKED)) for mid, reason in rows]


_REASONS: Final = {reason.value: reason for reason in DeathReason}
