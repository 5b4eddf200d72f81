"""Results interop with Dramatiq 2.2.1 (spec/wire.md §6): one Redis, both libraries.

- Backends: what dq's RedisBackend stores, Dramatiq's reads (blocking and not), and
  the reverse, for values and failures, with MD5 and namespace-prefixed keys.
- Workers: a Dramatiq worker stores results that dq reads through
  `dq.Message.get_result`, and a dq worker stores results that Dramatiq reads.
- Memcached: Dramatiq's MemcachedBackend needs pylibmc (a C extension, not installed
  here), so it cannot run; the wire is checked instead with Dramatiq's own key and
  encoding code against raw memcached items (flags 0).

Needs Redis on 127.0.0.1:6379, Memcached on 127.0.0.1:11211 and ``dramatiq==2.2.1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dramatiq
import dramatiq.broker
import dramatiq.results
import dramatiq.results.backend
import dramatiq.results.result
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker as DramatiqRedisBroker
from dramatiq.encoder import JSONEncoder as DramatiqJSONEncoder
from dramatiq.results.backends import RedisBackend as DramatiqRedisBackend
from pymemcache.client.base import Client as MemcacheClient

import dq
import dq.broker
from dq import Message
from dq.actor import ActorDecorator
from dq.brokers.redis import RedisBroker
from dq.results import ResultFailure, ResultMissing, Results, ResultTimeout
from dq.results.backends import MemcachedBackend, RedisBackend
from tests.support import redis_helpers as redis_support

pytestmark = [pytest.mark.redis]

VALUES: list[Any] = [7, "text é", None, 1.5, [1, [2, "x"]], {"a": {"b": None}}]
QUEUE = "results-interop"


@pytest.fixture
def conn() -> Iterator[redis.Redis]:
    client = redis_support.client()
    yield client
    client.close()


@pytest.fixture
def namespace(conn: redis.Redis) -> Iterator[str]:
    ns = redis_support.new_namespace("dq-results-interop")
    yield ns
    redis_support.delete_namespace(conn, ns)


def dramatiq_message(message: Message[Any]) -> dramatiq.Message[Any]:
    """The same message, as Dramatiq's record."""
    return dramatiq.Message(
        queue_name=message.queue_name,
        actor_name=message.actor_name,
        args=tuple(message.args),
        kwargs=dict(message.kwargs),
        options={},
        message_id=message.message_id,
        message_timestamp=message.message_timestamp,
    )


def backends(
    conn: redis.Redis, namespace: str, prefixed: bool
) -> tuple[RedisBackend, DramatiqRedisBackend]:
    mine = RedisBackend(client=conn, namespace=namespace, use_namespace_prefix_keys=prefixed)
    theirs = DramatiqRedisBackend(
        client=conn, namespace=namespace, use_namespace_prefix_keys=prefixed
    )
    return mine, theirs


@pytest.mark.parametrize("prefixed", [False, True])
def test_dq_stores_dramatiq_reads(conn: redis.Redis, namespace: str, prefixed: bool) -> None:
    mine, theirs = backends(conn, namespace, prefixed)
    written: list[str] = []
    try:
        for value in VALUES:
            message: Message[Any] = Message(f"{QUEUE}.DQ", "act")  # a delayed copy's queue
            theirs_message = dramatiq_message(message.copy(queue_name=QUEUE))
            assert mine.build_message_key(message) == theirs.build_message_key(theirs_message)
            written.append(mine.build_message_key(message))
            mine.store_result(message, value, 10_000)
            assert theirs.get_result(theirs_message) == value
            assert theirs.get_result(theirs_message, block=True, timeout=1000) == value
            assert mine.get_result(message) == value  # still there after Dramatiq's read
        failed: Message[Any] = Message(QUEUE, "act")
        written.append(mine.build_message_key(failed))
        mine.store_exception(failed, ZeroDivisionError("division by zero"), 10_000)
        for block in (False, True):
            with pytest.raises(dramatiq.results.ResultFailure) as failure:
                theirs.get_result(dramatiq_message(failed), block=block, timeout=1000)
            assert failure.value.orig_exc_type == "ZeroDivisionError"
            assert failure.value.orig_exc_msg == "division by zero"
            assert str(failure.value) == "actor raised ZeroDivisionError: division by zero"
    finally:
        if written:
            conn.delete(*written)


