"""Read-only questions about a `BrokerState`: what waits, what is held and by whom,
what was dead-lettered, how many deliveries a death cut short."""

from __future__ import annotations

from dq.core.policy import DELAY_SUFFIX, q_name
from dq.core.records import BrokerState, DeadLetter, Entry, Reservation

__all__ = ["dead_letters", "deliveries_of", "held_by", "pending", "waiting"]


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
