"""Fixtures of the SQLite broker tests: a database file per test and the brokers on it,
each closed after the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dq.brokers.sqlite import SqliteBroker


@pytest.fixture
def path(tmp_path: Path) -> str:
    """The test's database file (not created yet)."""
    return str(tmp_path / "dq.sqlite3")


@pytest.fixture
def brokers() -> Iterator[list[SqliteBroker]]:
    """Brokers a test made (append them): closed after it."""
    made: list[SqliteBroker] = []
    yield made
    for broker in made:
        broker.close()


@pytest.fixture
def broker(path: str, brokers: list[SqliteBroker]) -> SqliteBroker:
    """A SqliteBroker on `path` with no middleware, polling every 10 ms, and queue ``q``."""
    broker = SqliteBroker(path, middleware=[], poll_interval=10)
    brokers.append(broker)
    broker.declare_queue("q")
    return broker
