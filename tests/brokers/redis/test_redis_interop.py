"""Wire interop on Redis: dq and Dramatiq 2.2.1 share one namespace (spec/wire.md §3, §5).

Every test runs in both directions — Dramatiq produces and a dq Worker consumes, and dq
produces and a Dramatiq Worker consumes — plus one mixed-fleet test where both workers
consume the same queue at once. Each test gets its own namespace, and after stopping both
workers and closing both brokers it checks that nothing is left under it but
``ns:__heartbeats__``.

Needs the Redis server on 127.0.0.1:6379 and ``dramatiq==2.2.1`` (a test-only dependency).
"""

from __future__ import annotations

import abc
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dramatiq
import dramatiq.broker
import dramatiq.middleware
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker as DramatiqRedisBroker

import dq
import dq.broker
import dq.middleware
from dq.brokers.redis import RedisBroker as DqRedisBroker

pytestmark = [pytest.mark.redis]

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379

#: The queue every actor of these tests uses (the namespace is per test).
QUEUE = "interop"

#: How long a test waits for messages to be processed before failing, in seconds.
WAIT = 10.0

#: Both workers' settings (as the brief asks).
WORKER_THREADS = 2
WORKER_TIMEOUT = 100

#: Retry options sent with the messages: the consuming side's Retries reads them
#: (by key presence), so a retry waits 50-100 ms in the delay queue.
FAST_RETRY: dict[str, Any] = {"min_backoff": 50, "max_backoff": 100}

Envelope = dict[str, Any]


def now_ms() -> float:
    return time.time() * 1000


def envelope(encoded: bytes) -> Envelope:
    """The seven fields of an encoded message, as plain JSON values."""
    data = json.loads(encoded)
    assert isinstance(data, dict)
    return data


# -- what the actors record ------------------------------------------------------------


class Boom(Exception):
    """What the failing actors raise."""


@dataclass(frozen=True)
class Call:
    """One attempt of an actor, as seen from inside it."""

    side: str
    actor_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    message: Envelope
    started_ms: float


class Recorder:
    """Thread-safe list of calls, with a deadline-bounded wait."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._calls: list[Call] = []

    def add(self, call: Call) -> None:
        with self._cond:
            self._calls.append(call)
            self._cond.notify_all()

    @property
    def calls(self) -> list[Call]:
        with self._cond:
            return list(self._calls)

    def wait_for(self, done: Callable[[list[Call]], bool], timeout: float = WAIT) -> list[Call]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done(self._calls):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s; calls so far: {self._calls!r}"
                    )
                self._cond.wait(remaining)
            return list(self._calls)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


Behaviour = Callable[[Call], None]


def record(recorder: Recorder) -> Behaviour:
    return recorder.add


def fail_first_attempt(recorder: Recorder) -> Behaviour:
    def run(call: Call) -> None:
        recorder.add(call)
        if "retries" not in call.message["options"]:
            raise Boom("first attempt fails")

    return run


def always_fail(recorder: Recorder) -> Behaviour:
    def run(call: Call) -> None:
        recorder.add(call)
        raise Boom("this one never succeeds")

    return run


# -- the two libraries behind one interface ----------------------------------------------


class Side(abc.ABC):
    """One library's broker (and, once started, worker) on the test's namespace."""

    label: str

    @abc.abstractmethod
    def declare(self, actor_name: str, behaviour: Behaviour) -> None:
        """Declare an actor named ``actor_name`` on QUEUE that runs ``behaviour``."""

    @abc.abstractmethod
    def send(
        self,
        actor_name: str,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: int | None = None,
        **options: Any,
    ) -> Envelope:
        """Enqueue through this library; return the stored copy's fields."""

    @abc.abstractmethod
    def current_message(self) -> Envelope:
        """The fields of the message being processed (inside an actor)."""

    @abc.abstractmethod
    def decode(self, raw: bytes) -> Envelope:
        """Decode with this library's ``Message.decode``; return the fields it read."""

    @abc.abstractmethod
    def reencode(self, raw: bytes) -> bytes:
        """``Message.decode(raw).encode()`` with this library."""

    @abc.abstractmethod
    def start_worker(self) -> None: ...

    @abc.abstractmethod
    def stop_worker(self) -> None: ...

    @abc.abstractmethod
    def flush(self, queue_name: str) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def broker_id(self) -> str:
        """The worker id ``W`` of this side's broker (its ack sets' infix)."""

    def _wrap(self, actor_name: str, behaviour: Behaviour) -> Callable[..., None]:
        def fn(*args: Any, **kwargs: Any) -> None:
            behaviour(
                Call(
                    side=self.label,
                    actor_name=actor_name,
                    args=list(args),
                    kwargs=dict(kwargs),
                    message=self.current_message(),
                    started_ms=now_ms(),
                )
            )

        fn.__name__ = actor_name
        return fn


