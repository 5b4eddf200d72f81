"""SqliteBroker's delivery cap (``max_deliveries``): the core's rule, carried out in SQL.

A message whose consumers die running it is dead-lettered with the reason
``max_deliveries`` after at most ``max_deliveries`` deaths; a bystander (a message
that merely waited, or ran beside others, when its process died) never is. Before
this, a message that killed its process was delivered again forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dq.broker import Consumer, MessageProxy
from dq.brokers.sqlite import SqliteBroker
from dq.core import DeathReason, policy
from dq.message import Message

TESTS = Path(__file__).parent
ROOT = TESTS.parents[2]


def _broker(path: str, brokers: list[SqliteBroker], **options: Any) -> SqliteBroker:
    broker = SqliteBroker(path, middleware=[], poll_interval=10, **options)
    brokers.append(broker)
    broker.declare_queue("q")
    return broker


def _message(name: str, queue: str = "q") -> Message[Any]:
    return Message(queue, "act", (name,), {}, {})


def _take_all(consumer: Consumer) -> list[MessageProxy]:
    taken = []
    with contextlib.suppress(StopIteration):
        while True:
            taken.append(next(consumer))
    return taken


def _deliveries(path: str) -> dict[str, int]:
    import sqlite3

    conn = sqlite3.connect(path, timeout=10)
    try:
        rows = conn.execute("SELECT payload, deliveries FROM dq_messages").fetchall()
    finally:
        conn.close()
    return {Message.decode(payload).args[0]: count for payload, count in rows}


def _die(broker: SqliteBroker, consumer: Any, how: str) -> None:
    """The consumer's process died: its rows come back by `Recover` or lease expiry."""
    if how == "recover":
        broker.recover_consumer(consumer.consumer_id)
    else:
        broker._consumers.discard(consumer)  # nobody renews its lease any more
        broker.expire_leases(int(time.time() * 1000) + 10 * broker.lease)
    consumer.close()  # what it still "holds" is not its own any more: nothing moves


@pytest.mark.parametrize("how", ["recover", "expire_leases"])
def test_a_poison_message_is_dead_lettered_after_max_deliveries_and_bystanders_never(
    path: str, brokers: list[SqliteBroker], caplog: pytest.LogCaptureFixture, how: str
) -> None:
    broker = _broker(path, brokers, max_deliveries=3)
    broker.enqueue(_message("a"))
    poison = broker.enqueue(_message("poison"))
    broker.enqueue(_message("b"))
    broker.enqueue(_message("c"))
    deaths = 0
    with caplog.at_level(logging.ERROR):
        while not broker.dead_letters_of("q"):
            assert deaths < 10, "the poison message was never dead-lettered"
            consumer: Any = broker.consume("q", prefetch=4, timeout=10)
            got = {m.args[0]: m for m in _take_all(consumer)}
            assert set(got) == {"a", "poison", "b", "c"}
            # As dq's worker: a suspect runs alone; the others ran beside each other
            # before it ("a", "b") or wait ("c"); then the poison kills the process.
            suspects = {name for name, m in got.items() if consumer.suspect(m)}
            assert suspects == (set() if deaths == 0 else set(got))
            for name in ("a", "b"):
                consumer.started(got[name], alone=False)
            consumer.started(got["poison"], alone=consumer.suspect(got["poison"]))
            _die(broker, consumer, how)
            deaths += 1
            if deaths == 1:
                assert _deliveries(path) == {"a": 1, "poison": 1, "b": 1, "c": 1}
    assert deaths == 3
    assert broker.dead_letter_reasons_of("q") == [(poison.message_id, DeathReason.MAX_DELIVERIES)]
    assert poison.message_id in caplog.text and "max_deliveries" in caplog.text
    # The bystanders were charged for the first death only, and still run.
    assert _deliveries(path) == {"a": 1, "b": 1, "c": 1}
    consumer = broker.consume("q", prefetch=4, timeout=10)
    rest = _take_all(consumer)
    assert sorted(m.args[0] for m in rest) == ["a", "b", "c"]
    for m in rest:
        consumer.ack(m)
    assert broker.qsize("q") == 0
    consumer.close()


