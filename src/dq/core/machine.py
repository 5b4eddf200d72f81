"""The broker state machine: every transition a message can make, in one table.

Theory of operation
===================

A broker holds one `BrokerState` value. An interpreter (the in-memory `StubBroker`,
the Redis, RabbitMQ or SQLite brokers, a user's own runtime) turns each operation into
a *command* and calls ``apply(state, command)``, which returns a `Step`: the next
state, the *effects* the world must perform for that state to be real, and the
*events* that happened (brokers turn them into middleware hooks). `apply` does no I/O,
reads no clock, makes no ids and never mutates its input; time and payload bytes come
in inside the command.

Rules:

1. Every command addresses one subject: a queue, a stored entry, or the broker. The
   subject's `Status` and the command's type select one handler in `TRANSITIONS`.
2. A (status, command) pair that is not in the table raises `InvalidTransition`, never
   a silent no-op. A no-op that is meant (re-declaring a queue) has its own row.
3. Nothing is lost inside a step: an entry leaves one place only in the step that puts
   it in another (ready → reserved → acked | dead-lettered | requeued; held → promoted).
4. A replacement is stored before what it replaces is forgotten: `Promote` and
   `Replace` store the new copy and drop the old one in the same step.
5. A consumer that dies (`Recover`) or whose leases lapse (`ExpireLeases`) gives back
   everything it held, each entry's delivery count updated by
   `policy.deliveries_after_death`; an entry over the cap is dead-lettered with the
   reason instead. Every decision (eta validity, the cap, who is dead) is a function
   of `dq.core.policy`; interpreters only carry the step's effects out.

The life of a message::

                 Enqueue                    Enqueue (delayed: q.DQ + eta)
                    │                                  │
                    ▼                                  ▼
                ┌───────┐  Requeue              ┌─────────┐  Requeue
                │ READY │◄──────────┐           │ DELAYED │◄──────────┐
                └───┬───┘           │           └────┬────┘           │
            Reserve │               │        Reserve │ (from q.DQ)    │
                    ▼               │                ▼                │
              ┌──────────┐          │           ┌────────┐            │
     Start ┌───►│ RESERVED ├──────────┘           │  HELD  ├────────────┘
   (marks  └────┴─┬──────┬─┘                      └┬──┬──┬─┘
    a run)    Ack │      │ Nack               Ack  │  │  │ Promote (eta passed):
                  ▼      ▼                         │  │  │ a new READY copy on q,
              (acked)  DEAD-LETTERED ◄─────────────┼──┘  │ the held one forgotten,
                  ▲      (q.XQ)             Nack   │     │ in one step
                  └────────────────────────────────┘     └──► READY

    Replace (RESERVED or HELD): a new copy on q or q.DQ (a retry) is stored and the
    reserved one forgotten, in one step.
    Recover / ExpireLeases (the consumer died, or its leases lapsed): each RESERVED
    or HELD entry goes back to READY / DELAYED with its delivery count updated, or,
    past max_deliveries, to DEAD-LETTERED (reason MAX_DELIVERIES).
    Release (the consumer closed): back to READY / DELAYED, nothing counted.
    Renew extends a consumer's leases. Flush drops READY, DELAYED and DEAD-LETTERED
    entries of a queue; RESERVED and HELD entries stay with their consumers.
    ExpireDeadLetters drops dead letters past their time. AckMany is an Ack of each
    of several entries in one step (group commit); its subject is the batch,
    RESERVED (or HELD, when all are) only if every entry in it is, each named once.

Statuses a command can observe are the rows of the table: a queue is UNDECLARED or
DECLARED; an entry is RESERVED (taken from ``q``), HELD (taken from ``q.DQ``) or
UNRESERVED (waiting, settled, flushed or never stored: nothing may settle it); the
broker itself is always OPEN. A ``q.XQ`` name is a DEAD_LETTER_QUEUE: no command
addresses one directly (dead letters are made by Nack and dropped by Flush).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from rpds import HashTrieMap

from dq.core import commands as c
from dq.core import effects as fx
from dq.core import events as ev
from dq.core.errors import InvalidTransition
from dq.core.persistent import PQueue, empty_queue
from dq.core.policy import (
    DEAD_SUFFIX,
    DELAY_SUFFIX,
    deliveries_after_death,
    lease_expired,
    message_eta_ms,
    over_delivery_cap,
    q_name,
    xq_name,
)
from dq.core.records import (
    BrokerState,
    DeadLetter,
    DeathReason,
    Entry,
    Message,
    QueueState,
    Reservation,
    Row,
    Run,
)


class Status(enum.Enum):
    """The state of a command's subject."""

    UNDECLARED = "undeclared"  # queue
    DECLARED = "declared"  # queue
    DEAD_LETTER_QUEUE = "dead-letter queue"  # a q.XQ name: nothing is done *on* it
    RESERVED = "reserved"  # entry taken from a canonical queue
    HELD = "held"  # entry taken from a delay queue
    UNRESERVED = "unreserved"  # entry nobody holds
    OPEN = "open"  # the broker

    # Members are singletons: identity hashing is correct and much cheaper than
    # Enum's name-based hash (every apply looks a (status, type) pair up).
    __hash__ = object.__hash__


