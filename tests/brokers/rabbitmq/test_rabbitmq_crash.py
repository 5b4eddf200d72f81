"""Crash tests for RabbitmqBroker against the shared RabbitMQ on 127.0.0.1:5672.

Each test checks the at-least-once promise end to end: every message is processed at
least once, none is dead-lettered, and at the end no message is left ready or unacked
on the test's queues. Duplicates are counted and printed (run with ``-s`` to see them).

* The server closes every connection of a draining worker, several times, in the
  middle of the drain (``rabbitmqctl close_connection`` on the connections carrying the
  test's own ``connection_name``: other tests and users of the server are left alone).
* A worker process is SIGKILLed in the middle of a run (rabbitmq_crash_worker.py beside this file,
  which records what it ran in a SQLite file); the server hands what it held back, and
  a restarted worker finishes the run, with no more duplicates than the dead one held.

Every test uses its own queue ``crash_<hex>`` and deletes it, its ``.DQ`` and its
``.XQ`` at the end. Needs ``rabbitmqctl`` on the PATH.
"""

from __future__ import annotations

import json
import logging
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import dq
import dq.worker.tuning
from dq.brokers.rabbitmq import RabbitmqBroker
from tests.brokers.rabbitmq.rabbitmq_crash_worker import (
    FirstAttemptFails,
    RunLog,
    declare_flaky,
    declare_record,
    make_broker,
)
from tests.support import processes
from tests.support.processes import Child, Outcome
from tests.support.rabbitmq_helpers import Rabbit, private_queue, rabbitmqctl
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.rabbitmq]

WORKER_SCRIPT = Path(__file__).with_name("rabbitmq_crash_worker.py")


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


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def queue(rabbit: Rabbit) -> Iterator[str]:
    """A queue of this test only; it, its DQ and its XQ are deleted after."""
    yield from private_queue(rabbit, "crash")


@pytest.fixture
def connection_name() -> str:
    return f"dq-crash-test-{uuid.uuid4().hex}"


@pytest.fixture
def runs(tmp_path: Path) -> RunLog:
    return RunLog(tmp_path / "runs.sqlite3")


@dataclass
class Cleanup(processes.Cleanup[RabbitmqBroker]):
    """What a test started, stopped in reverse order in teardown."""

    def broker(self, connection_name: str) -> RabbitmqBroker:
        broker = make_broker(connection_name)
        self.brokers.append(broker)
        return broker

    def start(self, queue: str, runs: RunLog, connection_name: str, log: Path, *args: str) -> Child:
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
        child = self.spawn(command, log)
        assert child.info["pid"] == child.process.pid
        return child


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    started = Cleanup()
    yield started
    started.close()


# -- checking ------------------------------------------------------------------------------


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

    def left() -> dict[str, QueueCounts]:
        return {n: c for n, c in queue_counts(*names).items() if c != QueueCounts(0, 0)}

    return processes.assert_all_processed(
        expected,
        runs.counts,
        settled=settled,
        leftovers=left,
        timeout=timeout,
        interval=0.2,
        label=label,
        left_means="messages left on the server",
    )


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

        wait_until(reached, f"{fraction:.0%} processed", 30, interval=0.05)
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

    child = cleanup.start(
        queue, runs, connection_name, tmp_path / "worker-1.log", "--threads", "8", "--sleep-ms", "5"
    )
    wait_until(lambda: runs.processed() >= n // 3, "a third processed", 30, interval=0.05)
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
        "the dead worker's consumers to go",
        30,
        interval=0.05,
    )
    assert connections_named(connection_name) == []
    handed_back = time.monotonic() - killed
    assert all(c.unacked == 0 for c in queue_counts(*names).values())

    restarted = cleanup.start(
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