def test_no_cap_with_max_deliveries_0(path: str, brokers: list[SqliteBroker]) -> None:
    broker = _broker(path, brokers, max_deliveries=0)
    broker.enqueue(_message("poison"))
    for _ in range(12):
        consumer: Any = broker.consume("q", timeout=10)
        m = next(consumer)
        consumer.started(m, alone=True)
        _die(broker, consumer, "recover")
    assert broker.dead_letters_of("q") == []
    assert _deliveries(path) == {"poison": 12}


def test_a_held_delayed_message_is_never_charged(path: str, brokers: list[SqliteBroker]) -> None:
    broker = _broker(path, brokers, max_deliveries=2)
    broker.enqueue(_message("later"), delay=60_000)
    for _ in range(3):
        consumer: Any = broker.consume("q.DQ", timeout=10)
        assert not consumer.suspect(next(consumer))
        _die(broker, consumer, "recover")
    assert broker.dead_letters_of("q") == []
    assert _deliveries(path) == {"later": 0}


def test_a_requeue_keeps_the_count_and_a_settle_forgets_it(
    path: str, brokers: list[SqliteBroker]
) -> None:
    broker = _broker(path, brokers, max_deliveries=5)
    broker.enqueue(_message("x"))
    consumer: Any = broker.consume("q", timeout=10)
    next(consumer)
    _die(broker, consumer, "recover")
    consumer = broker.consume("q", timeout=10)
    m = next(consumer)
    assert consumer.suspect(m)
    consumer.requeue([m])
    assert _deliveries(path) == {"x": 1}
    m = next(consumer)
    assert consumer.suspect(m)
    retry = consumer.replace(m, m.message, None)  # a retry is a new delivery history
    assert _deliveries(path) == {"x": 0}
    m = next(consumer)
    assert m.message_id == retry.message_id
    assert not consumer.suspect(m)
    consumer.ack(m)
    consumer.close()


def test_started_marks_only_suspects(path: str, brokers: list[SqliteBroker]) -> None:
    import sqlite3

    broker = _broker(path, brokers)
    broker.enqueue(_message("x"))
    broker.enqueue(_message("y"))
    consumer: Any = broker.consume("q", prefetch=2, timeout=10)
    first = next(consumer)
    _die(broker, consumer, "recover")  # both come back as suspects
    broker.enqueue(_message("z"))
    consumer = broker.consume("q", prefetch=3, timeout=10)
    got = {m.args[0]: m for m in _take_all(consumer)}
    assert first.args[0] == "x"
    consumer.started(got["x"], alone=True)
    consumer.started(got["y"], alone=False)
    consumer.started(got["z"], alone=True)  # not a suspect: nothing written
    conn = sqlite3.connect(path)
    runs = {
        Message.decode(payload).args[0]: run
        for payload, run in conn.execute("SELECT payload, run FROM dq_messages")
    }
    conn.close()
    assert runs == {"x": "alone", "y": "shared", "z": None}
    consumer.close()


# -- end to end: processes that the poison message kills ------------------------------------


def _env(path: str, lease: int, max_deliveries: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DQ_SQLITE_TEST_PATH=path,
        DQ_SQLITE_TEST_LEASE=str(lease),
        DQ_SQLITE_TEST_MAX_DELIVERIES=str(max_deliveries),
        PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT / "src"), env.get("PYTHONPATH", "")]),
    )
    return env


def _prepare(path: str, names: Sequence[int | None]) -> SqliteBroker:
    """A producer with ``record(n)`` for each number and ``poison()`` for each None."""
    from tests.brokers.sqlite.sqlite_worker_app import QUEUE, create_runs_table

    producer = SqliteBroker(path, middleware=[])
    create_runs_table(path)
    producer.enqueue_many(
        [
            Message(QUEUE, "poison", (), {}, {})
            if n is None
            else Message(QUEUE, "record", (n,), {}, {})
            for n in names
        ]
    )
    return producer


