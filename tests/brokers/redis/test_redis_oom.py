"""RedisBroker on a Redis at ``maxmemory`` with ``noeviction`` (a private server).

Issue 16: the fetch script wrote the heartbeat first, so a full Redis refused it and a
worker drained 0 of 176 stored messages; heartbeats failed, so live workers looked
dead; enqueue raised the RESP client's private error. Scripts that only move or free
what is stored now carry ``#!lua flags=allow-oom``; enqueue is refused whole, with
`dq.errors.BrokerOutOfMemory`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import dq
from dq import Message
from dq.brokers.redis import RedisBroker
from dq.errors import BrokerOutOfMemory
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.redis]


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server with room for a few hundred small messages."""
    server = RedisServer(tmp_path / "redis-oom", options=("--maxmemory-policy", "noeviction"))
    server.start()
    client = server.client()
    used = int(client.info("memory")["used_memory"])
    # A little room above what the empty server uses (its clients' buffers included).
    client.config_set("maxmemory", used + 400_000)
    client.close()
    yield server
    server.close()


def fill(broker: RedisBroker) -> int:
    """Enqueue until Redis refuses; return how many messages were stored."""
    stored = 0
    padding = "x" * 1000
    with pytest.raises(BrokerOutOfMemory, match="Redis is out of memory") as info:
        for i in range(100_000):
            broker.enqueue(Message("q", "count", (i, padding), {}, {}))
            stored += 1
    # The public error, not the RESP client's private one.
    assert type(info.value).__module__ == "dq.errors"
    return stored


def test_a_worker_drains_a_full_redis_and_its_heartbeat_is_written(
    full_redis: RedisServer,
) -> None:
    broker = RedisBroker(url=full_redis.url, namespace="oom", heartbeat_timeout=2000)
    ran: set[int] = set()
    lock = threading.Lock()

    @dq.actor(broker=broker, actor_name="count", queue_name="q", max_retries=0)
    def count(i: int, padding: str) -> None:
        with lock:
            ran.add(i)

    stored = fill(broker)
    assert stored > 50
    client: redis.Redis = full_redis.client()
    # Over the limit for good (as when something else grew): every write that may
    # add memory is refused from now on.
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 50_000)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.zadd("oom:__heartbeats__", {broker.broker_id: 1})
    assert client.llen("oom:q") == stored
    # Still full: one more is refused, and nothing of it is stored.
    with pytest.raises(BrokerOutOfMemory):
        broker.enqueue_many([Message("q", "count", (-1, "y" * 1000), {}, {})] * 50)
    assert client.llen("oom:q") == stored

    # A heartbeat is written at maxmemory: a live worker never looks dead.
    broker.heartbeat()
    beat = client.zscore("oom:__heartbeats__", broker.broker_id)
    assert beat is not None and beat > 1

    worker = dq.Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        wait_until(lambda: len(ran) == stored, f"{stored} messages to run", 30)
    finally:
        worker.stop(timeout=5000)
        broker.close()
    print(f"[oom] drained {len(ran)} of {stored} messages stored at maxmemory")
    assert ran == set(range(stored))
    assert client.llen("oom:q") == 0 and client.hlen("oom:q.msgs") == 0
    client.close()
