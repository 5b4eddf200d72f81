"""Async actors: ``dq.asyncio`` and the AsyncIO middleware, on StubBroker and Redis.

Overlap is asserted by counting coroutines in flight (an asyncio barrier that only
opens when enough of them run at once), never by timing them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import dramatiq.brokers.stub
import pytest

import dq
import dq.asyncio
import dq.broker
import dq.middleware
from dq import MessageProxy, Worker
from dq.asyncio import (
    EventLoopThread,
    async_to_sync,
    get_event_loop_thread,
    set_event_loop_thread,
)
from dq.brokers.redis import RedisBroker
from dq.brokers.stub import StubBroker
from dq.middleware import (
    AsyncIO,
    CurrentMessage,
    Middleware,
    Retries,
    Shutdown,
    ShutdownNotifications,
    TimeLimit,
    TimeLimitExceeded,
)
from dq.runtime import Runner
from dq.threading import raise_thread_exception
from tests.support.global_broker import kept_global_broker
from tests.support.redis_helpers import client, delete_namespace, keys_under, new_namespace

logger = logging.getLogger("dq.tests.asyncio")


class Outcomes(Middleware):
    """Records what each processed message ended with."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.exceptions: list[BaseException | None] = []

    def after_process_message(
        self,
        broker: dq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        with self.lock:
            self.exceptions.append(exception)


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dq-event-loop" and t.is_alive()]


@pytest.fixture(autouse=True)
def _no_loop_thread_left() -> Iterator[None]:
    """Every test leaves no event-loop thread running and the global slot empty."""
    assert get_event_loop_thread() is None
    yield
    assert loop_threads() == []
    assert get_event_loop_thread() is None


@pytest.fixture
def make_broker() -> Iterator[Callable[..., StubBroker]]:
    """Build a StubBroker with the given middleware, installed as the global broker."""
    brokers: list[StubBroker] = []

    def make(*middleware: Middleware) -> StubBroker:
        broker = StubBroker(middleware=list(middleware))
        dq.set_broker(broker)
        brokers.append(broker)
        return broker

    with kept_global_broker():
        yield make
        for broker in brokers:
            broker.flush_all()
            broker.close()


@pytest.fixture
def make_worker() -> Iterator[Callable[..., Worker]]:
    """Build workers (50 ms timeout) that are stopped at the end of the test."""
    workers: list[Worker] = []

    def make(broker: dq.Broker, **kwargs: Any) -> Worker:
        worker = Worker(broker, worker_timeout=50, **kwargs)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        if worker._middleware is not None:  # started and not stopped yet
            worker.stop(timeout=5000)


@pytest.fixture
def loop_thread() -> Iterator[EventLoopThread]:
    thread = EventLoopThread(logger)
    thread.start(timeout=5)
    yield thread
    thread.stop()


# -- names and the error without the middleware ----------------------------------------------


def test_public_names() -> None:
    assert dq.asyncio.__all__ == [
        "EventLoopThread",
        "async_to_sync",
        "get_event_loop_thread",
        "set_event_loop_thread",
    ]
    assert dq.middleware.AsyncIO is AsyncIO
    assert "AsyncIO" in dq.middleware.__all__
    assert dq.middleware.asyncio.AsyncIO is AsyncIO
    assert AsyncIO().actor_options == set()
    assert AsyncIO().forks == []


def test_without_the_middleware_an_async_actor_fails_when_called_as_dramatiq_s(
    make_broker: Callable[..., StubBroker], make_worker: Callable[..., Worker]
) -> None:
    outcomes = Outcomes()
    broker = make_broker(outcomes, Retries(max_retries=0))

    @dq.actor
    async def lonely(x: int) -> int:
        return x

    d_broker = dramatiq.brokers.stub.StubBroker(middleware=[])

    @dramatiq.actor(broker=d_broker)
    async def d_lonely(x: int) -> int:
        return x

    with pytest.raises(RuntimeError) as theirs:
        d_lonely(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine ... was never awaited"
        with pytest.raises(RuntimeError, match=r"AsyncIO middleware") as ours:
            lonely(1)
        gc.collect()
    assert type(ours.value) is type(theirs.value)
    # Sending works; a worker's attempt fails like any failing actor.
    lonely.send(1)
    make_worker(broker).start()
    broker.join("default", timeout=5000, fail_fast=False)
    assert len(outcomes.exceptions) == 1
    assert isinstance(outcomes.exceptions[0], RuntimeError)
    assert len(broker.dead_letters) == 1


# -- running on workers ------------------------------------------------------------------------


def test_a_worker_runs_async_actors_and_stops_its_loop_thread(
    make_broker: Callable[..., StubBroker], make_worker: Callable[..., Worker]
) -> None:
    outcomes = Outcomes()
    broker = make_broker(AsyncIO(), outcomes)
    seen: list[int] = []

    @dq.actor
    async def double(x: int) -> None:
        await asyncio.sleep(0)
        seen.append(2 * x)

    @dq.actor
    async def add(x: int, y: int) -> int:
        await asyncio.sleep(0)
        return x + y

    for n in range(20):
        double.send(n)
    worker = make_worker(broker, worker_threads=4)
    worker.start()
    thread = get_event_loop_thread()
    assert thread is not None and thread.is_alive()
    assert add(2, 3) == 5  # calling it directly runs it on the same loop
    broker.join("default", timeout=5000)
    worker.stop()
    assert sorted(seen) == [2 * n for n in range(20)]
    assert outcomes.exceptions == [None] * 20
    assert not thread.is_alive()
    assert thread.loop.is_closed()
    assert get_event_loop_thread() is None


def test_coroutines_overlap_on_the_loop_up_to_worker_threads(
    make_broker: Callable[..., StubBroker], make_worker: Callable[..., Worker]
) -> None:
    broker = make_broker(AsyncIO(), CurrentMessage(), Outcomes())
    threads = 8
    lock = threading.Lock()
    in_flight = 0
    most = 0
    all_in: asyncio.Event | None = None  # made on the loop
    seen: dict[int, str] = {}

    @dq.actor
    async def job(n: int) -> None:
        nonlocal in_flight, most, all_in
        if all_in is None:
            all_in = asyncio.Event()
        with lock:
            in_flight += 1
            most = max(most, in_flight)
            if in_flight == threads:
                all_in.set()
        try:
            # The first `threads` coroutines wait for each other: they can only get
            # past this when all of them run at once.
            await asyncio.wait_for(all_in.wait(), timeout=30)
            message = CurrentMessage.get_current_message()
            assert message is not None
            seen[n] = message.message_id
        finally:
            with lock:
                in_flight -= 1

    sent = {n: job.send(n).message_id for n in range(64)}
    make_worker(broker, worker_threads=threads).start()
    broker.join("default", timeout=60_000)
    assert most == threads  # all at once, never more than worker_threads
    assert seen == sent  # each coroutine saw its own message


def test_a_failing_coroutine_is_retried_as_a_sync_actor_would_be(
    make_broker: Callable[..., StubBroker], make_worker: Callable[..., Worker]
) -> None:
    outcomes = Outcomes()
    broker = make_broker(AsyncIO(), outcomes, Retries(min_backoff=10, max_backoff=20))
    attempts: dict[str, int] = {"flaky": 0, "broken": 0}

    @dq.actor(max_retries=3)
    async def flaky() -> None:
        attempts["flaky"] += 1
        await asyncio.sleep(0)
        if attempts["flaky"] == 1:
            raise ValueError("first attempt fails")

    @dq.actor(max_retries=1)
    async def broken() -> None:
        attempts["broken"] += 1
        await asyncio.sleep(0)
        raise TimeoutError("always")  # a TimeoutError is the coroutine's, not a wait's

    flaky.send()
    broken.send()
    make_worker(broker).start()
    broker.join("default", timeout=10_000, fail_fast=False)
    assert attempts == {"flaky": 2, "broken": 2}
    kinds = sorted(type(e).__name__ for e in outcomes.exceptions)
    assert kinds == ["NoneType", "TimeoutError", "TimeoutError", "ValueError"]
    [dead] = broker.dead_letters
    assert dead.actor_name == "broken"


def test_a_time_limit_cancels_the_coroutine_and_fails_the_message_as_a_sync_one(
    make_broker: Callable[..., StubBroker], make_worker: Callable[..., Worker]
) -> None:
    outcomes = Outcomes()
    broker = make_broker(
        AsyncIO(), TimeLimit(interval=10), outcomes, Retries(min_backoff=10, max_backoff=20)
    )
    events: list[str] = []

    @dq.actor(time_limit=200, max_retries=1)
    async def sleepy() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # cleanup may still await
            events.append("cancelled")
            raise
        events.append("finished")

    @dq.actor(time_limit=200, max_retries=1)
    def sync_sleepy() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.005)

    class CleanedUpFirst(Middleware):
        """Checks that the coroutine had finished when its worker thread went on."""

        def after_process_message(
            self, broker: dq.Broker, message: MessageProxy, *, result: Any = None, **kw: Any
        ) -> None:
            if message.actor_name == "sleepy":
                events.append("worker went on")

    broker.add_middleware(CleanedUpFirst())
    broker.emit_after("process_boot")
    sleepy.send()
    sync_sleepy.send()
    make_worker(broker).start()
    broker.join("default", timeout=20_000, fail_fast=False)
    assert events == ["cancelled", "worker went on"] * 2
    assert len(outcomes.exceptions) == 4
    assert all(isinstance(e, TimeLimitExceeded) for e in outcomes.exceptions)
    dead = {m.actor_name: m for m in broker.dead_letters}
    assert sorted(dead) == ["sleepy", "sync_sleepy"]
    assert dead["sleepy"].options["retries"] == dead["sync_sleepy"].options["retries"]


def test_shutdown_notifications_cancel_opted_in_coroutines(
    make_broker: Callable[..., StubBroker], make_worker: Callable[..., Worker]
) -> None:
    outcomes = Outcomes()
    broker = make_broker(AsyncIO(), ShutdownNotifications(), outcomes)
    started = threading.Event()
    events: list[str] = []

    @dq.actor(notify_shutdown=True)
    async def long_running() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    long_running.send()
    worker = make_worker(broker)
    worker.start()
    assert started.wait(10)
    worker.stop(timeout=10_000)
    assert events == ["cancelled"]
    assert len(outcomes.exceptions) == 1
    assert isinstance(outcomes.exceptions[0], Shutdown)


def test_current_message_inside_coroutines_and_their_child_tasks(
    make_broker: Callable[..., StubBroker], make_worker: Callable[..., Worker]
) -> None:
    broker = make_broker(AsyncIO(), CurrentMessage())
    seen: list[str | None] = []

    async def child() -> str | None:
        await asyncio.sleep(0)
        message = CurrentMessage.get_current_message()
        return None if message is None else message.message_id

    @dq.actor
    async def parent() -> None:
        before = CurrentMessage.get_current_message()
        await asyncio.sleep(0)
        after = CurrentMessage.get_current_message()
        seen.extend(m.message_id if m else None for m in (before, after))
        seen.append(await asyncio.create_task(child()))

    sent = parent.send().message_id
    make_worker(broker).start()
    broker.join("default", timeout=5000)
    assert seen == [sent, sent, sent]
    # Called directly, outside a worker, there is no current message.
    with_loop = get_event_loop_thread()
    assert with_loop is not None
    del seen[:]
    parent()
    assert seen == [None, None, None]


def test_workers_share_one_loop_thread_stopped_with_the_last(
    make_broker: Callable[..., StubBroker], make_worker: Callable[..., Worker]
) -> None:
    first = make_worker(make_broker(AsyncIO()))
    second = make_worker(make_broker(AsyncIO()))
    first.start()
    thread = get_event_loop_thread()
    second.start()
    assert thread is not None and get_event_loop_thread() is thread
    assert loop_threads() == [thread]
    first.stop()
    assert get_event_loop_thread() is thread and thread.is_alive()
    second.stop()
    assert not thread.is_alive()


def test_a_loop_thread_installed_by_hand_is_used_and_left_running(
    make_broker: Callable[..., StubBroker],
    make_worker: Callable[..., Worker],
    loop_thread: EventLoopThread,
) -> None:
    broker = make_broker(AsyncIO())
    where: list[threading.Thread] = []

    @dq.actor
    async def locate() -> None:
        where.append(threading.current_thread())

    set_event_loop_thread(loop_thread)
    try:
        worker = make_worker(broker)
        worker.start()
        locate.send()
        broker.join("default", timeout=5000)
        worker.stop()
        assert where == [loop_thread]
        assert get_event_loop_thread() is loop_thread and loop_thread.is_alive()
        # The single-threaded runtime runs async actors on it too.
        locate.send()
        assert Runner(broker).run_until_idle() == 1
        assert where == [loop_thread, loop_thread]
    finally:
        set_event_loop_thread(None)


@pytest.mark.redis
def test_async_actors_on_redis_with_retries_and_the_current_message(
    make_worker: Callable[..., Worker],
) -> None:
    namespace = new_namespace()
    outcomes = Outcomes()
    broker = RedisBroker(
        namespace=namespace,
        middleware=[AsyncIO(), CurrentMessage(), outcomes, Retries(min_backoff=10, max_backoff=20)],
        heartbeat_timeout=1000,
        requeue_interval=100,
    )
    lock = threading.Lock()
    in_flight = 0
    most = 0
    attempts: dict[int, int] = {}
    seen: dict[int, str] = {}

    @dq.actor(broker=broker, max_retries=2)
    async def fetch(n: int) -> None:
        nonlocal in_flight, most
        with lock:
            attempts[n] = attempts.get(n, 0) + 1
            in_flight += 1
            most = max(most, in_flight)
        try:
            await asyncio.sleep(0.05)
            message = CurrentMessage.get_current_message()
            assert message is not None and "redis_message_id" in message.options
            if n % 4 == 0 and attempts[n] == 1:
                raise ConnectionError(f"{n}: first attempt fails")
            seen[n] = message.message_id
        finally:
            with lock:
                in_flight -= 1

    try:
        sent = {n: fetch.send(n).message_id for n in range(16)}
        worker = make_worker(broker, worker_threads=4)
        worker.start()
        broker.join("default", timeout=20_000)
        worker.stop()
        assert seen == sent
        assert attempts == {n: 2 if n % 4 == 0 else 1 for n in range(16)}
        assert 1 <= most <= 4
        assert sum(e is not None for e in outcomes.exceptions) == 4
        assert broker.client.zcard(f"{namespace}:default.XQ") == 0
        broker.flush_all()
        broker.close()
        with client() as conn:
            assert keys_under(conn, namespace) == []
    finally:
        broker.close()
        with client() as conn:
            delete_namespace(conn, namespace)


# -- EventLoopThread ---------------------------------------------------------------------------


def test_run_coroutine_returns_raises_and_refuses_bad_calls(
    loop_thread: EventLoopThread,
) -> None:
    async def value(x: int) -> int:
        await asyncio.sleep(0)
        return x

    async def fails() -> None:
        raise KeyError("k")

    assert loop_thread.run_coroutine(value(7)) == 7
    with pytest.raises(KeyError, match="k"):
        loop_thread.run_coroutine(fails())
    with pytest.raises(RuntimeError, match="started once"):
        loop_thread.start()

    # From the loop thread itself, waiting would deadlock: refused.
    inner = async_to_sync(value)

    async def nested() -> int:
        return inner(1)

    set_event_loop_thread(loop_thread)
    try:
        with pytest.raises(RuntimeError, match="deadlock"):
            loop_thread.run_coroutine(nested())
    finally:
        set_event_loop_thread(None)

    stopped = EventLoopThread(logger)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refused coroutine is closed, not leaked
        with pytest.raises(RuntimeError, match="not running"):
            stopped.run_coroutine(value(1))
        gc.collect()
    stopped.stop()  # never started: only closes its loop
    assert stopped.loop.is_closed()
    with pytest.raises(ValueError, match="interrupt_check_ival"):
        EventLoopThread(logger, interrupt_check_ival=0)


def test_stop_cancels_pending_tasks_without_destroying_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    thread = EventLoopThread(logger)
    thread.start(timeout=5)
    events: list[str] = []
    started = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    async def agen() -> Any:
        try:
            yield 1
            await asyncio.sleep(3600)
        finally:
            events.append("generator closed")

    async def start_generator() -> None:
        generator = agen()
        await generator.__anext__()  # left suspended: the loop must finalise it
        thread.loop.create_task(forever())

    asyncio.run_coroutine_threadsafe(start_generator(), thread.loop).result(5)
    assert started.wait(5)
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        thread.stop()
        gc.collect()
    assert not thread.is_alive() and thread.loop.is_closed()
    assert sorted(events) == ["cancelled", "generator closed"]
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.WARNING]
    thread.stop()  # stopping again does nothing


