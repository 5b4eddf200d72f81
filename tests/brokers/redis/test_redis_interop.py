"""Wire interop on Redis: dq and Dramatiq 2.2.1 share one namespace (spec/wire.md §3, §5).

Every test runs in both directions — Dramatiq produces and a dq Worker consumes, and dq
produces and a Dramatiq Worker consumes — plus one mixed-fleet test where both workers
consume the same queue at once. Each test gets its own namespace, and after stopping both
workers and closing both brokers it checks that nothing is left under it but
``ns:__heartbeats__``.

Needs the Redis server on 127.0.0.1:6379 and ``dramatiq==2.2.1`` (a test-only dependency).
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker as DramatiqRedisBroker

from dq.brokers.redis import RedisBroker as DqRedisBroker
from tests.support import interop
from tests.support.interop import (
    FAST_RETRY,
    DqSide,
    DramatiqSide,
    Recorder,
    envelope,
    now_ms,
    record,
)
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.redis]

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379

#: The queue every actor of these tests uses (the namespace is per test).
QUEUE = "interop"


def redis_sides(namespace: str) -> tuple[DqSide[DqRedisBroker], DramatiqSide[DramatiqRedisBroker]]:
    """dq's and Dramatiq's RedisBroker on ``namespace``, each declaring its actors on QUEUE."""
    dq_broker = DqRedisBroker(namespace=namespace, host=REDIS_HOST, port=REDIS_PORT)
    # Dramatiq's RedisBroker.__init__ is unannotated (the rest of its API is typed).
    dramatiq_broker = DramatiqRedisBroker(  # type: ignore[no-untyped-call]  # see above
        namespace=namespace, host=REDIS_HOST, port=REDIS_PORT
    )
    return DqSide(dq_broker, QUEUE), DramatiqSide(dramatiq_broker, QUEUE)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    """A plain client to look at the keys (bytes replies)."""
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        client.ping()
    except redis.ConnectionError as error:  # pragma: no cover - environment problem
        pytest.fail(f"the interop tests need Redis on {REDIS_HOST}:{REDIS_PORT}: {error}")
    yield client
    client.close()


@pytest.fixture
def namespace(client: redis.Redis) -> Iterator[str]:
    ns = f"dq-interop-{uuid.uuid4().hex}"
    yield ns
    keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
    if keys:
        client.delete(*keys)


@dataclass
class Fleet(interop.Fleet):
    """Both libraries on one namespace; ``producer`` sends and ``consumer`` works."""

    namespace: str
    client: redis.Redis

    def shutdown(self) -> None:
        """Stop both workers, then close both brokers and their clients (idempotent)."""
        super().shutdown()
        for side in self.sides:
            side.broker.client.close()

    # -- looking at Redis ---------------------------------------------------------------

    def key(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    def keys(self) -> set[str]:
        return {
            k.decode() if isinstance(k, bytes) else str(k)
            for k in self.client.scan_iter(match=f"{self.namespace}:*", count=1000)
        }

    def list_ids(self, queue_name: str) -> list[str]:
        return [as_str(i) for i in self.client.lrange(self.key(queue_name), 0, -1)]

    def stored(self, queue_name: str, redis_message_id: str) -> bytes:
        raw = self.client.hget(self.key(f"{queue_name}.msgs"), redis_message_id)
        assert isinstance(raw, bytes), f"no payload for {redis_message_id} on {queue_name}"
        return raw

    def zset(self, name: str) -> list[tuple[str, float]]:
        """Members and scores of the sorted set ``ns:name``."""
        entries: list[tuple[str, float]] = []
        for entry in self.client.zrange(self.key(name), 0, -1, withscores=True):
            assert isinstance(entry, tuple | list)
            member, score = entry
            entries.append((as_str(member), float(score)))
        return entries

    def ack_set(self, side: interop.Side[Any], queue_name: str) -> set[str]:
        """The ids ``side``'s broker holds (fetched, unsettled) from ``ns:queue_name``."""
        key = self.key(f"__acks__.{side.broker.broker_id}.{queue_name}")
        return {as_str(rid) for rid in self.client.smembers(key)}

    def key_type(self, name: str) -> str:
        return as_str(self.client.type(self.key(name)))

    def assert_nothing_left(self, *allowed: str) -> None:
        """After shutdown: only ``__heartbeats__`` (and ``allowed``) under the namespace."""
        self.shutdown()
        left = self.keys() - {self.key("__heartbeats__"), *(self.key(a) for a in allowed)}
        assert left == set(), f"left behind under {self.namespace}: {sorted(left)}"


