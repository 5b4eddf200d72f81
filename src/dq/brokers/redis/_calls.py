"""Typed calls of RedisBroker's Lua scripts: one function per script (`lua/<name>.lua`),
which names its keys, orders its arguments and narrows its reply to a typed result.

Each function takes ``run`` (how to run a script by name on this thread's connection:
`RedisBroker._run`), the namespace's `Keys`, and what the script needs; times are
passed in (``now_ms``), never read here. The scripts' own headers say what each moves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final, TypeAlias

import attrs

from dq.brokers.redis import _resp
from dq.brokers.redis._keys import Keys
from dq.brokers.redis._replies import as_bytes, as_int, as_list, as_text
from dq.brokers.redis._scripts import Script
from dq.core import Ack, DeathReason, Nack
from dq.core import commands as c

__all__ = [
    "Recovered",
    "Reserved",
    "Run",
    "Stored",
    "ack",
    "enqueue",
    "enqueue_command",
    "expire_dead_letters",
    "flush",
    "forget",
    "heartbeat",
    "maxstack",
    "nack",
    "promote",
    "recover",
    "recover_keys",
    "replace",
    "requeue",
    "reserve",
    "settle",
    "start",
]

#: Runs script ``name`` with ``keys`` and ``args`` and returns its reply.
Run: TypeAlias = Callable[[str, Sequence[str], Sequence[_resp.Arg]], _resp.Reply]


@attrs.frozen
class Reserved:
    """What one ``reserve.lua`` call handed to a consumer.

    Attributes:
        messages: (redis_message_id, payload) pairs, oldest first.
        suspects: the ids among them that a consumer died holding before.
    """

    messages: tuple[tuple[str, bytes], ...] = ()
    suspects: frozenset[str] = frozenset()


@attrs.frozen
class Recovered:
    """What one ``recover.lua`` call moved.

    Attributes:
        alive: the worker's heartbeat came back: nothing was moved.
        requeued: how many ids went back to their queue.
        dead_lettered: the ids dead-lettered.
    """

    alive: bool
    requeued: int = 0
    dead_lettered: tuple[str, ...] = ()


@attrs.frozen
class Stored:
    """A message to store in place of another (`replace`, `promote`).

    Attributes:
        queue_name: the queue it goes to.
        rid: its new redis_message_id.
        payload: its encoded bytes.
    """

    queue_name: str
    rid: str
    payload: bytes


_NOTHING: Final = Reserved()
_ALIVE: Final = Recovered(alive=True)


def enqueue(run: Run, keys: Keys, queue_name: str, rid: str, payload: bytes) -> None:
    """Store one message on ``queue_name`` under ``rid`` and wake its consumers."""
    run(
        "enqueue",
        (keys.queue(queue_name), keys.msgs(queue_name)),
        (keys.channel(queue_name), rid, payload),
    )


def enqueue_command(
    script: Script, keys: Keys, queue_name: str, items: Iterable[tuple[str, bytes]]
) -> list[_resp.Arg]:
    """The ``EVALSHA`` command of ``enqueue.lua`` storing ``items`` (id, payload) on
    ``queue_name``: what `RedisBroker.enqueue_many` pipelines (after a ``SCRIPT
    LOAD`` in the same round trip)."""
    command: list[_resp.Arg] = [
        "EVALSHA",
        script.sha,
        2,
        keys.queue(queue_name),
        keys.msgs(queue_name),
        keys.channel(queue_name),
    ]
    for rid, payload in items:
        command.append(rid)
        command.append(payload)
    return command


def reserve(
    run: Run, keys: Keys, worker: str, queue_name: str, limit: int, now_ms: int
) -> Reserved:
    """Hand up to ``limit`` messages of ``queue_name`` to ``worker``.

    Raises:
        ResponseError: a key of the wrong type (``WRONGTYPE``; nothing moved).
    """
    reply = as_list(
        run(
            "reserve",
            (
                keys.queue(queue_name),
                keys.msgs(queue_name),
                keys.acks(worker, queue_name),
                keys.heartbeats,
                keys.deliveries(queue_name),
            ),
            (limit, now_ms, worker),
        )
    )
    if not reply:
        return _NOTHING
    messages: list[tuple[str, bytes]] = []
    suspects: list[str] = []
    it = iter(reply)
    for raw_rid, data, suspect in zip(it, it, it, strict=True):
        rid = as_text(raw_rid)
        messages.append((rid, as_bytes(data)))
        if as_int(suspect):
            suspects.append(rid)
    return Reserved(tuple(messages), frozenset(suspects))


def _held(keys: Keys, worker: str, queue_name: str) -> tuple[str, str, str, str]:
    """The keys of messages ``worker`` holds on ``queue_name``: its ack set, their
    payloads, delivery counts and run marks (the first keys of ack, replace and
    promote)."""
    return (
        keys.acks(worker, queue_name),
        keys.msgs(queue_name),
        keys.deliveries(queue_name),
        keys.started(queue_name),
    )


def ack(run: Run, keys: Keys, worker: str, queue_name: str, rids: Sequence[str]) -> int:
    """Forget the messages ``worker`` processed; return how many it still held."""
    return as_int(run("ack", _held(keys, worker, queue_name), rids))


def nack(
    run: Run,
    keys: Keys,
    worker: str,
    queue_name: str,
    rids: Sequence[str],
    now_ms: int,
    reason: DeathReason = DeathReason.NACKED,
) -> int:
    """Dead-letter messages ``worker`` holds, for ``reason``; return how many."""
    return as_int(
        run(
            "nack",
            (
                keys.acks(worker, queue_name),
                keys.msgs(queue_name),
                keys.dead(queue_name),
                keys.dead_msgs(queue_name),
                keys.deliveries(queue_name),
                keys.started(queue_name),
                keys.reasons(queue_name),
            ),
            # A plain nack is Dramatiq's dead letter: no reason is kept for it.
            [now_ms, "" if reason is DeathReason.NACKED else reason.value, *rids],
        )
    )


def requeue(run: Run, keys: Keys, worker: str, queue_name: str, rids: Sequence[str]) -> int:
    """Return messages ``worker`` holds to the tail of their queue; return how many."""
    return as_int(
        run(
            "requeue",
            (keys.acks(worker, queue_name), keys.msgs(queue_name), keys.queue(queue_name)),
            [keys.channel(queue_name), *rids],
        )
    )


def settle(
    run: Run,
    keys: Keys,
    worker: str,
    command: type[c.Command],
    queue_name: str,
    rids: Sequence[str],
    now_ms: int,
    reason: DeathReason = DeathReason.NACKED,
) -> int:
    """Carry out ``command`` (`Ack`, `Nack` with ``reason``, else `Requeue`: a core
    command type) for ids ``worker`` holds on ``queue_name``, with its script."""
    if command is Ack:
        return ack(run, keys, worker, queue_name, rids)
    if command is Nack:
        return nack(run, keys, worker, queue_name, rids, now_ms, reason)
    return requeue(run, keys, worker, queue_name, rids)


def replace(run: Run, keys: Keys, worker: str, queue_name: str, old: str, new: Stored) -> bool:
    """Store ``new`` and forget ``old``, which ``worker`` holds on ``queue_name``, in
    one step; False (nothing stored) when it no longer holds ``old``.

    Raises:
        BrokerOutOfMemory: Redis is at ``maxmemory`` (nothing changed).
    """
    return _replace("replace", run, keys, worker, queue_name, old, new)


def promote(run: Run, keys: Keys, worker: str, queue_name: str, old: str, new: Stored) -> bool:
    """As `replace`, for a due delayed message ``old`` and its ready copy ``new``
    (``promote.lua`` runs at ``maxmemory`` too)."""
    return _replace("promote", run, keys, worker, queue_name, old, new)


def _replace(
    name: str, run: Run, keys: Keys, worker: str, queue_name: str, old: str, new: Stored
) -> bool:
    reply = run(
        name,
        (*_held(keys, worker, queue_name), keys.queue(new.queue_name), keys.msgs(new.queue_name)),
        (old, new.rid, new.payload, keys.channel(new.queue_name)),
    )
    return bool(as_int(reply))


def start(run: Run, keys: Keys, worker: str, queue_name: str, rid: str, mark: str) -> bool:
    """Write the run mark ``mark`` of ``rid`` (a suspect ``worker`` holds); return
    whether it was written."""
    reply = run(
        "start",
        (keys.acks(worker, queue_name), keys.started(queue_name)),
        (rid, mark),
    )
    return bool(as_int(reply))


def recover_keys(keys: Keys, worker: str, queue_name: str) -> tuple[str, ...]:
    """The keys of ``recover.lua`` for ``worker``'s ack set of ``queue_name``: the
    heartbeats, the ack set, the queue, its payloads, delivery counts and run marks,
    and the dead letters, their payloads and reasons."""
    return (
        keys.heartbeats,
        keys.acks(worker, queue_name),
        keys.queue(queue_name),
        keys.msgs(queue_name),
        keys.deliveries(queue_name),
        keys.started(queue_name),
        keys.dead(queue_name),
        keys.dead_msgs(queue_name),
        keys.reasons(queue_name),
    )


def recover(
    run: Run,
    keys: Keys,
    worker: str,
    queue_name: str,
    cutoff: int,
    now_ms: int,
    moves: Iterable[tuple[str, str, str]],
) -> Recovered:
    """Carry out ``moves`` (id, outcome, value: see ``recover.lua``) for ids the dead
    ``worker`` held on ``queue_name``, unless its heartbeat is newer than ``cutoff``.

    Raises:
        ResponseError: a key of the wrong type (nothing was written).
    """
    args: list[_resp.Arg] = [worker, cutoff, now_ms, keys.channel(queue_name)]
    for move in moves:
        args += move
    reply = as_list(run("recover", recover_keys(keys, worker, queue_name), args))
    first = as_int(reply[0])
    if first < 0:
        return _ALIVE
    return Recovered(False, first, tuple(as_text(rid) for rid in reply[1:]))


def expire_dead_letters(run: Run, keys: Keys, queue_name: str, cutoff: int, batch: int) -> int:
    """Drop up to ``batch`` dead letters of ``queue_name`` older than ``cutoff``;
    return how many."""
    return as_int(
        run(
            "expire_dead_letters",
            (keys.dead(queue_name), keys.dead_msgs(queue_name), keys.reasons(queue_name)),
            (cutoff, batch),
        )
    )


def flush(run: Run, keys: Keys, queue_name: str) -> int:
    """Drop the waiting messages of ``queue_name`` and its canonical queue's dead
    letters; return how many were waiting."""
    return as_int(
        run(
            "flush",
            (
                keys.queue(queue_name),
                keys.msgs(queue_name),
                keys.dead(queue_name),
                keys.dead_msgs(queue_name),
                keys.reasons(queue_name),
                keys.deliveries(queue_name),
                keys.started(queue_name),
            ),
            (),
        )
    )


def heartbeat(run: Run, keys: Keys, worker: str, now_ms: int) -> None:
    """Record that ``worker`` is alive at ``now_ms``."""
    run("heartbeat", (keys.heartbeats,), (now_ms, worker))


def forget(run: Run, keys: Keys, worker: str, cutoff: int) -> bool:
    """Drop the heartbeat of the dead ``worker`` unless it is newer than ``cutoff``;
    return whether it was dropped."""
    return bool(as_int(run("forget", (keys.heartbeats,), (worker, cutoff))))


def maxstack(run: Run) -> int:
    """How many values Lua's unpack may push on this server."""
    return as_int(run("maxstack", (), ()))