def test_an_interrupted_wait_cancels_the_coroutine_and_re_raises(
    loop_thread: EventLoopThread,
) -> None:
    outcome: dict[str, BaseException] = {}
    events: list[str] = []
    running = threading.Event()

    async def polite() -> None:
        running.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    def wait_for_it() -> None:
        try:
            loop_thread.run_coroutine(polite())
        except BaseException as e:
            outcome["exception"] = e

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    assert running.wait(5)
    assert waiter.ident is not None
    raise_thread_exception(waiter.ident, TimeLimitExceeded)
    waiter.join(5)
    assert isinstance(outcome["exception"], TimeLimitExceeded)
    assert events == ["cancelled"]


@pytest.mark.slow
def test_a_coroutine_that_ignores_its_cancellation_is_reported(
    loop_thread: EventLoopThread,
) -> None:
    outcome: dict[str, BaseException] = {}
    running = threading.Event()

    async def stubborn() -> None:
        running.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(3600)  # ignores it, until the loop stops

    def wait_for_it() -> None:
        try:
            loop_thread.run_coroutine(stubborn())
        except BaseException as e:
            outcome["exception"] = e

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    assert running.wait(5)
    assert waiter.ident is not None
    raise_thread_exception(waiter.ident, TimeLimitExceeded)
    waiter.join(5)
    error = outcome["exception"]
    assert isinstance(error, RuntimeError)
    assert "did not finish" in str(error)
    assert isinstance(error.__cause__, TimeLimitExceeded)
