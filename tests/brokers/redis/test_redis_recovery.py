"""RedisBroker recovery, queue names and the delivery cap against the real Redis: the
core decides, the Lua moves, and nothing a tick reads can make it lose a message.

Each fault test sets up, with raw writes, what issue 16 found in the field (a key of
another type where dq keeps its own, a delivery count that is not a number...) and
counts the messages that are neither waiting, held, nor dead-lettered afterwards.
"""

from __future__ import annotations

import logging
import os

import pytest
import redis

from dq import Message
from dq.broker import Consumer, MessageProxy
from dq.brokers.redis import COMMANDS, RedisBroker
from dq.brokers.redis._recovery import Held, decide
from dq.brokers.redis._scripts import LUA_DIR, SCRIPT_NAMES
from dq.brokers.steps import ServerStep, uncovered
from dq.core import DeathReason, Run
from dq.core.commands import COMMAND_TYPES
from dq.errors import InvalidQueueName, QueueNotFound
from tests.support.redis_helpers import keys_under

pytestmark = [pytest.mark.redis]


def _text(value: object) -> str:
    assert isinstance(value, bytes), value
    return value.decode()


def hold(conn: redis.Redis, namespace: str, worker: str, queue: str, n: int) -> list[str]:
    """Make dead ``worker`` hold the first ``n`` ids waiting on ``queue`` (as a worker
    that reserved them and died: its heartbeat is at 0)."""
    ids = [_text(r) for r in conn.lpop(f"{namespace}:{queue}", n) or []]
    assert len(ids) == n
    conn.sadd(f"{namespace}:__acks__.{worker}.{queue}", *ids)
    conn.zadd(f"{namespace}:__heartbeats__", {worker: 0})
    return ids


def lost(conn: redis.Redis, namespace: str, queue: str, rids: list[str]) -> set[str]:
    """The ids of ``rids`` that are neither waiting, held, nor dead-lettered, or whose
    payload is gone."""
    waiting = {_text(r) for r in conn.lrange(f"{namespace}:{queue}", 0, -1)}
    held: set[str] = set()
    for key in conn.scan_iter(match=f"{namespace}:__acks__.*", count=1000):
        if conn.type(key) == b"set":
            held |= {_text(r) for r in conn.smembers(key)}
    dead: set[str] = set()
    if conn.type(f"{namespace}:{queue}.XQ") == b"zset":
        dead = {_text(r) for r in conn.zrange(f"{namespace}:{queue}.XQ", 0, -1)}
    stored = {_text(r) for r in conn.hkeys(f"{namespace}:{queue}.msgs")}
    if conn.type(f"{namespace}:{queue}.XQ.msgs") == b"hash":
        stored |= {_text(r) for r in conn.hkeys(f"{namespace}:{queue}.XQ.msgs")}
    return {rid for rid in rids if rid not in (waiting | held | dead) or rid not in stored}


def stored_rids(broker: RedisBroker, queue: str, n: int) -> list[str]:
    messages = broker.enqueue_many([Message(queue, "f", (i,), {}, {}) for i in range(n)])
    return [m.options["redis_message_id"] for m in messages]


# -- the command table ---------------------------------------------------------------------


def test_every_core_command_has_a_row_and_every_step_a_script() -> None:
    assert uncovered(COMMANDS) == ()
    assert set(COMMANDS) == set(COMMAND_TYPES)
    on_disk = {name[:-4] for name in os.listdir(LUA_DIR) if name.endswith(".lua")}
    assert on_disk == set(SCRIPT_NAMES)
    for command, row in COMMANDS.items():
        if isinstance(row, ServerStep):
            assert row.name in on_disk, command
        else:
            assert row.reason, command
    # Each command is named after its step, unless the row says whose it shares.
    for command, row in COMMANDS.items():
        if isinstance(row, ServerStep) and row.name.replace("_", "") != command.__name__.lower():
            assert "share" in row.atomic or "returns all it holds" in row.atomic, (command, row)


# -- issue 16, fault 2: recovery lost what it had popped -----------------------------------


