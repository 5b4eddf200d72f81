"""A dq app on one SQLite file, for the multiprocess tests of test_sqlite_broker.py beside it.

Run as ``python -m dq sqlite_worker_app:broker -P tests/brokers/sqlite`` with the environment:

``DQ_SQLITE_TEST_PATH``
    the broker's file (required); the ``record`` actor counts its runs there too, in
    the table ``test_runs`` (n -> times run), outside the broker's tables.
``DQ_SQLITE_TEST_LEASE``
    the broker's lease, ms (default 30000).
``DQ_SQLITE_TEST_SLEEP``
    seconds each run sleeps (default 0).
``DQ_SQLITE_TEST_MAX_DELIVERIES``
    the broker's ``max_deliveries`` (default dq's).

``python sqlite_worker_app.py PREFETCH`` runs the messages one after another in one
thread (each one alone, as dq's worker runs suspects), without the ``dq`` command, and
exits once nothing arrived for three seconds: the delivery-cap tests kill it with the
``poison`` actor.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import threading
import time

import dq
from dq.brokers.sqlite import SqliteBroker

__all__ = [
    "QUEUE",
    "broker",
    "count_runs",
    "create_runs_table",
    "poison",
    "record",
    "run_one_by_one",
]

QUEUE = "sqlite_mp"

PATH = os.environ["DQ_SQLITE_TEST_PATH"]
LEASE = int(os.environ.get("DQ_SQLITE_TEST_LEASE", "30000"))
SLEEP = float(os.environ.get("DQ_SQLITE_TEST_SLEEP", "0"))
MAX_DELIVERIES = int(os.environ.get("DQ_SQLITE_TEST_MAX_DELIVERIES", "10"))

broker = SqliteBroker(
    PATH, middleware=[], lease=LEASE, poll_interval=20, max_deliveries=MAX_DELIVERIES
)
dq.set_broker(broker)

_local = threading.local()


def create_runs_table(path: str) -> None:
    """Create the run counter table in ``path``."""
    with sqlite3.connect(path, timeout=30) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS test_runs (n INTEGER PRIMARY KEY, runs INTEGER NOT NULL)"
        )


def count_runs(path: str) -> dict[int, int]:
    """n -> how many times ``record(n)`` ran."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        return {int(n): int(runs) for n, runs in conn.execute("SELECT n, runs FROM test_runs")}
    finally:
        conn.close()


def _connection() -> sqlite3.Connection:
    conn: sqlite3.Connection | None = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = sqlite3.connect(PATH, timeout=30, isolation_level=None)
    return conn


@dq.actor(queue_name=QUEUE)
def record(n: int) -> None:
    """Count one run of ``n``."""
    if SLEEP:
        time.sleep(SLEEP)
    _connection().execute(
        "INSERT INTO test_runs (n, runs) VALUES (?, 1) "
        "ON CONFLICT (n) DO UPDATE SET runs = runs + 1",
        (n,),
    )


@dq.actor(queue_name=QUEUE)
def poison() -> None:
    """Kill this process, as a message that crashes the interpreter would.

    It first runs a little (as a real one does): a worker process that dies right
    after it booted may stop the ``dq`` command before its supervisor saw it ready.
    """
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)


def run_one_by_one(prefetch: int, idle_ms: int = 3000) -> None:
    """Run the queue's messages one after another, each alone (no worker): reserve
    ``prefetch`` at a time, report each start, run it, ack it; return once nothing
    arrived for ``idle_ms``."""
    consumer = broker.consume(QUEUE, prefetch=prefetch, timeout=idle_ms)
    for message in consumer:
        consumer.started(message, alone=True)  # one thread: everything runs alone
        broker.get_actor(message.actor_name).fn(*message.args, **message.kwargs)
        consumer.ack(message)
    consumer.close()
    broker.close()


if __name__ == "__main__":
    run_one_by_one(int(sys.argv[1]))
