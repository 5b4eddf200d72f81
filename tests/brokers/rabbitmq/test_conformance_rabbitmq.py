"""The public conformance machine on RabbitmqBroker in its default consume mode
(subscriptions, >= 60 examples), with crash steps: a consumer's connection closes
without acking and the server requeues what it held. A smaller run checks
``exact_reservations=True``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from dq import Message
from dq.broker import Broker, Consumer
from dq.brokers.rabbitmq import RabbitmqBroker
from dq.brokers.rabbitmq.consumer import RabbitmqConsumer
from dq.core import policy
from dq.testing import Crashes, conformance_test
from tests.support.rabbitmq_helpers import RABBITMQ_URL, delete_queues, new_prefix, read_queue

pytestmark = [pytest.mark.rabbitmq]

# Queue names are global on a server: each run uses two private ones, which every
# example's teardown leaves empty (consumers closed, then flush_all).
_DEFAULT = new_prefix("conformance")
_EXACT = new_prefix("conformance_exact")


def _broker(*, exact_reservations: bool = False) -> Broker:
    # The default consume mode and consumer_timeout. Confirmed publishing, so that a
    # join's single check counts what was just published (without confirms RabbitMQ
    # may count it a moment later; the publish is written the same way either way).
    broker = RabbitmqBroker(
        url=RABBITMQ_URL,
        middleware=[],
        confirm_delivery=True,
        exact_reservations=exact_reservations,
    )
    broker.join_min_successes = 1  # every consumer of these queues is in this process
    return broker


def _dead_letters(broker: Broker, queue_name: str) -> Sequence[str]:
    return [Message.decode(body).message_id for body, _ in read_queue(policy.xq_name(queue_name))]


class RabbitmqCrashes(Crashes):
    """A consumer dies when its connection closes with its deliveries unacked (as when
    its process is killed): the server requeues them before it answers the close,
    so the death is the recovery. RabbitMQ counts no deliveries (no cap)."""

    recovers_at_once = True

    def crash(self, consumer: Consumer) -> None:
        assert isinstance(consumer, RabbitmqConsumer)
        assert isinstance(self.broker, RabbitmqBroker)
        self.broker._open_consumers.discard(consumer)  # its process is gone
        consumer.connection.close()  # no ack, no republish: the server takes them back


TestRabbitmqBrokerConformance = conformance_test(
    _broker,
    dead_letters=_dead_letters,
    queue_names=(f"{_DEFAULT}_a", f"{_DEFAULT}_b"),
    consumer_timeout_ms=5,
    strict_queues=False,
    crashes=RabbitmqCrashes,
    max_examples=60,
    stateful_step_count=25,
)

TestRabbitmqBrokerConformanceExact = conformance_test(
    lambda: _broker(exact_reservations=True),
    dead_letters=_dead_letters,
    queue_names=(f"{_EXACT}_a", f"{_EXACT}_b"),
    consumer_timeout_ms=5,
    strict_queues=False,
    crashes=RabbitmqCrashes,
    max_examples=15,
    stateful_step_count=20,
)


@pytest.fixture(scope="module", autouse=True)
def _delete_conformance_queues() -> Iterator[None]:
    yield
    delete_queues([f"{_DEFAULT}_a", f"{_DEFAULT}_b", f"{_EXACT}_a", f"{_EXACT}_b"])
