"""Shared fixtures: a fresh StubBroker as the global broker for each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import dq
import dq.broker
from dq.brokers.stub import StubBroker


@pytest.fixture
def stub_broker() -> Iterator[StubBroker]:
    """A StubBroker with no middleware, installed as the global broker."""
    previous = dq.broker.global_broker
    floating = list(dq.broker._floating)
    broker = StubBroker(middleware=[])
    dq.set_broker(broker)
    yield broker
    broker.flush_all()
    broker.close()
    dq.broker.global_broker = previous
    dq.broker._floating[:] = floating
