"""Lease expiry and recovery for `dq.brokers.sqlite.SqliteBroker`: the core decides,
the SQL moves.

`Recover` (a consumer is declared dead) and `ExpireLeases` (reservations whose lease
lapsed) are carried out the same way, inside one ``BEGIN IMMEDIATE`` transaction:

1. SELECT the candidate rows (a consumer's, or those whose ``lease_until`` passed:
   the index finds them) with what the core needs to decide: seq, queue, message id,
   holder, lease, delivery count and run mark;
2. describe them as a small `dq.core.BrokerState` (only those reservations) and
   `dq.core.apply` the command to it: the core says which lease lapsed
   (`policy.lease_expired`), each row's new delivery count
   (`policy.deliveries_after_death`) and which rows are over the cap
   (`policy.over_delivery_cap`: dead-lettered with `DeathReason.MAX_DELIVERIES`);
3. carry the step's effects out, row by row: `CountDeliveries` then `PushReady` /
   `PushDelayed` copy the row to the tail of its queue with its new count (and no
   run mark), `DeadLetter` moves it to ``dq_dead`` with the reason; the held row is
   deleted in the same statement pair.

Nothing is decided in SQL, and since it is one transaction nothing is half-done.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Final

import attrs

from dq.core import BrokerState, Entry, Reservation, Run, apply, policy
from dq.core import effects as fx
from dq.core import events as ev
from dq.core.commands import ExpireLeases, Recover
from dq.core.machine import Step, holding

__all__ = ["Recovery", "expire_leases", "recover_consumer"]

_COLUMNS: Final = "seq, queue, message_id, consumer, lease_until, deliveries, run"

#: Run marks as stored (NULL: waiting).
_RUNS: Final = {None: Run.WAITING, Run.ALONE.value: Run.ALONE, Run.SHARED.value: Run.SHARED}

_COPY_TO_TAIL: Final = """INSERT INTO dq_messages (queue, message_id, priority, eta, payload,
        deliveries)
    SELECT queue, message_id, priority, eta, payload, ? FROM dq_messages
    WHERE seq = ? AND consumer IS NOT NULL"""
_DEAD_LETTER: Final = """INSERT INTO dq_dead (queue, message_id, payload, dead_at, reason)
    SELECT ?, message_id, payload, ?, ? FROM dq_messages
    WHERE seq = ? AND consumer IS NOT NULL"""
_DELETE: Final = "DELETE FROM dq_messages WHERE seq = ? AND consumer IS NOT NULL"


@attrs.frozen
class Recovery:
    """What one recovery transaction did.

    Attributes:
        returned: rows returned to their queue (or delay queue).
        dead: the `dq.core.events.DeadLettered` events of rows over the cap (their
            entries carry seq, queue and message id; the payload is not read).
    """

    returned: int = 0
    dead: tuple[ev.DeadLettered, ...] = ()


def _whole(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _state_of(rows: Sequence[Any]) -> BrokerState:
    """The core state of these held rows: their reservations and counts.

    Values a raw write may have left in a row are read leniently: a delivery count as
    `dq.core.policy.stored_deliveries` reads it, an unknown run mark as waiting. The
    payload is not read: the SQL moves it.
    """
    reservations: list[Reservation] = []
    deliveries: dict[int, int] = {}
    for seq, queue, message_id, consumer, lease_until, stored_count, run in rows:
        entry = Entry(int(seq), str(queue), str(message_id), None, b"")
        reservations.append(
            Reservation(entry, str(consumer), _whole(lease_until), _RUNS.get(run, Run.WAITING))
        )
        deliveries[entry.seq] = policy.stored_deliveries(stored_count)[0]
    return holding(reservations, deliveries)


def _carry_out(conn: sqlite3.Connection, step: Step) -> int:
    """Perform a recovery step's effects; return how many rows went back to a queue."""
    counts: dict[int, int] = {}
    returned = 0
    for effect in step.effects:
        if isinstance(effect, fx.CountDeliveries):
            counts[effect.entry.seq] = effect.deliveries
        elif isinstance(effect, fx.PushReady | fx.PushDelayed):
            seq = effect.row[0]
            # A held delayed row has no CountDeliveries: it keeps its count (its
            # holder's death is not its doing), as the step's state says.
            count = counts.get(seq)
            if count is None:
                count = step.state.deliveries.get(seq, 0)
            if conn.execute(_COPY_TO_TAIL, (count, seq)).rowcount:
                conn.execute(_DELETE, (seq,))
                returned += 1
        elif isinstance(effect, fx.DeadLetter):
            seq = effect.entry.seq
            moved = conn.execute(
                _DEAD_LETTER,
                (policy.q_name(effect.xq_name), effect.dead_at_ms, effect.reason.value, seq),
            ).rowcount
            if moved:
                conn.execute(_DELETE, (seq,))
        else:  # pragma: no cover - the core's recovery steps make no other effect
            raise AssertionError(f"unexpected effect of a recovery step: {effect!r}")
    return returned


def _recovered(conn: sqlite3.Connection, rows: Sequence[Any], command: Any) -> Recovery:
    if not rows:
        return Recovery()
    step = apply(_state_of(rows), command)
    returned = _carry_out(conn, step)
    dead = tuple(event for event in step.events if isinstance(event, ev.DeadLettered))
    return Recovery(returned, dead)


def expire_leases(conn: sqlite3.Connection, now_ms: int, max_deliveries: int) -> Recovery:
    """Carry out `ExpireLeases(now_ms, max_deliveries)` (call inside a write
    transaction): every row whose lease lapsed goes back to its queue, or is
    dead-lettered over the cap."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM dq_messages "
        "WHERE consumer IS NOT NULL AND lease_until < ? ORDER BY seq",
        (now_ms,),
    ).fetchall()
    return _recovered(conn, rows, ExpireLeases(now_ms, max_deliveries))


def recover_consumer(
    conn: sqlite3.Connection, consumer: str, now_ms: int, max_deliveries: int
) -> Recovery:
    """Carry out `Recover(consumer, now_ms, max_deliveries)` (call inside a write
    transaction): every row ``consumer`` holds goes back to its queue, or is
    dead-lettered over the cap."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM dq_messages WHERE consumer = ? ORDER BY seq", (consumer,)
    ).fetchall()
    return _recovered(conn, rows, Recover(consumer, now_ms, max_deliveries))