class DqSide(Side):
    label = "dq"

    @property
    def broker_id(self) -> str:
        return str(self.broker.broker_id)

    def __init__(self, namespace: str) -> None:
        self.broker = DqRedisBroker(namespace=namespace, host=REDIS_HOST, port=REDIS_PORT)
        self.broker.add_middleware(dq.middleware.CurrentMessage())
        dq.set_broker(self.broker)
        self.actors: dict[str, dq.Actor[..., None]] = {}
        self.worker: dq.Worker | None = None
        self.closed = False

    def declare(self, actor_name: str, behaviour: Behaviour) -> None:
        fn = self._wrap(actor_name, behaviour)
        self.actors[actor_name] = dq.actor(
            actor_name=actor_name, queue_name=QUEUE, broker=self.broker
        )(fn)

    def send(
        self,
        actor_name: str,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: int | None = None,
        **options: Any,
    ) -> Envelope:
        stored = self.actors[actor_name].send_with_options(
            args=args, kwargs=kwargs, delay=delay, **options
        )
        return envelope(stored.encode())

    def current_message(self) -> Envelope:
        message = dq.middleware.CurrentMessage.get_current_message()
        assert message is not None
        return envelope(message.encode())

    def decode(self, raw: bytes) -> Envelope:
        message = dq.Message.decode(raw)
        return {
            "queue_name": message.queue_name,
            "actor_name": message.actor_name,
            "args": json.loads(json.dumps(list(message.args))),
            "kwargs": json.loads(json.dumps(dict(message.kwargs))),
            "options": envelope(message.encode())["options"],
            "message_id": message.message_id,
            "message_timestamp": message.message_timestamp,
        }

    def reencode(self, raw: bytes) -> bytes:
        return dq.Message.decode(raw).encode()

    def start_worker(self) -> None:
        self.worker = dq.Worker(
            self.broker, worker_threads=WORKER_THREADS, worker_timeout=WORKER_TIMEOUT
        )
        self.worker.start()

    def stop_worker(self) -> None:
        if self.worker is not None:
            worker, self.worker = self.worker, None
            worker.stop()

    def flush(self, queue_name: str) -> None:
        self.broker.flush(queue_name)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.broker.close()
            self.broker.client.close()