def _runs(path: str) -> dict[int, int]:
    import sqlite3

    conn = sqlite3.connect(path, timeout=30)
    try:
        return {int(n): int(runs) for n, runs in conn.execute("SELECT n, runs FROM test_runs")}
    finally:
        conn.close()


@pytest.fixture
def app_env(path: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("DQ_SQLITE_TEST_PATH", path)
    yield path
    sys.modules.pop("tests.brokers.sqlite.sqlite_worker_app", None)


def test_processes_killed_by_a_poison_message_dead_letter_it_and_run_the_rest_once(
    app_env: str,
) -> None:
    path, lease, cap = app_env, 500, 3
    names: list[int | None] = [0, 1, 2, None, 3, 4, 5, 6]
    producer = _prepare(path, names)
    deaths = 0
    for _ in range(cap + 3):
        done = subprocess.run(
            [sys.executable, str(TESTS / "sqlite_worker_app.py"), "3"],
            cwd=str(ROOT),
            env=_env(path, lease, cap),
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode == -signal.SIGKILL:
            deaths += 1
            continue
        assert done.returncode == 0, done.stderr.decode()
        break
    from tests.brokers.sqlite.sqlite_worker_app import QUEUE

    assert deaths == cap
    dead = producer.dead_letter_reasons_of(QUEUE)
    assert [reason for _, reason in dead] == [DeathReason.MAX_DELIVERIES]
    assert Message.decode(producer.dead_letters_of(QUEUE)[0][1]).actor_name == "poison"
    assert producer.qsize(QUEUE) == 0
    assert _runs(path) == dict.fromkeys(range(7), 1)  # every bystander ran, once
    producer.close()


def test_the_dq_command_dead_letters_a_message_that_kills_its_worker_process(
    app_env: str,
) -> None:
    path, lease, cap = app_env, 1000, 3
    names: list[int | None] = [*range(10), None, *range(10, 20)]
    producer = _prepare(path, names)
    from tests.brokers.sqlite.sqlite_worker_app import QUEUE

    log = open(Path(path).with_suffix(".log"), "ab")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "dq", "sqlite_worker_app:broker", "-p", "1", "-t", "4"],
        cwd=str(ROOT),
        env=_env(path, lease, cap),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while producer.qsize(QUEUE) or not producer.dead_letters_of(QUEUE):
            assert time.monotonic() < deadline, "the poison message was never dead-lettered"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        log.close()
    assert [reason for _, reason in producer.dead_letter_reasons_of(QUEUE)] == [
        DeathReason.MAX_DELIVERIES
    ]
    runs = _runs(path)
    assert sorted(runs) == list(range(20))  # no bystander was dead-lettered
    assert policy.DEFAULT_MAX_DELIVERIES == 10
    producer.close()


def test_recovery_reads_a_garbage_count_or_run_mark_leniently(
    path: str, brokers: list[SqliteBroker]
) -> None:
    import sqlite3

    broker = _broker(path, brokers, max_deliveries=2)
    conn = sqlite3.connect(path)
    for name, deliveries, run in (("x", "lots", "sideways"), ("y", 1, "alone")):
        message = _message(name)
        conn.execute(
            "INSERT INTO dq_messages (queue, message_id, payload, consumer, lease_until, "
            "deliveries, run) VALUES ('q', ?, ?, 'gone', 1, ?, ?)",
            (message.message_id, message.encode(), deliveries, run),
        )
    conn.commit()
    conn.close()
    # A count that is no number counts as none; "y" ran alone once more: over the cap.
    assert broker.expire_leases() == 1
    assert _deliveries(path) == {"x": 1}
    assert [reason for _, reason in broker.dead_letter_reasons_of("q")] == [
        DeathReason.MAX_DELIVERIES
    ]
