"""Recovery on Redis: the core decides who is dead and what becomes of what it held;
``recover.lua`` moves it.

One tick (`recover`) reads the heartbeats older than ``heartbeat_timeout`` and asks
`dq.core.policy.dead_consumers` which workers are dead. For each ack set of a dead
worker, a batch at a time, it reads the ids, their payloads, delivery counts and run
marks, *validates* them here (a count that is not a number, a payload that is gone, a
key of the wrong type never stops the tick: each gets a safe outcome, logged with the
key and the message), builds a small `dq.core.BrokerState` of what the worker held and
lets ``dq.core.apply(Recover(...))`` decide each message's fate: back to its queue
with its new delivery count, or dead-lettered past ``max_deliveries``. Then one
``recover.lua`` call per batch moves exactly those ids, guarded so that it does
nothing for a worker whose heartbeat came back or an id no longer in the ack set,
and never removes an id from the ack set before storing it elsewhere in the same
call: a failure part-way leaves every message reachable.

A worker's heartbeat is dropped (``forget.lua``) only once every ack set it had is
empty; otherwise the next tick tries again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from dq.brokers.redis import _calls, _resp
from dq.brokers.redis._keys import glob_escape
from dq.brokers.redis._replies import as_int, as_list, as_text
from dq.core import (
    Entry,
    Recover,
    Requeue,
    Reservation,
    Run,
    apply,
    policy,
)
from dq.core import effects as fx
from dq.core import events as ev
from dq.core.machine import holding
from dq.errors import ConnectionClosed

if TYPE_CHECKING:
    from dq.brokers.redis import RedisBroker

__all__ = ["RecoveryReport", "Verdict", "decide", "reconcile", "recover"]

#: Ids read and moved per ``recover.lua`` call.
BATCH = 500
#: A run mark for a suspect started beside other messages: ``"<worker> shared"``.
SHARED_MARK = " shared"


@attrs.frozen
class RecoveryReport:
    """What one recovery tick did.

    Attributes:
        dead_workers: ids of the workers found dead.
        requeued: messages returned to their queues.
        dead_lettered: redis_message_ids dead-lettered for too many deliveries.
        forgotten: dead workers whose heartbeat entry was removed.
        expired: dead letters removed for being older than ``dead_message_ttl``.
        skipped: keys this tick could not recover from (logged; what they hold stays
            where it is, and the next tick tries again).
    """

    dead_workers: tuple[str, ...] = ()
    requeued: int = 0
    dead_lettered: tuple[str, ...] = ()
    forgotten: int = 0
    expired: int = 0
    skipped: tuple[str, ...] = ()


@attrs.frozen
class Held:
    """One id a dead worker held, as read from Redis and validated.

    Attributes:
        rid: its redis_message_id.
        payload: the stored message, or None when it is gone.
        deliveries: its delivery count so far (0: it never was a suspect).
        run: how it was running when the worker died (from its run mark).
    """

    rid: str
    payload: bytes | None
    deliveries: int
    run: Run


@attrs.frozen
class Verdict:
    """What the core decided for one id.

    Attributes:
        outcome: ``"requeue"``, ``"dead"`` or ``"drop"`` (its payload is gone).
        deliveries: its new delivery count (None: leave the count alone).
        reason: why it is dead-lettered (a `dq.core.DeathReason` value), if it is.
    """

    outcome: str
    deliveries: int | None = None
    reason: str = ""


def message_id(held: Held) -> str:
    """The message_id in ``held``'s payload, else its redis_message_id (for logs)."""
    if held.payload is not None:
        try:
            found = json.loads(held.payload).get("message_id")
        except (ValueError, AttributeError):
            found = None
        if isinstance(found, str):
            return found
    return held.rid


def decide(
    worker: str, queue_name: str, held: Sequence[Held], now_ms: int, max_deliveries: int
) -> dict[str, Verdict]:
    """Let the core decide what becomes of ``held``, the ids ``worker`` (dead) held
    on ``queue_name``: a state in which the worker holds them is given
    ``Recover(worker, now_ms, max_deliveries)``, and its effects are read back.

    Returns:
        One verdict per id (``drop`` for those whose payload is gone).
    """
    verdicts = {h.rid: Verdict("drop") for h in held if h.payload is None}
    present = [h for h in held if h.payload is not None]
    if not present:
        return verdicts
    rids: dict[int, str] = {}
    reservations: list[Reservation] = []
    deliveries: dict[int, int] = {}
    for seq, item in enumerate(present, 1):
        assert item.payload is not None
        rids[seq] = item.rid
        entry = Entry(seq, queue_name, message_id(item), None, item.payload)
        reservations.append(Reservation(entry, worker, None, item.run))
        deliveries[seq] = item.deliveries
    state = holding(reservations, deliveries)
    step = apply(state, Recover(worker, now_ms, max_deliveries))
    counts: dict[int, int] = {}
    for effect in step.effects:
        if isinstance(effect, fx.CountDeliveries):
            counts[effect.entry.seq] = effect.deliveries
        elif isinstance(effect, fx.PushReady | fx.PushDelayed):
            seq = effect.entry.seq
            verdicts[rids[seq]] = Verdict("requeue", counts.get(seq))
        elif isinstance(effect, fx.DeadLetter):
            verdicts[rids[effect.entry.seq]] = Verdict("dead", None, effect.reason.value)
    for event in step.events:
        if isinstance(event, ev.DeadLettered):
            seq = event.entry.seq
            verdicts[rids[seq]] = attrs.evolve(verdicts[rids[seq]], deliveries=event.deliveries)
    return verdicts


