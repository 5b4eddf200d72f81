"""SqliteBroker: its command table, its schema migration, and the faults of issue 16.

Each fault test failed on the code before the fix: bad raw rows crash-looped the
consumer, a renewal behind a long lock granted an already-lapsed lease, a full disk
read as an unreachable broker, bad queue names were stored, nacks kept no reason.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from typing import Any

import pytest

from dq.broker import MessageProxy
from dq.brokers.sqlite import (
    COMMANDS,
    SCHEMA_VERSION,
    DatabaseFull,
    DatabaseUnavailable,
    SqliteBroker,
)
from dq.brokers.sqlite.database import Database
from dq.brokers.steps import Cannot, ServerStep, uncovered
from dq.core import DeathReason, policy
from dq.errors import BrokerConnectionError, QueueNotFound
from dq.message import Message
from tests.support.sqlite_helpers import select_rows


def _message(n: int, queue: str = "q") -> Message[Any]:
    return Message(queue, "act", (n,), {}, {})


def _insert_raw(path: str, **columns: Any) -> None:
    """INSERT one row into dq_messages as a raw writer would (no checks)."""
    names = ", ".join(columns)
    marks = ", ".join("?" * len(columns))
    conn = sqlite3.connect(path, timeout=10)
    try:
        conn.execute(f"INSERT INTO dq_messages ({names}) VALUES ({marks})", tuple(columns.values()))
        conn.commit()
    finally:
        conn.close()


# -- the command table ---------------------------------------------------------------------------


def test_every_command_has_a_row_naming_a_transaction_method() -> None:
    assert uncovered(COMMANDS) == ()
    for kind, row in COMMANDS.items():
        if isinstance(row, Cannot):
            assert row.reason, kind
            continue
        assert isinstance(row, ServerStep)
        assert "BEGIN IMMEDIATE" in row.atomic, (kind, row)
        # Named after the command, and a method of the database that runs one transaction.
        assert callable(getattr(Database, row.name, None)), f"{kind.__name__}: no {row.name!r}"
        words = row.name.split("_")
        assert kind.__name__.lower().startswith(words[0]), (kind, row)


# -- schema migration ------------------------------------------------------------------------------

_SCHEMA_V1 = (
    """CREATE TABLE dq_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL,
        message_id TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, eta INTEGER,
        payload BLOB NOT NULL, consumer TEXT, lease_until INTEGER)""",
    """CREATE INDEX dq_messages_waiting
        ON dq_messages (queue, priority, seq) WHERE consumer IS NULL""",
    "CREATE INDEX dq_messages_queue ON dq_messages (queue)",
    "CREATE INDEX dq_messages_consumer ON dq_messages (consumer) WHERE consumer IS NOT NULL",
    "CREATE INDEX dq_messages_lease ON dq_messages (lease_until) WHERE consumer IS NOT NULL",
    """CREATE TABLE dq_dead (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL,
        message_id TEXT NOT NULL, payload BLOB NOT NULL, dead_at INTEGER NOT NULL)""",
    "CREATE INDEX dq_dead_queue ON dq_dead (queue, seq)",
    "CREATE INDEX dq_dead_at ON dq_dead (dead_at)",
)


def _version_1_file(path: str) -> tuple[list[Message[Any]], Message[Any]]:
    """A file as dq's version-1 schema left it: three waiting messages (one delayed)
    and a dead letter."""
    waiting = [_message(1), _message(2), _message(3).copy(queue_name="q.DQ", options={"eta": 5})]
    dead = _message(4)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in _SCHEMA_V1:
        conn.execute(statement)
    for message in waiting:
        conn.execute(
            "INSERT INTO dq_messages (queue, message_id, priority, eta, payload) "
            "VALUES (?, ?, 0, ?, ?)",
            (message.queue_name, message.message_id, message.options.get("eta"), message.encode()),
        )
    conn.execute(
        "INSERT INTO dq_dead (queue, message_id, payload, dead_at) VALUES ('q', ?, ?, 7)",
        (dead.message_id, dead.encode()),
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    return waiting, dead


def test_a_version_1_file_is_migrated_in_place_and_keeps_its_messages(
    path: str, brokers: list[SqliteBroker]
) -> None:
    waiting, dead = _version_1_file(path)
    broker = SqliteBroker(path, middleware=[], poll_interval=10)
    brokers.append(broker)
    assert select_rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert SCHEMA_VERSION == 2
    columns = {row[1] for row in select_rows(path, "PRAGMA table_info(dq_messages)")}
    assert {"deliveries", "run"} <= columns
    assert "reason" in {row[1] for row in select_rows(path, "PRAGMA table_info(dq_dead)")}
    assert broker.qsize("q") == 3
    assert broker.dead_letter_reasons_of("q") == [(dead.message_id, DeathReason.NACKED)]
    assert [mid for mid, _, _ in broker.dead_letters_of("q")] == [dead.message_id]
    consumer = broker.consume("q", prefetch=2, timeout=10)
    got = [next(consumer), next(consumer)]
    assert [m.message_id for m in got] == [waiting[0].message_id, waiting[1].message_id]
    assert not consumer.suspect(got[0])
    for m in got:
        consumer.ack(m)
    delayed = broker.consume("q.DQ", timeout=10)
    assert next(delayed).message_id == waiting[2].message_id
    delayed.close()
    consumer.close()
    # A second broker finds it migrated already.
    again = SqliteBroker(path, middleware=[])
    brokers.append(again)
    assert again.qsize("q") == 1


# -- bad rows ------------------------------------------------------------------------------------


def test_a_row_with_a_text_payload_is_dead_lettered_and_its_batch_mates_delivered(
    broker: SqliteBroker, caplog: pytest.LogCaptureFixture
) -> None:
    broker.enqueue(_message(1))
    _insert_raw(
        broker.path, queue="q", message_id="text-payload", payload=_message(2).encode().decode()
    )
    broker.enqueue(_message(3))
    consumer = broker.consume("q", prefetch=3, timeout=10)
    with caplog.at_level(logging.ERROR):
        got = [next(consumer), next(consumer)]  # at once: no lease cycle waited
    assert [m.args for m in got] == [(1,), (3,)]
    assert broker.dead_letter_reasons_of("q") == [("text-payload", DeathReason.UNDECODABLE)]
    assert "text-payload" in caplog.text and "undecodable" in caplog.text
    for m in got:
        consumer.ack(m)
    broker.join("q", timeout=1000)
    consumer.close()


def test_a_row_with_a_text_priority_is_dead_lettered_and_its_batch_mates_delivered(
    broker: SqliteBroker, caplog: pytest.LogCaptureFixture
) -> None:
    broker.enqueue(_message(1))
    _insert_raw(
        broker.path,
        queue="q",
        message_id="text-priority",
        priority="high",
        payload=_message(2).encode(),
    )
    _insert_raw(
        broker.path,
        queue="q",
        message_id="blob-priority",
        priority=b"\x01",
        payload=_message(3).encode(),
    )
    broker.enqueue(_message(4))
    consumer = broker.consume("q", prefetch=4, timeout=10)
    with caplog.at_level(logging.ERROR):
        got = [next(consumer), next(consumer)]
    assert [m.args for m in got] == [(1,), (4,)]
    assert broker.dead_letter_reasons_of("q") == [
        ("text-priority", DeathReason.UNDECODABLE),
        ("blob-priority", DeathReason.UNDECODABLE),
    ]
    assert "'high' is not a number" in caplog.text
    for m in got:
        consumer.ack(m)
    consumer.close()


@pytest.mark.parametrize("eta", [math.inf, -math.inf, "soon", -5, policy.MAX_ETA_MS + 1])
def test_a_delayed_row_with_a_bad_eta_column_is_dead_lettered(
    broker: SqliteBroker, caplog: pytest.LogCaptureFixture, eta: Any
) -> None:
    good = broker.enqueue(_message(1), delay=0)
    bad = _message(2).copy(queue_name="q.DQ", options={"eta": 5})
    _insert_raw(broker.path, queue="q.DQ", message_id=bad.message_id, eta=eta, payload=bad.encode())
    consumer = broker.consume("q.DQ", prefetch=2, timeout=10)
    with caplog.at_level(logging.ERROR):
        got = next(consumer)
        with pytest.raises(StopIteration):
            next(consumer)
    assert got.message_id == good.message_id
    assert broker.dead_letter_reasons_of("q") == [(bad.message_id, DeathReason.BAD_ETA)]
    assert bad.message_id in caplog.text and "bad_eta" in caplog.text
    consumer.close()


@pytest.mark.parametrize("eta", [math.nan, math.inf, "soon"])
def test_a_delayed_message_whose_eta_option_is_bad_is_dead_lettered(
    broker: SqliteBroker, caplog: pytest.LogCaptureFixture, eta: Any
) -> None:
    # A raw row (or a foreign producer) with an eta option that is no time: NaN
    # even reaches the column as NULL, so the payload's option is checked too.
    bad = _message(2).copy(queue_name="q.DQ", options={"eta": eta})
    payload = json.dumps(json.loads(bad.encode()) | {"options": {"eta": eta}}).encode()
    _insert_raw(broker.path, queue="q.DQ", message_id=bad.message_id, eta=None, payload=payload)
    good = broker.enqueue(_message(1), delay=0)
    consumer = broker.consume("q.DQ", prefetch=2, timeout=10)
    with caplog.at_level(logging.ERROR):
        got = next(consumer)
        with pytest.raises(StopIteration):
            next(consumer)
    assert got.message_id == good.message_id
    assert broker.dead_letter_reasons_of("q") == [(bad.message_id, DeathReason.BAD_ETA)]
    assert bad.message_id in caplog.text and "bad_eta" in caplog.text
    consumer.close()


def test_an_enqueue_of_a_delayed_message_with_a_bad_eta_is_refused(broker: SqliteBroker) -> None:
    bad = _message(1).copy(queue_name="q.DQ", options={"eta": math.nan})
    with pytest.raises(ValueError, match="eta"):
        broker.enqueue(bad)
    assert broker.qsize("q") == 0


# -- leases behind a long lock ---------------------------------------------------------------------


def _hold_write_lock(
    path: str, seconds: float, ready: threading.Event, released: list[int]
) -> None:
    """Hold the file's write lock for ``seconds``; append to ``released`` the wall ms
    just before it lets go (nobody else can write before that)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    ready.set()
    time.sleep(seconds)
    released.append(int(time.time() * 1000))
    conn.execute("COMMIT")
    conn.close()


