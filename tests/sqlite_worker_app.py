"""A dq app on one SQLite file, for the multiprocess tests of tests/test_sqlite_broker.py.

Run as ``python -m dq sqlite_worker_app:broker -P tests`` with the environment:

``DQ_SQLITE_TEST_PATH``
    the broker's file (required); the ``record`` actor counts its runs there too, in
    the table ``test_runs`` (n -> times run), outside the broker's tables.
``DQ_SQLITE_TEST_LEASE``
    the broker's lease, ms (default 30000).
``DQ_SQLITE_TEST_SLEEP``
    seconds each run sleeps (default 0).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import dq
from dq.brokers.sqlite import SqliteBroker

__all__ = ["QUEUE", "broker", "count_runs", "create_runs_table", "record"]

QUEUE = "sqlite_mp"

PATH = os.environ["DQ_SQLITE_TEST_PATH"]
LEASE = int(os.environ.get("DQ_SQLITE_TEST_LEASE", "30000"))
SLEEP = float(os.environ.get("DQ_SQLITE_TEST_SLEEP", "0"))

broker = SqliteBroker(PATH, middleware=[], lease=LEASE, poll_interval=20)
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