def recover(broker: RedisBroker, now_ms: int) -> RecoveryReport:
    """Run one recovery tick (see the module docstring).

    Raises:
        ConnectionClosed: Redis could not be reached.
    """
    keys = broker._keys
    cutoff = now_ms - broker.heartbeat_timeout
    reply = as_list(broker._execute("ZRANGEBYSCORE", keys.heartbeats, "-inf", cutoff, "WITHSCORES"))
    beats = {as_text(reply[i]): int(float(as_text(reply[i + 1]))) for i in range(0, len(reply), 2)}
    dead = policy.dead_consumers(
        beats, now_ms, broker.heartbeat_timeout, alive=frozenset({broker.broker_id})
    )
    requeued, dead_lettered, forgotten, skipped = 0, [], 0, []
    for worker in dead:
        prefix = keys.acks(worker, "")
        alive = left = False
        for key in broker._scan(glob_escape(prefix) + "*"):
            tick = _AckSet(broker, worker, key, key[len(prefix) :], cutoff, now_ms)
            try:
                tick.run()
            except ConnectionClosed:
                raise
            except Exception as e:
                # Never a reason to stop the tick: log it naming the key, go on. What
                # the failed call had not moved is still in the ack set.
                broker.logger.error(
                    "Could not recover %s (worker %s is dead): %s; its messages stay "
                    "there and the next tick tries again.",
                    key,
                    worker,
                    e,
                    exc_info=not isinstance(e, _resp.ResponseError),
                )
                tick.left = True
            requeued += tick.requeued
            dead_lettered += tick.dead_lettered
            if tick.alive:
                alive = True
                break
            if tick.left:
                left = True
                skipped.append(key)
        if not alive and not left and _calls.forget(broker._run, keys, worker, cutoff):
            forgotten += 1
    if requeued:
        broker.logger.warning(
            "Recovered %d messages held by dead workers %s.", requeued, ", ".join(dead)
        )
    return RecoveryReport(dead, requeued, tuple(dead_lettered), forgotten, 0, tuple(skipped))