def as_str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture
def both(namespace: str) -> Iterator[tuple[DqSide[Any], DramatiqSide[Any]]]:
    with interop.kept_global_brokers():
        dq_side, dramatiq_side = redis_sides(namespace)
        try:
            yield dq_side, dramatiq_side
        finally:
            for side in (dq_side, dramatiq_side):
                side.stop_worker()
            for side in (dq_side, dramatiq_side):
                side.close()
                side.broker.client.close()


@pytest.fixture(params=interop.DIRECTIONS)
def fleet(
    request: pytest.FixtureRequest,
    namespace: str,
    client: redis.Redis,
    both: tuple[DqSide[Any], DramatiqSide[Any]],
) -> Fleet:
    dq_side, dramatiq_side = both
    producer, consumer = interop.directed(request.param, dq_side, dramatiq_side)
    return Fleet(dq_side, dramatiq_side, producer, consumer, namespace, client)


@pytest.fixture
def mixed(
    namespace: str, client: redis.Redis, both: tuple[DqSide[Any], DramatiqSide[Any]]
) -> Fleet:
    dq_side, dramatiq_side = both
    return Fleet(dq_side, dramatiq_side, dq_side, dramatiq_side, namespace, client)


# -- the tests -----------------------------------------------------------------------------


def test_plain_messages_cross_and_run_exactly_once(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("echo", record(recorder))
    sent: dict[str, tuple[list[Any], dict[str, Any]]] = {}
    for i in range(30):
        args = (i, f"s{i}", [i, {"nested": i * 1.5}], None, i % 2 == 0)
        kwargs = {"k": [i], "text": 'é€😀 /\\"', "big": 2**70 + i}
        stored = envelope(fleet.producer.send("echo", args=args, kwargs=kwargs))
        sent[stored["message_id"]] = (list(args), kwargs)
        assert stored["queue_name"] == QUEUE
        assert "eta" not in stored["options"]

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= len(sent))
    fleet.assert_nothing_left()

    interop.assert_each_ran_once(
        recorder.calls,  # everything, after the workers stopped
        sent,
        side=fleet.consumer.label,
        queue_name=QUEUE,
        actor_name="echo",
    )


def test_delayed_messages_are_promoted_by_the_consumer_after_their_eta(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("later", record(recorder))
    fleet.declare("now", record(recorder))

    delayed = [envelope(fleet.producer.send("later", args=(i,), delay=200)) for i in range(3)]
    for stored in delayed:
        # The producer stored it on Q.DQ, with an integer ms eta (spec §3.8 step 1).
        assert stored["queue_name"] == f"{QUEUE}.DQ"
        eta = stored["options"]["eta"]
        assert isinstance(eta, int)
        assert abs(eta - (stored["message_timestamp"] + 200)) < 1000
        rid = stored["options"]["redis_message_id"]
        assert envelope(fleet.stored(f"{QUEUE}.DQ", rid)) == stored
    assert sorted(fleet.list_ids(f"{QUEUE}.DQ")) == sorted(
        s["options"]["redis_message_id"] for s in delayed
    )
    assert fleet.list_ids(QUEUE) == []
    immediate = envelope(fleet.producer.send("now", args=("go",)))

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= 4)
    fleet.assert_nothing_left()

    # Promoted (spec §3.8 step 3): canonical queue, no eta, a new redis_message_id.
    by_id = interop.assert_ran_after_their_eta(
        recorder.calls, delayed, immediate, side=fleet.consumer.label, queue_name=QUEUE
    )
    for stored in delayed:
        call = by_id[stored["message_id"]]
        assert call.message["options"]["redis_message_id"] != stored["options"]["redis_message_id"]


def test_a_message_that_fails_once_is_retried_through_the_delay_queue(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("flaky", interop.fail_first_attempt(recorder))
    stored = envelope(
        fleet.producer.send("flaky", args=(7,), kwargs={"x": "y"}, max_retries=3, **FAST_RETRY)
    )

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= 2)
    fleet.assert_nothing_left()

    first, second = recorder.calls
    options = interop.assert_retried_once(
        first, second, stored, side=fleet.consumer.label, queue_name=QUEUE
    )
    assert "retries" not in first.message["options"]
    assert isinstance(options["traceback"], str)
    assert options["min_backoff"] == 50
    assert options["max_backoff"] == 100
    assert options["redis_message_id"] != stored["options"]["redis_message_id"]
    assert len(recorder.calls) == 2