@attrs.frozen
class Step:
    """The result of applying one command.

    Attributes:
        state: the next state.
        effects: what the world must do, in order.
        events: what happened, in order.
    """

    state: BrokerState
    effects: tuple[fx.Effect, ...] = ()
    events: tuple[ev.Event, ...] = ()


Handler = Callable[[BrokerState, Any], Step]

# -- subject status --------------------------------------------------------------


def _queue_status(state: BrokerState, queue_name: str) -> Status:
    if queue_name in state.queues:  # a declared canonical name: the common case
        return Status.DECLARED
    if queue_name.endswith(DEAD_SUFFIX):
        return Status.DEAD_LETTER_QUEUE
    return Status.DECLARED if q_name(queue_name) in state.queues else Status.UNDECLARED


def _entry_status(state: BrokerState, seq: int) -> Status:
    reservation = state.reserved.get(seq)
    if reservation is None:
        return Status.UNRESERVED
    if reservation.entry.queue_name.endswith(DELAY_SUFFIX):
        return Status.HELD
    return Status.RESERVED


def _subject_entry_status(state: BrokerState, command: Any) -> Status:
    """`_entry_status` of an entry command's ``seq`` (one call less per settle)."""
    reservation = state.reserved.get(command.seq)
    if reservation is None:
        return Status.UNRESERVED
    if reservation.entry.queue_name.endswith(DELAY_SUFFIX):
        return Status.HELD
    return Status.RESERVED


def _subject_entries_status(state: BrokerState, command: c.AckMany) -> Status:
    """The status of a batch of entries: UNRESERVED if one is not reserved, is named
    twice, or there is none; else HELD if every one is held; else RESERVED."""
    seqs = command.seqs
    if not seqs or len(frozenset(seqs)) != len(seqs):
        return Status.UNRESERVED
    get = state.reserved.get
    held = True
    for seq in seqs:
        reservation = get(seq)
        if reservation is None:
            return Status.UNRESERVED
        if held and not reservation.entry.queue_name.endswith(DELAY_SUFFIX):
            held = False
    return Status.HELD if held else Status.RESERVED


