"""`SqliteConsumer`, the consumer of a `dq.brokers.sqlite.SqliteBroker`: it reserves
rows in batches, hands them out, and settles them.

Each settlement (ack, nack, requeue, release, promote, replace, start) is one
transaction of the broker's `dq.brokers.sqlite.database.Database`, which only moves
rows: what to do was decided before (by the worker and `dq.core.policy`). A
settlement of a row this consumer no longer holds (its lease lapsed and the row was
recovered meanwhile) changes nothing, and is logged.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from dq import _sources as runtime
from dq.broker import MessageProxy
from dq.brokers._buffered import BufferedConsumer
from dq.core import DeathReason, Run, policy
from dq.errors import BrokerConnectionError
from dq.message import Message

if TYPE_CHECKING:
    from dq.brokers.sqlite.broker import SqliteBroker

__all__ = ["SqliteConsumer", "sort_reserved"]

M = TypeVar("M", bound=Message[Any])

#: A row that cannot be delivered: seq, message id, reason, what is wrong with it.
Reject = tuple[int, str, DeathReason, str]

_consumer_ids = itertools.count(1)


def sort_reserved(
    rows: Sequence[Sequence[Any]],
) -> tuple[list[tuple[int, bytes]], list[int], list[Reject]]:
    """Sort reserved rows (priority, seq, payload, deliveries, eta, message_id, any
    SQLite values) into what can be delivered and what cannot.

    A row that a raw write left with a payload that is not a BLOB or a priority that
    is not a number cannot be a message (`DeathReason.UNDECODABLE`); one whose eta
    `dq.core.policy.eta_problem` refuses is `DeathReason.BAD_ETA`. Such rows are
    dead-lettered, never delivered, and never hold their batch-mates back.

    Returns:
        The deliverable (seq, payload) pairs by priority then FIFO, the seqs of the
        suspects among them (a delivery count >= 1), and the rejected rows.
    """
    good: list[tuple[Any, int, bytes]] = []
    suspects: list[int] = []
    bad: list[Reject] = []
    for priority, seq, payload, deliveries, eta, message_id in rows:
        why: str | None
        reason = DeathReason.UNDECODABLE
        if not isinstance(payload, bytes):
            why = f"its payload is {type(payload).__name__}, not a BLOB of encoded bytes"
        elif isinstance(priority, bool) or not isinstance(priority, int | float):
            why = f"its priority {priority!r} is not a number"
        else:
            why = policy.eta_problem(eta)
            reason = DeathReason.BAD_ETA
        if why is not None:
            bad.append((seq, str(message_id), reason, why))
            continue
        good.append((priority, seq, payload))
        if isinstance(deliveries, int) and deliveries > 0:
            suspects.append(seq)
    good.sort(key=lambda row: (row[0], row[1]))
    return [(seq, payload) for _, seq, payload in good], suspects, bad


class SqliteConsumer(BufferedConsumer[int]):
    """A consumer of one queue of a SQLite file.

    When its buffer is empty it reserves as many rows as its free prefetch allows in
    one transaction, once at least half its prefetch window is free (at least one),
    then hands them out one per ``next()``. ``ack``, ``nack``, ``requeue``,
    ``promote``, ``replace`` and ``started`` are thread-safe: worker threads settle
    directly, and acks arriving while another thread sends a batch join the next
    batch.
    """

    #: What it holds lives in the file under its id and lease, not in a connection.
    survives_connection_loss = True

    broker: SqliteBroker

    def __init__(self, broker: SqliteBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self.pid = os.getpid()
        self.consumer_id = f"{broker.broker_id}.{self.pid}.{next(_consumer_ids)}"
        self._delay_queue = policy.is_delay_queue(queue_name)
        # Reserved rows with a delivery count: the worker runs them alone.
        self._suspects: set[int] = set()
        # Reserved rows that cannot be delivered, not dead-lettered yet.
        self._rejects: list[Reject] = []

    def buffered(self) -> int:
        """How many reserved messages wait in memory for ``next()``."""
        return len(self._buffer)

    def _tag(self, message: MessageProxy) -> int:
        return _seq(message)

    def _room_freed(self) -> None:
        self.broker._notify()

    def _forget(self, tags: list[int]) -> None:
        super()._forget(tags)
        if self._suspects:
            for tag in tags:
                self._suspects.discard(tag)

    # -- fetching --------------------------------------------------------------------------

    def _fetch(self, deadline: float) -> bool:
        """Fill the buffer, waiting until ``deadline``; return whether it has items."""
        broker = self.broker
        interval = broker.poll_interval / 1000
        while True:
            if self._rejects:
                self._reject()
            generation = broker._generation
            with self._lock:
                closed = self._closed
                room = self.prefetch - len(self._buffer) - len(self._held)
            if closed:
                return False
            if room >= self._min_batch:
                rows = broker._database.reserve(
                    self.queue_name, self.consumer_id, room, broker.lease
                )
                if rows:
                    good, suspects, bad = sort_reserved(rows)
                    with self._lock:
                        closed = self._closed
                        if not closed:
                            self._buffer.extend(good)
                            self._suspects.update(suspects)
                            self._rejects.extend(bad)
                    if closed:  # closed by another thread meanwhile: give them back
                        self._give_back([row[1] for row in rows])
                        return False
                    if bad:
                        self._reject()
                    if good:
                        return True
                    if time.monotonic() < deadline:
                        continue  # only rejects: look again at once
                    return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            broker._wait(generation, min(interval, remaining))

    def _reject(self) -> None:
        """Dead-letter the reserved rows that cannot be delivered, in one transaction,
        and log each with its reason; if the database fails, try again later."""
        with self._lock:
            rejects, self._rejects = self._rejects, []
        if not rejects:
            return
        items = [(seq, reason) for seq, _, reason, _ in rejects]
        now = runtime.get_clock().now_ms()
        try:
            self.broker._database.nack(self.consumer_id, self.queue_name, items, now)
        except BrokerConnectionError as e:
            self.broker.logger.warning(
                "Could not dead-letter %d bad rows of %r yet (%s); retrying.",
                len(rejects),
                self.queue_name,
                e,
            )
            with self._lock:
                self._rejects[:0] = rejects
            return
        for seq, message_id, reason, why in rejects:
            self.broker.logger.error(
                "Dead-lettered row %d (message %s) of %r, reason %s: %s.",
                seq,
                message_id,
                self.queue_name,
                reason.value,
                why,
            )
        self.broker._notify()

    def __next__(self) -> MessageProxy:
        if not self._delay_queue:
            return super().__next__()
        while True:
            proxy = super().__next__()
            # A delayed message waits for its eta: one that is not a time (from a raw
            # write or a foreign producer) is dead-lettered, never held forever.
            problem = policy.eta_problem(proxy.message.options.get("eta"))
            if problem is None:
                return proxy
            self._refuse((_seq(proxy), proxy.message_id, DeathReason.BAD_ETA, problem))

    # -- the delivery cap ------------------------------------------------------------------

    def suspect(self, message: MessageProxy) -> bool:
        """Whether a consumer died holding ``message`` before (its row's delivery
        count, read when it was reserved, is at least one)."""
        return bool(self._suspects) and _seq(message) in self._suspects

    def started(self, message: MessageProxy, *, alone: bool) -> None:
        """Record that a suspect starts running (``alone`` or not), for the delivery
        cap; an ordinary message costs nothing (its first death counts either way).

        Raises:
            BrokerConnectionError: the database could not be written.
        """
        seq = _seq(message)
        if not self._suspects or seq not in self._suspects:
            return
        run = Run.ALONE if alone else Run.SHARED
        self.broker._database.start(self.consumer_id, seq, run)

    # -- settling ------------------------------------------------------------------------

    def _settle(self, seq: int, transaction: Callable[[], int]) -> int:
        """Run one settling transaction of ``seq`` and free its prefetch slot."""
        try:
            return transaction()
        finally:
            self._forget([seq])

    def _lost(self, count: int, what: str) -> None:
        if count:
            self.broker.logger.warning(
                "%d message(s) of %r could not be %s: this consumer's lease expired and "
                "they were returned to the queue; they will run again.",
                count,
                self.queue_name,
                what,
            )

    def _send_ack_batch(self, batch: list[int]) -> None:
        """Delete the acked rows this consumer still holds, in one transaction."""
        self._lost(len(batch) - self.broker._database.ack(self.consumer_id, batch), "acked")

    def _dead_letter(self, tag: int) -> None:
        """Dead-letter an undecodable message (the base class logged why)."""
        self._refuse((tag, "?", DeathReason.UNDECODABLE, "its payload is not a message"))

    def _refuse(self, reject: Reject) -> None:
        """Dead-letter a message handed out by ``next()`` that must not run (it is
        not handed to the caller): see `_reject`."""
        with self._lock:
            self._held.pop(reject[0], None)
            self._rejects.append(reject)
        self._suspects.discard(reject[0])
        self._reject()

    def nack(self, message: MessageProxy) -> None:
        """Move ``message`` to its canonical queue's dead letters with its
        ``death_reason``, in one transaction."""
        seq = _seq(message)
        items = [(seq, message.death_reason)]
        now = runtime.get_clock().now_ms()
        database = self.broker._database
        done = self._settle(
            seq, lambda: database.nack(self.consumer_id, self.queue_name, items, now)
        )
        self._lost(1 - done, "dead-lettered")

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Return unprocessed ``messages`` to the tail of their queue, in order, in one
        transaction."""
        seqs = [_seq(message) for message in messages]
        if not seqs:
            return
        done = self._give_back(seqs)
        self._forget(seqs)
        self._lost(len(seqs) - done, "requeued")

    def _give_back(self, seqs: list[int], *, release: bool = False) -> int:
        """Requeue ``seqs`` (or, ``release``, everything this consumer returns as it
        closes) in one transaction; return how many it still held."""
        database = self.broker._database
        step = database.release if release else database.requeue
        try:
            return step(self.consumer_id, seqs)
        finally:
            self.broker._notify()

    def promote(self, message: MessageProxy) -> Message[Any]:
        """Store the ready copy of a held delayed message and forget the held one, in
        one transaction.

        Returns:
            The promoted copy as stored (canonical queue, no ``eta``).
        """
        broker = self.broker
        seq = _seq(message)
        stored, row = broker._prepare(policy.promoted(message.message), None, 0, hooks=False)
        database = broker._database
        if not self._settle(seq, lambda: database.promote(self.consumer_id, seq, row)):
            self._lost(1, "promoted")
        return stored

    def replace(self, message: MessageProxy, new: M, delay: int | None, *, hooks: bool = True) -> M:
        """Store ``new`` (after ``delay`` ms) and ack ``message`` in one transaction.

        This is how a retry is stored: if this consumer no longer holds ``message``
        (its lease expired and it was recovered), nothing is stored and it runs again
        instead.

        Returns:
            ``new`` as stored.

        Raises:
            ValueError: ``delay`` or ``new``'s queue is refused (see
                `dq.brokers.sqlite.SqliteBroker.enqueue`); nothing changed.
        """
        broker = self.broker
        seq = _seq(message)
        stored, row = broker._prepare(new, delay, runtime.get_clock().now_ms(), hooks=hooks)
        database = broker._database
        if not self._settle(seq, lambda: database.replace(self.consumer_id, seq, row)):
            self._lost(1, "replaced")
        elif hooks and broker._hooks.after_enqueue:
            broker._run_after(broker._hooks.after_enqueue, stored, delay)
        return stored

    def close(self) -> None:
        """Send pending acks and return everything this consumer holds (reserved or
        handed out, unsettled) to the tail of its queue, oldest first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            acked = set(self._acks)
            seqs = [seq for seq in self._held if seq not in acked] + [
                seq for seq, _ in self._buffer
            ]
            self._buffer.clear()
            sending = self._sending
            self._sending = True
        try:
            if not sending:
                self._send_acks()
            if self._rejects:
                self._reject()
            if seqs:
                self._give_back(seqs, release=True)
                with self._lock:
                    self._held.clear()
        except BrokerConnectionError:
            self.broker.logger.warning(
                "Could not return %d messages of %r: the database is unavailable; they "
                "come back when their lease expires.",
                len(seqs),
                self.queue_name,
            )
        finally:
            self._suspects.clear()
            self.broker._consumers.discard(self)


def _seq(message: MessageProxy) -> int:
    tag = message._tag
    if not isinstance(tag, int) or isinstance(tag, bool):
        raise ValueError(
            f"{message!r} was not delivered by a SqliteBroker consumer (it has no row tag)"
        )
    return tag