def test_a_retry_stored_by_one_library_is_run_by_the_other(fleet: Fleet) -> None:
    """The consumer's first attempt fails and it stores the retry on Q.DQ; it stops
    before the retry is due, and the producer's worker promotes and runs it."""
    recorder = Recorder()
    fleet.declare("flaky", interop.fail_first_attempt(recorder))
    # A 500-1000 ms backoff: the consumer is stopped well before the retry is due.
    stored = envelope(
        fleet.producer.send("flaky", args=(1,), max_retries=3, min_backoff=1000, max_backoff=1000)
    )

    fleet.consumer.start_worker()
    (first,) = recorder.wait_for(lambda calls: len(calls) >= 1)
    fleet.consumer.stop_worker()

    # Only the retry is left: on Q.DQ, not held by anyone (spec §5 retry scheduling).
    dq_queue = f"{QUEUE}.DQ"
    assert fleet.keys() - {fleet.key("__heartbeats__")} == {
        fleet.key(dq_queue),
        fleet.key(f"{dq_queue}.msgs"),
    }
    (rid,) = fleet.list_ids(dq_queue)
    raw = fleet.stored(dq_queue, rid)
    retry = envelope(raw)
    assert retry["queue_name"] == dq_queue
    assert retry["message_id"] == stored["message_id"]
    assert retry["message_timestamp"] == stored["message_timestamp"]
    assert retry["args"] == [1]
    options = retry["options"]
    assert options["redis_message_id"] == rid
    assert options["retries"] == 1
    assert isinstance(options["eta"], int)
    assert options["eta"] >= first.started_ms + 499
    fleet.assert_both_read(raw, retry)

    fleet.producer.start_worker()
    calls = recorder.wait_for(lambda calls: len(calls) >= 2)
    fleet.assert_nothing_left()

    second = calls[1]
    assert second.side == fleet.producer.label
    assert second.started_ms >= options["eta"]
    assert second.message["queue_name"] == QUEUE
    assert second.message["message_id"] == stored["message_id"]
    assert second.message["options"]["retries"] == 1
    assert "eta" not in second.message["options"]
    assert len(recorder.calls) == 2


def test_delayed_messages_held_at_shutdown_go_back_for_the_other_library(fleet: Fleet) -> None:
    """The consumer fetches delayed messages and holds them; stopped before their eta
    it returns them to Q.DQ, and the producer's worker runs them."""
    recorder = Recorder()
    fleet.declare("later", record(recorder))
    sent = [envelope(fleet.producer.send("later", args=(i,), delay=1000)) for i in range(3)]
    rids = {m["options"]["redis_message_id"] for m in sent}
    dq_queue = f"{QUEUE}.DQ"

    fleet.consumer.start_worker()
    wait_until(
        lambda: fleet.ack_set(fleet.consumer, dq_queue) == rids,
        f"the {fleet.consumer.label} worker to hold the delayed messages",
    )
    assert fleet.list_ids(dq_queue) == []
    fleet.consumer.stop_worker()
    assert recorder.calls == []
    assert fleet.ack_set(fleet.consumer, dq_queue) == set()
    assert sorted(fleet.list_ids(dq_queue)) == sorted(rids)
    for message in sent:
        assert envelope(fleet.stored(dq_queue, message["options"]["redis_message_id"])) == message

    fleet.producer.start_worker()
    calls = recorder.wait_for(lambda calls: len(calls) >= 3)
    fleet.assert_nothing_left()

    assert Counter(c.message["message_id"] for c in recorder.calls) == {
        m["message_id"]: 1 for m in sent
    }
    by_id = {c.message["message_id"]: c for c in calls}
    for message in sent:
        call = by_id[message["message_id"]]
        assert call.side == fleet.producer.label
        assert call.started_ms >= message["options"]["eta"]
        assert call.message["queue_name"] == QUEUE


