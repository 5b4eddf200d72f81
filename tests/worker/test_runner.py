"""The runtime seam: a single-threaded, deterministic runtime driving dq step by step.

No threads, no sleeps: a fake clock decides when delayed messages and retries come
due, and a fixed random source makes the backoff exact. This is how dq is embedded in
another runtime (an event loop, a simulation, a test).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import dq
import dq.broker
from dq import runtime
from dq.brokers.stub import StubBroker
from dq.runtime import Runner


class FakeClock:
    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now


class NoJitter:
    def random(self) -> float:
        return 0.0


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    fake = FakeClock(1_000_000)
    previous_clock, previous_random = runtime.get_clock(), runtime.get_random()
    previous_broker = dq.broker.global_broker
    runtime.set_clock(fake)
    runtime.set_random(NoJitter())
    yield fake
    runtime.set_clock(previous_clock)
    runtime.set_random(previous_random)
    dq.broker.global_broker = previous_broker


def test_delays_retries_with_backoff_and_dead_letters_step_by_step(clock: FakeClock) -> None:
    broker = StubBroker()  # the default middleware: Retries decides what a failure means
    log: list[tuple[int, str]] = []
    attempts = {"flaky": 0}

    @dq.actor(broker=broker, max_retries=3, min_backoff=1000)
    def flaky() -> None:
        attempts["flaky"] += 1
        log.append((clock.now, f"flaky attempt {attempts['flaky']}"))
        if attempts["flaky"] < 3:
            raise RuntimeError("not yet")

    @dq.actor(broker=broker)
    def later() -> None:
        log.append((clock.now, "later"))

    @dq.actor(broker=broker, max_retries=1, min_backoff=500)
    def doomed() -> None:
        log.append((clock.now, "doomed"))
        raise ValueError("always")

    flaky.send()
    later.send_with_options(delay=5000)
    doomed.send()
    runner = Runner(broker)
    start = clock.now

    assert runner.run_until_idle() == 2  # flaky and doomed ran once each; both failed
    assert log == [(start, "flaky attempt 1"), (start, "doomed")]
    # Backoff with no jitter: min_backoff x 2^retries. Nothing is due before it.
    assert runner.next_eta_ms() == start + 500  # doomed's retry
    clock.now = start + 499
    assert runner.run_until_idle() == 0

    clock.now = start + 500
    runner.run_until_idle()
    assert log[-1] == (start + 500, "doomed")
    # doomed has used its one retry: dead-lettered, with the exception that killed it.
    (dead,) = broker.dead_letters
    assert dead.actor_name == "doomed" and isinstance(dead._exception, ValueError)
    assert dead.options["retries"] == 2

    clock.now = start + 1000
    runner.run_until_idle()
    assert log[-1] == (start + 1000, "flaky attempt 2")
    assert runner.next_eta_ms() == start + 1000 + 2000  # second retry: 1000 x 2

    clock.now = start + 3000
    runner.run_until_idle()
    assert log[-1] == (start + 3000, "flaky attempt 3")  # succeeded

    clock.now = start + 4999
    runner.run_until_idle()
    assert log[-1][1] != "later"
    clock.now = start + 5000
    runner.run_until_idle()
    assert log[-1] == (start + 5000, "later")

    assert runner.next_eta_ms() is None
    broker.join("default", timeout=0, fail_fast=False)  # nothing unfinished
    runner.close()


def test_runner_respects_priority_and_returns_unprocessed_messages(clock: FakeClock) -> None:
    broker = StubBroker(middleware=[])
    order: list[str] = []

    @dq.actor(broker=broker, priority=5)
    def low() -> None:
        order.append("low")

    @dq.actor(broker=broker, priority=0)
    def high() -> None:
        order.append("high")

    low.send()
    high.send()
    low.send()
    runner = Runner(broker)
    assert runner.step()
    assert order == ["high"]
    runner.close()  # the two taken and not run go back to the broker
    assert broker.queues["default"].qsize() == 2
    assert Runner(broker).run_until_idle() == 2
    assert order == ["high", "low", "low"]


def test_a_retry_that_cannot_be_stored_is_dead_lettered_in_one_step(clock: FakeClock) -> None:
    # It used to be returned to its queue, to fail and be returned again, forever.
    broker = StubBroker()
    ran: list[str] = []

    @dq.actor(broker=broker)
    def doomed() -> None:
        ran.append("doomed")
        raise dq.Retry(delay=10**20)  # an eta past the year 9999: the broker refuses it

    @dq.actor(broker=broker)
    def fine() -> None:
        ran.append("fine")

    doomed.send()
    fine.send()
    runner = Runner(broker)
    assert runner.run_until_idle(max_steps=10) == 2
    assert ran == ["doomed", "fine"]
    (dead,) = broker.dead_letters
    assert dead.actor_name == "doomed"
    assert dead.death_reason is dq.core.DeathReason.UNSTORABLE
    broker.join("default", timeout=0, fail_fast=False)
    runner.close()
