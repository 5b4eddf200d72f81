"""Worker: a message its consumer suspects (a worker died holding it) runs alone, so
that a death while it runs is charged to it and to no bystander (issue 16, fault 5).

A consumer wrapping the stub's says which messages are suspects (``suspect``) and
records what the worker reports (``started``); the actors record which others were
running when each started.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

import dq
import dq.broker
import dq.runtime
from dq import MessageProxy, Worker
from dq.broker import Consumer
from dq.brokers.stub import StubBroker
from tests.support.consumers import Delegating
from tests.support.global_broker import kept_global_broker

#: How long an actor waits for something that must not happen (it only bounds the
#: test's duration: no assertion depends on it).
PATIENCE = 0.3


@pytest.fixture(autouse=True)
def _restore_global_broker() -> Iterator[None]:
    with kept_global_broker():
        yield


class Suspecting(Delegating):
    """A stub consumer that suspects messages whose first argument starts with
    ``"suspect"``, and records every ``started`` call."""

    def __init__(self, inner: Any, broker: SuspectingBroker) -> None:
        super().__init__(inner)
        self.broker = broker

    def suspect(self, message: MessageProxy) -> bool:
        return str(message.args[0]).startswith("suspect")

    def started(self, message: MessageProxy, *, alone: bool) -> None:
        with self.broker.lock:
            self.broker.starts.append((str(message.args[0]), alone))


class SuspectingBroker(StubBroker):
    def __init__(self) -> None:
        super().__init__(middleware=[])
        self.lock = threading.Lock()
        self.starts: list[tuple[str, bool]] = []

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 100) -> Consumer:
        return Suspecting(super().consume(queue_name, prefetch, timeout), self)


class Timeline:
    """Which messages ran at the same time: ``beside[tag]`` holds the tags running
    when ``tag`` started, and those that started while it ran."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.beside: dict[str, set[str]] = {}
        self.suspect_running = threading.Event()
        self.joined_a_suspect = threading.Event()

    def enter(self, tag: str) -> None:
        with self.lock:
            self.beside[tag] = set(self.running)
            for other in self.running:
                self.beside[other].add(tag)
            self.running.add(tag)
            if any(other.startswith("suspect") for other in self.running - {tag}):
                self.joined_a_suspect.set()

    def leave(self, tag: str) -> None:
        with self.lock:
            self.running.discard(tag)


def start_worker(broker: StubBroker, threads: int) -> Worker:
    worker = Worker(broker, worker_timeout=20, worker_threads=threads)
    worker.start()
    return worker


def test_a_suspect_runs_while_nothing_else_runs_and_is_reported_alone() -> None:
    broker = SuspectingBroker()
    dq.set_broker(broker)
    timeline = Timeline()

    @dq.actor
    def work(tag: str) -> None:
        timeline.enter(tag)
        try:
            if tag == "blocker":
                # Would overlap the suspect if both could run: wait for it to start.
                timeline.suspect_running.wait(PATIENCE)
            elif tag.startswith("suspect"):
                timeline.suspect_running.set()
                # Would see an ordinary message start beside it if one could.
                timeline.joined_a_suspect.wait(PATIENCE)
        finally:
            timeline.leave(tag)

    work.send("blocker")
    work.send("suspect")
    for n in range(6):
        work.send(f"after-{n}")
    worker = start_worker(broker, threads=4)
    try:
        broker.join("default", timeout=10_000)
        worker.join()
    finally:
        worker.stop(timeout=5000)
    assert set(timeline.beside) == {"blocker", "suspect", *(f"after-{n}" for n in range(6))}
    assert timeline.beside["suspect"] == set()  # nothing ran beside it
    starts = dict(broker.starts)
    assert starts.pop("suspect") is True  # started(alone=True)
    assert set(starts.values()) == {False}  # the others ran shared
    assert broker.dead_letters == []


