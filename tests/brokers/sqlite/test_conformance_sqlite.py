"""The public conformance machine on SqliteBroker in its default configuration (>= 200
examples), with crash steps: a consumer's process stops renewing its leases and
recovery expires them."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Sequence

import pytest

from dq.broker import Broker, Consumer
from dq.brokers.sqlite import SqliteBroker
from dq.testing import Crashes, conformance_test
from tests.support.sqlite_helpers import remove_database

_files: list[str] = []


def _broker() -> Broker:
    # Each example gets its own file; the previous examples' files are removed here
    # (their brokers are closed by then) and the last one by the module fixture.
    while _files:
        remove_database(_files.pop())
    fd, path = tempfile.mkstemp(prefix="dq-conformance-", suffix=".sqlite3")
    os.close(fd)
    _files.append(path)
    # poll_interval only shortens how long an idle consumer sleeps between looks.
    return SqliteBroker(path, middleware=[], poll_interval=5)


def _dead_letters(broker: Broker, queue_name: str) -> Sequence[str]:
    assert isinstance(broker, SqliteBroker)
    return [message_id for message_id, _, _ in broker.dead_letters_of(queue_name)]


def _wall_ms() -> int:
    return int(time.time() * 1000)


class SqliteCrashes(Crashes):
    """Each crashable consumer runs in a "process" of its own: a SqliteBroker on the
    same file. It dies when that broker stops (its keeper no longer renews its
    leases) without closing the consumer; recovery is the reaper's lease expiry, at
    a time past the dead one's leases and before the live ones' (renewed first)."""

    expires_leases = True

    def __init__(self, broker: Broker) -> None:
        super().__init__(broker)
        assert isinstance(broker, SqliteBroker)
        self.main = broker
        # The cap the broker applies when it expires leases, if it has one.
        self.max_deliveries = int(getattr(broker, "max_deliveries", 0))
        self.processes: dict[int, SqliteBroker] = {}  # id(consumer) -> its broker
        self.died_at = 0  # wall ms of the last death

    def consume(self, queue_name: str, prefetch: int, timeout: int) -> Consumer:
        process = SqliteBroker(self.main.path, middleware=[], poll_interval=5)
        process.declare_queue(queue_name)
        consumer = process.consume(queue_name, prefetch=prefetch, timeout=timeout)
        self.processes[id(consumer)] = process
        return consumer

    def crash(self, consumer: Consumer) -> None:
        self.processes.pop(id(consumer)).close()  # its consumer is never closed
        self.died_at = _wall_ms()

    def recover(self) -> None:
        while _wall_ms() <= self.died_at:  # the dead leases end before the live ones
            time.sleep(0.001)
        now = _wall_ms()
        for process in [self.main, *self.processes.values()]:
            process.renew_leases()  # the live keepers' tick: until >= now + lease
        self.main.recover(now_ms=now + self.main.lease)

    def close(self) -> None:
        for process in self.processes.values():
            process.close()


TestSqliteBrokerConformance = conformance_test(
    _broker,
    dead_letters=_dead_letters,
    consumer_timeout_ms=2,
    strict_queues=False,
    crashes=SqliteCrashes,
    max_examples=200,
    stateful_step_count=40,
)


@pytest.fixture(scope="module", autouse=True)
def _clean_files() -> Iterator[None]:
    yield
    while _files:
        remove_database(_files.pop())