class DramatiqSide(Side):
    label = "dramatiq"

    @property
    def broker_id(self) -> str:
        return str(self.broker.broker_id)

    def __init__(self, namespace: str) -> None:
        # Dramatiq's RedisBroker.__init__ is unannotated (the rest of its API is typed).
        self.broker = DramatiqRedisBroker(  # type: ignore[no-untyped-call]  # see above
            namespace=namespace, host=REDIS_HOST, port=REDIS_PORT
        )
        self.broker.add_middleware(dramatiq.middleware.CurrentMessage())
        dramatiq.set_broker(self.broker)
        self.actors: dict[str, dramatiq.Actor[..., None]] = {}
        self.worker: dramatiq.Worker | None = None
        self.closed = False

    def declare(self, actor_name: str, behaviour: Behaviour) -> None:
        fn = self._wrap(actor_name, behaviour)
        self.actors[actor_name] = dramatiq.actor(
            actor_name=actor_name, queue_name=QUEUE, broker=self.broker
        )(fn)

    def send(
        self,
        actor_name: str,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: int | None = None,
        **options: Any,
    ) -> Envelope:
        stored = self.actors[actor_name].send_with_options(
            args=args, kwargs=kwargs, delay=delay, **options
        )
        return envelope(stored.encode())

    def current_message(self) -> Envelope:
        message = dramatiq.middleware.CurrentMessage.get_current_message()
        assert message is not None
        return envelope(message.encode())

    def decode(self, raw: bytes) -> Envelope:
        message = dramatiq.Message.decode(raw)
        return {
            "queue_name": message.queue_name,
            "actor_name": message.actor_name,
            "args": json.loads(json.dumps(list(message.args))),
            "kwargs": json.loads(json.dumps(message.kwargs)),
            "options": json.loads(json.dumps(message.options)),
            "message_id": message.message_id,
            "message_timestamp": message.message_timestamp,
        }

    def reencode(self, raw: bytes) -> bytes:
        return dramatiq.Message.decode(raw).encode()

    def start_worker(self) -> None:
        self.worker = dramatiq.Worker(
            self.broker, worker_threads=WORKER_THREADS, worker_timeout=WORKER_TIMEOUT
        )
        self.worker.start()

    def stop_worker(self) -> None:
        if self.worker is not None:
            worker, self.worker = self.worker, None
            worker.stop()

    def flush(self, queue_name: str) -> None:
        self.broker.flush(queue_name)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.broker.close()
            self.broker.client.close()


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
class Fleet:
    """Both libraries on one namespace; ``producer`` sends and ``consumer`` works."""

    namespace: str
    client: redis.Redis
    dq: DqSide
    dramatiq: DramatiqSide
    producer: Side
    consumer: Side

    @property
    def sides(self) -> tuple[Side, Side]:
        return (self.dq, self.dramatiq)

    def declare(self, actor_name: str, behaviour: Behaviour) -> None:
        """Declare the same actor (name and queue) on both sides."""
        for side in self.sides:
            side.declare(actor_name, behaviour)

    def shutdown(self) -> None:
        """Stop both workers, then close both brokers (idempotent)."""
        for side in self.sides:
            side.stop_worker()
        for side in self.sides:
            side.close()

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

    def ack_set(self, side: Side, queue_name: str) -> set[str]:
        """The ids ``side``'s broker holds (fetched, unsettled) from ``ns:queue_name``."""
        key = self.key(f"__acks__.{side.broker_id}.{queue_name}")
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


DIRECTIONS = ["dramatiq-to-dq", "dq-to-dramatiq"]


def _restore_globals() -> Callable[[], None]:
    dq_previous = dq.broker.global_broker
    dq_floating = list(dq.broker._floating)
    dramatiq_previous = dramatiq.broker.global_broker

    def restore() -> None:
        dq.broker.global_broker = dq_previous
        dq.broker._floating[:] = dq_floating
        dramatiq.broker.global_broker = dramatiq_previous

    return restore


@pytest.fixture
def both(namespace: str, client: redis.Redis) -> Iterator[tuple[DqSide, DramatiqSide]]:
    restore = _restore_globals()
    dq_side = DqSide(namespace)
    dramatiq_side = DramatiqSide(namespace)
    try:
        yield dq_side, dramatiq_side
    finally:
        for side in (dq_side, dramatiq_side):
            side.stop_worker()
        for side in (dq_side, dramatiq_side):
            side.close()
        restore()


@pytest.fixture(params=DIRECTIONS)
def fleet(
    request: pytest.FixtureRequest,
    namespace: str,
    client: redis.Redis,
    both: tuple[DqSide, DramatiqSide],
) -> Fleet:
    dq_side, dramatiq_side = both
    producer: Side
    consumer: Side
    if request.param == "dramatiq-to-dq":
        producer, consumer = dramatiq_side, dq_side
    else:
        producer, consumer = dq_side, dramatiq_side
    return Fleet(namespace, client, dq_side, dramatiq_side, producer, consumer)


