"""Events: what happened, in the past tense. Brokers turn them into middleware hooks."""

from __future__ import annotations

from typing import TypeAlias

import attrs

from dq.core.records import DeathReason, Entry, Row


@attrs.frozen
class QueueDeclared:
    """A canonical queue was declared (hook ``after_declare_queue``)."""

    queue_name: str


@attrs.frozen
class DelayQueueDeclared:
    """Its delay queue was declared (hook ``after_declare_delay_queue``)."""

    queue_name: str


@attrs.frozen
class Enqueued:
    """An entry was stored (hook ``after_enqueue``).

    Carries the stored row itself (the hot path builds no `Entry`); read ``entry``.
    """

    row: Row

    @property
    def entry(self) -> Entry:
        """The stored entry."""
        return Entry.from_row(self.row)


@attrs.frozen
class Reserved:
    """Entries were handed to ``consumer``."""

    consumer: str
    entries: tuple[Entry, ...]


@attrs.frozen
class Acked:
    """A reserved entry was settled as done."""

    entry: Entry


@attrs.frozen
class Nacked:
    """A reserved entry was settled as failed and dead-lettered."""

    entry: Entry
    reason: DeathReason = DeathReason.NACKED


@attrs.frozen
class Replaced:
    """A reserved entry was forgotten and ``new`` stored in its place (a retry)."""

    old: Entry
    new: Entry


@attrs.frozen
class Started:
    """A reserved entry's message started running."""

    entry: Entry
    alone: bool


@attrs.frozen
class Recovered:
    """An entry held by a dead consumer (or one whose lease ended) went back to its
    queue, with ``deliveries`` deliveries cut short so far."""

    entry: Entry
    deliveries: int


@attrs.frozen
class DeadLettered:
    """An entry held by a dead consumer was dead-lettered instead of recovered:
    ``deliveries`` reached the cap."""

    entry: Entry
    deliveries: int
    reason: DeathReason


@attrs.frozen
class LeasesExtended:
    """A consumer's leases now last until ``until_ms`` (``count`` reservations)."""

    consumer: str
    until_ms: int
    count: int


@attrs.frozen
class DeadLettersExpired:
    """``dropped`` dead letters of a queue were past their time and dropped."""

    queue_name: str
    dropped: int


@attrs.frozen
class Requeued:
    """A reserved entry went back, unprocessed, to the tail of its queue."""

    entry: Entry


@attrs.frozen
class Promoted:
    """A held delayed entry was replaced by ``new`` on its canonical queue."""

    old: Entry
    new: Entry


@attrs.frozen
class Flushed:
    """Waiting entries and dead letters of a queue were dropped."""

    queue_name: str
    dropped: int


Event: TypeAlias = (
    QueueDeclared
    | DelayQueueDeclared
    | Enqueued
    | Reserved
    | Acked
    | Nacked
    | Requeued
    | Promoted
    | Replaced
    | Started
    | Recovered
    | DeadLettered
    | LeasesExtended
    | DeadLettersExpired
    | Flushed
)
