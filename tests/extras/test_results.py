"""dq.results: backends (Stub, real Redis, real Memcached), the Results middleware and
`Message.get_result`, end to end with workers on StubBroker and RedisBroker.

Server tests use a namespace of their own and delete every key they wrote.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from pymemcache.client.base import Client as MemcacheClient

import dq
import dq.broker
from dq import Message
from dq.brokers.redis import RedisBroker
from dq.brokers.stub import StubBroker
from dq.encoder import PickleEncoder
from dq.errors import DecodeError
from dq.middleware import AgeLimit, Middleware, Retries, SkipMessage
from dq.results import (
    Missing,
    ResultBackend,
    ResultError,
    ResultFailure,
    ResultMissing,
    Results,
    ResultTimeout,
)
from dq.results.backend import DEFAULT_TIMEOUT, MResult
from dq.results.backends import MemcachedBackend, RedisBackend, StubBackend
from dq.results.backends.memcached import expire_seconds, parse_servers
from dq.results.middleware import DEFAULT_RESULT_TTL
from tests.support import redis_helpers as redis_support
from tests.support.backends import BACKENDS
from tests.support.global_broker import installed

MEMCACHED = ("127.0.0.1", 11211)

#: Concurrency test size: threads x results per thread, on every backend.
THREADS = 8
PER_THREAD = 500


# -- backends under test ---------------------------------------------------------------------


@dataclass
class Env:
    """A backend on a private namespace, and the messages a test made (for cleanup)."""

    kind: str
    backend: ResultBackend
    namespace: str
    messages: list[Message[Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def message(self, actor_name: str = "act", queue_name: str = "default") -> Message[Any]:
        message: Message[Any] = Message(queue_name, actor_name)
        with self.lock:
            self.messages.append(message)
        return message

    def make(self, **kwargs: Any) -> ResultBackend:
        """Another backend of the same kind on the same server."""
        return _backend(self.kind, self.namespace, **kwargs)

    def expire_margin_s(self, ttl_ms: int) -> float:
        """How long after storing a result with ``ttl_ms`` it is surely gone."""
        if self.kind == "memcached":
            return expire_seconds(ttl_ms) + 0.3
        return ttl_ms / 1000 + 0.3


def _backend(kind: str, namespace: str, **kwargs: Any) -> ResultBackend:
    kwargs.setdefault("namespace", namespace)
    kwargs.setdefault("use_namespace_prefix_keys", True)
    if kind == "stub":
        return StubBackend(**kwargs)
    if kind == "redis":
        return RedisBackend(url=redis_support.REDIS_URL, **kwargs)
    return MemcachedBackend(servers=[f"{MEMCACHED[0]}:{MEMCACHED[1]}"], **kwargs)


def _cleanup(env: Env) -> None:
    backends = [env.backend, env.make(use_namespace_prefix_keys=False)]
    keys = {b.build_message_key(m) for b in backends for m in env.messages}
    if env.kind == "redis":
        conn = redis_support.client()
        if keys:
            conn.delete(*keys)
        redis_support.delete_namespace(conn, env.namespace)
        conn.close()
    elif env.kind == "memcached":
        for backend in backends:
            assert isinstance(backend, MemcachedBackend)
            backend.pool.close()  # its sockets, not left for the garbage collector
        client = MemcacheClient(MEMCACHED)
        for key in keys:
            client.delete(key, noreply=False)
        client.close()


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    kind: str = request.param
    namespace = f"dq-results-{uuid.uuid4().hex}"
    result = Env(kind, _backend(kind, namespace), namespace)
    yield result
    _cleanup(result)


# -- keys ----------------------------------------------------------------------------------


def test_keys_are_dramatiqs() -> None:
    message: Message[Any] = Message(
        "default", "add", message_id="9999ab8e-0000-4000-8000-000000000000"
    )
    base = "dramatiq-results:default:add:9999ab8e-0000-4000-8000-000000000000"
    assert StubBackend().build_message_key(message) == hashlib.md5(base.encode()).hexdigest()
    assert StubBackend(use_namespace_prefix_keys=True).build_message_key(message) == base
    # A delayed copy (queue "default.DQ") shares the key; the namespace is the prefix.
    delayed = message.copy(queue_name="default.DQ")
    assert StubBackend().build_message_key(delayed) == StubBackend().build_message_key(message)
    assert (
        StubBackend(namespace="ns", use_namespace_prefix_keys=True).build_message_key(delayed)
        == "ns:default:add:9999ab8e-0000-4000-8000-000000000000"
    )


# -- every backend ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [3, "text", None, 2.5, True, [1, "a", None], {"nested": {"list": [1, 2]}}]
)
def test_round_trip(env: Env, value: Any) -> None:
    message = env.message()
    env.backend.store_result(message, value, 10_000)
    assert env.backend.get_result(message) == value
    # Reading neither consumes nor changes it; blocking reads see it too.
    assert env.backend.get_result(message, block=True, timeout=1000) == value
    assert env.backend.get_result(message) == value
    # Another instance on the same server/namespace reads it (not the Stub: in memory).
    if env.kind != "stub":
        assert env.make().get_result(message) == value


def test_missing_and_timeout(env: Env) -> None:
    message = env.message()
    with pytest.raises(ResultMissing) as missing:
        env.backend.get_result(message)
    assert missing.value.message is message
    with pytest.raises(ResultTimeout) as timed_out:
        env.backend.get_result(message, block=True, timeout=300)
    assert timed_out.value.message is message
    with pytest.raises(ResultTimeout):
        env.backend.get_result(message, block=True, timeout=0)


def test_a_result_stored_while_a_reader_is_blocked_wakes_it(env: Env) -> None:
    message = env.message()
    got: list[Any] = []
    reader = threading.Thread(
        target=lambda: got.append(env.backend.get_result(message, block=True, timeout=10_000))
    )
    reader.start()
    time.sleep(0.2)  # let the reader block first (the test passes either way)
    writer = env.backend if env.kind == "stub" else env.make()  # another connection
    writer.store_result(message, {"late": True}, 10_000)
    reader.join(15)
    assert got == [{"late": True}]


def test_results_expire_after_their_ttl(env: Env) -> None:
    message = env.message()
    env.backend.store_result(message, 1, 200)
    assert env.backend.get_result(message) == 1
    time.sleep(env.expire_margin_s(200))
    with pytest.raises(ResultMissing):
        env.backend.get_result(message)


def test_stored_failures_raise_result_failure(env: Env) -> None:
    message = env.message()
    env.backend.store_exception(message, ValueError("bad value"), 10_000)
    for block in (False, True):
        with pytest.raises(ResultFailure) as failure:
            env.backend.get_result(message, block=block)
        assert failure.value.orig_exc_type == "ValueError"
        assert failure.value.orig_exc_msg == "bad value"
        assert str(failure.value) == "actor raised ValueError: bad value"
        assert isinstance(failure.value, ResultError)


def test_a_new_result_replaces_the_old_one(env: Env) -> None:
    message = env.message()
    env.backend.store_exception(message, KeyError("k"), 10_000)
    env.backend.store_result(message, "second", 10_000)
    assert env.backend.get_result(message) == "second"


def test_bad_ttls_and_values_are_refused(env: Env) -> None:
    message = env.message()
    with pytest.raises(ValueError, match="at least 1 ms, got 0"):
        env.backend.store_result(message, 1, 0)
    with pytest.raises(TypeError, match="number of ms"):
        env.backend.store_result(message, 1, "10s")  # type: ignore[arg-type]  # the point
    with pytest.raises(TypeError, match="object"):
        env.backend.store_result(message, object(), 1000)
    with pytest.raises(ResultMissing):
        env.backend.get_result(message)


def test_many_threads_store_and_read_at_once(env: Env) -> None:
    """THREADS writers store PER_THREAD results each while THREADS readers wait on
    them (blocking) and every writer reads its own back: each value arrives intact."""
    batches = [[env.message(actor_name=f"a{t}") for _ in range(PER_THREAD)] for t in range(THREADS)]
    errors: list[BaseException] = []
    read_back = [0] * THREADS
    waited = [0] * THREADS

    def write(t: int) -> None:
        try:
            for i, message in enumerate(batches[t]):
                env.backend.store_result(message, [t, i, message.message_id], 60_000)
            for i, message in enumerate(batches[t]):
                assert env.backend.get_result(message) == [t, i, message.message_id]
                read_back[t] += 1
        except BaseException as e:
            errors.append(e)

    def wait(t: int) -> None:
        try:
            for i, message in enumerate(batches[t]):
                value = env.backend.get_result(message, block=True, timeout=30_000)
                assert value == [t, i, message.message_id]
                waited[t] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=wait, args=(t,)) for t in range(THREADS)]
    threads += [threading.Thread(target=write, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert read_back == [PER_THREAD] * THREADS
    assert waited == [PER_THREAD] * THREADS


# -- backend specifics --------------------------------------------------------------------------


@dataclass
class DictBackend(ResultBackend):
    """A custom backend implementing only the two hooks (Dramatiq's extension API)."""

    store: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__()

    def _get(self, message_key: str) -> MResult:
        return self.store.get(message_key, Missing)

    def _store(self, message_key: str, result: Any, ttl: int) -> None:
        self.store[message_key] = result


def test_a_custom_backend_gets_polling_reads_from_the_hooks() -> None:
    backend = DictBackend()
    message: Message[Any] = Message("q", "a")
    with pytest.raises(ResultMissing):
        backend.get_result(message)
    threading.Timer(0.15, backend.store_result, (message, "polled", 1000)).start()
    assert backend.get_result(message, block=True, timeout=10_000) == "polled"
    backend.store_exception(message, RuntimeError("x"), 1000)
    with pytest.raises(ResultFailure, match="actor raised RuntimeError: x"):
        backend.get_result(message)
    with pytest.raises(ResultTimeout):
        backend.get_result(Message("q", "a"), block=True, timeout=150)


def test_the_base_class_hooks_are_abstract() -> None:
    with pytest.raises(NotImplementedError, match="ResultBackend does not implement _get"):
        ResultBackend().get_result(Message("q", "a"))
    with pytest.raises(NotImplementedError, match="does not implement _store"):
        ResultBackend().store_result(Message("q", "a"), 1, 1000)


def test_stub_backends_are_separate_and_use_the_runtime_clock() -> None:
    message: Message[Any] = Message("q", "a")
    one, other = StubBackend(), StubBackend()
    one.store_result(message, 1, 50)
    with pytest.raises(ResultMissing):
        other.get_result(message)
    # 50 ms is not truncated to 0 s (Dramatiq's stub would have expired it at once).
    assert one.get_result(message) == 1
    one.flush()
    with pytest.raises(ResultMissing):
        one.get_result(message)


def test_stub_backend_with_pickle_encoder_and_undecodable_data() -> None:
    backend = StubBackend(encoder=PickleEncoder())
    message: Message[Any] = Message("q", "a")
    backend.store_result(message, {1, 2}, 1000)  # a set: pickle only
    assert backend.get_result(message) == {1, 2}
    json_backend = StubBackend()
    json_backend.results[json_backend.build_message_key(message)] = (b"\xff not json", 2**62)
    with pytest.raises(DecodeError, match="not valid for JSONEncoder"):
        json_backend.get_result(message)


@pytest.fixture
def redis_conn() -> Iterator[redis.Redis]:
    conn = redis_support.client()
    yield conn
    conn.close()


@pytest.mark.redis
def test_redis_stores_a_one_element_list_with_a_ttl(redis_conn: redis.Redis) -> None:
    backend = RedisBackend(client=redis_conn)  # default namespace and MD5 keys
    message: Message[Any] = Message("q", "add", message_id=str(uuid.uuid4()))
    key = backend.build_message_key(message)
    try:
        backend.store_result(message, {"sum": 3}, 5000)
        assert redis_conn.type(key) == b"list"
        assert redis_conn.lrange(key, 0, -1) == [b'{"sum":3}']
        assert 0 < redis_conn.pttl(key) <= 5000
        backend.store_exception(message, ValueError("v"), 5000)
        assert redis_conn.lrange(key, 0, -1) == [
            b'{"__t":"dramatiq.results.Result","exn":{"type":"ValueError","msg":"v"}}'
        ]
        # A blocking read rotates the one element onto the same key: still one, TTL kept.
        with pytest.raises(ResultFailure):
            backend.get_result(message, block=True, timeout=1000)
        assert redis_conn.llen(key) == 1
        assert redis_conn.pttl(key) > 0
    finally:
        redis_conn.delete(key)


@pytest.mark.redis
def test_redis_backend_with_a_decoding_client_and_sub_second_timeouts() -> None:
    client = redis.Redis.from_url(redis_support.REDIS_URL, decode_responses=True)
    backend = RedisBackend(client=client)
    message: Message[Any] = Message("q", "a")
    try:
        with pytest.raises(ResultTimeout):
            backend.get_result(message, block=True, timeout=150)
        backend.store_result(message, "é", 1000)
        assert backend.get_result(message) == "é"
        assert backend.get_result(message, block=True, timeout=150) == "é"
    finally:
        client.delete(backend.build_message_key(message))
        client.close()


@pytest.mark.memcached
def test_memcached_stores_raw_bytes_with_flags_0_rounding_ttls_up() -> None:
    class Raw:
        def serialize(self, key: str, value: Any) -> tuple[Any, int]:
            return value, 0

        def deserialize(self, key: str, value: bytes, flags: int) -> tuple[bytes, int]:
            return value, flags

    backend = MemcachedBackend(servers=["127.0.0.1:11211"])
    message: Message[Any] = Message("q", "a")
    key = backend.build_message_key(message)
    raw = MemcacheClient(MEMCACHED, serde=Raw())
    try:
        backend.store_result(message, [1, "two"], 300)
        assert raw.get(key) == (b'[1,"two"]', 0)
    finally:
        raw.delete(key, noreply=False)
        raw.close()
    assert [expire_seconds(ms, now_s=0) for ms in (1, 999, 1000, 1001, 600_000)] == [
        2,
        2,
        2,
        3,
        601,
    ]
    # Beyond 30 days memcached wants an absolute time.
    assert expire_seconds(31 * 86_400_000, now_s=1_000_000) == 1_000_000 + 31 * 86_400 + 1


@pytest.mark.memcached
def test_memcached_server_strings() -> None:
    assert parse_servers(["a", "b:1", "[::1]:2"]) == [("a", 11211), ("b", 1), ("::1", 2)]
    for bad in (["h:"], ["h:port"], "h:1"):
        with pytest.raises(ValueError, match="host"):
            parse_servers(bad)
    sharded = MemcachedBackend(servers=["127.0.0.1:11211", "127.0.0.1:11211"])
    message: Message[Any] = Message("q", "a")
    try:
        sharded.store_result(message, 1, 1000)
        assert sharded.get_result(message) == 1
    finally:
        sharded.pool.delete(sharded.build_message_key(message), noreply=False)


def test_server_backends_are_imported_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    from dq.results import backends

    assert backends.RedisBackend is RedisBackend
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        backends.Nope  # noqa: B018
    # Without pymemcache: an ImportWarning naming the extra, and an AttributeError.
    monkeypatch.setitem(sys.modules, "pymemcache", None)
    monkeypatch.setitem(sys.modules, "pymemcache.client.base", None)
    monkeypatch.delitem(sys.modules, "dq.results.backends.memcached")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(AttributeError, match=r"dq\[memcached\]"):
            backends.MemcachedBackend  # noqa: B018
    assert [w.category for w in caught] == [ImportWarning]
    with pytest.raises(ImportError, match="'memcached' extra"):
        import dq.results.backends.memcached  # noqa: F401


# -- the middleware, with workers ------------------------------------------------------------------


@pytest.fixture
def results_broker() -> Iterator[StubBroker]:
    """A StubBroker with the default middleware and Results(StubBackend), global."""
    broker = StubBroker(fail_fast_default=False)
    broker.add_middleware(Results(backend=StubBackend()))
    yield from installed(broker)


@pytest.fixture
def stub_worker(results_broker: StubBroker) -> Iterator[dq.Worker]:
    worker = dq.Worker(results_broker, worker_timeout=20, worker_threads=2)
    worker.start()
    yield worker
    worker.stop()


def queue() -> str:
    return f"q{uuid.uuid4().hex}"


def test_results_middleware_defaults_and_options() -> None:
    backend = StubBackend()
    results = Results(backend=backend)
    assert (results.backend, results.store_results, results.result_ttl) == (
        backend,
        False,
        DEFAULT_RESULT_TTL,
    )
    assert DEFAULT_RESULT_TTL == 600_000 and DEFAULT_TIMEOUT == 10_000
    assert Results(backend=backend, result_ttl=0).result_ttl == DEFAULT_RESULT_TTL
    assert results.actor_options == {"store_results", "result_ttl"}
    with pytest.raises(TypeError, match=r"expects a dq\.results\.ResultBackend, got 'redis'"):
        Results(backend="redis")  # type: ignore[arg-type]  # the point
    broker = StubBroker(middleware=[])
    assert broker.get_results_backend() is None
    with pytest.raises(ValueError, match="store_results"):
        dq.actor(store_results=True, broker=broker)(lambda: None)
    broker.add_middleware(results)
    assert broker.get_results_backend() is backend
    dq.actor(store_results=True, broker=broker)(lambda: None)


def test_worker_stores_results_and_failures(
    results_broker: StubBroker, stub_worker: dq.Worker
) -> None:
    q = queue()

    @dq.actor(queue_name=q, store_results=True)
    def add(x: int, y: int) -> int:
        return x + y

    @dq.actor(queue_name=q, store_results=True, max_retries=0)
    def fail() -> None:
        raise ValueError("it broke")

    @dq.actor(queue_name=q, store_results=True, throws=KeyError)
    def throws() -> None:
        raise KeyError("expected")

    @dq.actor(queue_name=q)
    def not_stored() -> int:
        return 1

    sent = add.send(1, 2)
    assert sent.get_result(block=True) == 3
    assert add.send_with_options(args=(2, 2), delay=10).get_result(block=True) == 4
    with pytest.raises(ResultFailure) as failure:
        fail.send().get_result(block=True)
    assert (failure.value.orig_exc_type, failure.value.orig_exc_msg) == ("ValueError", "it broke")
    with pytest.raises(ResultFailure, match="actor raised KeyError: 'expected'"):
        throws.send().get_result(block=True)
    # store_results per message, both ways.
    extra = not_stored.send_with_options(store_results=True)
    assert extra.get_result(block=True) == 1
    skipped = add.send_with_options(args=(1, 1), store_results=False)
    results_broker.join(q)
    with pytest.raises(ResultMissing):
        skipped.get_result()
    plain = not_stored.send()
    results_broker.join(q)
    with pytest.raises(ResultMissing):
        plain.get_result()
    assert sent.get_result() == 3  # still there


def test_a_retried_failure_stores_only_the_final_outcome(
    results_broker: StubBroker, stub_worker: dq.Worker
) -> None:
    q = queue()
    attempts: list[int] = []

    @dq.actor(queue_name=q, store_results=True, min_backoff=10, max_backoff=20)
    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("not yet")
        return "done"

    @dq.actor(queue_name=q, store_results=True, max_retries=2, min_backoff=10, max_backoff=20)
    def hopeless() -> None:
        raise RuntimeError("never")

    message = flaky.send()
    assert message.get_result(block=True) == "done"
    assert len(attempts) == 3
    with pytest.raises(ResultFailure, match="actor raised RuntimeError: never"):
        hopeless.send().get_result(block=True)


def test_each_pipeline_step_stores_its_result(
    results_broker: StubBroker, stub_worker: dq.Worker
) -> None:
    q = queue()

    @dq.actor(queue_name=q, store_results=True)
    def add(x: int, y: int) -> int:
        return x + y

    @dq.actor(queue_name=q, store_results=True)
    def double(x: int) -> int:
        return 2 * x

    first = add.message(1, 2)
    second, third = (double.message_with_options(args=()) for _ in range(2))
    dq.pipeline([first, second, third]).run()
    # Steps keep their ids, so each step's result is read from its own message.
    assert third.get_result(block=True) == 12
    assert (first.get_result(), second.get_result()) == (3, 6)


def test_without_retries_a_failure_is_stored_when_acked() -> None:
    backend = StubBackend()
    broker = StubBroker(middleware=[Results(backend=backend, store_results=True)])
    q = queue()

    @dq.actor(queue_name=q, broker=broker)
    def fail() -> None:
        raise OSError("disk")

    worker = dq.Worker(broker, worker_timeout=20, worker_threads=1)
    worker.start()
    try:
        message = fail.send()
        with pytest.raises(ResultFailure, match="actor raised OSError: disk"):
            message.get_result(backend=backend, block=True)
    finally:
        worker.stop()


class SkipAll(Middleware):
    def __init__(self, *, fail: bool) -> None:
        self.fail = fail

    def before_process_message(self, broker: dq.Broker, message: dq.MessageProxy) -> None:
        if self.fail:
            message.fail()
        raise SkipMessage("skipped on purpose")


@pytest.mark.parametrize("fail", [False, True])
def test_skipped_messages(fail: bool) -> None:
    backend = StubBackend()
    broker = StubBroker(
        middleware=[Retries(), SkipAll(fail=fail), Results(backend=backend, store_results=True)],
        fail_fast_default=False,
    )
    q = queue()
    ran: list[int] = []

    @dq.actor(queue_name=q, broker=broker)
    def work() -> int:
        ran.append(1)
        return 5

    worker = dq.Worker(broker, worker_timeout=20, worker_threads=1)
    worker.start()
    try:
        message = work.send()
        if fail:  # skipped and failed: dead-lettered, a failure is stored
            with pytest.raises(ResultFailure):
                message.get_result(backend=backend, block=True)
        else:  # skipped only: None is stored
            assert message.get_result(backend=backend, block=True) is None
    finally:
        worker.stop()
    assert ran == []


def test_age_limited_messages_store_a_failure(
    results_broker: StubBroker, stub_worker: dq.Worker
) -> None:
    assert any(isinstance(m, AgeLimit) for m in results_broker.middleware)
    q = queue()

    @dq.actor(queue_name=q, store_results=True, max_age=1000)
    def old() -> int:
        return 1

    message = old.message().copy(message_timestamp=0)
    results_broker.enqueue(message)
    with pytest.raises(ResultFailure) as failure:
        message.get_result(block=True)
    # As Dramatiq: the SkipMessage that failed the message is what is stored.
    assert failure.value.orig_exc_type == "SkipMessage"


def test_an_unencodable_result_is_stored_as_a_failure(
    results_broker: StubBroker, stub_worker: dq.Worker
) -> None:
    @dq.actor(queue_name=queue(), store_results=True)
    def weird() -> object:
        return object()

    with pytest.raises(ResultFailure) as failure:
        weird.send().get_result(block=True)
    assert failure.value.orig_exc_type == "TypeError"


class Unreachable(StubBackend):
    """A backend whose server is down: every write fails."""

    def _store(self, message_key: str, result: Any, ttl: int) -> None:
        raise redis.exceptions.ConnectionError("down")


def test_a_result_that_cannot_be_stored_redelivers_the_message() -> None:
    backend = Unreachable()
    broker = StubBroker(middleware=[Results(backend=backend, store_results=True)])
    q = queue()
    runs: list[int] = []
    twice = threading.Event()

    @dq.actor(queue_name=q, broker=broker)
    def work() -> int:
        runs.append(1)
        if len(runs) >= 2:
            twice.set()
        return 1

    worker = dq.Worker(broker, worker_timeout=20, worker_threads=1)
    worker.start()
    try:
        work.send()
        assert twice.wait(10), "the message was acked although its result was not stored"
    finally:
        worker.stop()


def test_message_get_result_needs_a_backend(stub_broker: StubBroker) -> None:
    message: Message[Any] = Message("q", "a")
    with pytest.raises(RuntimeError, match=r"add_middleware\(dq.results.Results"):
        message.get_result()
    backend = StubBackend()
    backend.store_result(message, "explicit", 1000)
    assert message.get_result(backend=backend) == "explicit"


@pytest.mark.redis
def test_worker_on_redis_end_to_end(redis_conn: redis.Redis) -> None:
    namespace = redis_support.new_namespace("dq-results")
    broker = RedisBroker(url=redis_support.REDIS_URL, namespace=namespace)
    backend = RedisBackend(client=redis_conn, namespace=namespace, use_namespace_prefix_keys=True)
    broker.add_middleware(Results(backend=backend, store_results=True, result_ttl=60_000))
    previous = dq.broker.global_broker
    dq.set_broker(broker)
    worker = dq.Worker(broker, worker_timeout=50, worker_threads=4)
    try:

        @dq.actor(queue_name="results", broker=broker)
        def square(x: int) -> int:
            return x * x

        @dq.actor(queue_name="results", broker=broker, max_retries=0)
        def fail(x: int) -> None:
            raise ArithmeticError(f"no {x}")

        worker.start()
        messages = [square.send(i) for i in range(50)]
        failures = [fail.send(i) for i in range(5)]
        assert [m.get_result(block=True) for m in messages] == [i * i for i in range(50)]
        for i, message in enumerate(failures):
            with pytest.raises(ResultFailure, match=f"actor raised ArithmeticError: no {i}"):
                message.get_result(block=True)
        key = f"{namespace}:results:square:{messages[0].message_id}"
        assert redis_conn.lrange(key, 0, -1) == [b"0"]
        assert 0 < redis_conn.pttl(key) <= 60_000
    finally:
        worker.stop()
        broker.close()
        dq.broker.global_broker = previous
        redis_support.delete_namespace(redis_conn, namespace)


def test_errors_hierarchy() -> None:
    assert issubclass(ResultError, dq.DramatiqError)
    for cls in (ResultTimeout, ResultMissing, ResultFailure):
        assert issubclass(cls, ResultError)
    failure = ResultFailure("actor raised X: y", "X", "y")
    assert (str(failure), failure.orig_exc_type, failure.orig_exc_msg) == (
        "actor raised X: y",
        "X",
        "y",
    )
    assert (ResultFailure().orig_exc_type, ResultFailure().orig_exc_msg) == ("", "")
    assert repr(Missing) == "Missing"
    # A stored dict with the marker but a malformed body still reads as a failure.
    backend = StubBackend()
    message: Message[Any] = Message("q", "a")
    backend.store_result(message, {"__t": "dramatiq.results.Result", "exn": 3}, 1000)
    with pytest.raises(ResultFailure, match="actor raised Exception: 3"):
        backend.get_result(message)
    assert json.loads(json.dumps({"ok": 1})) == backend.unwrap_result({"ok": 1})