_SUBJECT: dict[type[c.Command], Callable[[BrokerState, Any], Status]] = {
    c.DeclareQueue: lambda s, cmd: _queue_status(s, cmd.queue_name),
    c.Enqueue: lambda s, cmd: _queue_status(s, cmd.message.queue_name),
    c.Reserve: lambda s, cmd: _queue_status(s, cmd.queue_name),
    c.Flush: lambda s, cmd: _queue_status(s, cmd.queue_name),
    c.Ack: _subject_entry_status,
    c.AckMany: _subject_entries_status,
    c.Nack: _subject_entry_status,
    c.Requeue: _subject_entry_status,
    c.Promote: _subject_entry_status,
    c.Replace: _subject_entry_status,
    c.Start: _subject_entry_status,
    c.ExpireDeadLetters: lambda s, cmd: _queue_status(s, cmd.queue_name),
    c.FlushAll: lambda s, cmd: Status.OPEN,
    c.Release: lambda s, cmd: Status.OPEN,
    c.Recover: lambda s, cmd: Status.OPEN,
    c.Renew: lambda s, cmd: Status.OPEN,
    c.ExpireLeases: lambda s, cmd: Status.OPEN,
}


def status_of(state: BrokerState, command: c.Command) -> Status:
    """Return the status of the subject ``command`` addresses in ``state``."""
    return _SUBJECT[type(command)](state, command)


# -- handlers --------------------------------------------------------------------


def _declare(state: BrokerState, command: c.DeclareQueue) -> Step:
    name = q_name(command.queue_name)
    return Step(
        BrokerState(
            state.queues.insert(name, QueueState(name)),
            state.reserved,
            state.next_seq,
            state.deliveries,
        ),
        (),
        (ev.QueueDeclared(name), ev.DelayQueueDeclared(name + DELAY_SUFFIX)),
    )


def _already_declared(state: BrokerState, command: c.DeclareQueue) -> Step:
    return Step(state)


def _stored(
    queue: QueueState, seq: int, message: Message[object], payload: bytes, priority: int
) -> tuple[QueueState, Row, fx.Effect]:
    """Return ``queue`` with ``message`` stored under ``seq`` at the tail of its queue
    (its delay queue, with its eta, when it is addressed there), the row, and the
    effect that stores it.

    Raises:
        InvalidValue: a delayed message's eta is one `policy.eta_problem` refuses.
    """
    target = message.queue_name
    if target.endswith(DELAY_SUFFIX):
        row: Row = (seq, target, message.message_id, message_eta_ms(message), payload)
        queue = QueueState(
            queue.name, queue.ready, queue.delayed.push(row), queue.in_flight, queue.dead
        )
        return queue, row, fx.PushDelayed(row)
    row = (seq, target, message.message_id, None, payload)
    queue = QueueState(
        queue.name, queue.ready.push(row, priority), queue.delayed, queue.in_flight, queue.dead
    )
    return queue, row, fx.PushReady(row)


def _enqueue(state: BrokerState, command: c.Enqueue) -> Step:
    message = command.message
    queue_name = message.queue_name
    name = queue_name[:-3] if queue_name.endswith(DELAY_SUFFIX) else queue_name
    seq = state.next_seq
    queue, row, effect = _stored(
        state.queues[name], seq, message, command.payload, command.priority
    )
    return Step(
        BrokerState(state.queues.insert(name, queue), state.reserved, seq + 1, state.deliveries),
        (effect,),
        (ev.Enqueued(row),),
    )


def _reserve(state: BrokerState, command: c.Reserve) -> Step:
    name = q_name(command.queue_name)
    queue = state.queues[name]
    from_delay = command.queue_name.endswith(DELAY_SUFFIX)
    waiting = queue.delayed if from_delay else queue.ready
    if not waiting or command.limit <= 0:
        return Step(state)
    consumer, lease = command.consumer, command.lease_until_ms
    # Rows of several priorities wait (a private attribute of the core's own queue,
    # read directly on the hot path): each reservation keeps its row's priority.
    if waiting._bands:
        ranked, waiting = waiting.take_ranked(command.limit)
        entries = tuple([Entry(*row) for _, row in ranked])
        reserved = state.reserved.update(
            {
                entry.seq: Reservation(entry, consumer, lease, Run.WAITING, rank)
                for entry, (rank, _) in zip(entries, ranked, strict=True)
            }
        )
    else:
        rows, waiting = waiting.take(command.limit)
        entries = tuple([Entry(*row) for row in rows])  # Entry.from_row, inlined
        reserved = state.reserved.update(
            {entry.seq: Reservation(entry, consumer, lease) for entry in entries}
        )
    in_flight = queue.in_flight + len(entries)
    if from_delay:
        queue = QueueState(name, queue.ready, waiting, in_flight, queue.dead)
    else:
        queue = QueueState(name, waiting, queue.delayed, in_flight, queue.dead)
    return Step(
        BrokerState(state.queues.insert(name, queue), reserved, state.next_seq, state.deliveries),
        (fx.Deliver(command.consumer, entries),),
        (ev.Reserved(command.consumer, entries),),
    )


