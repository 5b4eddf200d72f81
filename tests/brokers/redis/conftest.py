"""Fixtures of the Redis broker tests on the shared server (127.0.0.1:6379): a private
namespace per test, emptied after it, and a RedisBroker on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dq.brokers.redis import RedisBroker
from tests.support.redis_helpers import client, delete_namespace, new_namespace


@pytest.fixture
def namespace() -> Iterator[str]:
    """A namespace of this test only; every key under it is deleted after."""
    name = new_namespace()
    yield name
    delete_namespace(client(), name)


@pytest.fixture
def broker(namespace: str) -> Iterator[RedisBroker]:
    """A RedisBroker on `namespace` (1 s heartbeat timeout, 100 ms requeue interval),
    closed after the test."""
    b = RedisBroker(namespace=namespace, heartbeat_timeout=1000, requeue_interval=100)
    yield b
    b.close()
