"""Shared fixtures: a fresh StubBroker as the global broker for each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dq.brokers.stub import StubBroker
from tests.support.global_broker import installed


@pytest.fixture
def stub_broker() -> Iterator[StubBroker]:
    """A StubBroker with no middleware, installed as the global broker."""
    yield from installed(StubBroker(middleware=[]))