@pytest.fixture
def mixed(namespace: str, client: redis.Redis, both: tuple[DqSide, DramatiqSide]) -> Fleet:
    dq_side, dramatiq_side = both
    return Fleet(namespace, client, dq_side, dramatiq_side, dq_side, dramatiq_side)


# -- the tests -----------------------------------------------------------------------------


def test_plain_messages_cross_and_run_exactly_once(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("echo", record(recorder))
    sent: dict[str, tuple[list[Any], dict[str, Any]]] = {}
    for i in range(30):
        args = (i, f"s{i}", [i, {"nested": i * 1.5}], None, i % 2 == 0)
        kwargs = {"k": [i], "text": 'é€😀 /\\"', "big": 2**70 + i}
        stored = fleet.producer.send("echo", args=args, kwargs=kwargs)
        sent[stored["message_id"]] = (list(args), kwargs)
        assert stored["queue_name"] == QUEUE
        assert "eta" not in stored["options"]

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= len(sent))
    fleet.assert_nothing_left()

    calls = recorder.calls  # everything, after the workers stopped
    counts = Counter(call.message["message_id"] for call in calls)
    assert counts == dict.fromkeys(sent, 1), "every message exactly once"
    for call in calls:
        assert call.side == fleet.consumer.label
        sent_args, sent_kwargs = sent[call.message["message_id"]]
        assert call.args == sent_args
        assert call.kwargs == sent_kwargs
        assert call.message["queue_name"] == QUEUE
        assert call.message["actor_name"] == "echo"


def test_delayed_messages_are_promoted_by_the_consumer_after_their_eta(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("later", record(recorder))
    fleet.declare("now", record(recorder))

    delayed = [fleet.producer.send("later", args=(i,), delay=200) for i in range(3)]
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
    immediate = fleet.producer.send("now", args=("go",))

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= 4)
    fleet.assert_nothing_left()

    calls = recorder.calls
    assert Counter(c.message["message_id"] for c in calls) == {
        m["message_id"]: 1 for m in [*delayed, immediate]
    }
    by_id = {c.message["message_id"]: c for c in calls}
    assert by_id[immediate["message_id"]].started_ms < min(
        by_id[m["message_id"]].started_ms for m in delayed
    )
    for stored in delayed:
        call = by_id[stored["message_id"]]
        assert call.side == fleet.consumer.label
        assert call.started_ms >= stored["options"]["eta"], "ran before its eta"
        # Promoted (spec §3.8 step 3): canonical queue, no eta, a new redis_message_id.
        assert call.message["queue_name"] == QUEUE
        assert "eta" not in call.message["options"]
        assert call.message["options"]["redis_message_id"] != stored["options"]["redis_message_id"]
        assert call.message["message_timestamp"] == stored["message_timestamp"]
        assert call.args == stored["args"]


def test_a_message_that_fails_once_is_retried_through_the_delay_queue(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("flaky", fail_first_attempt(recorder))
    stored = fleet.producer.send("flaky", args=(7,), kwargs={"x": "y"}, max_retries=3, **FAST_RETRY)

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= 2)
    fleet.assert_nothing_left()

    first, second = recorder.calls
    for call in (first, second):
        assert call.side == fleet.consumer.label
        assert call.message["message_id"] == stored["message_id"]
        assert call.message["message_timestamp"] == stored["message_timestamp"]
        assert call.message["queue_name"] == QUEUE
        assert "eta" not in call.message["options"]
        assert call.args == [7]
        assert call.kwargs == {"x": "y"}
    assert "retries" not in first.message["options"]
    assert first.message["options"] == stored["options"]
    options = second.message["options"]
    assert options["retries"] == 1
    assert isinstance(options["traceback"], str)
    assert "Boom" in options["traceback"]
    assert isinstance(options["requeue_timestamp"], int)
    assert options["max_retries"] == 3
    assert options["min_backoff"] == 50
    assert options["max_backoff"] == 100
    assert options["redis_message_id"] != stored["options"]["redis_message_id"]
    # The retry waited its backoff (50-100 ms) in the delay queue.
    assert second.started_ms - first.started_ms >= 49
    assert len(recorder.calls) == 2