def _settle(state: BrokerState, seq: int) -> tuple[Entry, QueueState]:
    """Return a reserved entry and its queue with the reservation's in-flight slot freed."""
    entry = state.reserved[seq].entry
    queue = state.queues[q_name(entry.queue_name)]
    return entry, QueueState(
        queue.name, queue.ready, queue.delayed, queue.in_flight - 1, queue.dead
    )


def _ack(state: BrokerState, command: c.Ack) -> Step:
    # _settle, inlined: the hottest transition.
    seq = command.seq
    entry = state.reserved[seq].entry
    name = entry.queue_name
    if name.endswith(DELAY_SUFFIX):  # reserved entries come from q or q.DQ
        name = name[:-3]
    queues = state.queues
    queue = queues[name]
    queue = QueueState(name, queue.ready, queue.delayed, queue.in_flight - 1, queue.dead)
    deliveries = state.deliveries
    if deliveries:  # empty unless a consumer died holding something
        deliveries = deliveries.discard(seq)
    return Step(
        BrokerState(
            queues.insert(name, queue), state.reserved.remove(seq), state.next_seq, deliveries
        ),
        (fx.Forget(entry),),
        (ev.Acked(entry),),
    )


def _ack_many(state: BrokerState, command: c.AckMany) -> Step:
    # An Ack of each, in order, with one new queue state per queue and one step.
    reserved = state.reserved
    settled: dict[str, int] = {}  # canonical queue name -> entries acked
    effects: list[fx.Effect] = []
    events: list[ev.Event] = []
    forget, acked = fx.Forget, ev.Acked
    for seq in command.seqs:
        entry = reserved[seq].entry
        reserved = reserved.remove(seq)
        name = entry.queue_name
        if name.endswith(DELAY_SUFFIX):
            name = name[:-3]
        settled[name] = settled.get(name, 0) + 1
        effects.append(forget(entry))
        events.append(acked(entry))
    queues = state.queues
    for name, count in settled.items():
        queue = queues[name]
        queues = queues.insert(
            name,
            QueueState(name, queue.ready, queue.delayed, queue.in_flight - count, queue.dead),
        )
    deliveries = state.deliveries
    if deliveries:
        for seq in command.seqs:
            deliveries = deliveries.discard(seq)
    return Step(
        BrokerState(queues, reserved, state.next_seq, deliveries), tuple(effects), tuple(events)
    )


def _nack(state: BrokerState, command: c.Nack) -> Step:
    entry, queue = _settle(state, command.seq)
    reason = command.reason
    queue = QueueState(
        queue.name,
        queue.ready,
        queue.delayed,
        queue.in_flight,
        queue.dead.push(DeadLetter(entry, command.now_ms, reason)),
    )
    return Step(
        BrokerState(
            state.queues.insert(queue.name, queue),
            state.reserved.remove(command.seq),
            state.next_seq,
            state.deliveries.discard(command.seq),
        ),
        (fx.DeadLetter(entry, xq_name(queue.name), command.now_ms, reason),),
        (ev.Nacked(entry, reason),),
    )


