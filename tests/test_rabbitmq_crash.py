"""Crash tests for RabbitmqBroker against the shared RabbitMQ on 127.0.0.1:5672.

Each test checks the at-least-once promise end to end: every message is processed at
least once, none is dead-lettered, and at the end no message is left ready or unacked
on the test's queues. Duplicates are counted and printed (run with ``-s`` to see them).

* The server closes every connection of a draining worker, several times, in the
  middle of the drain (``rabbitmqctl close_connection`` on the connections carrying the
  test's own ``connection_name``: other tests and users of the server are left alone).
* A worker process is SIGKILLed in the middle of a run (tests/rabbitmq_crash_worker.py,
  which records what it ran in a SQLite file); the server hands what it held back, and
  a restarted worker finishes the run, with no more duplicates than the dead one held.

Every test uses its own queue ``crash_<hex>`` and deletes it, its ``.DQ`` and its
``.XQ`` at the end. Needs ``rabbitmqctl`` on the PATH.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pika.exceptions
import pytest

import dq
import dq.worker.tuning
from dq.brokers.rabbitmq import RabbitmqBroker
from rabbitmq_crash_worker import (
    RABBIT_HOST,
    RABBIT_PORT,
    FirstAttemptFails,
    RunLog,
    declare_flaky,
    declare_record,
    make_broker,
)

WORKER_SCRIPT = Path(__file__).with_name("rabbitmq_crash_worker.py")


def wait_until(
    condition: Callable[[], bool], timeout: float, *, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout


# -- the server, seen without dq -------------------------------------------------------------


@dataclass(frozen=True)
class QueueCounts:
    ready: int
    unacked: int


def queue_counts(*queue_names: str) -> dict[str, QueueCounts]:
    """Ready and unacknowledged messages of each queue, as the server counts them."""
    rows = json.loads(
        rabbitmqctl(
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "--formatter",
            "json",
        )
    )
    assert isinstance(rows, list)
    counts = {
        row["name"]: QueueCounts(int(row["messages_ready"]), int(row["messages_unacknowledged"]))
        for row in rows
        if row["name"] in queue_names
    }
    assert set(counts) == set(queue_names), f"queues missing: {set(queue_names) - set(counts)}"
    return counts


def connections_named(name: str) -> list[str]:
    """The pids (as rabbitmqctl prints them) of the connections named ``name``."""
    marker = f'{{"connection_name","{name}"}}'
    pids: list[str] = []
    for line in rabbitmqctl("list_connections", "pid", "client_properties").splitlines():
        pid, _, properties = line.partition("\t")
        if marker in properties:
            pids.append(pid)
    return pids


def close_connections_named(name: str) -> int:
    """Have the server close every connection named ``name`` (all at once); return how
    many it closed."""
    pids = connections_named(name)
    closers = [
        subprocess.Popen(
            ["rabbitmqctl", "-q", "close_connection", pid, "dq crash test"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for pid in pids
    ]
    closed = 0
    for closer in closers:
        _, err = closer.communicate(timeout=30)
        # A connection may be gone already (the client noticed another one die).
        closed += closer.returncode == 0
        if closer.returncode != 0:
            logging.getLogger(__name__).info("close_connection: %s", err.decode(errors="replace"))
    return closed


class Rabbit:
    """A plain pika connection to look at and delete queues."""

    def __init__(self) -> None:
        self.connection = pika.BlockingConnection(
            pika.ConnectionParameters(host=RABBIT_HOST, port=RABBIT_PORT)
        )

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def consumers(self, queue_name: str) -> int:
        channel = self.connection.channel()
        try:
            method = channel.queue_declare(queue_name, passive=True).method
            assert isinstance(method, pika.spec.Queue.DeclareOk)
            return int(method.consumer_count)
        finally:
            if channel.is_open:
                channel.close()

    def delete(self, *queue_names: str) -> None:
        channel = self.connection.channel()
        for name in queue_names:
            channel.queue_delete(name)
        channel.close()


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def rabbit() -> Iterator[Rabbit]:
    rabbit = Rabbit()
    yield rabbit
    rabbit.close()


@pytest.fixture
def queue(rabbit: Rabbit) -> Iterator[str]:
    """A queue of this test only; it, its DQ and its XQ are deleted after."""
    name = f"crash_{uuid.uuid4().hex}"
    yield name
    rabbit.delete(name, f"{name}.DQ", f"{name}.XQ")


@pytest.fixture
def connection_name() -> str:
    return f"dq-crash-test-{uuid.uuid4().hex}"


@pytest.fixture
def runs(tmp_path: Path) -> RunLog:
    return RunLog(tmp_path / "runs.sqlite3")


@dataclass
class Child:
    """A tests/rabbitmq_crash_worker.py process."""

    process: subprocess.Popen[str]
    log: Path

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Cleanup:
    """What a test started, stopped in reverse order in teardown."""

    workers: list[dq.Worker] = field(default_factory=list)
    brokers: list[RabbitmqBroker] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)

    def broker(self, connection_name: str) -> RabbitmqBroker:
        broker = make_broker(connection_name)
        self.brokers.append(broker)
        return broker

    def worker(self, broker: RabbitmqBroker, *, threads: int = 8) -> dq.Worker:
        worker = dq.Worker(broker, worker_threads=threads, worker_timeout=100)
        self.workers.append(worker)
        worker.start()
        return worker

    def spawn(self, queue: str, runs: RunLog, connection_name: str, log: Path, *args: str) -> Child:
        """Start the worker script and wait for its JSON line."""
        command = [
            sys.executable,
            str(WORKER_SCRIPT),
            "--queue",
            queue,
            "--runs",
            str(runs.path),
            "--connection-name",
            connection_name,
            *args,
        ]
        env = dict(os.environ, dramatiq_restart_delay="100", PYTHONUNBUFFERED="1")
        with log.open("ab") as stderr:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
            )
        child = Child(process, log)
        self.children.append(child)
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(20):
                raise AssertionError(f"the worker printed nothing:\n{child.log_text()}")
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"the worker exited ({process.wait()}):\n{child.log_text()}")
        assert json.loads(line)["pid"] == process.pid
        return child

    def close(self) -> None:
        for child in reversed(self.children):
            child.kill()
        for worker in reversed(self.workers):
            worker.stop(timeout=2000)
        for broker in reversed(self.brokers):
            broker.close()


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    started = Cleanup()
    yield started
    started.close()


@pytest.fixture
def fast_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Worker that lost its connection retries after 0.1 s instead of 3 s / 5 s."""
    monkeypatch.setattr(dq.worker.tuning, "CONSUMER_RESTART_DELAY_SECS", 0.1)
    monkeypatch.setattr(dq.worker.tuning, "POST_PROCESS_MESSAGE_RETRY_DELAY_SECS", 0.1)


