"""Effects: what the world must do for a step to be real. Inert data, never callables.

The in-memory interpreter's storage *is* the state value, so for it most effects are
already done once the new state is stored; it reads them only to know whom to wake.
Server-backed interpreters (Redis, RabbitMQ, SQLite) turn each into their own I/O, in
order: a replacement is always listed before the forgetting of what it replaces.
"""

from __future__ import annotations

from typing import TypeAlias

import attrs

from dq.core.records import DeathReason, Entry, Row


@attrs.frozen
class PushReady:
    """Store an entry at the tail of its canonical queue; it may run now.

    Carries the stored row itself (the hot path builds no `Entry`); read ``entry``.
    """

    row: Row

    @property
    def entry(self) -> Entry:
        """The entry to store."""
        return Entry.from_row(self.row)


@attrs.frozen
class PushDelayed:
    """Store an entry at the tail of its delay queue (``q.DQ``); it runs at its eta."""

    row: Row

    @property
    def entry(self) -> Entry:
        """The entry to store."""
        return Entry.from_row(self.row)


@attrs.frozen
class Deliver:
    """Hand ``entries`` to ``consumer``."""

    consumer: str
    entries: tuple[Entry, ...]


@attrs.frozen
class Forget:
    """Delete the stored copy ``entry`` (it was acked, or replaced by a promotion)."""

    entry: Entry


@attrs.frozen
class DeadLetter:
    """Move ``entry`` to dead-letter queue ``xq_name``, dead since ``dead_at_ms``,
    for ``reason``."""

    entry: Entry
    xq_name: str
    dead_at_ms: int
    reason: DeathReason = DeathReason.NACKED


@attrs.frozen
class MarkStarted:
    """Record that ``entry`` started running (``alone`` or beside others)."""

    entry: Entry
    alone: bool


@attrs.frozen
class CountDeliveries:
    """Record that ``entry`` has been cut short by its consumer's death ``deliveries``
    times (it is stored, or about to be, by the effect listed next)."""

    entry: Entry
    deliveries: int


@attrs.frozen
class ExtendLeases:
    """Make every reservation of ``consumer`` last until ``until_ms``."""

    consumer: str
    until_ms: int


@attrs.frozen
class DropDeadLetters:
    """Delete the dead letters of ``queue_name`` that died at or before ``cutoff_ms``."""

    queue_name: str
    cutoff_ms: int


@attrs.frozen
class Purge:
    """Delete everything waiting on ``queue_name``, its delay queue and dead letters."""

    queue_name: str


Effect: TypeAlias = (
    PushReady
    | PushDelayed
    | Deliver
    | Forget
    | DeadLetter
    | Purge
    | MarkStarted
    | CountDeliveries
    | ExtendLeases
    | DropDeadLetters
)
