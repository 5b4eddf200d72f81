"""`dq.group`: messages, pipelines and groups run in parallel (the results side needs
a results backend, which dq does not have yet)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import dq
from dq import Message, Worker
from dq.brokers.stub import StubBroker


@pytest.fixture
def broker() -> Iterator[StubBroker]:
    b = StubBroker()
    dq.set_broker(b)
    yield b
    b.close()


def test_run_enqueues_every_child_and_runs_nested_pipelines_and_groups(
    broker: StubBroker,
) -> None:
    seen: list[Any] = []

    @dq.actor
    def record(x: Any) -> Any:
        seen.append(x)
        return x

    g = dq.group(
        [
            record.message(1),
            record.message(2),
            record.message(3) | record.message_with_options(args=(4,), pipe_ignore=True),
            dq.group([record.message(5), record.message(6)]),
        ]
    )
    assert len(g) == 4
    assert str(g).startswith("group([record(1), record(2), pipeline([")
    assert g.run() is g
    worker = Worker(broker, worker_threads=2, worker_timeout=20)
    worker.start()
    try:
        broker.join("default", timeout=5000)
    finally:
        worker.stop()
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]


def test_run_with_a_delay_delays_every_child(broker: StubBroker) -> None:
    @dq.actor
    def noop() -> None:
        pass

    dq.group([noop.message(), noop.message() | noop.message()]).run(delay=10_000)
    assert broker.queues["default.DQ"].qsize() == 2
    assert broker.queues["default"].qsize() == 0


def test_the_group_runs_on_its_own_broker() -> None:
    other = StubBroker()
    message: Message[Any] = Message("default", "f", (), {}, {})
    other.declare_queue("default")
    dq.group([message], broker=other).run()
    assert other.queues["default"].qsize() == 1


def test_completion_callbacks_and_results_say_what_is_missing(broker: StubBroker) -> None:
    @dq.actor
    def noop() -> None:
        pass

    g = dq.group([noop.message()])
    g.add_completion_callback(noop.message())
    assert len(g.completion_callbacks) == 1
    with pytest.raises(RuntimeError, match="GroupCallbacks"):
        g.run()
    assert broker.queues["default"].qsize() == 0  # nothing was enqueued
    plain = dq.group([noop.message()])
    for call in (
        lambda: plain.completed,
        lambda: plain.completed_count,
        plain.get_results,
        plain.wait,
    ):
        with pytest.raises(RuntimeError, match="results backend"):
            call()
