"""The public conformance machine on StubBroker (>= 200 examples)."""

from __future__ import annotations

from collections.abc import Sequence

from dq.broker import Broker
from dq.brokers.stub import StubBroker
from dq.testing import conformance_test


def _dead_letters(broker: Broker, queue_name: str) -> Sequence[str]:
    assert isinstance(broker, StubBroker)
    return [m.message_id for m in broker.dead_letters_by_queue.get(queue_name, [])]


TestStubBrokerConformance = conformance_test(
    lambda: StubBroker(middleware=[], fail_fast_default=False),
    dead_letters=_dead_letters,
    consumer_timeout_ms=1,
    max_examples=200,
)
