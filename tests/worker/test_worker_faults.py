"""Worker: messages that cannot run or cannot be settled are dead-lettered with their
reason (issue 16: faults 1 and 6), and nothing stalls a queue.

The brokers here are StubBrokers whose consumers are wrapped, to play what a real
broker can deliver and refuse: a message with an eta the core refuses (a foreign
producer, a raw write), or a consumer that stores replacements itself (``replace``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dq
import dq.broker
import dq.runtime
import dq.worker.tuning
from dq import Message, MessageProxy, Worker
from dq.broker import Consumer
from dq.brokers.stub import StubBroker
from dq.core import DeathReason, InvalidValue, policy
from dq.middleware import Middleware
from tests.support.consumers import Delegating
from tests.support.global_broker import kept_global_broker


@pytest.fixture(autouse=True)
def _restore_global_broker() -> Iterator[None]:
    with kept_global_broker():
        yield


class Wrapped(Delegating):
    """A stub consumer whose deliveries ``rewrite`` may change, as if another producer
    had stored them so; a held delayed message is promoted only if its eta is valid
    (the core refuses to move a bad one, as every broker's server step does)."""

    def __init__(self, inner: Any, broker: WrappingBroker) -> None:
        super().__init__(inner)
        self.broker = broker

    def __next__(self) -> MessageProxy:
        proxy = super().__next__()
        self.broker.rewrite(proxy)
        return proxy

    def ack(self, message: MessageProxy) -> None:
        self.broker.settled("ack", message)
        super().ack(message)

    def nack(self, message: MessageProxy) -> None:
        self.broker.settled("nack", message)
        super().nack(message)

    def promote(self, message: MessageProxy) -> Message[Any]:
        problem = policy.eta_problem(message.options.get("eta"))
        if problem is not None:
            raise InvalidValue(problem)
        return super().promote(message)


class WrappingBroker(StubBroker):
    """A StubBroker whose consumers are ``consumer_class(stub consumer, broker)``."""

    def __init__(
        self,
        *,
        consumer_class: Callable[[Any, WrappingBroker], Consumer] = Wrapped,
        rewrite: Callable[[MessageProxy], None] = lambda proxy: None,
        middleware: list[Middleware] | None = None,
    ) -> None:
        super().__init__(middleware)
        self.consumer_class = consumer_class
        self.rewrite = rewrite
        self.settlements: list[tuple[str, str]] = []  # (kind, message_id)

    def settled(self, kind: str, message: MessageProxy) -> None:
        self.settlements.append((kind, message.message_id))

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 100) -> Consumer:
        return self.consumer_class(super().consume(queue_name, prefetch, timeout), self)


def run_worker(broker: StubBroker, *, threads: int = 1, queue: str = "default") -> None:
    """Start a worker, wait until ``queue`` is drained, stop it (raises
    QueueJoinTimeout if the queue stalls)."""
    worker = Worker(broker, worker_timeout=20, worker_threads=threads)
    worker.start()
    try:
        broker.join(queue, timeout=10_000, fail_fast=False)
        worker.join()
    finally:
        worker.stop(timeout=5000)


def errors(caplog: pytest.LogCaptureFixture, *, at_least: int = logging.ERROR) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= at_least]


# -- fault 6: a settlement that cannot be stored ---------------------------------------------


