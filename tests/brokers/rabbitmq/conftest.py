"""Fixtures of the RabbitMQ broker tests: a plain pika connection to the shared server."""

from __future__ import annotations

from collections.abc import Iterator

import pika.exceptions
import pytest

from tests.support.rabbitmq_helpers import RABBITMQ_URL, Rabbit


@pytest.fixture
def rabbit() -> Iterator[Rabbit]:
    """A `Rabbit` (looks at and deletes queues without dq or Dramatiq), closed after."""
    try:
        rabbit = Rabbit()
    except pika.exceptions.AMQPConnectionError as error:  # pragma: no cover - environment
        pytest.fail(f"these tests need RabbitMQ at {RABBITMQ_URL}: {error}")
    yield rabbit
    rabbit.close()