def test_a_user_queue_colliding_with_the_delivery_counts_loses_nothing(
    broker: RedisBroker, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A queue named __dq__.deliveries.default (accepted by the decorator before issue 16)
    # has its list where dq keeps the delivery counts of "default". The old recovery
    # popped 500 ids, then failed on that key: 600 of 600 were lost.
    conn = broker.client
    conn.rpush(f"{namespace}:__dq__.deliveries.default", "someone-else")
    rids = stored_rids(broker, "default", 600)
    hold(conn, namespace, "dead-1", "default", 600)
    with caplog.at_level(logging.WARNING, logger="dq"):
        report = broker.recover()
    assert lost(conn, namespace, "default", rids) == set()
    assert report.requeued == 600
    assert conn.llen(f"{namespace}:default") == 600
    assert f"{namespace}:__dq__.deliveries.default" in caplog.text  # the log names the key
    # The colliding key is left as it was, and the dead worker is forgotten.
    assert conn.lrange(f"{namespace}:__dq__.deliveries.default", 0, -1) == [b"someone-else"]
    assert conn.zscore(f"{namespace}:__heartbeats__", "dead-1") is None


def test_a_delivery_count_that_is_not_a_number_loses_nothing(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The old recovery popped 500 ids per call and failed on tonumber(nil): 461 of 1,200
    # were lost. Now the count is validated before anything moves.
    broker = RedisBroker(namespace=namespace, heartbeat_timeout=1000, max_deliveries=3)
    try:
        conn = broker.client
        rids = stored_rids(broker, "default", 1200)
        held = hold(conn, namespace, "dead-2", "default", 1200)
        bad = held[700]
        conn.hset(f"{namespace}:__dq__.deliveries.default", bad, "not-a-number")
        with caplog.at_level(logging.WARNING, logger="dq"):
            report = broker.recover()
        assert lost(conn, namespace, "default", rids) == set()
        assert report.requeued == 1200 and report.dead_lettered == ()
        # The bad count was taken as one death (it was a suspect), logged with its key.
        assert f"Delivery count b'not-a-number' of message {bad}" in caplog.text
        assert f"{namespace}:__dq__.deliveries.default" in caplog.text
        counts = conn.hgetall(f"{namespace}:__dq__.deliveries.default")
        assert counts[bad.encode()] == b"1"  # repaired: the core's count after a death
        assert len(counts) == 1200  # every message a dead worker held is a suspect now
    finally:
        broker.close()


def test_a_dead_letter_key_of_the_wrong_type_fails_no_tick(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    # ns:q.XQ is a string: the poison message cannot be dead-lettered. The tick logs
    # it naming the key, requeues it, and recovers the other queue and worker too.
    broker = RedisBroker(namespace=namespace, heartbeat_timeout=1000, max_deliveries=2)
    try:
        conn = broker.client
        conn.set(f"{namespace}:q.XQ", "not a zset")
        on_q = stored_rids(broker, "q", 3)
        on_other = stored_rids(broker, "other", 4)
        poison = hold(conn, namespace, "dead-a", "q", 3)[0]
        conn.hset(f"{namespace}:__dq__.deliveries.q", poison, 1)
        conn.hset(f"{namespace}:__dq__.started.q", poison, "dead-a")  # it ran alone
        hold(conn, namespace, "dead-b", "other", 4)
        with caplog.at_level(logging.ERROR, logger="dq"):
            report = broker.recover()
        assert lost(conn, namespace, "q", on_q) == set()
        assert lost(conn, namespace, "other", on_other) == set()
        assert report.requeued == 7 and report.dead_lettered == ()
        assert sorted(report.dead_workers) == ["dead-a", "dead-b"]
        assert f"{namespace}:q.XQ" in caplog.text and "Cannot dead-letter" in caplog.text
        assert conn.get(f"{namespace}:q.XQ") == b"not a zset"
        # Its count is kept: once the key is repaired, the next death dead-letters it.
        assert conn.hget(f"{namespace}:__dq__.deliveries.q", poison) == b"2"
    finally:
        broker.close()


def test_recovery_of_a_worker_whose_heartbeat_came_back_moves_nothing(
    broker: RedisBroker, namespace: str
) -> None:
    conn = broker.client
    stored_rids(broker, "q", 2)
    held = hold(conn, namespace, "back", "q", 2)
    # It looked dead when the tick read the heartbeats; it beats again before the move.
    conn.zadd(f"{namespace}:__heartbeats__", {"back": 10**15})
    report = broker.recover()
    assert report.dead_workers == () and report.requeued == 0
    assert {_text(r) for r in conn.smembers(f"{namespace}:__acks__.back.q")} == set(held)


def test_recover_lua_is_a_no_op_for_a_live_worker_and_ids_it_no_longer_holds(
    broker: RedisBroker, namespace: str
) -> None:
    # The guards of the script itself (the decision was made on an older picture).
    conn = broker.client
    rids = stored_rids(broker, "q", 2)
    hold(conn, namespace, "w", "q", 2)
    conn.srem(f"{namespace}:__acks__.w.q", rids[1])  # somebody settled it meanwhile
    keys = broker._keys
    script_keys = (
        keys.heartbeats,
        keys.acks("w", "q"),
        keys.queue("q"),
        keys.msgs("q"),
        keys.deliveries("q"),
        keys.started("q"),
        keys.dead("q"),
        keys.dead_msgs("q"),
        keys.reasons("q"),
    )
    args: list[str | int] = ["w", 100, 1000, keys.channel("q")]
    args += [rids[0], "requeue", "1", rids[1], "requeue", "1"]
    conn.zadd(keys.heartbeats, {"w": 500})  # alive at cutoff 100
    assert broker._run("recover", script_keys, args) == [-1]
    assert conn.llen(keys.queue("q")) == 0
    conn.zadd(keys.heartbeats, {"w": 50})
    assert broker._run("recover", script_keys, args) == [1]
    assert conn.lrange(keys.queue("q"), 0, -1) == [rids[0].encode()]
    assert conn.hkeys(keys.deliveries("q")) == [rids[0].encode()]


def test_the_core_decides_each_recovered_messages_outcome() -> None:
    held = [
        Held("first-death", b'{"message_id": "m1"}', 0, Run.WAITING),
        Held("waited", b'{"message_id": "m2"}', 1, Run.WAITING),
        Held("ran-beside", b'{"message_id": "m3"}', 1, Run.SHARED),
        Held("ran-alone", b'{"message_id": "m4"}', 1, Run.ALONE),
        Held("gone", None, 1, Run.ALONE),
    ]
    verdicts = decide("w", "q", held, 1000, 2)
    assert {rid: (v.outcome, v.deliveries, v.reason) for rid, v in verdicts.items()} == {
        "first-death": ("requeue", 1, ""),
        "waited": ("requeue", 1, ""),
        "ran-beside": ("requeue", 1, ""),
        "ran-alone": ("dead", 2, "max_deliveries"),
        "gone": ("drop", None, ""),
    }
    # A delay queue's messages never ran: nothing is counted for them.
    delayed = decide("w", "q.DQ", held[3:4], 1000, 0)
    assert verdicts["ran-alone"].outcome == "dead"
    assert (delayed["ran-alone"].outcome, delayed["ran-alone"].deliveries) == ("requeue", None)


# -- issue 16, fault 3: names that collide with the layout -----------------------------------


@pytest.mark.parametrize(
    "queue_name",
    [
        "__heartbeats__",
        "default.XQ",
        "default.msgs",
        "__acks__.x",
        "__dq__.x",
        "__dq__.deliveries.default",
    ],
)
def test_a_raw_enqueue_to_a_reserved_name_is_refused_and_stores_nothing(
    broker: RedisBroker, namespace: str, queue_name: str
) -> None:
    message = Message(queue_name, "f", (), {}, {})
    with pytest.raises(InvalidQueueName, match="invalid queue name"):
        broker.enqueue(message)
    assert issubclass(InvalidQueueName, QueueNotFound)
    assert issubclass(InvalidQueueName, ValueError)
    with pytest.raises(InvalidQueueName):
        broker.enqueue_many([Message("fine", "f", (), {}, {}), message])
    with pytest.raises(InvalidQueueName):
        broker.declare_queue(queue_name)
    with pytest.raises(InvalidQueueName):
        broker.do_enqueue(queue_name, "rid", b"{}")
    assert keys_under(broker.client, namespace) == []


def test_a_consumer_backs_off_from_a_key_somebody_else_broke(
    broker: RedisBroker, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    conn = broker.client
    conn.rpush(f"{namespace}:q", "r1")
    conn.set(f"{namespace}:q.msgs", "not a hash")  # e.g. a Dramatiq producer's raw write
    consumer = broker.consume("q", prefetch=1, timeout=50)
    try:
        with caplog.at_level(logging.ERROR, logger="dq"):
            for _ in range(3):
                with pytest.raises(StopIteration):
                    next(consumer)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        # Logged once, naming the key; then it waits instead of asking again.
        assert len(errors) == 1, errors
        assert f"{namespace}:q.msgs is a string, not a hash" in errors[0]
        assert conn.lrange(f"{namespace}:q", 0, -1) == [b"r1"]  # nothing moved
    finally:
        consumer.close()


# -- issue 16, fault 5: bystanders ----------------------------------------------------------


def _take(broker: RedisBroker, queue: str, n: int) -> tuple[Consumer, list[MessageProxy]]:
    consumer = broker.consume(queue, prefetch=n, timeout=500)
    return consumer, [next(consumer) for _ in range(n)]


def test_started_marks_suspects_only_and_recovery_blames_only_who_ran_alone(
    namespace: str,
) -> None:
    broker = RedisBroker(namespace=namespace, heartbeat_timeout=1000, max_deliveries=2)
    try:
        conn = broker.client
        rids = stored_rids(broker, "q", 4)
        deliveries = f"{namespace}:__dq__.deliveries.q"
        started = f"{namespace}:__dq__.started.q"
        conn.hset(deliveries, mapping={rids[0]: 1, rids[1]: 1, rids[2]: 1})
        consumer, taken = _take(broker, "q", 4)
        by_rid = {m.options["redis_message_id"]: m for m in taken}
        assert [consumer.suspect(by_rid[r]) for r in rids] == [True, True, True, False]
        consumer.started(by_rid[rids[3]], alone=True)
        assert not conn.exists(started)  # nothing written for an ordinary message
        consumer.started(by_rid[rids[0]], alone=True)
        consumer.started(by_rid[rids[1]], alone=False)
        me = broker.broker_id
        assert conn.hgetall(started) == {
            rids[0].encode(): me.encode(),
            rids[1].encode(): f"{me} shared".encode(),
        }
        # This process "dies": no more heartbeats (its keeper stops), another recovers.
        assert broker._keeper is not None
        broker._keeper.stopped.set()
        broker._keeper.wake.set()
        broker._keeper.join()
        conn.zadd(f"{namespace}:__heartbeats__", {me: 0})
        other = RedisBroker(namespace=namespace, heartbeat_timeout=1000, max_deliveries=2)
        try:
            report = other.recover()
        finally:
            other.close()
        assert report.dead_lettered == (rids[0],)  # ran alone: its doing
        assert report.requeued == 3  # beside others, waiting, or its first death
        assert conn.hgetall(deliveries) == {
            rids[1].encode(): b"1",
            rids[2].encode(): b"1",
            rids[3].encode(): b"1",
        }
        assert not conn.exists(started)
        consumer.close()  # it holds nothing any more: nothing is returned
        assert conn.llen(f"{namespace}:q") == 3
    finally:
        broker.close()


def test_a_nack_keeps_its_death_reason_beside_the_untouched_dead_letter(
    broker: RedisBroker, namespace: str
) -> None:
    conn = broker.client
    stored = broker.enqueue(Message("q", "f", (), {}, {}))
    rid = stored.options["redis_message_id"]
    payload = conn.hget(f"{namespace}:q.msgs", rid)
    consumer, (message,) = _take(broker, "q", 1)
    message.death_reason = DeathReason.BAD_OPTIONS
    consumer.nack(message)
    assert conn.hget(f"{namespace}:q.XQ.msgs", rid) == payload  # Dramatiq's bytes
    assert conn.hget(f"{namespace}:__dq__.reasons.q", rid) == b"bad_options"
    consumer.close()
    broker.declare_queue("q")
    broker.flush("q")  # the reason goes with its dead letter
    assert keys_under(conn, namespace) == [f"{namespace}:__heartbeats__"]


def test_a_heartbeat_that_cannot_be_written_never_blocks_a_fetch(
    broker: RedisBroker, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    conn = broker.client
    conn.set(f"{namespace}:__heartbeats__", "somebody else's")
    stored = broker.enqueue(Message("q", "f", (), {}, {}))
    with caplog.at_level(logging.ERROR, logger="dq"):
        consumer = broker.consume("q", prefetch=1, timeout=500)
        message = next(consumer)
    assert message.message_id == stored.message_id
    assert "Could not write this broker's heartbeat" in caplog.text
    consumer.ack(message)
    consumer.close()
    conn.delete(f"{namespace}:__heartbeats__")
