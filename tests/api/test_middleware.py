"""The default middleware stack, driven hook by hook (no Worker).

Each test delivers real messages through a `StubBroker` consumer and plays the
worker's part by hand: ``before_process_message``, the actor call, then
``after_process_message`` with the result or the exception.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

import dq
import dq.broker
import dq.middleware
import dq.middleware.threading
import dq.threading
from dq import Message, MessageProxy, Retry, runtime
from dq.broker import Consumer
from dq.brokers.stub import StubBroker
from dq.brokers.stub.consumer import _StubConsumer
from dq.composition import pipeline
from dq.core import DeathReason
from dq.errors import BrokerConnectionError, QueueNotFound
from dq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Interrupt,
    Middleware,
    Pipelines,
    Retries,
    Shutdown,
    ShutdownNotifications,
    SkipMessage,
    TimeLimit,
    TimeLimitExceeded,
)
from dq.middleware.retries import DEFAULT_MAX_BACKOFF, DEFAULT_MIN_BACKOFF
from dq.worker.processing import settle_or_dead_letter
from tests.support.global_broker import installed

NOW = 1_700_000_000_000

M = TypeVar("M", bound=Message[Any])

# -- fixtures and helpers -----------------------------------------------------------------


class FixedClock:
    """A clock that stands still (tests move it by hand)."""

    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now


class FixedRandom:
    """A random source that always draws the same number."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


class Recorder(Middleware):
    """Records every enqueue (as stored) with its delay."""

    def __init__(self) -> None:
        self.enqueued: list[tuple[Message[Any], int | None]] = []

    def after_enqueue(self, broker: dq.Broker, message: Message[Any], delay: int | None) -> None:
        self.enqueued.append((message, delay))

    def on(self, queue_name: str) -> list[tuple[Message[Any], int | None]]:
        return [(m, d) for m, d in self.enqueued if m.queue_name == queue_name]


@pytest.fixture
def clock() -> Iterator[FixedClock]:
    previous = runtime.get_clock()
    fixed = FixedClock(NOW)
    runtime.set_clock(fixed)
    yield fixed
    runtime.set_clock(previous)


@pytest.fixture
def rng() -> Iterator[FixedRandom]:
    previous = runtime.get_random()
    fixed = FixedRandom(0.5)
    runtime.set_random(fixed)
    yield fixed
    runtime.set_random(previous)


@pytest.fixture
def broker() -> Iterator[StubBroker]:
    """A StubBroker with the default stack, installed as the global broker."""
    yield from installed(StubBroker())


@pytest.fixture
def recorder(broker: StubBroker) -> Recorder:
    recorder = Recorder()
    broker.add_middleware(recorder)
    return recorder


_consumers: dict[int, Consumer] = {}  # id(proxy) -> the consumer that delivered it


def deliver(broker: StubBroker, queue_name: str = "default") -> MessageProxy:
    """Return the next message of ``queue_name`` as a consumer delivers it."""
    consumer = broker.consume(queue_name, timeout=10)
    proxy = next(consumer)
    _consumers[id(proxy)] = consumer
    return proxy


def process(broker: dq.Broker, proxy: MessageProxy) -> tuple[Any, BaseException | None]:
    """Play the worker's part: before hooks, the actor, after hooks, then settle the
    message on its consumer (when `deliver` delivered it)."""
    result: Any = None
    exception: BaseException | None = None
    try:
        broker.emit_before("process_message", proxy)
    except SkipMessage:
        broker.emit_after("skip_message", proxy)
    else:
        actor = broker.get_actor(proxy.actor_name)
        try:
            result = actor(*proxy.args, **proxy.kwargs)
        except BaseException as e:
            exception = e
            proxy.stuff_exception(e)
            broker.emit_after("process_message", proxy, exception=e)
        else:
            broker.emit_after("process_message", proxy, result=result)
    consumer = _consumers.pop(id(proxy), None)
    if consumer is not None:
        settle_or_dead_letter(broker, consumer, proxy)
    return result, exception


def failing(broker: dq.Broker, exc: BaseException | None = None, **options: Any) -> Any:
    """Declare the actor ``failing``, which raises ``exc`` (``ValueError("boom")``)."""

    @dq.actor(broker=broker, actor_name="failing", **options)
    def failing() -> None:
        raise exc if exc is not None else ValueError("boom")

    return failing


# -- the stack ------------------------------------------------------------------------------