@pytest.mark.parametrize("prefixed", [False, True])
def test_dramatiq_stores_dq_reads(conn: redis.Redis, namespace: str, prefixed: bool) -> None:
    mine, theirs = backends(conn, namespace, prefixed)
    written: list[str] = []
    try:
        for value in VALUES:
            message: Message[Any] = Message(QUEUE, "act")
            written.append(mine.build_message_key(message))
            theirs.store_result(dramatiq_message(message), value, 10_000)
            assert mine.get_result(message) == value
            assert mine.get_result(message, block=True, timeout=500) == value
        failed: Message[Any] = Message(QUEUE, "act")
        written.append(mine.build_message_key(failed))
        theirs.store_exception(dramatiq_message(failed), LookupError("gone"), 10_000)
        for block in (False, True):
            with pytest.raises(ResultFailure) as failure:
                mine.get_result(failed, block=block, timeout=500)
            assert (failure.value.orig_exc_type, failure.value.orig_exc_msg) == (
                "LookupError",
                "gone",
            )
        absent: Message[Any] = Message(QUEUE, "act")
        with pytest.raises(ResultMissing):
            mine.get_result(absent)
        with pytest.raises(ResultTimeout):
            mine.get_result(absent, block=True, timeout=200)
    finally:
        if written:
            conn.delete(*written)


class Fleet:
    """A dq RedisBroker and a Dramatiq RedisBroker on one namespace, each with its own
    Results middleware on the same result keys, and the same two actors declared on
    both: ``add`` (returns x + y) and ``fail`` (raises OverflowError)."""

    def __init__(self, conn: redis.Redis, namespace: str) -> None:
        self.dq_backend = RedisBackend(client=conn, namespace=namespace)
        self.dq_broker = RedisBroker(url=redis_support.REDIS_URL, namespace=namespace)
        self.dq_broker.add_middleware(Results(backend=self.dq_backend, store_results=True))
        self.dramatiq_backend = DramatiqRedisBackend(client=conn, namespace=namespace)
        self.dramatiq_broker = DramatiqRedisBroker(  # type: ignore[no-untyped-call]  # unannotated
            url=redis_support.REDIS_URL, namespace=namespace
        )
        self.dramatiq_broker.add_middleware(
            # Dramatiq's Results.__init__ is unannotated.
            dramatiq.results.Results(backend=self.dramatiq_backend, store_results=True)  # type: ignore[no-untyped-call]  # see above
        )
        self.previous = dq.broker.global_broker
        dq.set_broker(self.dq_broker)
        dramatiq.set_broker(self.dramatiq_broker)

        def add(x: int, y: int) -> int:
            return x + y

        def fail() -> None:
            raise OverflowError("too big")

        # One decorator per actor: Dramatiq's remembers the first function's name.
        def on_dq() -> ActorDecorator:
            return dq.actor(queue_name=QUEUE, broker=self.dq_broker, max_retries=0)

        def on_dramatiq() -> Any:
            return dramatiq.actor(queue_name=QUEUE, broker=self.dramatiq_broker, max_retries=0)

        self.dq_add, self.dq_fail = on_dq()(add), on_dq()(fail)
        self.dramatiq_add, self.dramatiq_fail = on_dramatiq()(add), on_dramatiq()(fail)

    def close(self) -> None:
        self.dq_broker.close()
        self.dramatiq_broker.close()
        dq.broker.global_broker = self.previous


@pytest.fixture
def fleet(conn: redis.Redis, namespace: str) -> Iterator[Fleet]:
    fleet = Fleet(conn, namespace)
    yield fleet
    fleet.close()