# -- checking ------------------------------------------------------------------------------


@dataclass
class Outcome:
    processed: int
    runs: int
    duplicates: int
    settled_after: float


def assert_all_processed(
    queue: str, expected: set[str], runs: RunLog, *, timeout: float, label: str
) -> Outcome:
    """Wait until every expected message ran and the test's queues hold nothing (ready
    or unacked); then assert it, with the figures in the messages."""
    names = (queue, f"{queue}.DQ", f"{queue}.XQ")

    def settled() -> bool:
        if not expected <= runs.counts().keys():
            return False
        return all(c == QueueCounts(0, 0) for c in queue_counts(*names).values())

    began = time.monotonic()
    with contextlib.suppress(AssertionError):  # the asserts below say what is wrong
        wait_until(settled, timeout, interval=0.2, what=label)
    settled_after = time.monotonic() - began
    final = runs.counts()
    left = {n: c for n, c in queue_counts(*names).items() if c != QueueCounts(0, 0)}
    missing = expected - final.keys()
    unexpected = final.keys() - expected
    total = sum(final.values())
    duplicates = total - len(final)
    figures = (
        f"[{label}] {len(final)}/{len(expected)} processed, {total} runs, "
        f"{duplicates} duplicates, settled after {settled_after:.2f} s; left on the server: {left}"
    )
    print(figures)
    assert not missing, f"{len(missing)} messages never processed (lost or stuck): {figures}"
    assert not unexpected, f"{len(unexpected)} unknown messages ran: {figures}"
    assert not left, f"messages left on the server: {figures}"
    return Outcome(len(final), total, duplicates, settled_after)


def send_batch(
    broker: RabbitmqBroker,
    record: dq.Actor[[int], None],
    n: int,
    n_delayed: int,
    *,
    flaky: dq.Actor[[int], None] | None = None,
    every: int = 20,
) -> set[str]:
    """``n`` messages now (with ``flaky``, every ``every``-th for it) and ``n_delayed``
    with delays of 0.3-2 s; their ids."""
    now = [
        flaky.message(i) if flaky is not None and i % every == 0 else record.message(i)
        for i in range(n)
    ]
    sent = broker.enqueue_many(now)
    rng = random.Random(n)
    for i in range(n_delayed):
        sent.append(broker.enqueue(record.message(n + i), delay=rng.randint(300, 2000)))
    return {m.message_id for m in sent}


def is_trouble(record: logging.LogRecord) -> bool:
    """A warning or error of dq's that is not about ``flaky``'s planned failures."""
    if not record.name.startswith("dq") or record.levelno < logging.WARNING:
        return False
    planned = record.exc_info is not None and isinstance(record.exc_info[1], FirstAttemptFails)
    return not planned and "FirstAttemptFails" not in record.getMessage()