def test_default_stack_order_and_the_13_actor_options() -> None:
    assert dq.middleware.default_middleware == [
        AgeLimit,
        TimeLimit,
        ShutdownNotifications,
        Callbacks,
        Pipelines,
        Retries,
    ]
    broker = StubBroker()
    assert [type(m) for m in broker.middleware] == dq.middleware.default_middleware
    assert broker.actor_options == {
        "max_age",
        "time_limit",
        "notify_shutdown",
        "on_failure",
        "on_success",
        "pipe_ignore",
        "pipe_target",
        "max_retries",
        "min_backoff",
        "max_backoff",
        "retry_when",
        "throws",
        "on_retry_exhausted",
    }
    assert CurrentMessage().actor_options == set()


def test_public_names() -> None:
    assert dq.middleware.__all__ == [
        "Middleware",
        "MiddlewareError",
        "SkipMessage",
        "Interrupt",
        "raise_thread_exception",
        "AgeLimit",
        "AsyncIO",
        "Callbacks",
        "CurrentMessage",
        "GroupCallbacks",
        "Pipelines",
        "Retries",
        "Shutdown",
        "ShutdownNotifications",
        "TimeLimit",
        "TimeLimitExceeded",
    ]
    assert "default_middleware" not in dq.middleware.__all__
    for name in dq.middleware.__all__:
        assert hasattr(dq.middleware, name)
    assert dq.middleware.threading.__all__ == dq.threading.__all__
    for name in dq.threading.__all__:
        assert getattr(dq.middleware.threading, name) is getattr(dq.threading, name)
    assert dq.threading.supported_platforms == {"CPython"}
    assert dq.threading.is_gevent_active() is False
    assert "pipeline" in dq.__all__
    assert dq.pipeline is pipeline
    assert (DEFAULT_MIN_BACKOFF, DEFAULT_MAX_BACKOFF) == (15_000, 604_800_000)


def test_interrupts_are_base_exceptions_outside_the_dramatiq_hierarchy() -> None:
    for cls in (TimeLimitExceeded, Shutdown):
        assert issubclass(cls, Interrupt)
        assert issubclass(cls, BaseException)
        assert not issubclass(cls, Exception)


def test_raise_thread_exception_on_an_unknown_thread_logs_critical(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.CRITICAL, logger="dq.threading"):
        dq.threading.raise_thread_exception(2**40 + 12345, Interrupt)
    assert "no such thread" in caplog.text


# -- Retries ------------------------------------------------------------------------------


def test_a_failure_enqueues_a_delayed_retry_and_leaves_the_original_untouched(
    broker: StubBroker, recorder: Recorder, clock: FixedClock, rng: FixedRandom
) -> None:
    actor = failing(broker)
    sent = actor.send()
    proxy = deliver(broker)
    delivered = proxy.message
    options_before = dict(delivered.options)

    _, exc = process(broker, proxy)

    assert isinstance(exc, ValueError)
    assert not proxy.failed
    assert not proxy.redelivery_requested
    assert delivered.options == options_before  # the delivered object is unchanged
    assert "retries" not in sent.options
    # Later hooks see the recorded attempt.
    assert proxy.message.options["retries"] == 1
    ((retry, delay),) = recorder.on("default.DQ")
    assert retry.queue_name == "default.DQ"
    assert retry.message_id == sent.message_id
    assert retry.message_timestamp == sent.message_timestamp
    assert retry.options["retries"] == 1
    assert retry.options["requeue_timestamp"] == NOW
    assert "ValueError: boom" in retry.options["traceback"]
    assert delay == int(DEFAULT_MIN_BACKOFF * 1.5)
    assert retry.options["eta"] == NOW + delay
    assert broker.queues["default.DQ"].qsize() == 1


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 15_000), (0.999999, 29_999)])
def test_the_first_backoff_is_between_15_and_30_seconds(
    broker: StubBroker, recorder: Recorder, rng: FixedRandom, draw: float, expected: int
) -> None:
    rng.value = draw
    failing(broker).send()
    process(broker, deliver(broker))
    ((_, delay),) = recorder.on("default.DQ")
    assert delay == expected
    assert 15_000 <= expected < 30_000


def test_backoff_grows_exponentially_and_is_capped(
    broker: StubBroker, recorder: Recorder, rng: FixedRandom
) -> None:
    actor = failing(broker, min_backoff=1000, max_backoff=5000)
    rng.value = 0.0
    actor.send_with_options(retries=2)  # third attempt: 1000 × 2² × 1
    process(broker, deliver(broker))
    rng.value = 0.8
    actor.send_with_options(retries=3)  # 1000 × 2³ × 1.8 > 5000 → 5000 × (0.5 + 0.4)
    process(broker, deliver(broker))
    assert [d for _, d in recorder.on("default.DQ")] == [4000, 4500]