def test_a_lease_renewed_behind_a_lock_longer_than_the_lease_does_not_lapse(
    path: str, brokers: list[SqliteBroker]
) -> None:
    lease, count = 1500, 8
    # Keepers tick once when they start, then only when the test ticks them.
    holder = SqliteBroker(path, middleware=[], lease=lease, sweep_interval=600_000)
    other = SqliteBroker(path, middleware=[], lease=lease, sweep_interval=600_000)
    brokers += [holder, other]
    holder.enqueue_many([_message(n) for n in range(count)])
    consumer: Any = holder.consume("q", prefetch=count, timeout=10)
    held = [next(consumer) for _ in range(count)]
    ready, released = threading.Event(), list[int]()
    locker = threading.Thread(
        target=_hold_write_lock, args=(path, 2.3 * lease / 1000, ready, released)
    )
    locker.start()
    ready.wait()
    # Both brokers' keepers tick while the file is locked: they wait for the lock.
    ticks = [threading.Thread(target=b._keeper_tick) for b in (holder, other)]
    for tick in ticks:
        tick.start()
    locker.join()
    for tick in ticks:
        tick.join()
    rows = select_rows(path, "SELECT consumer, lease_until FROM dq_messages")
    assert len(rows) == count  # nothing was copied back to the queue: no duplicate
    assert {holder_id for holder_id, _ in rows} == {consumer.consumer_id}
    assert min(until for _, until in rows) >= released[0] + lease  # granted after the lock
    late = other.consume("q", prefetch=count, timeout=10)
    with pytest.raises(StopIteration):
        next(late)
    for m in held:
        consumer.ack(m)
    assert holder.qsize("q") == 0
    late.close()
    consumer.close()


