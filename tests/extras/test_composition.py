"""Pipelines and groups: results, completion and failure callbacks, group steps in
pipelines, the in-actor wait guard, and atomic completion counting under many
threads, on the Stub, Redis and Memcached backends.

End-to-end tests run a real `dq.Worker` on a `StubBroker` (stub or Memcached backends)
or a `RedisBroker` (Redis backends). The counting tests drive the `GroupCallbacks`
middleware directly from many threads, with the members of many groups completing
(or failing) in a shuffled order, and count the callbacks enqueued.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from pymemcache.client.base import Client as MemcacheClient

import dq
import dq.broker
from dq import Worker
from dq.broker import Broker, MessageProxy
from dq.brokers.redis import RedisBroker
from dq.brokers.stub import StubBroker
from dq.middleware import GroupCallbacks, Retries
from dq.rate_limits import RateLimiterBackend
from dq.rate_limits.backends import MemcachedBackend as RLMemcached
from dq.rate_limits.backends import RedisBackend as RLRedis
from dq.rate_limits.backends import StubBackend as RLStub
from dq.results import ResultMissing, Results, ResultTimeout
from dq.results.backend import ResultBackend
from dq.results.backends import MemcachedBackend as ResultsMemcached
from dq.results.backends import RedisBackend as ResultsRedis
from dq.results.backends import StubBackend as ResultsStub
from tests.support.backends import BACKENDS
from tests.support.redis_helpers import REDIS_URL, delete_namespace, new_namespace

MEMCACHED = "127.0.0.1:11211"


class RecordingRedisLimits(RLRedis):
    """The Redis rate-limiter backend, remembering the keys it wrote (barrier keys
    are bare uuids, as on the wire: no namespace to delete them by)."""

    written: set[str]

    def add(self, key: str, value: int, ttl: int) -> bool:
        self.written.add(key)
        return super().add(key, value, ttl)

    def wait_notify(self, key: str, ttl: int) -> None:
        self.written.add(key)
        super().wait_notify(key, ttl)


class RecordingMemcachedLimits(RLMemcached):
    """The Memcached rate-limiter backend, remembering the keys it wrote."""

    written: set[str]

    def add(self, key: str, value: int, ttl: int) -> bool:
        self.written.add(key)
        return super().add(key, value, ttl)

    def wait_notify(self, key: str, ttl: int) -> None:
        self.written.add(key)
        super().wait_notify(key, ttl)


class Stack:
    """A broker with Results and GroupCallbacks on one kind of backend."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.namespace = new_namespace("dq-test-comp")
        self.results: ResultBackend
        self.limits: RateLimiterBackend
        self.broker: Broker
        if kind == "redis":
            self.results = ResultsRedis(
                url=REDIS_URL, namespace=self.namespace, use_namespace_prefix_keys=True
            )
            self.limits = RecordingRedisLimits(url=REDIS_URL)
            self.limits.written = set()
            self.broker = RedisBroker(
                url=REDIS_URL, namespace=self.namespace, heartbeat_timeout=1000
            )
        else:
            if kind == "memcached":
                self.results = ResultsMemcached(servers=[MEMCACHED], namespace=self.namespace)
                self.limits = RecordingMemcachedLimits(servers=[MEMCACHED])
                self.limits.written = set()
            else:
                self.results = ResultsStub(namespace=self.namespace)
                self.limits = RLStub()
            self.broker = StubBroker()
        # Memcached cannot list keys: results left there expire after a minute.
        self.broker.add_middleware(Results(backend=self.results, result_ttl=60_000))
        self.group_callbacks = GroupCallbacks(self.limits, barrier_ttl=60_000)
        self.broker.add_middleware(self.group_callbacks)
        for m in self.broker.middleware:
            if isinstance(m, Retries):
                m.min_backoff = 10
                m.max_backoff = 50

    def close(self) -> None:
        self.broker.close()
        if isinstance(self.limits, RecordingRedisLimits):
            conn = redis.Redis.from_url(REDIS_URL)
            delete_namespace(conn, self.namespace)
            if self.limits.written:
                conn.delete(*self.limits.written)
            conn.close()
        elif isinstance(self.limits, RecordingMemcachedLimits):
            self.limits.pool.close()  # its sockets, not left for the garbage collector
            if isinstance(self.results, ResultsMemcached):
                self.results.pool.close()
            client = MemcacheClient(MEMCACHED)
            client.delete_many(list(self.limits.written), noreply=False)
            client.close()


