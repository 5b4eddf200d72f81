"""The public conformance machine on StubBroker (>= 200 examples), crash steps included."""

from __future__ import annotations

from collections.abc import Sequence

from dq.broker import Broker, Consumer
from dq.brokers.stub import StubBroker
from dq.testing import Crashes, conformance_test


def _dead_letters(broker: Broker, queue_name: str) -> Sequence[str]:
    assert isinstance(broker, StubBroker)
    return [m.message_id for m in broker.dead_letters_by_queue.get(queue_name, [])]


class StubCrashes(Crashes):
    """A stub consumer dies by `StubBroker.abandon`; `StubBroker.recover` is the reaper."""

    def __init__(self, broker: Broker) -> None:
        super().__init__(broker)
        assert isinstance(broker, StubBroker)
        self.stub = broker
        self.max_deliveries = broker.max_deliveries

    def crash(self, consumer: Consumer) -> None:
        self.stub.abandon(consumer)

    def recover(self) -> None:
        self.stub.recover()


# The default configuration (max_deliveries 10)...
TestStubBrokerConformance = conformance_test(
    lambda: StubBroker(middleware=[], fail_fast_default=False),
    dead_letters=_dead_letters,
    consumer_timeout_ms=1,
    crashes=StubCrashes,
    max_examples=200,
)

# ... and the smallest cap, which a few deaths reach.
TestStubBrokerConformanceSmallCap = conformance_test(
    lambda: StubBroker(middleware=[], fail_fast_default=False, max_deliveries=2),
    dead_letters=_dead_letters,
    consumer_timeout_ms=1,
    crashes=StubCrashes,
    max_examples=100,
)