def _pushed_back(
    queue: QueueState, entry: Entry, priority: int = 0
) -> tuple[QueueState, fx.Effect]:
    """Return ``queue`` with a settled-unprocessed entry at the tail of its list (of
    its priority's entries)."""
    row = entry.row
    if entry.queue_name.endswith(DELAY_SUFFIX):
        return (
            QueueState(
                queue.name, queue.ready, queue.delayed.push(row), queue.in_flight, queue.dead
            ),
            fx.PushDelayed(row),
        )
    return (
        QueueState(
            queue.name, queue.ready.push(row, priority), queue.delayed, queue.in_flight, queue.dead
        ),
        fx.PushReady(row),
    )


def _requeue(state: BrokerState, command: c.Requeue) -> Step:
    entry, queue = _settle(state, command.seq)
    queue, effect = _pushed_back(queue, entry, state.reserved[command.seq].priority)
    return Step(
        BrokerState(
            state.queues.insert(queue.name, queue),
            state.reserved.remove(command.seq),
            state.next_seq,
            state.deliveries,
        ),
        (effect,),
        (ev.Requeued(entry),),
    )


def _promote(state: BrokerState, command: c.Promote) -> Step:
    old, queue = _settle(state, command.seq)
    message = command.message
    if (
        message.queue_name != queue.name
        or message.message_id != old.message_id
        or "eta" in message.options
    ):
        raise InvalidTransition(
            Status.HELD,
            command,
            f"a promoted copy of {old.message_id!r} must be on {queue.name!r} with the same "
            "message_id and no 'eta' option (see dq.core.policy.promoted)",
        )
    new = Entry(state.next_seq, queue.name, message.message_id, None, command.payload)
    queue = QueueState(
        queue.name,
        queue.ready.push(new.row, command.priority),
        queue.delayed,
        queue.in_flight,
        queue.dead,
    )
    return Step(
        BrokerState(
            state.queues.insert(queue.name, queue),
            state.reserved.remove(command.seq),
            state.next_seq + 1,
            state.deliveries.discard(command.seq),
        ),
        # Store the replacement first, then forget the held copy.
        (fx.PushReady(new.row), fx.Forget(old)),
        (ev.Promoted(old, new),),
    )


def _replace(state: BrokerState, command: c.Replace) -> Step:
    old, queue = _settle(state, command.seq)
    message = command.message
    target = message.queue_name
    if q_name(target) != queue.name or target.endswith(DEAD_SUFFIX):
        status = Status.HELD if old.queue_name.endswith(DELAY_SUFFIX) else Status.RESERVED
        raise InvalidTransition(
            status,
            command,
            f"the replacement of {old.message_id!r} must be stored on {queue.name!r} or "
            f"{queue.name + DELAY_SUFFIX!r}, not {target!r}",
        )
    seq = state.next_seq
    queue, row, effect = _stored(queue, seq, message, command.payload, command.priority)
    return Step(
        BrokerState(
            state.queues.insert(queue.name, queue),
            state.reserved.remove(command.seq),
            seq + 1,
            state.deliveries.discard(command.seq),
        ),
        # Store the replacement first, then forget the original.
        (effect, fx.Forget(old)),
        (ev.Replaced(old, Entry(*row)),),
    )


def _start(state: BrokerState, command: c.Start) -> Step:
    reservation = state.reserved[command.seq]
    run = Run.ALONE if command.alone else Run.SHARED
    return Step(
        BrokerState(
            state.queues,
            state.reserved.insert(command.seq, attrs.evolve(reservation, run=run)),
            state.next_seq,
            state.deliveries,
        ),
        (fx.MarkStarted(reservation.entry, command.alone),),
        (ev.Started(reservation.entry, command.alone),),
    )


