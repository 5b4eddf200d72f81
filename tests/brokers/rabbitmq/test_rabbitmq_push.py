"""RabbitMQ consumers in their default mode: subscriptions, as Dramatiq's.

`BrokerConformance` checks ``exact_reservations=True`` (its model reserves when
``next()`` asks). A subscribed consumer is sent messages whenever the server likes,
within its prefetch, so which consumer gets which message is not determined; this
machine checks what must hold anyway, against the real server:

- a message is handed out only if it was enqueued, is not settled, and no consumer
  holds it (no delivery twice while held);
- a consumer never holds more than its prefetch (handed out, buffered and parked);
- one consumer receives the messages it was sent first-time in the order they were
  enqueued (requeued ones go to the tail);
- at the end, every message enqueued and neither acked nor nacked is still there,
  exactly once, and the dead letters are exactly the nacked ones.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dq import Message
from dq.broker import Consumer, MessageProxy
from dq.brokers.rabbitmq import RabbitmqBroker
from dq.brokers.rabbitmq.consumer import RabbitmqConsumer
from dq.core import policy
from tests.support.rabbitmq_helpers import RABBITMQ_URL, delete_queues, new_prefix, read_queue

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]

_TAKE_TIMEOUT_MS = 50  # what next() waits: pushes are asynchronous


class _Held:
    def __init__(self, consumer: Consumer, prefetch: int) -> None:
        self.consumer = consumer
        self.prefetch = prefetch
        self.held: dict[str, MessageProxy] = {}
        self.last_fresh = -1  # enqueue index of the last first-time delivery


class PushConsumers(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.queue = new_prefix("push")
        self.broker = RabbitmqBroker(
            url=RABBITMQ_URL, middleware=[], confirm_delivery=True, consumer_timeout=86_400_000
        )
        self.broker.declare_queue(self.queue, ensure=True)
        self.consumers: list[_Held] = []
        self.order: dict[str, int] = {}  # message id -> enqueue index
        self.settled: set[str] = set()
        self.nacked: set[str] = set()
        self.requeued: set[str] = set()

    def teardown(self) -> None:
        try:
            for c in self.consumers:
                c.consumer.close()
            self.check_the_rest()
        finally:
            self.broker.close()
            delete_queues([self.queue, policy.dq_name(self.queue), policy.xq_name(self.queue)])

    def check_the_rest(self) -> None:
        """Drain what is left with a fresh consumer: exactly the unsettled messages."""
        consumer = self.broker.consume(self.queue, prefetch=50, timeout=300)
        seen: list[str] = []
        for proxy in consumer:
            seen.append(proxy.message_id)
            consumer.ack(proxy)
        consumer.close()
        expected = set(self.order) - self.settled
        assert sorted(seen) == sorted(expected), "left on the queue: not the unsettled messages"
        dead = {
            Message.decode(body).message_id for body, _ in read_queue(policy.xq_name(self.queue))
        }
        assert dead == self.nacked

    @rule(n=st.integers(1, 4))
    def enqueue(self, n: int) -> None:
        sent = self.broker.enqueue_many([Message(self.queue, "f", (i,), {}, {}) for i in range(n)])
        for message in sent:
            self.order[message.message_id] = len(self.order)

    @precondition(lambda self: len(self.consumers) < 3)
    @rule(prefetch=st.integers(1, 3))
    def open_consumer(self, prefetch: int) -> None:
        consumer = self.broker.consume(self.queue, prefetch=prefetch, timeout=_TAKE_TIMEOUT_MS)
        self.consumers.append(_Held(consumer, prefetch))

    @precondition(lambda self: self.consumers)
    @rule(data=st.data())
    def take(self, data: st.DataObject) -> None:
        c = data.draw(st.sampled_from(self.consumers))
        try:
            proxy = next(c.consumer)
        except StopIteration:
            return
        mid = proxy.message_id
        assert mid in self.order, f"{mid} was never enqueued"
        assert mid not in self.settled, f"{mid} was handed out after it was settled"
        holders = [other for other in self.consumers if mid in other.held]
        assert not holders, f"{mid} handed out while a consumer holds it"
        if mid not in self.requeued:
            assert self.order[mid] > c.last_fresh, "a consumer got messages out of order"
            c.last_fresh = self.order[mid]
        c.held[mid] = proxy

    def _pick(self, data: st.DataObject) -> tuple[_Held, MessageProxy]:
        c = data.draw(st.sampled_from([c for c in self.consumers if c.held]))
        mid = data.draw(st.sampled_from(sorted(c.held)))
        return c, c.held.pop(mid)

    @precondition(lambda self: any(c.held for c in self.consumers))
    @rule(data=st.data(), outcome=st.sampled_from(["ack", "nack", "requeue"]))
    def settle(self, data: st.DataObject, outcome: str) -> None:
        c, proxy = self._pick(data)
        if outcome == "ack":
            c.consumer.ack(proxy)
            self.settled.add(proxy.message_id)
        elif outcome == "nack":
            c.consumer.nack(proxy)
            self.settled.add(proxy.message_id)
            self.nacked.add(proxy.message_id)
        else:
            c.consumer.requeue([proxy])
            self.requeued.add(proxy.message_id)

    @precondition(lambda self: self.consumers)
    @rule(data=st.data())
    def close_consumer(self, data: st.DataObject) -> None:
        c = data.draw(st.sampled_from(self.consumers))
        c.consumer.close()
        self.consumers.remove(c)
        # What it held, handed out or buffered, went back to the tail of the queue:
        # every unsettled message no consumer holds may be out of order now.
        held = {mid for other in self.consumers for mid in other.held}
        self.requeued.update(set(self.order) - self.settled - held)

    @invariant()
    def never_more_than_the_prefetch(self) -> None:
        for c in self.consumers:
            consumer = c.consumer
            assert isinstance(consumer, RabbitmqConsumer)
            assert consumer._outstanding <= c.prefetch, (consumer._outstanding, c.prefetch)


TestPushConsumers = PushConsumers.TestCase
TestPushConsumers.settings = settings(
    max_examples=15,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