# -- 1. the server closes a draining worker's connections ------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("fast_restarts")
def test_server_closing_a_draining_workers_connections_loses_nothing(
    queue: str,
    connection_name: str,
    runs: RunLog,
    cleanup: Cleanup,
    caplog: pytest.LogCaptureFixture,
) -> None:
    n, n_delayed = 2000, 100
    broker = cleanup.broker(connection_name)
    # 60 ms per message (about 16 s for the batch on 8 threads): each round of
    # rabbitmqctl takes seconds on a loaded machine, and the last close must come while
    # the drain is still running.
    record = declare_record(broker, queue, runs, sleep_ms=60)
    # One message in 20 fails once: its retry is published from a worker thread (to the
    # delay queue) while connections close.
    flaky = declare_flaky(broker, queue, runs, sleep_ms=60)
    expected = send_batch(broker, record, n, n_delayed, flaky=flaky)
    total = len(expected)

    caplog.set_level(logging.WARNING)
    cleanup.worker(broker)
    closed: list[int] = []
    for fraction in (0.1, 0.25, 0.4, 0.55):
        target = total * fraction

        def reached(target: float = target) -> bool:
            return runs.processed() >= target

        wait_until(reached, 30, what=f"{fraction:.0%} processed")
        closed.append(close_connections_named(connection_name))
    at_last_close = runs.processed()
    assert at_last_close < total, "the drain was over before the last close; raise n"
    assert all(closed), f"a round closed no connection: {closed}"

    try:
        outcome = assert_all_processed(queue, expected, runs, timeout=60, label="server close")
    finally:
        warnings = [r for r in caplog.records if is_trouble(r)]
        print(
            f"[server close] {len(closed)} rounds closed {closed} connections; "
            f"{at_last_close} of {total} processed at the last close; "
            f"{len(warnings)} warnings logged by dq; broker.lost_settlements="
            f"{broker.lost_settlements}"
        )
        kinds = Counter(
            re.sub(r"\d+", "#", r.getMessage().replace(queue, "Q"))[:100] for r in warnings
        )
        for text, count in kinds.most_common(5):
            print(f"[server close]   {count} x {text}")
    print(f"[server close] {outcome.duplicates} duplicates")
    assert warnings, "the worker never noticed its connections closing"


# -- 2. a worker process is SIGKILLed in the middle of a run -------------------------------


@pytest.mark.slow
def test_messages_of_a_sigkilled_worker_are_finished_by_a_restarted_one(
    queue: str,
    connection_name: str,
    runs: RunLog,
    cleanup: Cleanup,
    rabbit: Rabbit,
    tmp_path: Path,
) -> None:
    n, n_delayed = 1500, 100
    producer = cleanup.broker(f"{connection_name}-producer")
    record = declare_record(producer, queue, runs)
    expected = send_batch(producer, record, n, n_delayed)
    names = (queue, f"{queue}.DQ")

    child = cleanup.spawn(
        queue, runs, connection_name, tmp_path / "worker-1.log", "--threads", "8", "--sleep-ms", "5"
    )
    wait_until(lambda: runs.processed() >= n // 3, 30, what="a third processed")
    # Frozen, the worker acks nothing more: what the server counts unacked is what it
    # holds when it dies.
    child.process.send_signal(signal.SIGSTOP)
    held_by_queue = {name: c.unacked for name, c in queue_counts(*names).items()}
    held = sum(held_by_queue.values())
    child.process.send_signal(signal.SIGKILL)
    assert child.process.wait(10) == -signal.SIGKILL
    killed = time.monotonic()
    at_kill = runs.processed()
    assert at_kill < n, "the run was over before the kill; raise n"
    assert held > 0, "the worker held nothing when it died"

    # The server notices the dead connections and hands back what they held.
    wait_until(
        lambda: all(rabbit.consumers(name) == 0 for name in names),
        30,
        what="the dead worker's consumers to go",
    )
    assert connections_named(connection_name) == []
    handed_back = time.monotonic() - killed
    assert all(c.unacked == 0 for c in queue_counts(*names).values())

    restarted = cleanup.spawn(
        queue, runs, connection_name, tmp_path / "worker-2.log", "--threads", "8", "--sleep-ms", "5"
    )
    outcome = assert_all_processed(queue, expected, runs, timeout=60, label="worker sigkill")
    print(
        f"[worker sigkill] killed with {at_kill} of {n + n_delayed} processed, holding "
        f"{held} unacked {held_by_queue}; handed back {handed_back * 1000:.0f} ms after the "
        f"kill; {outcome.duplicates} duplicates"
    )
    assert outcome.duplicates <= held, "more duplicates than messages the dead worker held"

    restarted.process.send_signal(signal.SIGTERM)
    code = restarted.process.wait(20)
    assert code == 0, f"the restarted worker exited with {code}:\n{restarted.log_text()}"
    assert all(c == QueueCounts(0, 0) for c in queue_counts(*names).values())
