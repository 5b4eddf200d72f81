"""RedisBroker on the real Redis: the conformance machine, the wire layout, recovery,
batching, notifications and bad input."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
import redis

import dq
from dq import Message, Worker
from dq.broker import Broker
from dq.brokers.redis import RedisBroker
from dq.errors import ConnectionClosed, QueueJoinTimeout, QueueNotFound
from tests.support.redis_helpers import client, keys_under

pytestmark = [pytest.mark.redis]


def _decode(payload: object) -> Message[Any]:
    assert isinstance(payload, bytes), payload
    return Message.decode(payload)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def broker(broker: RedisBroker) -> RedisBroker:
    """The folder's broker (tests/brokers/redis/conftest.py), as dq's global broker."""
    dq.set_broker(broker)
    return broker


def _raw(conn: redis.Redis, key: str) -> str:
    kind = conn.type(key)
    return kind.decode() if isinstance(kind, bytes) else str(kind)


# -- construction --------------------------------------------------------------------------


def test_url_wins_over_parameters_and_a_client_is_used_as_given(namespace: str) -> None:
    with pytest.warns(UserWarning, match="url is given"):
        b = RedisBroker(url="redis://127.0.0.1:6379/0", namespace=namespace, port=1)
    assert b.client.ping()
    given = client()
    assert RedisBroker(client=given, namespace=namespace).client is given


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"heartbeat_timeout": 0}, "heartbeat_timeout must be a positive integer"),
        ({"dead_message_ttl": -1}, "dead_message_ttl"),
        ({"requeue_interval": 1.5}, "requeue_interval must be a positive integer"),
        ({"requeue_deadline": 500, "heartbeat_timeout": 1000}, "must be larger than"),
        (
            {"requeue_deadline": 1100, "requeue_interval": 500, "heartbeat_timeout": 1000},
            "at least their sum",
        ),
        ({"max_deliveries": -1}, "max_deliveries must be an integer >= 0"),
        ({"namespace": ""}, "namespace must be a non-empty string"),
    ],
)
def test_bad_arguments_are_refused_with_the_value(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RedisBroker(**kwargs)


def test_recovery_timing_defaults_and_derivations() -> None:
    b = RedisBroker()
    assert (b.heartbeat_timeout, b.requeue_interval, b.requeue_deadline) == (60000, 6000, 66000)
    b = RedisBroker(heartbeat_timeout=1000, requeue_deadline=1500)
    assert b.requeue_interval == 500
    b = RedisBroker(heartbeat_timeout=1000, requeue_interval=200)
    assert b.requeue_deadline == 1200


# -- the wire layout -------------------------------------------------------------------------


def test_enqueue_writes_dramatiqs_keys_and_types(broker: RedisBroker, namespace: str) -> None:
    broker.declare_queue("q")
    message: Message[Any] = Message("q", "f", (1,), {}, {})
    stored = broker.enqueue(message)
    rid = stored.options["redis_message_id"]
    conn = broker.client
    assert _raw(conn, f"{namespace}:q") == "list"
    assert conn.lrange(f"{namespace}:q", 0, -1) == [rid.encode()]
    assert conn.hget(f"{namespace}:q.msgs", rid) == stored.encode()
    assert keys_under(conn, namespace) == [f"{namespace}:q", f"{namespace}:q.msgs"]
    # Every enqueue gets a new id, even of a message that has one.
    again = broker.enqueue(stored)
    assert again.options["redis_message_id"] != rid
    assert list(again.options) == ["redis_message_id"]  # it kept its position


def test_a_delayed_enqueue_goes_to_the_delay_queue_with_an_eta(
    broker: RedisBroker, namespace: str
) -> None:
    before = int(time.time() * 1000)
    stored = broker.enqueue(Message("q", "f", (), {}, {}), delay=5000)
    assert stored.queue_name == "q.DQ"
    assert before + 5000 <= stored.options["eta"] <= int(time.time() * 1000) + 5000
    rid = stored.options["redis_message_id"]
    assert broker.client.lrange(f"{namespace}:q.DQ", 0, -1) == [rid.encode()]


def test_enqueue_on_a_queue_declared_elsewhere_stores_it(broker: RedisBroker) -> None:
    # As in Dramatiq: a producer may send to actors another process declares.
    broker.enqueue(Message("elsewhere", "f", (), {}, {}))
    assert broker.qsize("elsewhere") == 1
    assert "elsewhere" not in broker.get_declared_queues()


def test_fetch_ack_nack_keep_the_ack_set_and_dead_letters_as_dramatiq(
    broker: RedisBroker, namespace: str
) -> None:
    broker.declare_queue("q")
    for i in range(3):
        broker.enqueue(Message("q", "f", (i,), {}, {}))
    consumer = broker.consume("q", prefetch=3, timeout=100)
    first, second, third = next(consumer), next(consumer), next(consumer)
    acks = f"{namespace}:__acks__.{broker.broker_id}.q"
    assert _raw(broker.client, acks) == "set"
    assert broker.client.scard(acks) == 3
    consumer.ack(first)
    consumer.nack(second)
    consumer.requeue([third])
    assert broker.client.scard(acks) == 0
    assert broker.client.lrange(f"{namespace}:q", 0, -1) == [str(third._tag).encode()]
    dead_id = second._tag
    assert isinstance(dead_id, str)
    assert _raw(broker.client, f"{namespace}:q.XQ") == "zset"
    score = broker.client.zscore(f"{namespace}:q.XQ", dead_id)
    assert score is not None and abs(score - time.time() * 1000) < 5000
    assert broker.client.hget(f"{namespace}:q.XQ.msgs", dead_id) == second.message.encode()
    consumer.close()


def test_a_nack_from_the_delay_queue_goes_to_the_canonical_dead_letters(
    broker: RedisBroker, namespace: str
) -> None:
    broker.declare_queue("q")
    stored = broker.enqueue(Message("q", "f", (), {}, {}), delay=60000)
    consumer = broker.consume("q.DQ", prefetch=1, timeout=100)
    held = next(consumer)
    consumer.nack(held)
    payload = broker.client.hget(f"{namespace}:q.XQ.msgs", stored.options["redis_message_id"])
    assert payload is not None
    dead = _decode(payload)
    assert dead.queue_name == "q.DQ" and "eta" in dead.options  # bytes as stored
    consumer.close()


def test_promotion_stores_the_copy_and_forgets_the_held_one_in_one_step(
    broker: RedisBroker, namespace: str
) -> None:
    broker.declare_queue("q")
    broker.enqueue(Message("q", "f", (7,), {}, {}), delay=0)
    dq_consumer = broker.consume("q.DQ", prefetch=1, timeout=100)
    held = next(dq_consumer)
    promoted = dq_consumer.promote(held)  # type: ignore[attr-defined]  # Redis consumers can
    assert promoted.queue_name == "q" and "eta" not in promoted.options
    assert promoted.options["redis_message_id"] != held._tag
    assert broker.client.hlen(f"{namespace}:q.DQ.msgs") == 0
    assert broker.client.llen(f"{namespace}:q") == 1
    # Promoting again (the held copy is gone) stores nothing.
    dq_consumer.promote(held)  # type: ignore[attr-defined]  # Redis consumers can
    assert broker.client.llen(f"{namespace}:q") == 1
    dq_consumer.close()


def test_a_replacement_of_a_message_recovered_by_someone_else_stores_nothing(
    broker: RedisBroker, namespace: str
) -> None:
    broker.declare_queue("q")
    broker.enqueue(Message("q", "f", (), {}, {}))
    consumer = broker.consume("q", prefetch=1, timeout=100)
    held = next(consumer)
    # Another worker recovered it (as if this one had been declared dead).
    broker.client.delete(f"{namespace}:__acks__.{broker.broker_id}.q")
    broker.client.rpush(f"{namespace}:q", held._tag)  # type: ignore[arg-type]  # a str tag
    retry = held.message.copy(options={"retries": 1})
    consumer.replace(held, retry, 10)  # type: ignore[attr-defined]  # Redis consumers can
    assert broker.client.llen(f"{namespace}:q.DQ") == 0  # no duplicate stored
    assert broker.client.llen(f"{namespace}:q") == 1
    consumer.close()


def test_flush_keeps_reserved_messages_and_drops_waiting_ones_and_dead_letters(
    broker: RedisBroker, namespace: str
) -> None:
    broker.declare_queue("q")
    for i in range(3):
        broker.enqueue(Message("q", "f", (i,), {}, {}))
    broker.enqueue(Message("q", "f", (), {}, {}), delay=10)
    consumer = broker.consume("q", prefetch=1, timeout=100)
    held = next(consumer)
    broker.flush("q")
    assert broker.qsize("q") == 1  # the reserved one
    consumer.ack(held)
    assert broker.qsize("q") == 0
    consumer.close()
    assert keys_under(broker.client, namespace) == [f"{namespace}:__heartbeats__"]


def test_join_waits_for_in_flight_messages_and_times_out(broker: RedisBroker) -> None:
    broker.declare_queue("q")
    broker.enqueue(Message("q", "f", (), {}, {}))
    with pytest.raises(QueueJoinTimeout):
        broker.join("q", timeout=50)
    consumer = broker.consume("q", prefetch=1, timeout=100)
    message = next(consumer)
    threading.Timer(0.1, consumer.ack, args=(message,)).start()
    broker.join("q", timeout=5000)
    consumer.close()


def test_consume_refuses_dead_letter_queues_and_bad_arguments(broker: RedisBroker) -> None:
    with pytest.raises(QueueNotFound):
        broker.consume("q.XQ")
    with pytest.raises(ValueError, match="prefetch must be an integer >= 1, got 0"):
        broker.consume("q", prefetch=0)
    with pytest.raises(ValueError, match="timeout must be"):
        broker.consume("q", timeout=-1)


def test_dramatiqs_semi_public_dispatch(broker: RedisBroker, namespace: str) -> None:
    payload = Message("q", "f", (), {}, {"redis_message_id": "r1"}).encode()
    broker.do_enqueue("q", "r1", payload)
    assert broker.do_qsize("q") == 1
    assert broker.do_fetch("q", 5) == [payload]
    broker.do_ack("q", "r1")
    assert broker.do_qsize("q") == 0
    second = Message("q", "f", (), {}, {"redis_message_id": "r2"}).encode()
    broker.do_enqueue("q", "r2", second)
    assert broker.do_fetch("q", 5) == [second]
    broker.do_requeue("q", "r2")
    assert broker.do_fetch("q", 5) == [second]
    broker.do_nack("q", "r2")
    assert broker.client.zrange(f"{namespace}:q.XQ", 0, -1) == [b"r2"]
    broker.do_enqueue("q", "r3", payload)
    assert broker.do_purge("q") == 1
    assert broker.do_qsize("q") == 0
    with pytest.raises(AttributeError, match="do_nothing"):
        broker.do_nothing  # type: ignore[attr-defined]  # noqa: B018 - the access is the test


# -- batching --------------------------------------------------------------------------------


def test_enqueue_many_stores_a_batch_in_order_across_queues(
    broker: RedisBroker, namespace: str
) -> None:
    messages: list[Message[Any]] = [
        Message("a" if i % 3 else "b", "f", (i,), {}, {}) for i in range(1203)
    ]
    stored = broker.enqueue_many(messages)
    assert [m.message_id for m in stored] == [m.message_id for m in messages]
    a_ids = broker.client.lrange(f"{namespace}:a", 0, -1)
    assert a_ids == [m.options["redis_message_id"].encode() for m in stored if m.queue_name == "a"]
    assert broker.qsize("a") + broker.qsize("b") == 1203


def test_send_many_is_typed_and_runs_the_enqueue_hooks(namespace: str) -> None:
    seen: list[Message[Any]] = []

    class Hook(dq.Middleware):
        def after_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
            seen.append(message)

    b = RedisBroker(namespace=namespace, middleware=[Hook()])

    @dq.actor(broker=b)
    def add(x: int, y: int) -> int:
        return x + y

    stored = add.send_many([add.message(1, 2), add.message(3, 4)], delay=100)
    assert [m.args for m in stored] == [(1, 2), (3, 4)]
    assert all(m.queue_name == "default.DQ" for m in stored)
    assert seen == stored
    b.close()


def test_concurrent_acks_are_sent_in_batches_and_none_is_lost(
    broker: RedisBroker, namespace: str
) -> None:
    broker.declare_queue("q")
    broker.enqueue_many([Message("q", "f", (i,), {}, {}) for i in range(400)])
    consumer = broker.consume("q", prefetch=400, timeout=100)
    delivered = [next(consumer) for _ in range(400)]
    calls = 0
    original = broker._run

    def counting(name: str, keys: Any, args: Any) -> Any:
        nonlocal calls
        calls += name == "ack"
        return original(name, keys, args)

    broker._run = counting  # type: ignore[method-assign]  # counting the ack calls
    threads = [
        threading.Thread(target=lambda ms=delivered[i::8]: [consumer.ack(m) for m in ms])
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert broker.qsize("q") == 0
    assert broker.client.exists(f"{namespace}:__acks__.{broker.broker_id}.q") == 0
    assert 1 <= calls <= 400
    consumer.close()


# -- notifications and latency ----------------------------------------------------------------


def test_an_idle_consumer_wakes_on_enqueue_not_on_its_timeout(broker: RedisBroker) -> None:
    broker.declare_queue("q")
    consumer = broker.consume("q", prefetch=1, timeout=10_000)
    got: list[float] = []

    def take() -> None:
        message = next(consumer)
        got.append(time.monotonic())
        consumer.ack(message)

    taker = threading.Thread(target=take)
    taker.start()
    time.sleep(0.2)  # the consumer is waiting now
    sent = time.monotonic()
    broker.enqueue(Message("q", "f", (), {}, {}))
    taker.join(5)
    assert got, "the consumer did not wake"
    # Far below the 10 s timeout: the enqueue notification woke it.
    assert got[0] - sent < 2.0
    consumer.close()


def test_an_idle_consumer_still_sees_messages_stored_without_a_notification(
    broker: RedisBroker, namespace: str
) -> None:
    # Dramatiq producers do not publish: the consumer polls at its timeout.
    payload = Message("q", "f", (), {}, {"redis_message_id": "r9"}).encode()
    consumer = broker.consume("q", prefetch=1, timeout=50)
    with pytest.raises(StopIteration):
        next(consumer)
    broker.client.hset(f"{namespace}:q.msgs", "r9", payload)
    broker.client.rpush(f"{namespace}:q", "r9")
    assert next(consumer).message_id == Message.decode(payload).message_id
    consumer.close()


# -- recovery ----------------------------------------------------------------------------------


def test_messages_of_a_dead_worker_come_back_within_the_deadline(namespace: str) -> None:
    dead = RedisBroker(namespace=namespace, heartbeat_timeout=500, requeue_interval=100)
    dead.declare_queue("q")
    dead.enqueue_many([Message("q", "f", (i,), {}, {}) for i in range(5)])
    consumer = dead.consume("q", prefetch=5, timeout=100)
    taken = [next(consumer) for _ in range(5)]
    died_at = time.monotonic()
    assert dead._keeper is not None
    dead._keeper.stopped.set()  # the process "dies": no more heartbeats, nothing settled
    dead._keeper.wake.set()
    dead._keeper.join()
    live = RedisBroker(namespace=namespace, heartbeat_timeout=500, requeue_interval=100)
    live.declare_queue("q")
    other = live.consume("q", prefetch=5, timeout=2000)
    back = [next(other) for _ in range(5)]
    elapsed_ms = (time.monotonic() - died_at) * 1000
    assert sorted(m.message_id for m in back) == sorted(m.message_id for m in taken)
    # heartbeat_timeout + requeue_interval, plus the heartbeat period and slack.
    assert elapsed_ms < live.requeue_deadline + dead.heartbeat_interval + 500, elapsed_ms
    for m in back:
        other.ack(m)
    other.close()
    live.close()
    # The dead worker was forgotten; nothing is left behind.
    assert keys_under(live.client, namespace) == []


def test_a_message_that_kills_its_worker_each_time_is_dead_lettered(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = RedisBroker(
        namespace=namespace, heartbeat_timeout=200, requeue_interval=100, max_deliveries=2
    )
    stored = broker.enqueue(Message("q", "f", (), {}, {}))
    rid = stored.options["redis_message_id"]
    conn = broker.client
    hb = f"{namespace}:__heartbeats__"
    bystander = broker.enqueue(Message("q", "f", (), {}, {})).options["redis_message_id"]
    for attempt in (1, 2):
        # A worker takes both, starts the first and dies (its heartbeat is old).
        worker_id = f"dead-{attempt}"
        assert conn.lpop(f"{namespace}:q", 2) == [rid.encode(), bystander.encode()]
        conn.sadd(f"{namespace}:__acks__.{worker_id}.q", rid, bystander)
        conn.zadd(hb, {worker_id: 0})
        if attempt == 2:
            # A suspect records its start (the consumer does it before running it).
            conn.hset(f"{namespace}:__dq__.started.q", rid, worker_id)
        with caplog.at_level(logging.ERROR, logger="dq"):
            report = broker.recover()
        assert report.dead_workers == (worker_id,)
        if attempt == 1:
            assert report.requeued == 2 and report.dead_lettered == ()
            # Put the poison message first again.
            conn.delete(f"{namespace}:q")
            conn.rpush(f"{namespace}:q", rid, bystander)
        else:
            # Only the one that started (twice now) is dead-lettered; the message
            # merely prefetched beside it goes back to its queue.
            assert report.requeued == 1 and report.dead_lettered == (rid,)
    assert conn.zscore(f"{namespace}:q.XQ", rid) is not None
    # The log line names the message (not only its redis id) and the reason.
    assert f"Dead-lettered message {stored.message_id} (redis id {rid})" in caplog.text
    assert "reason max_deliveries" in caplog.text
    assert conn.lrange(f"{namespace}:q", 0, -1) == [bystander.encode()]
    assert conn.hkeys(f"{namespace}:__dq__.deliveries.q") == [bystander.encode()]  # a suspect
    # Once the bystander is acked, nothing but the dead letter is left.
    consumer = broker.consume("q", prefetch=1, timeout=100)
    message = next(consumer)
    consumer.started(message, alone=True)
    consumer.ack(message)
    consumer.close()
    broker.close()
    # The dead letter, and the reason dq keeps for it where Dramatiq does not look.
    assert keys_under(conn, namespace) == [
        f"{namespace}:__dq__.reasons.q",
        f"{namespace}:q.XQ",
        f"{namespace}:q.XQ.msgs",
    ]
    assert conn.hgetall(f"{namespace}:__dq__.reasons.q") == {rid.encode(): b"max_deliveries"}


def test_recovery_leaves_live_workers_alone(broker: RedisBroker, namespace: str) -> None:
    conn = broker.client
    conn.zadd(f"{namespace}:__heartbeats__", {"alive": time.time() * 1000})
    conn.hset(f"{namespace}:q.msgs", "r1", b"{}")
    conn.sadd(f"{namespace}:__acks__.alive.q", "r1")
    report = broker.recover()
    assert report.dead_workers == ()
    assert conn.sismember(f"{namespace}:__acks__.alive.q", "r1")


def test_dead_letters_older_than_the_ttl_expire(namespace: str) -> None:
    broker = RedisBroker(namespace=namespace, dead_message_ttl=1000)
    broker.declare_queue("q")
    conn = broker.client
    now = int(time.time() * 1000)
    conn.zadd(f"{namespace}:q.XQ", {"old": now - 5000, "new": now})
    conn.hset(f"{namespace}:q.XQ.msgs", mapping={"old": b"x", "new": b"y"})
    assert broker.expire_dead_letters() == 1
    assert conn.zrange(f"{namespace}:q.XQ", 0, -1) == [b"new"]
    assert conn.hkeys(f"{namespace}:q.XQ.msgs") == [b"new"]


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe garbage", b'{"queue_name":"q","actor_name":"f"', b"[1, 2]"],
    ids=["garbage", "truncated", "not-an-object"],
)
def test_undecodable_payloads_are_dead_lettered_and_the_consumer_goes_on(
    broker: RedisBroker, namespace: str, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    conn = broker.client
    conn.hset(f"{namespace}:q.msgs", "bad", payload)
    conn.rpush(f"{namespace}:q", "bad")
    good = broker.enqueue(Message("q", "f", (), {}, {}))
    consumer = broker.consume("q", prefetch=2, timeout=100)
    with caplog.at_level(logging.ERROR, logger="dq"):
        assert next(consumer).message_id == good.message_id
    assert "Dead-lettering undecodable message bad" in caplog.text
    assert conn.hget(f"{namespace}:q.XQ.msgs", "bad") == payload
    consumer.close()


def test_a_message_for_an_unknown_actor_is_dead_lettered_by_the_worker(
    broker: RedisBroker, namespace: str
) -> None:
    @dq.actor(queue_name="q", broker=broker)
    def known() -> None:
        pass

    stored = broker.enqueue(Message("q", "nobody", (), {}, {}))
    worker = Worker(broker, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        broker.join("q", timeout=5000)
    finally:
        worker.stop()
    rid = stored.options["redis_message_id"]
    assert broker.client.zscore(f"{namespace}:q.XQ", rid) is not None


def test_a_connection_failure_raises_connection_closed(namespace: str) -> None:
    broker = RedisBroker(namespace=namespace, port=1, socket_connect_timeout=0.2)
    with pytest.raises(ConnectionClosed) as caught:
        broker.enqueue(Message("q", "f", (), {}, {}))
    assert isinstance(caught.value, redis.exceptions.ConnectionError)  # both, for either code


# -- the worker end to end ----------------------------------------------------------------------


def test_a_worker_runs_retries_delays_and_dead_letters_on_redis(
    broker: RedisBroker, namespace: str
) -> None:
    attempts: dict[int, int] = {}
    lock = threading.Lock()

    @dq.actor(max_retries=1, min_backoff=20, max_backoff=40, broker=broker)
    def job(n: int) -> None:
        with lock:
            attempts[n] = attempts.get(n, 0) + 1
            count = attempts[n]
        if n == 1 and count == 1:
            raise ValueError("fails once")
        if n == 2:
            raise ValueError("always fails")

    for n in range(5):
        job.send(n)
    job.send_with_options(args=(99,), delay=100)
    worker = Worker(broker, worker_threads=4, worker_timeout=50)
    worker.start()
    try:
        broker.join("default", timeout=10_000)
    finally:
        worker.stop()
    assert attempts == {0: 1, 1: 2, 2: 2, 3: 1, 4: 1, 99: 1}
    assert broker.client.zcard(f"{namespace}:default.XQ") == 1
    dead = _decode(broker.client.hvals(f"{namespace}:default.XQ.msgs")[0])
    # The dead letter holds the bytes as stored (the retry's: retries == 1), as Dramatiq.
    assert dead.args == (2,) and dead.options["retries"] == 1
    broker.flush_all()
    broker.close()
    assert keys_under(broker.client, namespace) == []


def test_a_client_that_decodes_responses_works_too(namespace: str) -> None:
    # The Brokers chapter's example passes redis.Redis(decode_responses=True).
    decoding = redis.Redis(host="127.0.0.1", port=6379, decode_responses=True)
    broker = RedisBroker(client=decoding, namespace=namespace)
    broker.declare_queue("q")
    stored = broker.enqueue(Message("q", "f", ("é",), {}, {}))
    consumer = broker.consume("q", prefetch=1, timeout=100)
    message = next(consumer)
    assert message.message == stored
    consumer.ack(message)
    consumer.close()
    broker.close()
    assert keys_under(client(), namespace) == []