def test_a_reservation_behind_a_lock_gets_a_whole_lease(
    path: str, brokers: list[SqliteBroker]
) -> None:
    lease = 500
    broker = SqliteBroker(path, middleware=[], lease=lease, sweep_interval=600_000)
    brokers.append(broker)
    broker.enqueue(_message(1))
    ready, released = threading.Event(), list[int]()
    locker = threading.Thread(
        target=_hold_write_lock, args=(path, 2 * lease / 1000, ready, released)
    )
    locker.start()
    ready.wait()
    reserved: list[Any] = []
    fetch = threading.Thread(
        target=lambda: reserved.extend(broker._database.reserve("q", "someone", 1, broker.lease))
    )
    fetch.start()
    locker.join()
    fetch.join()
    assert len(reserved) == 1
    ((until,),) = select_rows(path, "SELECT lease_until FROM dq_messages")
    assert until >= released[0] + lease


# -- delays too long, a full disk, bad queue names, reasons ------------------------------------


def test_a_delay_past_the_largest_eta_is_a_value_error_and_stores_nothing(
    broker: SqliteBroker,
) -> None:
    with pytest.raises(ValueError, match=r"delay 100000000000000000000 ms is too long"):
        broker.enqueue(_message(1), delay=10**20)
    with pytest.raises(ValueError, match=r"delay 100000000000000000000 ms is too long"):
        broker.enqueue_many([_message(2), _message(3)], delay=10**20)
    assert broker.qsize("q") == 0