def _flushed(
    queue: QueueState, deliveries: HashTrieMap[int, int]
) -> tuple[QueueState, int, HashTrieMap[int, int]]:
    """Return ``queue`` without its waiting entries and dead letters, how many were
    dropped, and ``deliveries`` without the counts of the dropped entries."""
    dropped = len(queue.ready) + len(queue.delayed) + len(queue.dead)
    if deliveries:
        for row in (*queue.ready, *queue.delayed):
            deliveries = deliveries.discard(row[0])
    empty: PQueue[Any] = empty_queue()
    return QueueState(queue.name, empty, empty, queue.in_flight, empty), dropped, deliveries


def _flush(state: BrokerState, command: c.Flush) -> Step:
    queue, dropped, deliveries = _flushed(
        state.queues[q_name(command.queue_name)], state.deliveries
    )
    return Step(
        BrokerState(
            state.queues.insert(queue.name, queue), state.reserved, state.next_seq, deliveries
        ),
        (fx.Purge(queue.name),),
        (ev.Flushed(queue.name, dropped),),
    )


def _flush_all(state: BrokerState, command: c.FlushAll) -> Step:
    queues, deliveries = state.queues, state.deliveries
    effects: list[fx.Effect] = []
    events: list[ev.Event] = []
    for name in sorted(state.queues.keys()):
        queue, dropped, deliveries = _flushed(state.queues[name], deliveries)
        queues = queues.insert(name, queue)
        effects.append(fx.Purge(name))
        events.append(ev.Flushed(name, dropped))
    return Step(
        BrokerState(queues, state.reserved, state.next_seq, deliveries),
        tuple(effects),
        tuple(events),
    )


def _expire_dead_letters(state: BrokerState, command: c.ExpireDeadLetters) -> Step:
    name = q_name(command.queue_name)
    queue = state.queues[name]
    cutoff = command.cutoff_ms
    kept = [dead for dead in queue.dead if dead.dead_at_ms > cutoff]
    dropped = len(queue.dead) - len(kept)
    if not dropped:
        return Step(state, (fx.DropDeadLetters(name, cutoff),), (ev.DeadLettersExpired(name, 0),))
    queue = QueueState(name, queue.ready, queue.delayed, queue.in_flight, PQueue(kept))
    return Step(
        BrokerState(
            state.queues.insert(name, queue), state.reserved, state.next_seq, state.deliveries
        ),
        (fx.DropDeadLetters(name, cutoff),),
        (ev.DeadLettersExpired(name, dropped),),
    )


def _release(state: BrokerState, command: c.Release) -> Step:
    queues, reserved = state.queues, state.reserved
    effects: list[fx.Effect] = []
    events: list[ev.Event] = []
    for reservation in held_by(state, command.consumer):
        entry = reservation.entry
        name = q_name(entry.queue_name)
        queue = queues[name]
        queue = QueueState(name, queue.ready, queue.delayed, queue.in_flight - 1, queue.dead)
        queue, effect = _pushed_back(queue, entry, reservation.priority)
        queues = queues.insert(name, queue)
        reserved = reserved.remove(entry.seq)
        effects.append(effect)
        events.append(ev.Requeued(entry))
    return Step(
        BrokerState(queues, reserved, state.next_seq, state.deliveries),
        tuple(effects),
        tuple(events),
    )