def test_backoff_lookups_are_by_key_presence(
    broker: StubBroker, recorder: Recorder, rng: FixedRandom
) -> None:
    # A per-message 0 is honoured (presence); a constructor 0 means the default.
    actor = failing(broker, min_backoff=1000)
    actor.send_with_options(min_backoff=0)
    process(broker, deliver(broker))
    assert recorder.on("default.DQ")[-1][1] == 0
    assert Retries(min_backoff=0, max_backoff=0).min_backoff == DEFAULT_MIN_BACKOFF
    assert Retries(min_backoff=0, max_backoff=0).max_backoff == DEFAULT_MAX_BACKOFF


def test_the_retry_of_a_delayed_message_goes_to_the_canonical_delay_queue(
    broker: StubBroker, recorder: Recorder, clock: FixedClock, rng: FixedRandom
) -> None:
    actor = failing(broker)
    actor.send_with_options(delay=60_000)
    proxy = deliver(broker, "default.DQ")
    assert proxy.message.options["eta"] == NOW + 60_000
    clock.now += 60_000
    process(broker, proxy)
    (retry, delay), *_ = recorder.on("default.DQ")[1:]
    assert retry.queue_name == "default.DQ"  # not default.DQ.DQ
    assert retry.options["eta"] == clock.now + (delay or 0)  # a fresh eta, not the stale one


def test_exhausted_retries_fail_the_message(broker: StubBroker, recorder: Recorder) -> None:
    actor = failing(broker, max_retries=2)
    actor.send_with_options(retries=2)
    proxy = deliver(broker)
    process(broker, proxy)
    assert proxy.failed
    assert proxy.message.options["retries"] == 3
    assert recorder.on("default.DQ") == []

    actor.send_with_options(retries=1)
    proxy = deliver(broker)
    process(broker, proxy)
    assert not proxy.failed
    assert len(recorder.on("default.DQ")) == 1


def test_max_retries_zero_fails_on_the_first_failure(
    broker: StubBroker, recorder: Recorder
) -> None:
    failing(broker, max_retries=0).send()
    proxy = deliver(broker)
    process(broker, proxy)
    assert proxy.failed
    assert recorder.on("default.DQ") == []


def test_a_message_max_retries_overrides_the_actor_s_even_when_null(
    broker: StubBroker, recorder: Recorder
) -> None:
    actor = failing(broker, max_retries=0)
    actor.send_with_options(max_retries=5)
    proxy = deliver(broker)
    process(broker, proxy)
    assert not proxy.failed
    # By key presence: an explicit null means unlimited.
    actor.send_with_options(max_retries=None, retries=1000)
    proxy = deliver(broker)
    process(broker, proxy)
    assert not proxy.failed
    assert len(recorder.on("default.DQ")) == 2


def test_retry_when_decides_alone(broker: StubBroker, recorder: Recorder) -> None:
    calls: list[tuple[int, type[BaseException]]] = []

    def retry_when(retries: int, exc: BaseException) -> bool:
        calls.append((retries, type(exc)))
        return isinstance(exc, KeyError)

    @dq.actor(broker=broker, retry_when=retry_when, max_retries=0)
    def raises_key_error() -> None:
        raise KeyError("k")

    @dq.actor(broker=broker, retry_when=retry_when, max_retries=100)
    def raises_value_error() -> None:
        raise ValueError("v")

    raises_key_error.send_with_options(retries=7)
    proxy = deliver(broker)
    process(broker, proxy)
    assert not proxy.failed  # retried although max_retries=0

    raises_value_error.send()
    proxy = deliver(broker)
    process(broker, proxy)
    assert proxy.failed  # not retried although max_retries=100
    assert calls == [(7, KeyError), (0, ValueError)]
    assert len(recorder.on("default.DQ")) == 1


def test_the_constructor_retry_when_is_the_fallback(rng: FixedRandom) -> None:
    recorder = Recorder()
    broker = StubBroker(middleware=[Retries(retry_when=lambda n, e: False), recorder])
    failing(broker).send()
    proxy = deliver(broker)
    process(broker, proxy)
    assert proxy.failed
    assert recorder.on("default.DQ") == []


