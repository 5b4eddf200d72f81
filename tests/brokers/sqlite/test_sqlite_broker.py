"""SqliteBroker: the conformance machine, each behaviour, and several processes on one file."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dq
import dq.broker
from dq import Worker
from dq.broker import Broker, MessageProxy
from dq.brokers.sqlite import DatabaseBusy, DatabaseUnavailable, SqliteBroker
from dq.errors import BrokerConnectionError, QueueJoinTimeout, QueueNotFound
from dq.message import Message
from dq.middleware import Retries
from tests.support.global_broker import kept_global_broker
from tests.support.sqlite_helpers import select_rows
from tests.support.waiting import wait_until

TESTS = Path(__file__).parent
ROOT = TESTS.parents[2]


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def global_broker() -> Iterator[None]:
    with kept_global_broker():
        yield


def _message(n: int, queue: str = "q", actor: str = "act") -> Message[Any]:
    return Message(queue, actor, (n,), {}, {})


def _take(consumer: Any, count: int) -> list[MessageProxy]:
    taken = []
    for _ in range(count):
        taken.append(next(consumer))
    return taken


# -- enqueue, consume, settle --------------------------------------------------------------------


def test_messages_come_out_fifo_and_ack_forgets_them(broker: SqliteBroker) -> None:
    for n in range(5):
        broker.enqueue(_message(n))
    assert broker.qsize("q") == 5
    consumer = broker.consume("q", prefetch=10, timeout=10)
    got = _take(consumer, 5)
    assert [m.args[0] for m in got] == [0, 1, 2, 3, 4]
    assert broker.qsize("q") == 5  # in flight counts
    with pytest.raises(QueueJoinTimeout):
        broker.join("q", timeout=20)
    for m in got:
        consumer.ack(m)
    broker.join("q", timeout=1000)
    assert broker.qsize("q") == 0
    consumer.close()


def test_fetch_reserves_the_free_window_in_one_batch(broker: SqliteBroker) -> None:
    for n in range(10):
        broker.enqueue(_message(n))
    consumer = broker.consume("q", prefetch=4, timeout=10)
    first = next(consumer)
    assert consumer.buffered() == 3  # type: ignore[attr-defined]  # the SQLite consumer's
    held = [first, *_take(consumer, 3)]
    with pytest.raises(StopIteration):  # the prefetch window is full
        next(consumer)
    consumer.ack(held[0])
    with pytest.raises(StopIteration):  # one free slot: less than half the window
        next(consumer)
    consumer.ack(held[1])
    assert next(consumer).args == (4,)
    assert consumer.buffered() == 1  # type: ignore[attr-defined]  # the SQLite consumer's
    consumer.close()
    assert broker.qsize("q") == 8


def test_queue_priority_orders_fetches_then_fifo(broker: SqliteBroker) -> None:
    @dq.actor(broker=broker, queue_name="q", priority=5)
    def low(n: int) -> None: ...

    @dq.actor(broker=broker, queue_name="q", priority=0)
    def high(n: int) -> None: ...

    @dq.actor(broker=broker, queue_name="q", priority=-3)
    def urgent(n: int) -> None: ...

    low.send(1)
    high.send(2)
    low.send(3)
    urgent.send(4)
    high.send(5)
    broker.enqueue(_message(6, actor="unknown_here"))  # priority 0
    consumer = broker.consume("q", prefetch=2, timeout=10)
    order = []
    for _ in range(6):
        m = next(consumer)
        order.append(m.args[0])
        consumer.ack(m)
    assert order == [4, 2, 5, 6, 1, 3]
    consumer.close()


def test_requeue_goes_to_the_tail(broker: SqliteBroker) -> None:
    for n in range(3):
        broker.enqueue(_message(n))
    consumer = broker.consume("q", prefetch=1, timeout=10)
    first = next(consumer)
    consumer.requeue([first])
    order = []
    for _ in range(3):
        m = next(consumer)
        order.append(m.args[0])
        consumer.ack(m)
    assert order == [1, 2, 0]
    consumer.close()


def test_close_returns_what_the_consumer_holds(broker: SqliteBroker) -> None:
    for n in range(4):
        broker.enqueue(_message(n))
    consumer = broker.consume("q", prefetch=4, timeout=10)
    held = next(consumer)  # three more buffered
    consumer.close()
    with pytest.raises(StopIteration):
        next(consumer)
    assert held.args == (0,)
    other = broker.consume("q", prefetch=4, timeout=10)
    assert [m.args[0] for m in _take(other, 4)] == [0, 1, 2, 3]
    other.close()


def test_enqueue_many_is_one_transaction(broker: SqliteBroker) -> None:
    stored = broker.enqueue_many([_message(n) for n in range(100)])
    assert [m.args[0] for m in stored] == list(range(100))
    assert broker.qsize("q") == 100
    bad = [_message(1000), Message("q", "act", (object(),), {}, {})]
    with pytest.raises(TypeError):
        broker.enqueue_many(bad)
    assert broker.qsize("q") == 100  # none of the batch
    assert broker.enqueue_many([]) == []


def test_undeclared_queues_are_allowed_but_not_dead_letter_queues(broker: SqliteBroker) -> None:
    broker.enqueue(_message(1, queue="elsewhere"))  # declared by another process
    assert broker.qsize("elsewhere") == 1
    with pytest.raises(QueueNotFound):
        broker.enqueue(_message(1, queue="q.XQ"))
    with pytest.raises(QueueNotFound):
        broker.consume("q.XQ")
    with pytest.raises(QueueNotFound):
        broker.declare_queue("q.XQ")
    with pytest.raises(ValueError, match="prefetch"):
        broker.consume("q", prefetch=0)


def test_declare_runs_hooks_once(path: str, brokers: list[SqliteBroker]) -> None:
    declared: list[str] = []

    class Spy(dq.Middleware):
        def after_declare_queue(self, broker: Broker, queue_name: str) -> None:
            declared.append(queue_name)

        def after_declare_delay_queue(self, broker: Broker, queue_name: str) -> None:
            declared.append(queue_name)

    broker = SqliteBroker(path, middleware=[Spy()])
    brokers.append(broker)
    broker.declare_queue("a")
    broker.declare_queue("a")
    assert declared == ["a", "a.DQ"]
    assert broker.get_declared_queues() == {"a"}
    assert broker.get_declared_delay_queues() == {"a.DQ"}


# -- delays --------------------------------------------------------------------------------------


def test_a_delayed_message_waits_on_the_delay_queue_and_promotes(broker: SqliteBroker) -> None:
    before = int(time.time() * 1000)
    stored = broker.enqueue(_message(1), delay=60_000)
    assert stored.queue_name == "q.DQ"
    assert before + 60_000 <= stored.options["eta"] <= int(time.time() * 1000) + 60_000
    ready = broker.consume("q", prefetch=1, timeout=10)
    with pytest.raises(StopIteration):
        next(ready)
    delayed = broker.consume("q.DQ", prefetch=1, timeout=10)
    held = next(delayed)
    assert held.message_id == stored.message_id
    promoted = delayed.promote(held)  # type: ignore[attr-defined]  # the SQLite consumer's
    assert promoted.queue_name == "q"
    assert "eta" not in promoted.options
    assert select_rows(broker.path, "SELECT queue FROM dq_messages") == [("q",)]
    got = next(ready)
    assert got.message_id == stored.message_id
    ready.ack(got)
    broker.join("q", timeout=1000)
    ready.close()
    delayed.close()


# -- dead letters ---------------------------------------------------------------------------------


def test_nack_dead_letters_and_the_ttl_expires_them(path: str, brokers: list[SqliteBroker]) -> None:
    broker = SqliteBroker(path, middleware=[], dead_message_ttl=1000)
    brokers.append(broker)
    broker.enqueue(_message(1))
    broker.enqueue(_message(2), delay=10)
    consumer = broker.consume("q", timeout=10)
    m = next(consumer)
    consumer.nack(m)
    delayed = broker.consume("q.DQ", timeout=10)
    d = next(delayed)
    delayed.nack(d)
    dead = broker.dead_letters_of("q")
    assert [mid for mid, _, _ in dead] == [m.message_id, d.message_id]
    assert Message.decode(dead[0][1]).args == (1,)
    assert broker.qsize("q") == 0
    assert broker.expire_dead_letters(dead[0][2] + 999) == 0  # younger than the TTL
    assert broker.expire_dead_letters(dead[1][2] + 1000) == 2
    assert broker.dead_letters_of("q") == []
    consumer.close()
    delayed.close()


def test_the_keeper_expires_dead_letters(path: str, brokers: list[SqliteBroker]) -> None:
    broker = SqliteBroker(path, middleware=[], dead_message_ttl=50, lease=300)
    brokers.append(broker)
    broker.enqueue(_message(1))
    consumer = broker.consume("q", timeout=10)
    consumer.nack(next(consumer))
    assert len(broker.dead_letters_of("q")) == 1
    deadline = time.monotonic() + 3
    while broker.dead_letters_of("q") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert broker.dead_letters_of("q") == []
    consumer.close()


def test_undecodable_payloads_are_dead_lettered(
    broker: SqliteBroker, caplog: pytest.LogCaptureFixture
) -> None:
    conn = sqlite3.connect(broker.path)
    conn.execute(
        "INSERT INTO dq_messages (queue, message_id, priority, payload) VALUES (?, ?, 0, ?)",
        ("q", "garbage", b"\xffnot json"),
    )
    conn.commit()
    conn.close()
    broker.enqueue(_message(7))
    consumer = broker.consume("q", prefetch=2, timeout=10)
    with caplog.at_level(logging.ERROR):
        m = next(consumer)
    assert m.args == (7,)
    assert "undecodable" in caplog.text
    assert [mid for mid, _, _ in broker.dead_letters_of("q")] == ["garbage"]
    consumer.ack(m)
    broker.join("q", timeout=1000)
    consumer.close()


def test_flush_and_flush_all(broker: SqliteBroker) -> None:
    broker.declare_queue("r")
    for n in range(3):
        broker.enqueue(_message(n))
        broker.enqueue(_message(n, queue="r"), delay=1000)
    consumer = broker.consume("q", timeout=10)
    held = next(consumer)
    broker.enqueue(_message(9))
    second = broker.consume("q", timeout=10)
    second.nack(next(second))
    broker.flush("q")
    assert broker.qsize("q") == 1  # the reserved one stays
    assert broker.dead_letters_of("q") == []
    assert broker.qsize("r") == 3
    consumer.ack(held)
    broker.flush_all()
    assert broker.qsize("r") == 0
    consumer.close()
    second.close()


def test_join_wakes_when_another_thread_settles(broker: SqliteBroker) -> None:
    broker.enqueue(_message(1))
    consumer = broker.consume("q", timeout=10)
    m = next(consumer)
    timer = threading.Timer(0.1, consumer.ack, (m,))
    timer.start()
    started = time.monotonic()
    broker.join("q", timeout=5000)
    assert time.monotonic() - started < 1
    timer.join()
    consumer.close()


def test_an_enqueue_wakes_a_waiting_consumer_at_once(
    path: str, brokers: list[SqliteBroker]
) -> None:
    broker = SqliteBroker(path, middleware=[], poll_interval=5000)
    brokers.append(broker)
    consumer = broker.consume("q", timeout=5000)
    threading.Timer(0.1, broker.enqueue, (_message(1),)).start()
    started = time.monotonic()
    m = next(consumer)
    assert time.monotonic() - started < 1
    consumer.ack(m)
    consumer.close()


def test_another_process_enqueue_is_found_by_polling(
    path: str, brokers: list[SqliteBroker]
) -> None:
    consuming = SqliteBroker(path, middleware=[], poll_interval=20)
    producing = SqliteBroker(path, middleware=[])
    brokers += [consuming, producing]
    consumer = consuming.consume("q", timeout=3000)
    threading.Timer(0.1, producing.enqueue, (_message(1),)).start()
    started = time.monotonic()
    assert next(consumer).args == (1,)
    assert time.monotonic() - started < 1
    consumer.close()


# -- replace (retries) ----------------------------------------------------------------------------


def test_replace_stores_the_retry_and_acks_the_original(broker: SqliteBroker) -> None:
    broker.enqueue(_message(1))
    consumer: Any = broker.consume("q", timeout=10)
    m = next(consumer)
    retry = m.message.copy(options={"retries": 1})
    stored = consumer.replace(m, retry, 50_000)
    assert stored.queue_name == "q.DQ"
    rows = select_rows(broker.path, "SELECT queue, message_id, consumer FROM dq_messages")
    assert rows == [("q.DQ", m.message_id, None)]
    consumer.close()


def test_replace_is_atomic(broker: SqliteBroker) -> None:
    broker.enqueue(_message(1))
    consumer: Any = broker.consume("q", timeout=10)
    m = next(consumer)
    # Make the INSERT of the retry fail inside the transaction (on this thread's
    # connection): the original must still be held, and nothing else stored.
    broker._database.connection().execute(
        "CREATE TEMP TRIGGER fail_retry BEFORE INSERT ON main.dq_messages "
        "WHEN NEW.queue = 'q.DQ' BEGIN SELECT RAISE(ABORT, 'injected'); END"
    )
    with pytest.raises(DatabaseUnavailable, match="injected"):
        consumer.replace(m, m.message, 1000)
    rows = select_rows(broker.path, "SELECT queue, consumer FROM dq_messages")
    assert rows == [("q", consumer.consumer_id)]
    broker._database.connection().execute("DROP TRIGGER fail_retry")
    consumer.replace(m, m.message, 1000)
    assert select_rows(broker.path, "SELECT queue, consumer FROM dq_messages") == [("q.DQ", None)]
    consumer.close()


# -- leases and recovery ---------------------------------------------------------------------------


def test_rows_of_a_consumer_whose_keeper_stopped_come_back(
    path: str, brokers: list[SqliteBroker], caplog: pytest.LogCaptureFixture
) -> None:
    lease, sweep = 400, 100
    dead = SqliteBroker(path, middleware=[], lease=lease, sweep_interval=sweep)
    alive = SqliteBroker(path, middleware=[], lease=lease, sweep_interval=sweep, poll_interval=10)
    brokers += [dead, alive]
    for n in range(3):
        dead.enqueue(_message(n))
    lost: Any = dead.consume("q", prefetch=3, timeout=10)
    taken = _take(lost, 2)  # and one buffered
    dead._stop_keeper()  # the process "died": nobody renews its lease
    stopped = time.monotonic()
    consumer = alive.consume("q", prefetch=3, timeout=5000)
    got = _take(consumer, 3)
    waited = (time.monotonic() - stopped) * 1000
    assert sorted(m.args[0] for m in got) == [0, 1, 2]
    assert waited <= lease + sweep + 300, waited  # the stated bound, plus slack
    # The dead consumer's late settlements change nothing.
    with caplog.at_level(logging.WARNING):
        lost.ack(taken[0])
        lost.nack(taken[1])
        lost.replace(taken[0], taken[0].message, None)
    assert "lease expired" in caplog.text
    assert alive.qsize("q") == 3
    assert alive.dead_letters_of("q") == []
    for m in got:
        consumer.ack(m)
    alive.join("q", timeout=1000)
    consumer.close()


def test_the_keeper_renews_leases_of_live_consumers(path: str, brokers: list[SqliteBroker]) -> None:
    holder = SqliteBroker(path, middleware=[], lease=300, sweep_interval=50)
    other = SqliteBroker(path, middleware=[], lease=300, sweep_interval=50)
    brokers += [holder, other]
    holder.enqueue(_message(1))
    consumer = holder.consume("q", timeout=10)
    m = next(consumer)
    time.sleep(1.0)  # over three leases
    assert other.recover() == 0
    consumer.ack(m)
    holder.join("q", timeout=1000)
    consumer.close()


def test_recover_returns_expired_rows_to_the_tail(broker: SqliteBroker) -> None:
    for n in range(3):
        broker.enqueue(_message(n))
    consumer = broker.consume("q", prefetch=1, timeout=10)
    next(consumer)
    far = int(time.time() * 1000) + 10 * broker.lease
    assert broker.recover(far) == 1
    other = broker.consume("q", prefetch=3, timeout=10)
    assert [m.args[0] for m in _take(other, 3)] == [1, 2, 0]
    consumer.close()
    other.close()


# -- a locked database --------------------------------------------------------------------------


def _hold_write_lock(path: str, seconds: float, ready: threading.Event) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    ready.set()
    time.sleep(seconds)
    conn.execute("COMMIT")
    conn.close()


def test_a_locked_database_is_waited_for(path: str, brokers: list[SqliteBroker]) -> None:
    broker = SqliteBroker(path, middleware=[], busy_timeout=5000)
    brokers.append(broker)
    ready = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(path, 0.3, ready))
    holder.start()
    ready.wait()
    broker.enqueue(_message(1))
    holder.join()
    assert broker.qsize("q") == 1


def test_a_database_locked_too_long_raises_a_connection_error(
    path: str, brokers: list[SqliteBroker]
) -> None:
    broker = SqliteBroker(path, middleware=[], busy_timeout=200)
    brokers.append(broker)
    ready = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(path, 1.0, ready))
    holder.start()
    ready.wait()
    started = time.monotonic()
    with pytest.raises(DatabaseBusy, match="locked") as info:
        broker.enqueue(_message(1))
    assert isinstance(info.value, BrokerConnectionError)
    assert time.monotonic() - started < 0.9
    holder.join()
    assert broker.qsize("q") == 0


# -- bad paths ------------------------------------------------------------------------------------


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnavailable, match="cannot open SQLite database") as info:
        SqliteBroker(str(tmp_path), middleware=[])
    assert str(tmp_path) in str(info.value)


def test_a_file_of_garbage_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(os.urandom(8192))
    with pytest.raises(DatabaseUnavailable, match="cannot open SQLite database") as info:
        SqliteBroker(str(garbage), middleware=[])
    assert str(garbage) in str(info.value)


def test_another_schema_version_is_refused(path: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(DatabaseUnavailable, match="schema version 99"):
        SqliteBroker(path, middleware=[])


def test_a_path_nobody_can_write_is_refused() -> None:
    # /proc refuses new files even to root.
    with pytest.raises(DatabaseUnavailable, match="cannot open SQLite database '/proc/dq"):
        SqliteBroker("/proc/dq-test.sqlite3", middleware=[])


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnavailable, match="cannot open SQLite database"):
        SqliteBroker(str(tmp_path / "missing" / "dq.sqlite3"), middleware=[])


def test_bad_options_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="lease"):
        SqliteBroker(path, lease=0)
    with pytest.raises(ValueError, match="poll_interval"):
        SqliteBroker(path, poll_interval=0)


# -- a worker end to end ------------------------------------------------------------------------


def test_a_worker_runs_retries_delays_and_dead_letters(path: str, global_broker: None) -> None:
    broker = SqliteBroker(
        path, middleware=[Retries(min_backoff=10, max_backoff=50)], poll_interval=10
    )
    dq.set_broker(broker)
    attempts: dict[str, int] = {}
    ran: list[str] = []
    lock = threading.Lock()

    @dq.actor(queue_name="e2e", max_retries=3)
    def flaky(key: str) -> None:
        with lock:
            attempts[key] = attempts.get(key, 0) + 1
            if attempts[key] < 3:
                raise RuntimeError("not yet")
            ran.append(key)

    @dq.actor(queue_name="e2e", max_retries=1)
    def doomed() -> None:
        raise RuntimeError("always")

    @dq.actor(queue_name="e2e")
    def later(key: str) -> None:
        with lock:
            ran.append(key)

    flaky.send("a")
    doomed.send()
    sent = time.monotonic()
    later.send_with_options(args=("later",), delay=300)
    worker = Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        broker.join("e2e", timeout=10_000)
        elapsed = time.monotonic() - sent
    finally:
        worker.stop(timeout=5000)
        broker.close()
    assert sorted(ran) == ["a", "later"]
    assert attempts == {"a": 3}
    assert elapsed >= 0.3
    dead = broker.dead_letters_of("e2e")
    assert len(dead) == 1
    assert Message.decode(dead[0][1]).actor_name == "doomed"
    assert Message.decode(dead[0][1]).options["retries"] >= 1


# -- several processes -----------------------------------------------------------------------------


def _start_cli(path: str, *, processes: int, threads: int, lease: int, sleep: float) -> Any:
    env = dict(os.environ)
    env.update(
        DQ_SQLITE_TEST_PATH=path,
        DQ_SQLITE_TEST_LEASE=str(lease),
        DQ_SQLITE_TEST_SLEEP=str(sleep),
        PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT / "src"), env.get("PYTHONPATH", "")]),
    )
    log = open(Path(path).with_suffix(".log"), "ab")  # noqa: SIM115 - closed by the caller
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dq",
            "sqlite_worker_app:broker",
            "-p",
            str(processes),
            "-t",
            str(threads),
            "--worker-shutdown-timeout",
            "5000",
        ],
        cwd=str(ROOT),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return process, log


def _stop_cli(process: Any, log: Any, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        if sig == signal.SIGKILL:
            os.killpg(process.pid, sig)  # every process of the group, at once
        else:
            process.send_signal(sig)  # the main process stops its workers
    try:
        returncode = process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
        raise AssertionError("the dq CLI did not stop in 20 s") from None
    finally:
        log.close()
    if sig == signal.SIGTERM:
        assert returncode == 0, returncode


def _prepare_app(path: str, count: int) -> SqliteBroker:
    """A producer on ``path`` with ``count`` messages for the app's ``record`` actor."""
    from tests.brokers.sqlite.sqlite_worker_app import (  # needs the environment set
        QUEUE,
        create_runs_table,
    )

    producer = SqliteBroker(path, middleware=[])
    create_runs_table(path)
    producer.enqueue_many([Message(QUEUE, "record", (n,), {}, {}) for n in range(count)])
    return producer