def test_a_dramatiq_worker_stores_results_dq_reads(fleet: Fleet) -> None:
    worker = dramatiq.Worker(fleet.dramatiq_broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        sums = [fleet.dq_add.send(i, i) for i in range(10)]
        failed = fleet.dq_fail.send()
        assert [m.get_result(block=True) for m in sums] == [2 * i for i in range(10)]
        with pytest.raises(ResultFailure) as failure:
            failed.get_result(block=True)
        assert (failure.value.orig_exc_type, failure.value.orig_exc_msg) == (
            "OverflowError",
            "too big",
        )
    finally:
        worker.stop()


def test_a_dq_worker_stores_results_dramatiq_reads(fleet: Fleet) -> None:
    worker = dq.Worker(fleet.dq_broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        sums = [fleet.dramatiq_add.send(i, 1) for i in range(10)]
        failed = fleet.dramatiq_fail.send()
        backend = fleet.dramatiq_backend
        assert [m.get_result(backend=backend, block=True) for m in sums] == [
            i + 1 for i in range(10)
        ]
        with pytest.raises(dramatiq.results.ResultFailure) as failure:
            failed.get_result(backend=backend, block=True)
        assert (failure.value.orig_exc_type, failure.value.orig_exc_msg) == (
            "OverflowError",
            "too big",
        )
    finally:
        worker.stop()


# -- memcached: the wire, with Dramatiq's key and encoding code ---------------------------------


class RawWithFlags:
    """A pymemcache serde that hands back the stored bytes and their flags."""

    def serialize(self, key: str, value: Any) -> tuple[Any, int]:
        return value, 0

    def deserialize(self, key: str, value: bytes, flags: int) -> tuple[bytes, int]:
        return value, flags


@pytest.fixture
def raw_memcached() -> Iterator[MemcacheClient]:
    client = MemcacheClient(("127.0.0.1", 11211), serde=RawWithFlags())
    yield client
    client.close()


@pytest.mark.memcached
def test_memcached_items_are_what_dramatiqs_backend_writes_and_reads(
    raw_memcached: MemcacheClient,
) -> None:
    mine = MemcachedBackend(servers=["127.0.0.1:11211"])
    # Dramatiq's base class holds the key and (un)wrapping logic its memcached backend
    # uses; only the pylibmc transport is missing.
    theirs = dramatiq.results.backend.ResultBackend()
    encoder = DramatiqJSONEncoder()
    keys: list[str] = []
    try:
        for value in [*VALUES, "failure"]:
            message: Message[Any] = Message(QUEUE, "act")
            key = theirs.build_message_key(dramatiq_message(message))
            assert key == mine.build_message_key(message)
            keys.append(key)
            if value == "failure":
                mine.store_exception(message, KeyError("k"), 5000)
                data, flags = raw_memcached.get(key)
                assert flags == 0
                with pytest.raises(dramatiq.results.ResultFailure, match="KeyError: 'k'"):
                    theirs.unwrap_result(encoder.decode(data))  # type: ignore[no-untyped-call]  # unannotated
                continue
            mine.store_result(message, value, 5000)
            data, flags = raw_memcached.get(key)
            assert (flags, encoder.decode(data)) == (0, value)
            # The reverse: an item as Dramatiq's backend writes it (raw bytes, flags 0).
            wrapped = dramatiq.results.result.wrap_exception(ValueError(repr(value)))  # type: ignore[no-untyped-call]  # unannotated
            raw_memcached.set(key, encoder.encode(wrapped), expire=5, noreply=False)
            with pytest.raises(ResultFailure, match="actor raised ValueError"):
                mine.get_result(message)
            raw_memcached.set(key, encoder.encode(value), expire=5, noreply=False)
            assert mine.get_result(message, block=True) == value
    finally:
        for key in keys:
            raw_memcached.delete(key, noreply=False)


def test_dramatiqs_memcached_backend_needs_pylibmc() -> None:
    """Why the memcached interop above is checked on the wire: Dramatiq's backend
    cannot be imported without pylibmc (not installed; it needs libmemcached)."""
    with pytest.raises(ModuleNotFoundError, match="pylibmc"):
        import dramatiq.results.backends.memcached  # noqa: F401