def test_throws_fails_at_once_without_recording_an_attempt(
    broker: StubBroker, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    failing(broker, exc=KeyError("k"), throws=(KeyError, TypeError)).send()
    proxy = deliver(broker)
    delivered = proxy.message
    with caplog.at_level(logging.INFO, logger="dq.middleware.retries"):
        process(broker, proxy)
    assert proxy.failed
    assert proxy.message is delivered  # no retries/traceback recorded
    assert recorder.on("default.DQ") == []
    assert any(r.levelno == logging.INFO and "Aborting" in r.getMessage() for r in caplog.records)


def test_throws_and_retry_when_never_travel_in_message_options(
    broker: StubBroker, recorder: Recorder
) -> None:
    failing(broker, throws=KeyError, retry_when=lambda n, e: True).send()
    process(broker, deliver(broker))
    ((retry, _),) = recorder.on("default.DQ")
    assert "throws" not in retry.options
    assert "retry_when" not in retry.options
    json.loads(retry.encode())


def test_retry_with_a_delay_replaces_the_backoff(
    broker: StubBroker, recorder: Recorder, clock: FixedClock, rng: FixedRandom
) -> None:
    failing(broker, exc=Retry(delay=100)).send()
    process(broker, deliver(broker))
    ((retry, delay),) = recorder.on("default.DQ")
    assert delay == 100
    assert retry.options["eta"] == NOW + 100

    broker.actors.pop("failing")
    failing(broker, exc=Retry()).send()
    process(broker, deliver(broker))
    assert recorder.on("default.DQ")[-1][1] == int(DEFAULT_MIN_BACKOFF * 1.5)


def test_on_retry_exhausted_is_sent_once_with_the_right_payload(
    broker: StubBroker, recorder: Recorder
) -> None:
    received: list[tuple[Any, ...]] = []

    @dq.actor(broker=broker, queue_name="exhausted")
    def exhausted(message: dict[str, Any], info: dict[str, Any]) -> None:
        received.append((message, info))

    sent = failing(broker, max_retries=3, on_retry_exhausted="exhausted").send_with_options(
        retries=3
    )
    proxy = deliver(broker)
    process(broker, proxy)
    assert proxy.failed
    ((notice, _),) = recorder.on("exhausted")
    payload, info = notice.args
    assert info == {"retries": 3, "max_retries": 3}
    assert payload["message_id"] == sent.message_id
    assert payload["actor_name"] == "failing"
    assert payload["options"]["retries"] == 4
    json.loads(notice.encode())


def test_an_unknown_on_retry_exhausted_actor_is_logged(
    broker: StubBroker, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    failing(broker, max_retries=0, on_retry_exhausted="nobody").send()
    proxy = deliver(broker)
    with caplog.at_level(logging.ERROR):
        process(broker, proxy)
    assert proxy.failed
    assert "'nobody'" in caplog.text
    assert [m for m, _ in recorder.enqueued if m.actor_name == "nobody"] == []


class FlakyBroker(StubBroker):
    """A StubBroker whose enqueue fails when ``fail_when(message, delay)`` says so
    (by default: for every delayed message, which is what retries are)."""

    def __init__(
        self,
        middleware: list[Middleware],
        fail_when: Callable[[Message[Any], int | None], bool] = lambda m, delay: delay is not None,
        error: type[Exception] = BrokerConnectionError,
    ) -> None:
        super().__init__(middleware)
        self.fail_when = fail_when
        self.error = error

    def enqueue(self, message: M, *, delay: int | None = None) -> M:
        if self.fail_when(message, delay):
            raise self.error("the broker went away")
        return super().enqueue(message, delay=delay)

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 100) -> Consumer:
        # Without the stub's atomic replace, a retry goes through enqueue (which fails).
        consumer = super().consume(queue_name, prefetch, timeout)
        consumer.__class__ = _EnqueueOnlyConsumer
        return consumer


class _EnqueueOnlyConsumer(_StubConsumer):
    replace = None  # type: ignore[assignment]  # no replace capability: the worker enqueues


def test_a_retry_that_cannot_be_stored_dead_letters_the_original_with_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    retries = Retries()
    broker = FlakyBroker([retries], error=QueueNotFound)
    failing(broker).send()
    proxy = deliver(broker)
    with caplog.at_level(logging.ERROR, logger="dq.worker"):
        _, exc = process(broker, proxy)  # the retry cannot be stored: does not raise
    assert isinstance(exc, ValueError)
    assert proxy.replacement is not None  # Retries asked for a retry...
    assert broker.queues["default.DQ"].qsize() == 0  # ...which was not stored,
    # so the original is dead-lettered, with the reason, rather than held or requeued.
    assert proxy.failed
    assert proxy.death_reason is DeathReason.UNSTORABLE
    assert broker.dead_letters == [proxy]
    assert broker.queues["default"].qsize() == 0
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert proxy.message_id in line and "'failing'" in line
    assert "Dead-lettering" in line and "the broker went away" in line
    assert "redeliver" not in line


def test_a_failing_retry_when_fails_the_message_instead_of_losing_it(
    broker: StubBroker, recorder: Recorder
) -> None:
    def broken(retries: int, exc: BaseException) -> bool:
        raise RuntimeError("bug in retry_when")

    failing(broker, retry_when=broken).send()
    proxy = deliver(broker)
    process(broker, proxy)
    assert proxy.failed
    assert recorder.on("default.DQ") == []


# -- AgeLimit -------------------------------------------------------------------------------


def test_age_limit_fails_and_skips_old_messages(broker: StubBroker, clock: FixedClock) -> None:
    ran: list[int] = []

    @dq.actor(broker=broker, max_age=1000)
    def job() -> None:
        ran.append(1)

    broker.enqueue(job.message().copy(message_timestamp=NOW - 1000))
    proxy = deliver(broker)
    with pytest.raises(SkipMessage):
        broker.emit_before("process_message", proxy)
    assert proxy.failed

    broker.enqueue(job.message().copy(message_timestamp=NOW - 999))
    proxy = deliver(broker)
    process(broker, proxy)
    assert not proxy.failed
    assert ran == [1]


def test_age_limit_lookup_is_truthy_on_the_message_then_presence_on_the_actor(
    clock: FixedClock,
) -> None:
    broker = StubBroker(middleware=[AgeLimit(max_age=1000)])

    @dq.actor(broker=broker, max_age=0)
    def unlimited() -> None: ...

    @dq.actor(broker=broker)
    def limited() -> None: ...

    old = NOW - 10_000
    # The actor's 0 wins over the constructor's default: no limit.
    broker.enqueue(unlimited.message().copy(message_timestamp=old))
    process(broker, proxy := deliver(broker))
    assert not proxy.failed
    # A message's 0 is falsy: the lookup falls through to the constructor default.
    broker.enqueue(limited.message_with_options(max_age=0).copy(message_timestamp=old))
    process(broker, proxy := deliver(broker))
    assert proxy.failed
    # A message's truthy value wins.
    broker.enqueue(limited.message_with_options(max_age=20_000).copy(message_timestamp=old))
    process(broker, proxy := deliver(broker))
    assert not proxy.failed


# -- TimeLimit ------------------------------------------------------------------------------


def run_in_thread(
    broker: dq.Broker, proxy: MessageProxy, seconds: float, started: threading.Event | None = None
) -> dict[str, Any]:
    """Process ``proxy`` in a new thread whose 'actor' sleeps in a loop for up to
    ``seconds``; return what happened (filled once the thread is joined)."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        start = time.monotonic()
        try:
            broker.emit_before("process_message", proxy)
            if started is not None:
                started.set()
            while time.monotonic() - start < seconds:
                time.sleep(0.005)
        except BaseException as e:
            outcome["exception"] = e
            outcome["after"] = time.monotonic() - start
            broker.emit_after("process_message", proxy, exception=e)
        else:
            broker.emit_after("process_message", proxy, result=None)

    thread = threading.Thread(target=work)
    thread.start()
    outcome["thread"] = thread
    return outcome


def test_time_limit_interrupts_an_actor_past_its_limit() -> None:
    broker = StubBroker(middleware=[TimeLimit(interval=10)])

    @dq.actor(broker=broker, time_limit=200)
    def slow() -> None: ...

    broker.emit_after("process_boot")
    slow.send()
    outcome = run_in_thread(broker, deliver(broker), seconds=3)
    outcome["thread"].join(5)
    assert isinstance(outcome.get("exception"), TimeLimitExceeded)
    assert 0.2 <= outcome["after"] < 1.5


def test_time_limit_is_disarmed_after_processing() -> None:
    middleware = TimeLimit(time_limit=100, interval=10)
    broker = StubBroker(middleware=[middleware])

    @dq.actor(broker=broker)
    def quick() -> None: ...

    broker.emit_after("process_boot")
    quick.send()
    proxy = deliver(broker)
    process(broker, proxy)
    assert middleware._deadlines == {}
    time.sleep(0.15)  # past the limit, outside any actor: nothing is raised here


def test_time_limit_lookup_and_infinite_limits(clock: FixedClock) -> None:
    middleware = TimeLimit(time_limit=1000, interval=10)
    broker = StubBroker(middleware=[middleware])

    @dq.actor(broker=broker, time_limit=float("inf"))
    def endless() -> None: ...

    @dq.actor(broker=broker, time_limit=0)
    def zero() -> None: ...

    endless.send()
    broker.emit_before("process_message", deliver(broker))
    assert middleware._deadlines == {}  # no deadline at all
    # A falsy message value falls through to the actor's, which is used even when 0.
    zero.send_with_options(time_limit=0)
    broker.emit_before("process_message", deliver(broker))
    assert middleware._deadlines == {threading.get_ident(): NOW}
    zero.send_with_options(time_limit=50)
    proxy = deliver(broker)
    broker.emit_before("process_message", proxy)
    assert middleware._deadlines == {threading.get_ident(): NOW + 50}
    broker.emit_after("skip_message", proxy)
    assert middleware._deadlines == {}


def test_the_time_limit_watcher_stops_with_its_middleware() -> None:
    middleware = TimeLimit(interval=10)
    middleware.after_process_boot(StubBroker(middleware=[]))
    middleware.after_process_boot(StubBroker(middleware=[]))  # started once
    watcher = middleware._watcher
    assert watcher is not None and watcher.is_alive()
    del middleware
    gc.collect()
    watcher.join(2)
    assert not watcher.is_alive()


# -- ShutdownNotifications -----------------------------------------------------------------


def test_shutdown_interrupts_only_opted_in_running_actors() -> None:
    broker = StubBroker(middleware=[ShutdownNotifications()])

    @dq.actor(broker=broker, notify_shutdown=True)
    def opted_in() -> None: ...

    @dq.actor(broker=broker)
    def left_alone() -> None: ...

    opted_in.send()
    left_alone.send()
    first, second = deliver(broker), deliver(broker)
    started = [threading.Event(), threading.Event()]
    outcomes = [
        run_in_thread(broker, first, seconds=0.5, started=started[0]),
        run_in_thread(broker, second, seconds=0.5, started=started[1]),
    ]
    for event in started:
        assert event.wait(2)
    broker.emit_before("worker_shutdown", None)
    for outcome in outcomes:
        outcome["thread"].join(5)
    assert isinstance(outcomes[0].get("exception"), Shutdown)
    assert outcomes[0]["after"] < 0.4
    assert "exception" not in outcomes[1]


def test_should_notify_skips_only_none() -> None:
    broker = StubBroker(middleware=[])
    middleware = ShutdownNotifications(notify_shutdown=True)
    broker.add_middleware(middleware)

    @dq.actor(broker=broker, notify_shutdown=False)
    def opted_out() -> None: ...

    @dq.actor(broker=broker)
    def default() -> None: ...

    assert middleware.should_notify(opted_out, opted_out.message()) is False
    assert middleware.should_notify(default, default.message()) is True
    # A message's False is not None: it wins.
    no = default.message_with_options(notify_shutdown=False)
    assert middleware.should_notify(default, no) is False
    yes = opted_out.message_with_options(notify_shutdown=True)
    assert middleware.should_notify(opted_out, yes) is True
    unset = opted_out.message_with_options(notify_shutdown=None)
    assert middleware.should_notify(opted_out, unset) is False
    assert ShutdownNotifications().notify_shutdown is False


# -- Callbacks --------------------------------------------------------------------------------


def declare_callbacks(broker: dq.Broker) -> None:
    @dq.actor(broker=broker, queue_name="callbacks")
    def succeeded(message: dict[str, Any], result: Any) -> None: ...

    @dq.actor(broker=broker, queue_name="callbacks")
    def failed(message: dict[str, Any], failure: dict[str, str]) -> None: ...


def test_on_success_gets_the_message_and_the_result(broker: StubBroker, recorder: Recorder) -> None:
    declare_callbacks(broker)

    @dq.actor(broker=broker, on_success="succeeded")
    def add(x: int, y: int) -> int:
        return x + y

    sent = add.send(1, 2)
    process(broker, deliver(broker))
    ((callback, _),) = recorder.on("callbacks")
    assert callback.actor_name == "succeeded"
    payload, result = callback.args
    assert result == 3
    assert payload["message_id"] == sent.message_id
    assert payload["args"] == (1, 2)


def test_on_failure_is_sent_on_every_failure_with_the_recorded_attempt(
    broker: StubBroker, recorder: Recorder
) -> None:
    declare_callbacks(broker)
    failing(broker, on_failure="failed").send()
    process(broker, deliver(broker))
    ((callback, _),) = recorder.on("callbacks")
    payload, failure = callback.args
    assert failure == {"type": "ValueError", "message": "boom"}
    assert payload["options"]["retries"] == 1  # Retries ran first
    assert len(recorder.on("default.DQ")) == 1  # and the message is retried too


def test_message_callbacks_win_when_truthy(broker: StubBroker, recorder: Recorder) -> None:
    declare_callbacks(broker)

    @dq.actor(broker=broker, queue_name="callbacks")
    def other(message: dict[str, Any], result: Any) -> None: ...

    @dq.actor(broker=broker, on_success="succeeded")
    def job() -> int:
        return 1

    job.send_with_options(on_success=other)  # an actor becomes its name
    process(broker, deliver(broker))
    job.send_with_options(on_success="")  # falsy: the actor's option is used
    process(broker, deliver(broker))
    assert [m.actor_name for m, _ in recorder.on("callbacks")] == ["other", "succeeded"]


def test_an_unknown_callback_actor_is_logged_and_nothing_is_sent(
    broker: StubBroker, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    @dq.actor(broker=broker, on_success="nobody")
    def job() -> int:
        return 1

    job.send()
    proxy = deliver(broker)
    with caplog.at_level(logging.ERROR, logger="dq.middleware.callbacks"):
        process(broker, proxy)
    assert "'nobody'" in caplog.text
    assert [m for m, _ in recorder.enqueued if m.actor_name == "nobody"] == []
    assert not proxy.failed


# -- Pipelines ------------------------------------------------------------------------------


def declare_steps(broker: dq.Broker) -> tuple[Any, Any, Any]:
    @dq.actor(broker=broker)
    def add(x: int, y: int) -> int:
        return x + y

    @dq.actor(broker=broker, queue_name="second")
    def double(x: int) -> int:
        return x * 2

    @dq.actor(broker=broker, queue_name="third")
    def show(*args: Any) -> None: ...

    return add, double, show


def test_building_a_pipeline_links_copies(broker: StubBroker) -> None:
    add, double, show = declare_steps(broker)
    first, second, third = add.message(1, 2), double.message(), show.message()
    p = first | second
    assert isinstance(p, pipeline)
    assert len(p) == 2
    assert p.broker is broker
    assert "pipe_target" not in first.options  # the originals are unchanged
    assert [m.message_id for m in p.messages] == [first.message_id, second.message_id]
    assert p.messages[0].options["pipe_target"] == p.messages[1].asdict()
    assert "pipe_target" not in p.messages[1].options
    assert str(p) == "pipeline([add(1, 2), double()])"

    longer = p | third  # pipelines flatten
    assert len(longer) == 3
    assert longer.broker is broker
    target = longer.messages[0].options["pipe_target"]
    assert target["message_id"] == second.message_id
    assert target["options"]["pipe_target"]["message_id"] == third.message_id
    assert len(pipeline([p, pipeline([third])])) == 3
    # The whole chain encodes as plain JSON and decodes back.
    data = json.loads(longer.messages[0].encode())
    assert data["options"]["pipe_target"]["options"]["pipe_target"]["actor_name"] == "show"
    assert Message.decode(longer.messages[0].encode()) == longer.messages[0]


def test_a_successful_step_enqueues_the_next_with_its_result(
    broker: StubBroker, recorder: Recorder
) -> None:
    add, double, show = declare_steps(broker)
    pipeline([add.message(1, 2), double.message(), show.message()]).run()
    process(broker, deliver(broker))
    ((step, delay),) = recorder.on("second")
    assert (step.args, delay) == ((3,), None)
    process(broker, deliver(broker, "second"))
    ((last, _),) = recorder.on("third")
    assert last.args == (6,)
    assert "pipe_target" not in last.options


def test_pipe_ignore_on_the_next_step_or_the_current_actor(
    broker: StubBroker, recorder: Recorder
) -> None:
    add, _, show = declare_steps(broker)

    @dq.actor(broker=broker, pipe_ignore=True)
    def quiet() -> int:
        return 42

    (add.message(1, 2) | show.message_with_options(args=("x",), pipe_ignore=True)).run()
    process(broker, deliver(broker))
    (quiet.message() | show.message()).run()
    process(broker, deliver(broker))
    assert [m.args for m, _ in recorder.on("third")] == [("x",), ()]


def test_the_next_step_honours_its_delay_option(
    broker: StubBroker, recorder: Recorder, clock: FixedClock
) -> None:
    add, double, _ = declare_steps(broker)
    (add.message(1, 2) | double.message_with_options(delay=500)).run()
    process(broker, deliver(broker))
    ((step, delay),) = recorder.on("second.DQ")
    assert delay == 500
    assert step.options["eta"] == NOW + 500
    assert step.args == (3,)


def test_run_uses_the_larger_of_its_delay_and_the_first_step_s(
    broker: StubBroker, recorder: Recorder
) -> None:
    add, double, _ = declare_steps(broker)
    (add.message_with_options(args=(1, 2), delay=300) | double.message()).run(delay=100)
    (add.message(1, 2) | double.message()).run(delay=100)
    (add.message(1, 2) | double.message()).run()
    assert [d for _, d in recorder.enqueued] == [300, 100, None]


def test_failed_steps_end_the_chain(broker: StubBroker, recorder: Recorder) -> None:
    _, double, _ = declare_steps(broker)
    (failing(broker, max_retries=0).message() | double.message()).run()
    proxy = deliver(broker)
    process(broker, proxy)
    assert proxy.failed
    assert recorder.on("second") == []


def test_a_next_step_that_cannot_be_stored_redelivers_the_step() -> None:
    broker = FlakyBroker([Pipelines()], fail_when=lambda m, delay: m.actor_name == "double")
    add, double, _ = declare_steps(broker)
    pipeline([add.message(1, 2), double.message()], broker=broker).run()
    proxy = deliver(broker)
    process(broker, proxy)
    assert proxy.redelivery_requested
    assert not proxy.failed


# -- CurrentMessage -------------------------------------------------------------------------


def test_current_message_inside_and_outside_actors(broker: StubBroker) -> None:
    broker.add_middleware(CurrentMessage())

    @dq.actor(broker=broker)
    def whoami() -> Message[Any] | None:
        return CurrentMessage.get_current_message()

    assert CurrentMessage.get_current_message() is None
    sent = whoami.send()
    proxy = deliver(broker)
    result, _ = process(broker, proxy)
    assert isinstance(result, Message)
    assert result.message_id == sent.message_id
    assert CurrentMessage.get_current_message() is None

    seen: list[Message[Any] | None] = []
    other = threading.Thread(target=lambda: seen.append(CurrentMessage.get_current_message()))
    broker.emit_before("process_message", proxy)
    other.start()
    other.join()
    assert seen == [None]  # each thread sees its own message
    assert CurrentMessage.get_current_message() == proxy.message
    broker.emit_after("skip_message", proxy)
    assert CurrentMessage.get_current_message() is None


def test_interrupting_middleware_warn_where_threads_cannot_be_interrupted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dq.threading
    from dq.middleware import ShutdownNotifications, TimeLimit

    assert dq.threading.interrupt_problem() is None
    monkeypatch.setattr(dq.threading, "current_platform", "PyPy")
    assert dq.threading.interrupt_problem() == "cannot interrupt threads on 'PyPy'"
    broker = StubBroker(middleware=[])
    with pytest.warns(RuntimeWarning, match="TimeLimit cannot interrupt threads on 'PyPy'"):
        TimeLimit().after_process_boot(broker)
    with pytest.warns(RuntimeWarning, match="ShutdownNotifications cannot interrupt threads"):
        ShutdownNotifications().after_process_boot(broker)
    monkeypatch.setattr(dq.threading, "current_platform", "CPython")
    monkeypatch.setattr(dq.threading, "is_gevent_active", lambda: True)
    assert dq.threading.interrupt_problem() == "does not support gevent yet"


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: Retries(max_retries=-1), "'max_retries'"),
        (lambda: Retries(max_backoff=-100), "'max_backoff'"),
        (lambda: Retries(min_backoff=-1), "'min_backoff'"),
        (lambda: TimeLimit(time_limit="x"), "'time_limit'"),  # type: ignore[arg-type]  # the point
        (lambda: TimeLimit(time_limit=-5), "'time_limit'"),
        (lambda: AgeLimit(max_age=-1), "'max_age'"),
    ],
)
def test_middleware_settings_are_checked_like_options(build: Any, named: str) -> None:
    with pytest.raises(ValueError, match="settings") as raised:
        build()
    assert named in str(raised.value)


def test_dramatiq_middleware_settings_are_accepted() -> None:
    Retries(max_retries=None, min_backoff=0, max_backoff=0)
    TimeLimit(time_limit=float("inf"))
    AgeLimit(max_age=None)


def test_an_actor_time_limit_of_none_means_the_default(clock: FixedClock) -> None:
    middleware = TimeLimit(time_limit=1000, interval=10)
    broker = StubBroker(middleware=[middleware])

    @dq.actor(broker=broker, time_limit=None)
    def unset() -> None: ...

    unset.send()
    broker.emit_before("process_message", deliver(broker))
    assert middleware._deadlines == {threading.get_ident(): NOW + 1000}
