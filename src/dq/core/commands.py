"""Commands: what an interpreter asks the machine to do. Inert data, imperative nouns.

Each command addresses one *subject* (a queue, a stored entry, or the broker as a
whole); `dq.core.machine` looks up the subject's status and the command's type in its
table to find the transition.
"""

from __future__ import annotations

from typing import TypeAlias

import attrs

from dq.core.records import Message


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
    """

    message: Message[object]
    payload: bytes


@attrs.frozen
class Reserve:
    """Hand up to ``limit`` waiting entries of ``queue_name`` to a consumer.

    ``queue_name`` may name the delay queue (``q.DQ``). Subject: the queue.
    """

    queue_name: str
    consumer: str
    limit: int = 1


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
    """

    seq: int
    now_ms: int


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
    """

    seq: int
    message: Message[object]
    payload: bytes


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
    Flush,
    FlushAll,
    Release,
)
