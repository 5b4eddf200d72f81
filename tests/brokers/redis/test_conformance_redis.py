"""The public conformance machine on RedisBroker in its default configuration (>= 60
examples), with crash steps: a consumer's process (its broker) stops beating, and
another broker of the namespace recovers what it held."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any, cast

import pytest

from dq import Message
from dq.broker import Broker, Consumer
from dq.brokers.redis import RedisBroker
from dq.testing import Crashes, conformance_test
from tests.support.redis_helpers import client, delete_namespace, keys_under, new_namespace

pytestmark = [pytest.mark.redis]

_namespaces: list[str] = []


def _stop_listener(broker: RedisBroker) -> None:
    """Stop ``broker``'s notification thread now: it polls for 0.5 s between looks at
    its stop flag, so each close would otherwise cost up to that much."""
    listener = broker._listener
    if listener is not None:
        listener.stopped.set()
        client().publish(broker._keys.channel("__conformance_wake__"), b"")


class _Broker(RedisBroker):
    def close(self) -> None:
        _stop_listener(self)
        super().close()


def _broker() -> Broker:
    namespace = new_namespace("dq-conformance")
    _namespaces.append(namespace)
    return _Broker(namespace=namespace, middleware=[])


def _dead_letters(broker: Broker, queue_name: str) -> Sequence[str]:
    assert isinstance(broker, RedisBroker)
    conn = broker.client
    ids = cast(list[bytes], conn.zrange(f"{broker.namespace}:{queue_name}.XQ", 0, -1))
    if not ids:
        return []
    payloads = conn.hmget(f"{broker.namespace}:{queue_name}.XQ.msgs", ids)
    return [_decode(payload).message_id for payload in payloads]


def _decode(payload: object) -> Message[Any]:
    assert isinstance(payload, bytes), payload
    return Message.decode(payload)


class RedisCrashes(Crashes):
    """Each crashable consumer runs in a process of its own: a RedisBroker on the same
    namespace. The process dies when its keeper stops beating (its consumer is never
    closed). Recovery is the reaper of the example's broker, once the dead process's
    last heartbeat is older than ``heartbeat_timeout`` (set so here: the default
    timeout is a minute)."""

    def __init__(self, broker: Broker) -> None:
        super().__init__(broker)
        assert isinstance(broker, RedisBroker)
        self.main = broker
        self.max_deliveries = broker.max_deliveries
        self.processes: dict[int, RedisBroker] = {}  # id(consumer) -> its broker
        self.dead: list[RedisBroker] = []

    def consume(self, queue_name: str, prefetch: int, timeout: int) -> Consumer:
        process = _Broker(namespace=self.main.namespace, middleware=[])
        consumer = process.consume(queue_name, prefetch=prefetch, timeout=timeout)
        self.processes[id(consumer)] = process
        return consumer

    def crash(self, consumer: Consumer) -> None:
        process = self.processes.pop(id(consumer))
        keeper = process._keeper
        assert keeper is not None
        keeper.stopped.set()
        keeper.wake.set()
        keeper.join(5)  # no heartbeat after this
        _stop_listener(process)
        self.dead.append(process)

    def recover(self) -> None:
        conn = client()
        heartbeats = self.main._keys.heartbeats
        for process in self.dead:
            # Its last beat, as long ago as the timeout: now it counts as dead.
            beat = conn.zscore(heartbeats, process.broker_id)
            if beat is not None:
                old = int(beat) - process.heartbeat_timeout
                conn.zadd(heartbeats, {process.broker_id: old}, xx=True)
        self.main.recover()
        self.dead.clear()

    def close(self) -> None:
        closing = [threading.Thread(target=process.close) for process in self.processes.values()]
        for thread in closing:
            thread.start()
        for thread in closing:
            thread.join()


TestRedisBrokerConformance = conformance_test(
    _broker,
    dead_letters=_dead_letters,
    consumer_timeout_ms=5,
    strict_queues=False,
    broker_options=("redis_message_id",),
    crashes=RedisCrashes,
    max_examples=60,
    stateful_step_count=30,
)


def _dump(conn: Any, key: str) -> object:
    """A key's type and contents, for the message of a failed check."""
    kind = conn.type(key)
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind == "hash":
        return (kind, conn.hgetall(key))
    if kind == "set":
        return (kind, conn.smembers(key))
    if kind == "zset":
        return (kind, conn.zrange(key, 0, -1, withscores=True))
    if kind == "list":
        return (kind, conn.lrange(key, 0, -1))
    return (kind, conn.get(key) if kind == "string" else None)


@pytest.fixture(scope="module", autouse=True)
def _clean_namespaces() -> Iterator[None]:
    yield
    conn = client()
    for namespace in _namespaces:
        # Closed brokers hold nothing, and recovery forgot the dead: no key is left
        # (a flush drops the delivery counts of what it drops, as the core's Flush).
        left = keys_under(conn, namespace)
        assert left == [], {key: _dump(conn, key) for key in left}
        delete_namespace(conn, namespace)
