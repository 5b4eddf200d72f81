"""Commands: what an interpreter asks the machine to do. Inert data, imperative nouns.

Each command addresses one *subject* (a queue, a stored entry, or the broker as a
whole); `dq.core.machine` looks up the subject's status and the command's type in its
table to find the transition.
"""

from __future__ import annotations

from typing import TypeAlias

import attrs

from dq.core.records import DeathReason, Message


@attrs.frozen
class DeclareQueue:
    """Declare a canonical queue (and its delay queue). Subject: the queue."""

    queue_name: str


@attrs.frozen
class Enqueue:
    """Store a message on the queue its ``queue_name`` names. Subject: the queue.

    The message is stored as given: build delayed copies with
    `dq.core.policy.delayed` first (``q.DQ`` and an ``eta`` option).

    Attributes:
        message: the message as it must be stored.
        payload: its encoded bytes.
        priority: lower is reserved first (0 by default; the SQLite broker uses the
            actor's ``priority``). Ignored on a delay queue: a delayed message gets
            its priority when it is promoted.
    """

    message: Message[object]
    payload: bytes
    priority: int = 0


@attrs.frozen
class Reserve:
    """Hand up to ``limit`` waiting entries of ``queue_name`` to a consumer.

    ``queue_name`` may name the delay queue (``q.DQ``). Subject: the queue.

    Attributes:
        queue_name: the queue (or delay queue).
        consumer: who takes them.
        limit: at most this many.
        lease_until_ms: when the reservations lapse unless renewed (`Renew`), for
            interpreters with leases (SQLite); None: they last until settled or
            their consumer is released or recovered.
    """

    queue_name: str
    consumer: str
    limit: int = 1
    lease_until_ms: int | None = None


@attrs.frozen
class Ack:
    """Settle a reserved entry as done: forget it. Subject: the entry."""

    seq: int


@attrs.frozen
class AckMany:
    """Settle several reserved entries as done, in one step: the same as an `Ack` of
    each, in order (same state, effects and events), for interpreters that commit
    acks in groups. Subject: the entries; every one must be reserved or held, and
    named once.

    Attributes:
        seqs: the entries, in the order they were acked.
    """

    seqs: tuple[int, ...]


@attrs.frozen
class Nack:
    """Settle a reserved entry as failed: dead-letter it. Subject: the entry.

    Attributes:
        seq: the entry.
        now_ms: the time of death, kept for dead-letter expiry.
        reason: why (an actor that gave up, an undecodable payload, a bad eta...).
    """

    seq: int
    now_ms: int
    reason: DeathReason = DeathReason.NACKED


@attrs.frozen
class Requeue:
    """Return a reserved entry, unprocessed, to the tail of its queue. Subject: the entry."""

    seq: int


@attrs.frozen
class Promote:
    """Move a held delayed entry to its canonical queue, atomically. Subject: the entry.

    The interpreter builds the new copy with `dq.core.policy.promoted` and encodes it;
    the machine checks that it is the held message, promoted, then stores it and drops
    the held copy in the same step.

    Attributes:
        seq: the held entry.
        message: the promoted message (canonical queue, no ``eta``, same id).
        payload: its encoded bytes.
        priority: its priority on the canonical queue.
    """

    seq: int
    message: Message[object]
    payload: bytes
    priority: int = 0


@attrs.frozen
class Replace:
    """Store ``message`` in place of a reserved entry, and forget the entry, in one
    step: how a retry is stored (the failed message acked, its retry stored on the
    delay queue). Subject: the entry.

    The replacement goes to the entry's canonical queue or its delay queue (with an
    ``eta``: build it with `dq.core.policy.delayed`). The replacement is stored
    before the original is forgotten, in the same step.

    Attributes:
        seq: the reserved entry.
        message: the replacement, as it must be stored.
        payload: its encoded bytes.
        priority: its priority, when it goes to the canonical queue.
    """

    seq: int
    message: Message[object]
    payload: bytes
    priority: int = 0


@attrs.frozen
class Start:
    """Record that a reserved entry's message starts running. Subject: the entry.

    Only the delivery cap reads it (`Recover`, `ExpireLeases`). Interpreters may
    skip it for entries with no death counted yet: the count after a death is the
    same either way (`dq.core.policy.deliveries_after_death`).

    Attributes:
        seq: the entry.
        alone: nothing else runs in its process while it does.
    """

    seq: int
    alone: bool


@attrs.frozen
class Recover:
    """A consumer died: return what it held, counting the deliveries it cut short.
    Subject: the broker.

    Every reservation of ``consumer`` goes back to the tail of its queue (or delay
    queue) with its delivery count updated by
    `dq.core.policy.deliveries_after_death`; an entry of a canonical queue whose
    count reaches ``max_deliveries`` is dead-lettered instead
    (`DeathReason.MAX_DELIVERIES`).

    Attributes:
        consumer: the dead consumer.
        now_ms: the time, for dead letters.
        max_deliveries: the cap (0: none).
    """

    consumer: str
    now_ms: int
    max_deliveries: int = 0


@attrs.frozen
class Renew:
    """Extend the leases of every reservation a consumer holds. Subject: the broker.

    Attributes:
        consumer: the live consumer.
        until_ms: the new end of its leases.
    """

    consumer: str
    until_ms: int


@attrs.frozen
class ExpireLeases:
    """Recover every reservation whose lease ended before ``now_ms``, as `Recover`
    does for a dead consumer. Subject: the broker."""

    now_ms: int
    max_deliveries: int = 0


@attrs.frozen
class ExpireDeadLetters:
    """Drop the dead letters of a queue that died at or before ``cutoff_ms``.
    Subject: the queue."""

    queue_name: str
    cutoff_ms: int


@attrs.frozen
class Flush:
    """Drop every waiting entry and dead letter of a queue and its delay queue.

    Reserved entries stay reserved (their consumers will still settle them).
    Subject: the queue.
    """

    queue_name: str


@attrs.frozen
class FlushAll:
    """Flush every declared queue. Subject: the broker."""


@attrs.frozen
class Release:
    """Requeue every entry a consumer still holds (it closed or died). Subject: the broker."""

    consumer: str


Command: TypeAlias = (
    DeclareQueue
    | Enqueue
    | Reserve
    | Ack
    | AckMany
    | Nack
    | Requeue
    | Promote
    | Replace
    | Start
    | Recover
    | Renew
    | ExpireLeases
    | ExpireDeadLetters
    | Flush
    | FlushAll
    | Release
)

#: Every command type, in a stable order (the property tests walk it).
COMMAND_TYPES: tuple[type[Command], ...] = (
    DeclareQueue,
    Enqueue,
    Reserve,
    Ack,
    AckMany,
    Nack,
    Requeue,
    Promote,
    Replace,
    Start,
    Recover,
    Renew,
    ExpireLeases,
    ExpireDeadLetters,
    Flush,
    FlushAll,
    Release,
)
