"""dq's global broker in tests: install one for a test and put back what was there.

`dq.set_broker` replaces the process-wide broker and actors declared without a broker
wait in a module-level list until one is set; a test that changes either leaves the
next test a different world unless it restores both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

import dq
import dq.broker
from dq.brokers.stub import StubBroker

StubT = TypeVar("StubT", bound=StubBroker)


@contextlib.contextmanager
def kept_global_broker() -> Iterator[None]:
    """On exit, the global broker and the actors waiting for one are as on entry."""
    previous = dq.broker.global_broker
    floating = list(dq.broker._floating)
    try:
        yield
    finally:
        dq.broker.global_broker = previous
        dq.broker._floating[:] = floating


def installed(broker: StubT) -> Iterator[StubT]:
    """For a fixture (``yield from installed(broker)``): ``broker`` is the global broker
    while the test runs; then it is flushed and closed, and the previous one is back."""
    with kept_global_broker():
        dq.set_broker(broker)
        yield broker
        broker.flush_all()
        broker.close()