def test_suspects_on_every_thread_run_one_at_a_time_without_deadlock() -> None:
    broker = SuspectingBroker()
    dq.set_broker(broker)
    timeline = Timeline()

    @dq.actor
    def work(tag: str) -> None:
        timeline.enter(tag)
        timeline.leave(tag)

    tags = [f"suspect-{n}" for n in range(8)] + [f"plain-{n}" for n in range(8)]
    for tag in tags:
        work.send(tag)
    worker = start_worker(broker, threads=3)
    try:
        broker.join("default", timeout=10_000)
        worker.join()
    finally:
        worker.stop(timeout=5000)
    assert set(timeline.beside) == set(tags)
    for n in range(8):
        assert timeline.beside[f"suspect-{n}"] == set()
    assert sorted(tag for tag, alone in broker.starts if alone) == sorted(tags[:8])


@pytest.mark.parametrize("action", ["stop", "pause"])
def test_stop_and_pause_while_a_suspect_waits_for_a_running_message(action: str) -> None:
    broker = SuspectingBroker()
    dq.set_broker(broker)
    release = threading.Event()
    blocker_running = threading.Event()
    ran: list[str] = []

    @dq.actor
    def work(tag: str) -> None:
        if tag == "blocker":
            blocker_running.set()
            release.wait(10)
        ran.append(tag)

    work.send("blocker")
    work.send("suspect")
    worker = start_worker(broker, threads=2)
    try:
        assert blocker_running.wait(10)
        # Both threads are taken: the blocker runs, the suspect waits for it.
        call = worker.stop if action == "stop" else worker.pause
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        release.set()
        caller.join(10)
        assert not caller.is_alive(), f"Worker.{action}() hung"
        if action == "pause":
            worker.resume()
            broker.join("default", timeout=10_000)
        assert ran == ["blocker", "suspect"]
    finally:
        release.set()
        worker.stop(timeout=5000)


def test_a_single_threaded_worker_and_the_runner_report_every_message_alone() -> None:
    broker = SuspectingBroker()
    dq.set_broker(broker)

    @dq.actor
    def work(tag: str) -> None: ...

    for tag in ("a", "suspect-b", "c"):
        work.send(tag)
    worker = start_worker(broker, threads=1)
    try:
        broker.join("default", timeout=10_000)
    finally:
        worker.stop(timeout=5000)
    assert sorted(broker.starts) == [("a", True), ("c", True), ("suspect-b", True)]

    broker.starts.clear()
    work.send("d")
    runner = dq.runtime.Runner(broker)
    runner.run_until_idle()
    runner.close()
    assert broker.starts == [("d", True)]


class Unsure(Suspecting):
    """A consumer that cannot tell whether a message is a suspect, nor record starts."""

    def suspect(self, message: MessageProxy) -> bool:
        if str(message.args[0]).startswith("unsure"):
            raise dq.ConnectionClosed("cannot tell")
        return False

    def started(self, message: MessageProxy, *, alone: bool) -> None:
        super().started(message, alone=alone)
        raise dq.ConnectionClosed("cannot record it")


class UnsureBroker(SuspectingBroker):
    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 100) -> Consumer:
        return Unsure(StubBroker.consume(self, queue_name, prefetch, timeout), self)


def test_a_message_the_consumer_cannot_judge_runs_alone_and_a_failed_start_record_is_harmless(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = UnsureBroker()
    dq.set_broker(broker)
    timeline = Timeline()

    @dq.actor
    def work(tag: str) -> None:
        timeline.enter(tag)
        timeline.leave(tag)

    tags = ["plain-0", "unsure", "plain-1", "plain-2"]
    for tag in tags:
        work.send(tag)
    worker = start_worker(broker, threads=2)
    try:
        broker.join("default", timeout=10_000)
        worker.join()
    finally:
        worker.stop(timeout=5000)
    assert set(timeline.beside) == set(tags)  # every message ran, none failed
    assert timeline.beside["unsure"] == set()
    assert ("unsure", True) in broker.starts
    assert broker.dead_letters == []
    assert any("cannot tell" in r.getMessage() for r in caplog.records)
    assert any("cannot record it" in r.getMessage() for r in caplog.records)