@pytest.fixture
def app_env(path: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("DQ_SQLITE_TEST_PATH", path)
    yield path
    sys.modules.pop("tests.brokers.sqlite.sqlite_worker_app", None)


def test_four_processes_of_eight_threads_run_each_message_exactly_once(app_env: str) -> None:
    from tests.brokers.sqlite.sqlite_worker_app import (  # needs the environment set
        QUEUE,
        count_runs,
    )

    path, count = app_env, 20_000
    producer = _prepare_app(path, count)
    started = time.monotonic()
    process, log = _start_cli(path, processes=4, threads=8, lease=30_000, sleep=0)
    try:
        wait_until(lambda: producer.qsize(QUEUE) == 0, "the queue to drain", 75, interval=0.1)
        elapsed = time.monotonic() - started
    finally:
        _stop_cli(process, log)
    assert select_rows(path, "SELECT count(*) FROM dq_messages") == [(0,)]  # a clean stop
    runs = count_runs(path)
    assert len(runs) == count
    assert set(runs.values()) == {1}, {n: r for n, r in runs.items() if r != 1}
    assert producer.dead_letters_of(QUEUE) == []
    print(f"drained {count} messages with 4 processes x 8 threads in {elapsed:.1f} s")
    producer.close()


def test_a_killed_worker_process_loses_nothing(app_env: str) -> None:
    from tests.brokers.sqlite.sqlite_worker_app import (  # needs the environment set
        QUEUE,
        count_runs,
    )

    path, count, lease = app_env, 1500, 1000
    producer = _prepare_app(path, count)
    process, log = _start_cli(path, processes=1, threads=8, lease=lease, sleep=0.005)
    try:
        wait_until(lambda: len(count_runs(path)) >= 300, "the first runs", 30, interval=0.1)
    finally:
        _stop_cli(process, log, signal.SIGKILL)  # mid-batch: its reservations are orphaned
    in_flight = select_rows(path, "SELECT count(*) FROM dq_messages WHERE consumer IS NOT NULL")[0][
        0
    ]
    assert in_flight > 0
    process, log = _start_cli(path, processes=1, threads=8, lease=lease, sleep=0)
    try:
        wait_until(lambda: producer.qsize(QUEUE) == 0, "a fresh worker to finish", 30, interval=0.1)
    finally:
        _stop_cli(process, log)
    runs = count_runs(path)
    assert sorted(runs) == list(range(count))  # every message ran at least once
    duplicates = sum(runs.values()) - count
    assert duplicates <= in_flight  # only what the dead process held ran twice
    print(f"killed with {in_flight} reserved; {duplicates} ran twice")
    producer.close()