class _AckSet:
    """Recovery of one dead worker's ack set, a batch at a time."""

    def __init__(
        self,
        broker: RedisBroker,
        worker: str,
        key: str,
        queue_name: str,
        cutoff: int,
        now_ms: int,
    ) -> None:
        self.broker = broker
        self.worker = worker
        self.key = key
        self.queue_name = queue_name
        self.cutoff = cutoff
        self.now_ms = now_ms
        self.requeued = 0
        self.dead_lettered: list[str] = []
        self.alive = False
        self.left = False  # something stays in the ack set (logged)
        self.logger: logging.Logger = broker.logger
        self.keys = _calls.recover_keys(broker._keys, worker, queue_name)

    def run(self) -> None:
        broker = self.broker
        _, ack, queue, msgs, deliveries, started, dead, dead_msgs, _ = self.keys
        kinds = [as_text(r) for r in broker._pipeline([("TYPE", key) for key in self.keys[1:]])]
        size = as_int(broker._execute("SCARD", ack)) if kinds[0] == "set" else 0
        kind = dict(zip(self.keys[1:], kinds, strict=True))
        if kind[ack] != "set":
            # Nothing dq can read is there (somebody else's key under an ack-set name).
            self.logger.warning(
                "Key %s is a %s, not an ack set: it holds no message of worker %s; left as is.",
                ack,
                kind[ack],
                self.worker,
            )
            return
        for key, expected in ((queue, "list"), (msgs, "hash")):
            if kind[key] not in (expected, "none"):
                self.logger.error(
                    "Cannot recover the %d messages of dead worker %s in %s: key %s is a %s, "
                    "not a %s; they stay there until it is repaired.",
                    size,
                    self.worker,
                    ack,
                    key,
                    kind[key],
                    expected,
                )
                self.left = True
                return
        self.counts = kind[deliveries] in ("hash", "none")
        self.marks = kind[started] in ("hash", "none")
        self.graves = kind[dead] in ("zset", "none") and kind[dead_msgs] in ("hash", "none")
        if not self.counts:
            self.logger.warning(
                "Delivery counts of %r cannot be kept: key %s is a %s, not dq's hash; the "
                "messages of dead worker %s are requeued without counting.",
                self.queue_name,
                deliveries,
                kind[deliveries],
                self.worker,
            )
        for _ in range(size // BATCH + 2):  # bounded: each batch empties BATCH ids
            rids = [as_text(r) for r in as_list(broker._execute("SRANDMEMBER", ack, BATCH))]
            if not rids or not self._batch(rids, kind):
                return
        self.left = as_int(broker._execute("SCARD", ack)) > 0

    def _batch(self, rids: list[str], kind: dict[str, str]) -> bool:
        """Recover ``rids``; return whether to go on."""
        broker = self.broker
        msgs, deliveries, started, dead, dead_msgs = self.keys[3:8]
        commands: list[list[_resp.Arg]] = [["HMGET", msgs, *rids]]
        if kind[deliveries] == "hash":
            commands.append(["HMGET", deliveries, *rids])
        if kind[started] == "hash":
            commands.append(["HMGET", started, *rids])
        replies = broker._pipeline(commands)
        payloads = as_list(replies[0])
        counts = as_list(replies[1]) if kind[deliveries] == "hash" else [None] * len(rids)
        marks = as_list(replies[-1]) if kind[started] == "hash" else [None] * len(rids)
        held = [
            Held(
                rid,
                payload if isinstance(payload, bytes) else None,
                self._count(rid, count),
                self._run_mark(mark),
            )
            for rid, payload, count, mark in zip(rids, payloads, counts, marks, strict=True)
        ]
        canonical = not policy.is_delay_queue(self.queue_name)
        verdicts = decide(
            self.worker,
            self.queue_name,
            held,
            self.now_ms,
            broker.max_deliveries if canonical else 0,
        )
        moves: list[tuple[str, str, str]] = []
        by_rid = {h.rid: h for h in held}
        for rid, decided in verdicts.items():
            verdict = decided
            if verdict.outcome == "dead" and not self.graves:
                self.logger.error(
                    "Cannot dead-letter message %s (redis id %s, %s): key %s or %s is of the "
                    "wrong type; it goes back to %r instead.",
                    message_id(by_rid[rid]),
                    rid,
                    verdict.reason,
                    dead,
                    dead_msgs,
                    self.queue_name,
                )
                verdict = Verdict("requeue", verdict.deliveries)
            count = verdict.deliveries if self.counts else None
            value = verdict.reason if verdict.outcome == "dead" else _arg(count)
            moves.append((rid, verdict.outcome, value))
        recovered = _calls.recover(
            broker._run, broker._keys, self.worker, self.queue_name, self.cutoff, self.now_ms, moves
        )
        if recovered.alive:
            self.alive = True
            return False
        self.requeued += recovered.requeued
        for rid in recovered.dead_lettered:
            self.dead_lettered.append(rid)
            verdict = verdicts[rid]
            self.logger.error(
                "Dead-lettered message %s (redis id %s) on %r, reason %s: %d of its "
                "deliveries ended with its worker's death (max_deliveries=%d).",
                message_id(by_rid[rid]),
                rid,
                self.queue_name,
                verdict.reason,
                verdict.deliveries or 0,
                broker.max_deliveries,
            )
        return True

    def _count(self, rid: str, raw: Any) -> int:
        """A delivery count as read (None: never counted), as the core reads it."""
        count, problem = policy.stored_deliveries(raw)
        if problem is not None:
            self.logger.warning(
                "Delivery count %r of message %s in %s is not a count (%s).",
                raw,
                rid,
                self.keys[4],
                problem,
            )
        # A field exists only once a consumer died holding the message (an older dq
        # stored 0 for that first death): it is a suspect.
        return count if raw is None else max(count, 1)

    def _run_mark(self, raw: Any) -> Run:
        """How the dead worker was running an id, from its run mark."""
        if not isinstance(raw, bytes):
            return Run.WAITING
        mark = raw.decode(errors="replace")
        if mark == self.worker:
            return Run.ALONE
        if mark == self.worker + SHARED_MARK:
            return Run.SHARED
        return Run.WAITING  # another worker's mark, or none


def _arg(count: int | None) -> str:
    return "" if count is None else str(count)


def reconcile(broker: RedisBroker) -> int:
    """Return to their queues the ids ``broker``'s ack sets hold but none of its
    consumers (nor its unsent settlements) knows about; return how many
    (`RedisBroker.reconcile`).

    Raises:
        ConnectionClosed: Redis could not be reached.
    """
    stray_total = 0
    for queue_name in sorted({c.queue_name for c in list(broker._consumers)}):
        with broker._fetch_lock(queue_name):
            known: set[str] = set()
            for consumer in list(broker._consumers):
                if consumer.queue_name == queue_name:
                    known |= consumer._known()
            with broker._orphans_lock:
                for name, _, rids in broker._orphans:
                    if name == queue_name:
                        known.update(rids)
            key = broker._keys.acks(broker.broker_id, queue_name)
            members = [as_text(m) for m in as_list(broker._execute("SMEMBERS", key))]
            stray = [rid for rid in members if rid not in known]
            if stray:
                returned = broker._settle(Requeue, queue_name, stray)
                stray_total += len(stray)
                broker.logger.warning(
                    "Returned %d messages of %r whose fetch reply was lost (%d were still stored).",
                    len(stray),
                    queue_name,
                    returned,
                )
    return stray_total
