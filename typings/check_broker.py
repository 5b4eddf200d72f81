"""Pinned types of brokers: the global broker, enqueueing, consuming, message proxies.

Only mypy reads this file (``typing.assert_type`` checks). Everything sits in functions
that nothing calls: importing it sets no broker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, assert_type

import redis

import dq
import dq.core
from dq import Broker, Consumer, Message, MessageProxy
from dq.brokers.redis import RecoveryReport, RedisBroker
from dq.brokers.stub import StubBroker


def global_broker() -> None:
    assert_type(dq.get_broker(), Broker)
    assert_type(dq.set_broker(StubBroker()), None)
    assert_type(dq.get_broker().actors, dict[str, dq.Actor[Any, Any]])
    assert_type(dq.get_broker().get_actor("add"), dq.Actor[Any, Any])


def enqueue_keeps_the_message_type() -> None:
    @dq.actor
    def add(x: int, y: int, /) -> int:
        return x + y

    broker = StubBroker()
    message = add.message(1, 2)
    assert_type(broker.enqueue(message), Message[int])
    assert_type(broker.enqueue(message, delay=100), Message[int])
    assert_type(dq.get_broker().enqueue(message), Message[int])
    assert_type(broker.enqueue(Message.decode(b"{}")), Message[Any])


def enqueue_through_the_base_class(base: Broker, message: Message[bytes]) -> None:
    assert_type(base.enqueue(message), Message[bytes])
    assert_type(base.enqueue(message, delay=0), Message[bytes])
    assert_type(base.enqueue_many([message, message]), list[Message[bytes]])


def redis_broker() -> None:
    broker = RedisBroker(url="redis://127.0.0.1:6379/0", heartbeat_timeout=10_000)
    assert_type(broker.client, redis.Redis)
    assert_type(broker.enqueue_many([Message.decode(b"{}")], delay=5), list[Message[Any]])
    assert_type(broker.recover(), RecoveryReport)
    assert_type(broker.recover().dead_lettered, tuple[str, ...])
    assert_type(broker.qsize("default"), int)


def consumers(broker: StubBroker) -> None:
    consumer = broker.consume("default", prefetch=2, timeout=10)
    assert_type(consumer, Consumer)
    assert_type(consumer.__next__(), MessageProxy)  # not `MessageProxy | None`
    assert_type(next(consumer), MessageProxy)
    assert_type(iter(consumer), Consumer)
    iterator: Iterator[MessageProxy] = consumer
    for proxy in consumer:
        assert_type(proxy, MessageProxy)
        assert_type(proxy.message, Message[Any])
        assert_type(proxy.queue_name, str)
        assert_type(proxy.message_id, str)
        assert_type(proxy.message_timestamp, int)
        assert_type(proxy.args, tuple[Any, ...])
        assert_type(proxy.failed, bool)
        assert_type(consumer.ack(proxy), None)
        assert_type(consumer.nack(proxy), None)
    assert_type(consumer.requeue([]), None)
    assert_type(consumer.close(), None)


def message_proxies(broker: Broker, message: Message[int]) -> None:
    assert_type(MessageProxy(message), MessageProxy)
    assert_type(MessageProxy(broker, message), MessageProxy)


def stub_broker(broker: StubBroker) -> None:
    assert_type(broker.state, dq.core.BrokerState)
    assert_type(broker.dead_letters, list[MessageProxy])
    assert_type(broker.join("default", timeout=100), None)
    assert_type(broker.flush("default"), None)
    assert_type(broker.flush_all(), None)
    assert_type(broker.declare_queue("default"), None)
    assert_type(broker.get_declared_queues(), set[str])