def _recovered(
    state: BrokerState, reservations: tuple[Reservation, ...], now_ms: int, max_deliveries: int
) -> Step:
    """Give back ``reservations`` (oldest first) of consumers that died: each entry to
    the tail of its queue with its delivery count updated, or dead-lettered when an
    entry of a canonical queue reaches ``max_deliveries``."""
    queues, reserved, deliveries = state.queues, state.reserved, state.deliveries
    effects: list[fx.Effect] = []
    events: list[ev.Event] = []
    for reservation in reservations:
        entry = reservation.entry
        seq = entry.seq
        name = q_name(entry.queue_name)
        queue = queues[name]
        queue = QueueState(name, queue.ready, queue.delayed, queue.in_flight - 1, queue.dead)
        reserved = reserved.remove(seq)
        if entry.queue_name.endswith(DELAY_SUFFIX):
            # A held delayed message never runs: its holder's death is not its doing.
            queue, effect = _pushed_back(queue, entry)
            effects.append(effect)
            events.append(ev.Recovered(entry, deliveries.get(seq, 0)))
        else:
            count = deliveries_after_death(deliveries.get(seq, 0), reservation.run)
            if over_delivery_cap(count, max_deliveries):
                reason = DeathReason.MAX_DELIVERIES
                queue = QueueState(
                    name,
                    queue.ready,
                    queue.delayed,
                    queue.in_flight,
                    queue.dead.push(DeadLetter(entry, now_ms, reason)),
                )
                deliveries = deliveries.discard(seq)
                effects.append(fx.DeadLetter(entry, xq_name(name), now_ms, reason))
                events.append(ev.DeadLettered(entry, count, reason))
            else:
                queue, effect = _pushed_back(queue, entry, reservation.priority)
                deliveries = deliveries.insert(seq, count)
                # The count is recorded first: the entry is never back without it.
                effects.append(fx.CountDeliveries(entry, count))
                effects.append(effect)
                events.append(ev.Recovered(entry, count))
        queues = queues.insert(name, queue)
    return Step(
        BrokerState(queues, reserved, state.next_seq, deliveries), tuple(effects), tuple(events)
    )


def _recover(state: BrokerState, command: c.Recover) -> Step:
    return _recovered(
        state, held_by(state, command.consumer), command.now_ms, command.max_deliveries
    )


def _expire_leases(state: BrokerState, command: c.ExpireLeases) -> Step:
    now = command.now_ms
    lapsed = tuple(
        sorted(
            (r for r in state.reserved.values() if lease_expired(r.lease_until_ms, now)),
            key=lambda r: r.entry.seq,
        )
    )
    return _recovered(state, lapsed, now, command.max_deliveries)


def _renew(state: BrokerState, command: c.Renew) -> Step:
    reserved = state.reserved
    count = 0
    for reservation in held_by(state, command.consumer):
        reserved = reserved.insert(
            reservation.entry.seq, attrs.evolve(reservation, lease_until_ms=command.until_ms)
        )
        count += 1
    return Step(
        BrokerState(state.queues, reserved, state.next_seq, state.deliveries),
        (fx.ExtendLeases(command.consumer, command.until_ms),),
        (ev.LeasesExtended(command.consumer, command.until_ms, count),),
    )


#: (status of the subject, command type) -> handler. Anything else is invalid.
TRANSITIONS: dict[tuple[Status, type[c.Command]], Handler] = {
    (Status.UNDECLARED, c.DeclareQueue): _declare,
    (Status.DECLARED, c.DeclareQueue): _already_declared,
    (Status.DECLARED, c.Enqueue): _enqueue,
    (Status.DECLARED, c.Reserve): _reserve,
    (Status.DECLARED, c.Flush): _flush,
    (Status.RESERVED, c.Ack): _ack,
    (Status.HELD, c.Ack): _ack,
    (Status.RESERVED, c.AckMany): _ack_many,
    (Status.HELD, c.AckMany): _ack_many,
    (Status.RESERVED, c.Nack): _nack,
    (Status.HELD, c.Nack): _nack,
    (Status.RESERVED, c.Requeue): _requeue,
    (Status.HELD, c.Requeue): _requeue,
    (Status.HELD, c.Promote): _promote,
    (Status.RESERVED, c.Replace): _replace,
    (Status.HELD, c.Replace): _replace,
    (Status.RESERVED, c.Start): _start,
    (Status.DECLARED, c.ExpireDeadLetters): _expire_dead_letters,
    (Status.OPEN, c.FlushAll): _flush_all,
    (Status.OPEN, c.Release): _release,
    (Status.OPEN, c.Recover): _recover,
    (Status.OPEN, c.Renew): _renew,
    (Status.OPEN, c.ExpireLeases): _expire_leases,
}