def test_a_retry_stored_by_one_library_is_run_by_the_other(fleet: Fleet) -> None:
    """The consumer's first attempt fails and it stores the retry on Q.DQ; it stops
    before the retry is due, and the producer's worker promotes and runs it."""
    recorder = Recorder()
    fleet.declare("flaky", fail_first_attempt(recorder))
    # A 500-1000 ms backoff: the consumer is stopped well before the retry is due.
    stored = fleet.producer.send(
        "flaky", args=(1,), max_retries=3, min_backoff=1000, max_backoff=1000
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
    for side in fleet.sides:
        assert side.decode(raw) == retry, side.label
        assert side.reencode(raw) == raw, side.label

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
    sent = [fleet.producer.send("later", args=(i,), delay=1000) for i in range(3)]
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
    fleet.declare("doomed", always_fail(recorder))
    before = now_ms()
    stored = fleet.producer.send("doomed", args=("x",), max_retries=0, **FAST_RETRY)
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
    for side in fleet.sides:
        assert side.decode(dead) == stored, side.label
        assert side.reencode(dead) == dead, side.label

    # Either library's flush purges the dead letters (purge deletes Q.XQ and Q.XQ.msgs).
    fleet.producer.flush(QUEUE)
    fleet.assert_nothing_left()


def test_a_message_for_an_actor_only_the_producer_knows_is_dead_lettered(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("known", record(recorder))
    fleet.producer.declare("ghost", record(recorder))
    ghost = fleet.producer.send("ghost", args=(1,))
    raw = fleet.stored(QUEUE, ghost["options"]["redis_message_id"])
    known = fleet.producer.send("known", args=(2,))

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
    args = (
        1,
        -2,
        2**70,
        0.1,
        1e100,
        -0.0,
        True,
        None,
        'é€😀 </script> \\ " \n \t \x00',
        [1, [2, {"a": None}]],
        {"b": 1, "a": 2, "ü": [3.25]},
    )
    kwargs = {"z": "last", "a": {"nested": [1.5, "x"]}, "ü": 1}
    options = {"max_retries": 3, "time_limit": 60000}
    plain = fleet.producer.send("payload", args=args, kwargs=kwargs, **options)
    delayed = fleet.producer.send("payload", args=args, kwargs=kwargs, delay=100, **options)

    for stored, queue_name in ((plain, QUEUE), (delayed, f"{QUEUE}.DQ")):
        rid = stored["options"]["redis_message_id"]
        assert fleet.key_type(queue_name) == "list"
        assert fleet.key_type(f"{queue_name}.msgs") == "hash"
        assert fleet.list_ids(queue_name) == [rid]
        raw = fleet.stored(queue_name, rid)
        assert envelope(raw) == stored
        assert list(envelope(raw)) == [
            "queue_name",
            "actor_name",
            "args",
            "kwargs",
            "options",
            "message_id",
            "message_timestamp",
        ]
        assert list(envelope(raw)["kwargs"]) == ["z", "a", "ü"]
        # Dramatiq's encoding: compact separators, ensure_ascii, key order kept (spec §1.2).
        assert raw == json.dumps(envelope(raw), separators=(",", ":")).encode()
        for side in fleet.sides:
            assert side.decode(raw) == stored, side.label
            assert side.reencode(raw) == raw, side.label
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
    mixed.declare("flaky", fail_first_attempt(recorder))
    for side in mixed.sides:
        side.start_worker()

    plain: list[str] = []
    flaky: list[str] = []
    for side in mixed.sides:
        for i in range(20):
            plain.append(side.send("echo", args=(side.label, i))["message_id"])
        for i in range(2):
            plain.append(side.send("echo", args=(side.label, i), delay=150)["message_id"])
        for i in range(3):
            flaky.append(side.send("flaky", args=(i,), max_retries=3, **FAST_RETRY)["message_id"])

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