def test_a_message_that_fails_for_good_is_dead_lettered_readably(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("doomed", interop.always_fail(recorder))
    before = now_ms()
    stored = envelope(fleet.producer.send("doomed", args=("x",), max_retries=0, **FAST_RETRY))
    rid = stored["options"]["redis_message_id"]
    raw = fleet.stored(QUEUE, rid)

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= 1)
    xq, xq_msgs = f"{QUEUE}.XQ", f"{QUEUE}.XQ.msgs"
    wait_until(lambda: fleet.client.zcard(fleet.key(xq)) >= 1, f"a dead letter in {xq}")
    after = now_ms()
    fleet.shutdown()

    assert len(recorder.calls) == 1, "max_retries=0: one attempt, no retry"
    assert fleet.keys() - {fleet.key("__heartbeats__")} == {fleet.key(xq), fleet.key(xq_msgs)}
    assert fleet.key_type(xq) == "zset"
    assert fleet.key_type(xq_msgs) == "hash"
    ((member, score),) = fleet.zset(xq)
    assert member == rid
    assert before - 1000 <= score <= after + 1000, f"score {score} is not a ms time"
    assert [as_str(f) for f in fleet.client.hkeys(fleet.key(xq_msgs))] == [rid]
    dead = fleet.stored(xq, rid)
    # nack copies the stored bytes as they were (spec §3.5).
    assert dead == raw
    # Both decoders read it; in particular the library that did not dead-letter it.
    fleet.assert_both_read(dead, stored)

    # Either library's flush purges the dead letters (purge deletes Q.XQ and Q.XQ.msgs).
    fleet.producer.flush(QUEUE)
    fleet.assert_nothing_left()


def test_a_message_for_an_actor_only_the_producer_knows_is_dead_lettered(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("known", record(recorder))
    fleet.producer.declare("ghost", record(recorder))
    ghost = envelope(fleet.producer.send("ghost", args=(1,)))
    raw = fleet.stored(QUEUE, ghost["options"]["redis_message_id"])
    known = envelope(fleet.producer.send("known", args=(2,)))

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= 1)
    xq = f"{QUEUE}.XQ"
    wait_until(lambda: fleet.client.zcard(fleet.key(xq)) >= 1, f"a dead letter in {xq}")
    fleet.shutdown()

    assert [c.message["message_id"] for c in recorder.calls] == [known["message_id"]]
    assert [member for member, _ in fleet.zset(xq)] == [ghost["options"]["redis_message_id"]]
    dead = fleet.stored(xq, ghost["options"]["redis_message_id"])
    assert dead == raw
    assert fleet.producer.decode(dead) == ghost
    fleet.producer.flush(QUEUE)
    fleet.assert_nothing_left()


def test_stored_payloads_are_read_byte_for_byte_by_the_other_library(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("payload", record(recorder))
    args, kwargs = interop.PAYLOAD_ARGS, interop.PAYLOAD_KWARGS
    options = {"max_retries": 3, "time_limit": 60000}
    plain = envelope(fleet.producer.send("payload", args=args, kwargs=kwargs, **options))
    delayed = envelope(
        fleet.producer.send("payload", args=args, kwargs=kwargs, delay=100, **options)
    )

    for stored, queue_name in ((plain, QUEUE), (delayed, f"{QUEUE}.DQ")):
        rid = stored["options"]["redis_message_id"]
        assert fleet.key_type(queue_name) == "list"
        assert fleet.key_type(f"{queue_name}.msgs") == "hash"
        assert fleet.list_ids(queue_name) == [rid]
        raw = fleet.stored(queue_name, rid)
        assert envelope(raw) == stored
        interop.assert_encoded_as_dramatiq_does(raw)
        fleet.assert_both_read(raw, stored)
    assert delayed["queue_name"] == f"{QUEUE}.DQ"
    assert isinstance(delayed["options"]["eta"], int)
    assert plain["options"] == {**options, "redis_message_id": plain["options"]["redis_message_id"]}

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= 2)
    fleet.assert_nothing_left()

    expected_args = json.loads(json.dumps(list(args)))
    for call in recorder.calls:
        assert call.args == expected_args
        assert call.kwargs == kwargs
        assert list(call.kwargs) == ["z", "a", "ü"]


def test_a_mixed_fleet_shares_one_queue(mixed: Fleet) -> None:
    """Both workers consume the same queue while both libraries produce: plain, delayed
    and fail-once messages each run exactly once (twice for the retried ones)."""
    recorder = Recorder()
    mixed.declare("echo", record(recorder))
    mixed.declare("flaky", interop.fail_first_attempt(recorder))
    for side in mixed.sides:
        side.start_worker()

    plain, flaky = interop.send_mixed_load(mixed.sides)

    expected = len(plain) + 2 * len(flaky)
    recorder.wait_for(lambda calls: len(calls) >= expected)
    mixed.assert_nothing_left()

    calls = recorder.calls
    counts = Counter(c.message["message_id"] for c in calls)
    assert counts == {**dict.fromkeys(plain, 1), **dict.fromkeys(flaky, 2)}
    for message_id in flaky:
        retries = sorted(
            c.message["options"].get("retries", 0)
            for c in calls
            if c.message["message_id"] == message_id
        )
        assert retries == [0, 1]