@pytest.fixture(params=BACKENDS)
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    previous = dq.broker.global_broker
    s = Stack(request.param)
    dq.set_broker(s.broker)
    yield s
    s.close()
    dq.broker.global_broker = previous


@pytest.fixture
def stub_stack() -> Iterator[Stack]:
    previous = dq.broker.global_broker
    s = Stack("stub")
    dq.set_broker(s.broker)
    yield s
    s.close()
    dq.broker.global_broker = previous


class Running:
    """A worker on the stack's broker for the duration of a ``with`` block."""

    def __init__(self, stack: Stack, threads: int = 4) -> None:
        self.worker = Worker(stack.broker, worker_threads=threads, worker_timeout=20)

    def __enter__(self) -> Running:
        self.worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()


class Calls:
    """A thread-safe record of actor calls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[Any] = []

    def add(self, item: Any) -> None:
        with self.lock:
            self.items.append(item)


# -- pipelines ---------------------------------------------------------------------------


def test_pipeline_results(stack: Stack) -> None:
    @dq.actor(store_results=True)
    def add(x: int, y: int) -> int:
        return x + y

    @dq.actor(store_results=True)
    def double(x: int) -> int:
        return 2 * x

    p = add.message(1, 2) | double.message_with_options() | double.message_with_options()
    assert len(p) == 3
    assert [p.completed, p.completed_count] == [False, 0]
    with pytest.raises(ResultMissing):
        p.get_result()
    with Running(stack):
        p.run()
        assert p.get_result(block=True, timeout=10_000) == 12
        assert list(p.get_results(block=True, timeout=10_000)) == [3, 6, 12]
    assert [p.completed, p.completed_count] == [True, 3]


def test_pipeline_wait_times_out(stub_stack: Stack) -> None:
    @dq.actor(store_results=True)
    def never_run() -> int:
        return 1

    p = never_run.message() | never_run.message()
    with pytest.raises(ResultTimeout):
        p.get_result(block=True, timeout=100)
    with pytest.raises(ResultTimeout):
        list(p.get_results(block=True, timeout=100))


# -- groups ------------------------------------------------------------------------------


def test_group_results_in_child_order(stack: Stack) -> None:
    @dq.actor(store_results=True)
    def square(x: int) -> int:
        return x * x

    g = dq.group(
        [
            square.message(1),
            square.message(2) | square.message_with_options(),
            dq.group([square.message(3), square.message(4)]),
        ]
    )
    assert g.completed_count == 0
    with Running(stack):
        g.run()
        g.wait(timeout=10_000)
    assert list(g.get_results()) == [1, 16, [9, 16]]
    assert g.completed is True
    assert g.completed_count == 3


def test_group_wait_times_out_and_counts_what_finished(stub_stack: Stack) -> None:
    @dq.actor(store_results=True)
    def value(x: int) -> int:
        return x

    done = value.message(1)
    pending = value.message(2)
    stub_stack.broker.enqueue(done)
    with Running(stub_stack):
        assert done.get_result(block=True, timeout=10_000) == 1
    g = dq.group([pending, done])  # never run: `pending` never gets a result
    assert g.completed_count == 1
    assert g.completed is False
    with pytest.raises(ResultTimeout):
        g.wait(timeout=100)


def test_completion_callback_fires_once_after_every_child(stack: Stack) -> None:
    calls = Calls()

    @dq.actor(store_results=True)
    def work(x: int) -> int:
        calls.add(("work", x))
        return x

    @dq.actor(store_results=True)
    def done(tag: str) -> str:
        calls.add(("done", tag))
        return tag

    callback = done.message("all")
    g = dq.group(
        [
            work.message(1),
            work.message(2) | work.message_with_options(args=(3,), pipe_ignore=True),
            work.message(4),
        ]
    )
    g.add_completion_callback(callback)
    with Running(stack):
        g.run()
        assert callback.get_result(block=True, timeout=10_000) == "all"
        stack.broker.join("default", timeout=10_000)
    assert Counter(c[0] for c in calls.items) == {"work": 4, "done": 1}
    assert calls.items[-1] == ("done", "all")


def test_failure_callback_fires_once_and_completion_never(stack: Stack) -> None:
    calls = Calls()

    @dq.actor(store_results=True, max_retries=1)
    def flaky(x: int) -> int:
        if x < 0:
            raise ValueError(f"bad {x}")
        return x

    @dq.actor(store_results=True)
    def report(tag: str) -> str:
        calls.add(tag)
        return tag

    completed = report.message("completed")
    failed = report.message("failed")
    g = dq.group([flaky.message(1), flaky.message(-1), flaky.message(-2), flaky.message(3)])
    g.add_completion_callback(completed)
    g.add_failure_callback(failed)
    assert len(g.failure_callbacks) == 1
    with Running(stack):
        g.run()
        assert failed.get_result(block=True, timeout=10_000) == "failed"
        _join(stack)
    assert calls.items == ["failed"]
    with pytest.raises(ResultMissing):
        completed.get_result()


def test_failure_callback_covers_every_step_of_a_child_pipeline(stub_stack: Stack) -> None:
    @dq.actor(store_results=True, max_retries=0)
    def boom() -> int:
        raise RuntimeError("boom")

    @dq.actor(store_results=True)
    def report(tag: str) -> str:
        return tag

    @dq.actor(store_results=True)
    def after(x: int) -> int:
        return x

    failed = report.message("failed")
    g = dq.group([boom.message() | after.message_with_options()])
    g.add_failure_callback(failed)
    with Running(stub_stack):
        g.run()
        assert failed.get_result(block=True, timeout=10_000) == "failed"


def test_failure_callback_option_is_on_the_wire(stub_stack: Stack) -> None:
    @dq.actor
    def noop() -> None:
        pass

    g = dq.group([noop.message(), noop.message() | noop.message()])
    g.add_failure_callback(noop.message())
    g.run()
    queued = _drain(stub_stack.broker, "default")
    assert len(queued) == 2
    for proxy in queued:
        assert proxy.options["group_failure_callbacks"][0]["actor_name"] == "noop"
        assert proxy.options["group_completion_uuid"]
        # No completion callbacks: Dramatiq's GroupCallbacks would do nothing.
        assert "group_completion_callbacks" not in proxy.options


def test_callbacks_need_group_callbacks_middleware() -> None:
    previous = dq.broker.global_broker
    broker = StubBroker()
    dq.set_broker(broker)
    try:

        @dq.actor
        def noop() -> None:
            pass

        for add in ("add_completion_callback", "add_failure_callback"):
            g = dq.group([noop.message()])
            getattr(g, add)(noop.message())
            with pytest.raises(RuntimeError, match="GroupCallbacks middleware not found"):
                g.run()
        with pytest.raises(RuntimeError, match="GroupCallbacks middleware not found"):
            (dq.group([noop.message()]) | noop.message()).run()
        assert broker.queues["default"].qsize() == 0
    finally:
        broker.close()
        dq.broker.global_broker = previous


def test_callbacks_with_a_nested_group_are_not_implemented(stub_stack: Stack) -> None:
    @dq.actor
    def noop() -> None:
        pass

    g = dq.group([noop.message(), dq.group([noop.message()])])
    g.add_completion_callback(noop.message())
    with pytest.raises(NotImplementedError):
        g.run()
    with pytest.raises(NotImplementedError, match="followed by a message"):
        dq.pipeline([dq.group([noop.message()]), dq.group([noop.message()])])


# -- groups as pipeline steps ------------------------------------------------------------


def test_group_step_receives_the_previous_result_and_hands_on_a_list(stack: Stack) -> None:
    @dq.actor(store_results=True)
    def start(x: int) -> int:
        return x

    @dq.actor(store_results=True)
    def times(factor: int, x: int) -> int:
        return factor * x

    @dq.actor(store_results=True)
    def total(values: list[int]) -> int:
        return sum(values)

    # (`message | group` works too, but Message.__or__ is typed for messages and
    # pipelines only.)
    step = dq.group([times.message_with_options(args=(2,)), times.message_with_options(args=(3,))])
    p = (
        dq.pipeline([start.message(5), step])
        | total.message_with_options()
        | times.message_with_options(args=(2,))
    )
    assert len(p) == 4
    assert len(p.messages) == 3  # the message steps
    assert "pipe_group" in p.steps[0].options  # type: ignore[union-attr]
    with Running(stack):
        p.run()
        assert p.get_result(block=True, timeout=10_000) == 50
        assert list(p.get_results(block=True, timeout=10_000)) == [5, [10, 15], 25, 50]
    assert p.completed_count == 4


def test_group_as_first_and_last_step(stack: Stack) -> None:
    @dq.actor(store_results=True)
    def value(x: int) -> int:
        return x

    @dq.actor(store_results=True)
    def collect(values: list[int]) -> list[int]:
        return values

    first = (
        dq.group(
            [
                value.message(1),
                value.message(2) | value.message_with_options(args=(7,), pipe_ignore=True),
            ]
        )
        | collect.message_with_options()
    )
    last = dq.pipeline(
        [value.message(3), dq.group([value.message_with_options(args=(4,), pipe_ignore=True)])]
    )
    with Running(stack):
        first.run()
        last.run()
        assert first.get_result(block=True, timeout=10_000) == [1, 7]
        assert last.get_result(block=True, timeout=10_000) == [4]


def test_failing_group_step_ends_the_pipeline_and_fires_the_failure_callback(
    stub_stack: Stack,
) -> None:
    calls = Calls()

    @dq.actor(store_results=True, max_retries=0)
    def check(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x

    @dq.actor(store_results=True)
    def after(values: list[int]) -> None:
        calls.add(values)

    @dq.actor(store_results=True)
    def report() -> str:
        return "failed"

    step = dq.group([check.message(1), check.message(-1)])
    failed = report.message()
    step.add_failure_callback(failed)
    p = step | after.message_with_options()
    with Running(stub_stack):
        p.run()
        assert failed.get_result(block=True, timeout=10_000) == "failed"
        _join(stub_stack)
    assert calls.items == []


# -- waiting inside an actor -------------------------------------------------------------


def test_waiting_on_a_group_inside_an_actor_raises(stub_stack: Stack) -> None:
    @dq.actor(store_results=True)
    def child() -> int:
        return 1

    @dq.actor(store_results=True)
    def parent() -> str:
        g = dq.group([child.message()]).run()
        messages = []
        for call in (g.wait, lambda: list(g.get_results(block=True))):
            try:
                call()
            except RuntimeError as e:
                messages.append(str(e))
        p = dq.pipeline([child.message()]).run()
        try:
            p.get_result(block=True)
        except RuntimeError as e:
            messages.append(str(e))
        return " | ".join(messages)

    message = parent.send()
    with Running(stub_stack, threads=1):
        text = message.get_result(block=True, timeout=10_000)
    assert text.count("inside an actor") == 3
    assert "group.wait(block=True)" in text
    assert "pipeline.get_result(block=True)" in text


# -- atomic completion counting ----------------------------------------------------------

GROUPS = 200
MEMBERS = 10
THREADS = 16


def test_completion_and_failure_callbacks_fire_exactly_once_under_threads(
    stack: Stack,
) -> None:
    """200 groups x 10 members (2000 completions) delivered by 16 threads in a shuffled
    order: each of the 150 succeeding groups enqueues its completion callback once,
    each of the 50 groups with 3 failing members its failure callback once."""
    broker = stack.broker

    @dq.actor
    def member(i: int) -> None:
        pass

    @dq.actor(queue_name="callbacks")
    def callback(kind: str, index: int) -> None:
        pass

    for i in range(GROUPS):
        g = dq.group([member.message(i) for _ in range(MEMBERS)])
        g.add_completion_callback(callback.message("completed", i))
        g.add_failure_callback(callback.message("failed", i))
        g.run()
    queued = _drain(broker, "default")
    assert len(queued) == GROUPS * MEMBERS
    by_group: dict[int, list[MessageProxy]] = {}
    for proxy in queued:
        by_group.setdefault(proxy.args[0], []).append(proxy)
    events: list[tuple[str, MessageProxy]] = []
    for i, members in by_group.items():
        failing = 3 if i % 4 == 0 else 0
        events += [("fail", m) for m in members[:failing]]
        events += [("ok", m) for m in members[failing:]]
    random.Random(9).shuffle(events)
    middleware = stack.group_callbacks
    start = threading.Barrier(THREADS, timeout=30)
    errors: list[BaseException] = []

    def deliver(share: list[tuple[str, MessageProxy]]) -> None:
        try:
            start.wait()
            for kind, proxy in share:
                if kind == "ok":
                    middleware.after_process_message(broker, proxy, result=None)
                else:
                    proxy.fail()
                    middleware.after_nack(broker, proxy)
                assert not proxy.redelivery_requested
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=deliver, args=(events[t::THREADS],)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    fired = Counter((p.args[0], p.args[1]) for p in _drain(broker, "callbacks"))
    expected = Counter(("failed" if i % 4 == 0 else "completed", i) for i in range(GROUPS))
    assert fired == expected  # each exactly once, none of the other kind


def test_group_callbacks_end_to_end_many_groups(stack: Stack) -> None:
    """20 groups x 10 members through a real 8-thread worker: 20 callbacks, once each."""
    calls = Calls()

    @dq.actor
    def member(i: int) -> None:
        pass

    @dq.actor(queue_name="callbacks")
    def callback(i: int) -> None:
        calls.add(i)

    for i in range(20):
        g = dq.group([member.message(i) for _ in range(10)])
        g.add_completion_callback(callback.message(i))
        g.run()
    with Running(stack, threads=8):
        _join(stack, "default")
        _join(stack, "callbacks")
    assert sorted(calls.items) == list(range(20))


# -- the middleware itself ---------------------------------------------------------------


def test_group_callbacks_attributes_and_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = RLStub()
    m = GroupCallbacks(backend)
    assert (m.rate_limiter_backend, m.barrier_ttl) == (backend, 86_400_000)
    assert m.actor_options == set()
    monkeypatch.setenv("dramatiq_group_callback_barrier_ttl", "1234")
    with pytest.warns(FutureWarning, match="barrier_ttl"):
        assert GroupCallbacks(backend, barrier_ttl=5).barrier_ttl == 1234
    monkeypatch.setenv("dramatiq_group_callback_barrier_ttl", "soon")
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="got 'soon'"):
        GroupCallbacks(backend)


def test_barrier_keys_are_dramatiqs(stub_stack: Stack) -> None:
    @dq.actor
    def noop() -> None:
        pass

    g = dq.group([noop.message(), noop.message(), noop.message()])
    g.add_completion_callback(noop.message())
    g.run()
    (first, *_) = _drain(stub_stack.broker, "default")
    key = first.options["group_completion_uuid"]
    assert str(uuid.UUID(key)) == key
    limits = stub_stack.limits
    assert isinstance(limits, RLStub)
    assert limits._get(key) == 3


# -- helpers -----------------------------------------------------------------------------


def _drain(broker: Broker, queue_name: str) -> list[MessageProxy]:
    """Take every waiting message of ``queue_name`` (acking them)."""
    consumer = broker.consume(queue_name, prefetch=10_000, timeout=100)
    taken: list[MessageProxy] = []
    try:
        while True:
            try:
                proxy = next(consumer)
            except StopIteration:
                break
            taken.append(proxy)
        for proxy in taken:
            consumer.ack(proxy)
    finally:
        consumer.close()
    return taken


def _join(stack: Stack, queue_name: str = "default") -> None:
    if isinstance(stack.broker, StubBroker):
        stack.broker.join(queue_name, timeout=20_000, fail_fast=False)
    else:
        stack.broker.join(queue_name, timeout=20_000)
