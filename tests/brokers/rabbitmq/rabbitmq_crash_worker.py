"""A dq worker process on RabbitMQ, for the crash tests (test_rabbitmq_crash.py beside it).

``python rabbitmq_crash_worker.py --queue Q --runs DB --connection-name NAME`` runs a dq
`Worker` for the ``record`` actor of `declare_record` on queue ``Q``, prints one JSON line
(``pid``) once it runs, then works until SIGTERM (a clean stop, exit 0) or SIGKILL.

What the actor ran is written to a SQLite file (`RunLog`), one row per run, before the
message is acked: it survives the process, so a test that SIGKILLs the worker still
knows what ran. Every connection of the process carries ``NAME`` as its
``connection_name`` client property, so a test can find (and close) exactly its own
connections on a server other tests share.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import dq
from dq.brokers.rabbitmq import RabbitmqBroker
from dq.middleware import CurrentMessage, default_middleware

__all__ = [
    "RABBIT_HOST",
    "RABBIT_PORT",
    "FirstAttemptFails",
    "RunLog",
    "declare_flaky",
    "declare_record",
    "main",
    "make_broker",
]

RABBIT_HOST = "127.0.0.1"
RABBIT_PORT = 5672


class RunLog:
    """Runs of the ``record`` actor in a SQLite file: one row (message_id, pid) per run.

    Safe for many threads and processes: each call opens its own connection (WAL mode,
    waits on a lock for up to 30 s).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS runs (message_id TEXT NOT NULL, pid INTEGER)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def add(self, message_id: str) -> None:
        """Record one run of ``message_id`` by this process."""
        db = self._connect()
        try:
            db.execute("INSERT INTO runs VALUES (?, ?)", (message_id, os.getpid()))
        finally:
            db.close()

    def counts(self) -> dict[str, int]:
        """message_id -> times it ran."""
        db = self._connect()
        try:
            rows = db.execute("SELECT message_id, COUNT(*) FROM runs GROUP BY message_id")
            return {str(message_id): int(n) for message_id, n in rows}
        finally:
            db.close()

    def processed(self) -> int:
        """How many distinct messages ran."""
        db = self._connect()
        try:
            (n,) = db.execute("SELECT COUNT(DISTINCT message_id) FROM runs").fetchone()
            return int(n)
        finally:
            db.close()


def make_broker(connection_name: str) -> RabbitmqBroker:
    """A RabbitmqBroker on the test server with the default middleware plus
    `CurrentMessage`; its connections are named ``connection_name``."""
    middleware = [cls() for cls in default_middleware]
    middleware.append(CurrentMessage())
    return RabbitmqBroker(
        host=RABBIT_HOST,
        port=RABBIT_PORT,
        middleware=middleware,
        client_properties={"connection_name": connection_name},
    )


def declare_record(
    broker: RabbitmqBroker, queue_name: str, runs: RunLog, *, sleep_ms: int = 0
) -> dq.Actor[[int], None]:
    """``record(n)`` on ``queue_name``: logs its message_id in ``runs``, then sleeps."""

    @dq.actor(broker=broker, actor_name="record", queue_name=queue_name, max_retries=0)
    def record(n: int) -> None:
        message = CurrentMessage.get_current_message()
        assert message is not None, "CurrentMessage middleware missing"
        runs.add(message.message_id)
        if sleep_ms:
            time.sleep(sleep_ms / 1000)

    return record


class FirstAttemptFails(Exception):
    """What ``flaky`` raises on a message's first attempt."""


def declare_flaky(
    broker: RabbitmqBroker, queue_name: str, runs: RunLog, *, sleep_ms: int = 0
) -> dq.Actor[[int], None]:
    """``flaky(n)`` on ``queue_name``: its first attempt fails (so the retry is published
    to the delay queue from the worker thread); a retry logs its message_id in ``runs``,
    then sleeps. Retries wait 100-300 ms."""

    @dq.actor(
        broker=broker,
        actor_name="flaky",
        queue_name=queue_name,
        max_retries=5,
        min_backoff=100,
        max_backoff=300,
    )
    def flaky(n: int) -> None:
        message = CurrentMessage.get_current_message()
        assert message is not None, "CurrentMessage middleware missing"
        if "retries" not in message.options:
            raise FirstAttemptFails(n)
        runs.add(message.message_id)
        if sleep_ms:
            time.sleep(sleep_ms / 1000)

    return flaky


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queue", required=True)
    parser.add_argument("--runs", required=True, type=Path, help="the SQLite run log")
    parser.add_argument("--connection-name", required=True)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--sleep-ms", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    broker = make_broker(args.connection_name)
    declare_record(broker, args.queue, RunLog(args.runs), sleep_ms=args.sleep_ms)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    worker = dq.Worker(broker, worker_threads=args.threads, worker_timeout=100)
    worker.start()
    sys.stdout.write(json.dumps({"pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    stop.wait()
    worker.stop(timeout=5000)
    broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