#: The table regrouped by command type, for one dictionary lookup per apply.
_BY_TYPE: dict[
    type[c.Command], tuple[Callable[[BrokerState, Any], Status], dict[Status, Handler]]
] = {
    kind: (
        _SUBJECT[kind],
        {status: handler for (status, k), handler in TRANSITIONS.items() if k is kind},
    )
    for kind in _SUBJECT
}


def apply(state: BrokerState, command: c.Command) -> Step:
    """Apply ``command`` to ``state`` and return the resulting `Step`.

    Raises:
        InvalidTransition: the table has no row for the subject's status and the
            command's type (for example, acking an entry nobody holds, or enqueueing
            on an undeclared queue), or the command contradicts the state (a promoted
            copy that is not the held message, promoted; a replacement on another
            queue).
        InvalidValue: a message to store on a delay queue has an eta that
            `dq.core.policy.eta_problem` refuses.
    """
    subject, handlers = _BY_TYPE[type(command)]
    status = subject(state, command)
    handler = handlers.get(status)
    if handler is None:
        raise InvalidTransition(status, command)
    return handler(state, command)


# -- queries (pure, read-only) ----------------------------------------------------


def pending(state: BrokerState, queue_name: str) -> int:
    """Return how many entries of a queue (and its delay queue) are unfinished."""
    queue = state.queues.get(q_name(queue_name))
    return 0 if queue is None else queue.pending


def waiting(state: BrokerState, queue_name: str) -> tuple[Entry, ...]:
    """Return the entries waiting on ``queue_name`` (``q`` or ``q.DQ``), oldest first."""
    queue = state.queues.get(q_name(queue_name))
    if queue is None:
        return ()
    rows = queue.delayed if queue_name.endswith(DELAY_SUFFIX) else queue.ready
    return tuple(Entry.from_row(row) for row in rows)


def holding(
    reservations: Iterable[Reservation], deliveries: Mapping[int, int] | None = None
) -> BrokerState:
    """Return the state in which ``reservations`` are held and nothing else is stored.

    A server-backed interpreter asks the core about a slice of the server's state with
    it: what becomes of what a dead consumer held (`Recover`), of lapsed leases
    (`ExpireLeases`). The entries' ``seq`` are the interpreter's own handles (distinct,
    > 0); ``deliveries`` gives their counts (counts of 0 are left out).
    """
    held = {r.entry.seq: r for r in reservations}
    in_flight: dict[str, int] = {}
    for reservation in held.values():
        name = q_name(reservation.entry.queue_name)
        in_flight[name] = in_flight.get(name, 0) + 1
    counts = {seq: n for seq, n in (deliveries or {}).items() if n and seq in held}
    return BrokerState(
        HashTrieMap({name: QueueState(name, in_flight=n) for name, n in in_flight.items()}),
        HashTrieMap(held),
        max(held, default=0) + 1,
        HashTrieMap(counts),
    )


def deliveries_of(state: BrokerState, seq: int) -> int:
    """Return how many deliveries of entry ``seq`` were cut short by a death."""
    return state.deliveries.get(seq, 0)


def dead_letters(state: BrokerState, queue_name: str) -> tuple[DeadLetter, ...]:
    """Return the dead letters of a queue, oldest first."""
    queue = state.queues.get(q_name(queue_name))
    return () if queue is None else tuple(queue.dead)


def held_by(state: BrokerState, consumer: str) -> tuple[Reservation, ...]:
    """Return the reservations ``consumer`` holds, oldest entry first."""
    return tuple(
        sorted(
            (r for r in state.reserved.values() if r.consumer == consumer),
            key=lambda r: r.entry.seq,
        )
    )


__all__ = [
    "TRANSITIONS",
    "Row",
    "Status",
    "Step",
    "apply",
    "dead_letters",
    "deliveries_of",
    "held_by",
    "holding",
    "pending",
    "status_of",
    "waiting",
]