def test_retries_that_cannot_be_stored_are_dead_lettered_and_free_their_slots(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # `dq -t 1`: one thread, a prefetch of two. Two messages whose retry the broker
    # refuses (an eta past the year 9999) used to keep both slots (or loop through
    # requeues), so the third message never ran.
    broker = StubBroker()  # the default middleware: Retries
    dq.set_broker(broker)
    ran: list[str] = []

    @dq.actor
    def doomed() -> None:
        raise dq.Retry(delay=10**20)

    @dq.actor
    def fine() -> None:
        ran.append("fine")

    first, second = doomed.send(), doomed.send()
    fine.send()
    with caplog.at_level(logging.INFO, logger="dq"):
        run_worker(broker, threads=1)
    assert ran == ["fine"]
    dead = {proxy.message_id: proxy for proxy in broker.dead_letters}
    assert set(dead) == {first.message_id, second.message_id}
    assert {proxy.death_reason for proxy in dead.values()} == {DeathReason.UNSTORABLE}
    lines = [line for line in errors(caplog) if "Dead-lettering" in line]
    for message in (first, second):
        (line,) = [line for line in lines if message.message_id in line]
        assert "'doomed'" in line  # the actor
        assert "could not be stored" in line
        assert "the year 9999" in line  # the broker's own reason
    assert not any("redeliver" in line for line in errors(caplog, at_least=logging.WARNING))


class Replacing(Wrapped):
    """A consumer that stores a message's replacement and acks it in one step, as the
    Redis, SQLite and RabbitMQ consumers do (here: refusing what the core refuses)."""

    def replace(self, message: MessageProxy, new: Message[Any], delay: int | None) -> Message[Any]:
        if delay is not None:
            policy.eta_ms(0, delay)  # the core's bound: raises InvalidValue
        raise AssertionError("only unstorable replacements reach this consumer")


def test_a_replacement_the_consumer_refuses_is_dead_lettered_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = WrappingBroker(consumer_class=Replacing)
    dq.set_broker(broker)

    @dq.actor
    def doomed() -> None:
        raise dq.Retry(delay=10**20)

    sent = [doomed.send() for _ in range(3)]
    with caplog.at_level(logging.ERROR, logger="dq"):
        run_worker(broker, threads=1)
    assert sorted(p.message_id for p in broker.dead_letters) == sorted(m.message_id for m in sent)
    assert all(p.death_reason is DeathReason.UNSTORABLE for p in broker.dead_letters)
    assert broker.settlements == [("nack", m.message_id) for m in sent]


class AckFailsOnce(Wrapped):
    failures = 0

    def ack(self, message: MessageProxy) -> None:
        if not AckFailsOnce.failures:
            AckFailsOnce.failures += 1
            raise dq.ConnectionClosed("database or disk is full")
        super().ack(message)


def test_a_stored_replacement_is_stored_once_when_the_ack_after_it_must_be_retried(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A consumer without `replace`: the worker enqueues the retry, then acks. When
    # the ack fails for want of a connection, only the ack is tried again.
    monkeypatch.setattr(dq.worker.tuning, "POST_PROCESS_MESSAGE_RETRY_DELAY_SECS", 0.01)
    AckFailsOnce.failures = 0
    broker = WrappingBroker(consumer_class=AckFailsOnce)
    dq.set_broker(broker)
    enqueued: list[int | None] = []

    class Count(Middleware):
        def after_enqueue(self, broker: dq.Broker, message: Any, delay: int | None) -> None:
            enqueued.append(delay)

    broker.add_middleware(Count())
    attempts: list[int] = []

    @dq.actor(min_backoff=1, max_backoff=1)
    def fails_once() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")

    fails_once.send()
    with caplog.at_level(logging.WARNING, logger="dq"):
        run_worker(broker, threads=1)
    assert attempts == [1, 1]
    assert enqueued == [None, 1]  # the send, then the retry: once
    assert broker.dead_letters == []
    (line,) = [line for line in errors(caplog, at_least=logging.WARNING) if "retrying" in line]
    assert "database or disk is full" in line  # the error's own text...
    assert "unreachable" not in line  # ...not a guess


# -- option values from the wire ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"time_limit": "x"}, "'time_limit'"),
        ({"max_retries": -1}, "'max_retries'"),
        ({"max_backoff": -100}, "'max_backoff'"),
        ({"max_age": "old"}, "'max_age'"),
        ({"retries": "many"}, "'retries'"),
    ],
)
def test_a_message_with_a_bad_option_from_the_wire_is_dead_lettered_before_it_runs(
    options: dict[str, Any], named: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = StubBroker()
    dq.set_broker(broker)
    ran: list[str] = []

    @dq.actor
    def record(tag: str) -> None:
        ran.append(tag)

    # As a Dramatiq producer sends it (dq's own send refuses such values).
    bad = broker.enqueue(Message("default", "record", ("bad",), {}, options))
    record.send("good")
    with caplog.at_level(logging.ERROR, logger="dq"):
        run_worker(broker, threads=1)
    assert ran == ["good"]
    (dead,) = broker.dead_letters
    assert dead.message_id == bad.message_id
    assert dead.death_reason is DeathReason.BAD_OPTIONS
    assert isinstance(dead._exception, ValueError)  # what results readers see
    (line,) = errors(caplog)
    assert bad.message_id in line and "'record'" in line
    assert named in line and repr(next(iter(options.values()))) in line


def test_dramatiq_values_of_options_from_the_wire_still_run() -> None:
    broker = StubBroker()
    dq.set_broker(broker)
    ran: list[dict[str, Any]] = []

    @dq.actor
    def record() -> None:
        message = dq.middleware.CurrentMessage.get_current_message()
        ran.append(dict(message.options) if message is not None else {})

    broker.add_middleware(dq.middleware.CurrentMessage())
    valid: list[dict[str, Any]] = [
        {"time_limit": math.inf},  # no limit
        {"time_limit": 0},  # falls through to the actor's limit
        {"max_retries": None},  # unlimited
        {"notify_shutdown": None, "max_age": None},
        {"min_backoff": 0.5, "max_backoff": math.inf},
        {"retries": 3, "eta": None},
    ]
    for options in valid:
        broker.enqueue(Message("default", "record", (), {}, options))
    run_worker(broker, threads=1)
    assert broker.dead_letters == []
    assert len(ran) == len(valid)


# -- fault 1: an eta that never comes due --------------------------------------------------------


def poison_eta(value: object) -> Callable[[MessageProxy], None]:
    def rewrite(proxy: MessageProxy) -> None:
        if proxy.args == ("poison",):
            proxy.update_message(proxy.message.copy(options={"eta": value}))

    return rewrite


@pytest.mark.parametrize("eta", [math.nan, math.inf, -math.inf, "soon", -5, 10**20, True])
def test_a_delayed_message_with_a_bad_eta_is_dead_lettered_and_the_others_go_on(
    eta: object, caplog: pytest.LogCaptureFixture
) -> None:
    broker = WrappingBroker(rewrite=poison_eta(eta))
    dq.set_broker(broker)
    ran: list[str] = []

    @dq.actor
    def record(tag: str) -> None:
        ran.append(tag)

    record.send_with_options(args=("before",), delay=1)
    poisoned = record.send_with_options(args=("poison",), delay=1)
    record.send_with_options(args=("after",), delay=1)
    with caplog.at_level(logging.INFO, logger="dq"):
        run_worker(broker, threads=2)
    assert sorted(ran) == ["after", "before"]
    (dead,) = broker.dead_letters
    assert dead.message_id == poisoned.message_id
    assert dead.death_reason is DeathReason.BAD_ETA
    (line,) = [line for line in errors(caplog) if "Dead-lettering" in line]
    assert poisoned.message_id in line and repr(eta) in line and "default.DQ" in line
    # The delay queue's consumer thread never crashed (it used to, every 3 s).
    assert not [r for r in caplog.records if r.levelno >= logging.CRITICAL]


def test_a_runner_dead_letters_a_bad_eta_and_runs_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = WrappingBroker(rewrite=poison_eta(math.nan))
    dq.set_broker(broker)
    ran: list[str] = []

    @dq.actor
    def record(tag: str) -> None:
        ran.append(tag)

    record.send_with_options(args=("poison",), delay=0)
    record.send("ready")
    runner = dq.runtime.Runner(broker)
    with caplog.at_level(logging.ERROR, logger="dq"):
        runner.run_until_idle()
    runner.close()
    assert ran == ["ready"]
    (dead,) = broker.dead_letters
    assert dead.death_reason is DeathReason.BAD_ETA
    assert any("nan" in line and dead.message_id in line for line in errors(caplog))