def test_a_full_database_says_it_is_full(broker: SqliteBroker) -> None:
    broker.enqueue(_message(0))
    conn = broker._database.connection()  # this thread's: the limit is per connection
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")
    big = Message("q", "act", ("x" * 20_000,), {}, {})
    with pytest.raises(DatabaseFull) as info:
        for _ in range(10):
            broker.enqueue(big)
    error = info.value
    assert isinstance(error, DatabaseUnavailable)
    assert isinstance(error, BrokerConnectionError)
    assert broker.path in str(error)
    assert "is full" in str(error) and "disk" in str(error)
    assert "unreachable" not in str(error)
    conn.execute("PRAGMA max_page_count = 1073741823")
    broker.enqueue(big)


@pytest.mark.parametrize(
    "name", ["x.msgs", "__dq__.x", "__heartbeats__", "__acks__.q", "bad name", "", "q.DQ.DQ"]
)
def test_a_bad_queue_name_is_refused_with_the_core_reason(broker: SqliteBroker, name: str) -> None:
    problem = policy.stored_queue_problem(name)
    assert problem is not None
    with pytest.raises(ValueError, match="invalid queue name") as info:
        broker.declare_queue(name)
    assert problem in str(info.value)
    with pytest.raises(ValueError, match="invalid queue name"):
        broker.enqueue(_message(1, queue=name))
    with pytest.raises(ValueError, match="invalid queue name"):
        broker.enqueue_many([_message(1), _message(2, queue=name)])
    with pytest.raises(ValueError, match="invalid queue name"):
        broker.consume(name)
    assert select_rows(broker.path, "SELECT count(*) FROM dq_messages") == [(0,)]
    assert name not in broker.get_declared_queues()


def test_a_dead_letter_queue_name_is_not_found(broker: SqliteBroker) -> None:
    for call in (
        lambda: broker.declare_queue("r.XQ"),
        lambda: broker.declare_queue("q.XQ"),
        lambda: broker.enqueue(_message(1, queue="q.XQ")),
        lambda: broker.consume("q.XQ"),
    ):
        with pytest.raises(QueueNotFound):
            call()
    assert broker.get_declared_queues() == {"q"}
    broker.declare_queue("q.DQ")  # a delay queue's name declares its queue
    broker.enqueue(_message(1, queue="q.DQ"))
    assert broker.qsize("q") == 1


def test_a_nack_stores_the_reason(broker: SqliteBroker) -> None:
    for n in range(2):
        broker.enqueue(_message(n))
    consumer = broker.consume("q", prefetch=2, timeout=10)
    first, second = next(consumer), next(consumer)
    second.death_reason = DeathReason.BAD_OPTIONS
    consumer.nack(first)
    consumer.nack(second)
    assert broker.dead_letter_reasons_of("q") == [
        (first.message_id, DeathReason.NACKED),
        (second.message_id, DeathReason.BAD_OPTIONS),
    ]
    assert [mid for mid, _, _ in broker.dead_letters_of("q")] == [
        first.message_id,
        second.message_id,
    ]
    consumer.close()


# -- the hot path ------------------------------------------------------------------------------


def test_enqueue_reserve_and_ack_cost_no_extra_statement(broker: SqliteBroker) -> None:
    statements: list[str] = []
    conn = broker._database.connection()
    conn.set_trace_callback(statements.append)
    try:
        broker.enqueue(_message(1))
        assert [s.split()[0] for s in statements] == ["BEGIN", "INSERT", "COMMIT"]
        statements.clear()
        consumer = broker.consume("q", prefetch=1, timeout=10)
        statements.clear()
        m: MessageProxy = next(consumer)
        assert [s.split()[0] for s in statements] == ["SELECT", "BEGIN", "UPDATE", "COMMIT"]
        statements.clear()
        consumer.started(m, alone=False)  # not a suspect: nothing to write
        assert statements == []
        consumer.ack(m)
        assert [s.split()[0] for s in statements] == ["BEGIN", "DELETE", "COMMIT"]
    finally:
        conn.set_trace_callback(None)
    consumer.close()


def test_max_deliveries_is_checked_by_the_core(path: str) -> None:
    for bad in (1, -1, "3", 2.5, True):
        with pytest.raises(ValueError, match="max_deliveries"):
            SqliteBroker(path, middleware=[], max_deliveries=bad)  # type: ignore[arg-type]  # the test's point
    broker = SqliteBroker(path, middleware=[])
    assert broker.max_deliveries == policy.DEFAULT_MAX_DELIVERIES == 10
    broker.close()
