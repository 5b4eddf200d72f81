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

What each command addresses is `dq.core.subjects`; how one queue's state changes,
`dq.core.queues`. Read-only questions about a state (`pending`, `waiting`…) are
`dq.core.queries`, and `holding` (a state slice for a server's recovery) is
`dq.core.slices`; this module re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from dq.core import commands as c
from dq.core import effects as fx
from dq.core import events as ev
from dq.core.errors import InvalidTransition
from dq.core.persistent import PQueue
from dq.core.policy import (
    DEAD_SUFFIX,
    DELAY_SUFFIX,
    deliveries_after_death,
    lease_expired,
    over_delivery_cap,
    q_name,
    xq_name,
)
from dq.core.queries import dead_letters, deliveries_of, held_by, pending, waiting
from dq.core.queues import dead_lettered, flushed, freed, pushed, stored
from dq.core.records import (
    BrokerState,
    DeadLetter,
    DeathReason,
    Entry,
    QueueState,
    Reservation,
    Row,
    Run,
)
from dq.core.slices import holding
from dq.core.subjects import SUBJECT, Status, status_of


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


def _enqueue(state: BrokerState, command: c.Enqueue) -> Step:
    message = command.message
    name = q_name(message.queue_name)
    seq = state.next_seq
    queue, row, effect = stored(state.queues[name], seq, message, command.payload, command.priority)
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
        entries = tuple([Entry.from_row(row) for _, row in ranked])
        reserved = state.reserved.update(
            {
                entry.seq: Reservation(entry, consumer, lease, Run.WAITING, rank)
                for entry, (rank, _) in zip(entries, ranked, strict=True)
            }
        )
    else:
        rows, waiting = waiting.take(command.limit)
        entries = tuple([Entry.from_row(row) for row in rows])
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
    return entry, freed(state.queues[q_name(entry.queue_name)])


def _ack(state: BrokerState, command: c.Ack) -> Step:
    seq = command.seq
    entry, queue = _settle(state, seq)
    deliveries = state.deliveries
    if deliveries:  # empty unless a consumer died holding something
        deliveries = deliveries.discard(seq)
    return Step(
        BrokerState(
            state.queues.insert(queue.name, queue),
            state.reserved.remove(seq),
            state.next_seq,
            deliveries,
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
        name = q_name(entry.queue_name)
        settled[name] = settled.get(name, 0) + 1
        effects.append(forget(entry))
        events.append(acked(entry))
    queues = state.queues
    for name, count in settled.items():
        queues = queues.insert(name, freed(queues[name], count))
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
    queue = dead_lettered(queue, DeadLetter(entry, command.now_ms, reason))
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


def _requeue(state: BrokerState, command: c.Requeue) -> Step:
    entry, queue = _settle(state, command.seq)
    queue, effect = pushed(queue, entry.row, state.reserved[command.seq].priority)
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
    queue, row, effect = stored(queue, seq, message, command.payload, command.priority)
    return Step(
        BrokerState(
            state.queues.insert(queue.name, queue),
            state.reserved.remove(command.seq),
            seq + 1,
            state.deliveries.discard(command.seq),
        ),
        # Store the replacement first, then forget the original.
        (effect, fx.Forget(old)),
        (ev.Replaced(old, Entry.from_row(row)),),
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


def _flush(state: BrokerState, command: c.Flush) -> Step:
    queue, dropped, deliveries = flushed(state.queues[q_name(command.queue_name)], state.deliveries)
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
        queue, dropped, deliveries = flushed(state.queues[name], deliveries)
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
        queue, effect = pushed(freed(queues[name]), entry.row, reservation.priority)
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
        queue = freed(queues[name])
        reserved = reserved.remove(seq)
        if entry.queue_name.endswith(DELAY_SUFFIX):
            # A held delayed message never runs: its holder's death is not its doing.
            queue, effect = pushed(queue, entry.row)
            effects.append(effect)
            events.append(ev.Recovered(entry, deliveries.get(seq, 0)))
        else:
            count = deliveries_after_death(deliveries.get(seq, 0), reservation.run)
            if over_delivery_cap(count, max_deliveries):
                reason = DeathReason.MAX_DELIVERIES
                queue = dead_lettered(queue, DeadLetter(entry, now_ms, reason))
                deliveries = deliveries.discard(seq)
                effects.append(fx.DeadLetter(entry, xq_name(name), now_ms, reason))
                events.append(ev.DeadLettered(entry, count, reason))
            else:
                queue, effect = pushed(queue, entry.row, reservation.priority)
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
        SUBJECT[kind],
        {status: handler for (status, k), handler in TRANSITIONS.items() if k is kind},
    )
    for kind in SUBJECT
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
