"""The SQLite file of a `dq.brokers.sqlite.SqliteBroker`: its connections, and the
``BEGIN IMMEDIATE`` transactions that carry out the core's commands.

`Database` owns the file: one connection per thread (sqlite3 connections are not
thread-safe), reopened after a fork; `Database.write` runs a body in one
``BEGIN IMMEDIATE`` transaction, retried while the file is locked. `COMMANDS` maps
every core command to the `Database` method named after it that runs its one
transaction (``enqueue``, ``reserve``, ``ack``, ``nack``, ``requeue``, ``release``,
``promote``, ``replace``, ``start``, ``recover``, ``renew``, ``expire_leases``,
``expire_dead_letters``, ``flush``, ``flush_all``): each is atomic across processes,
and its statements only move rows, as the broker and `dq.core.policy` decided.
Every statement on a reserved row is guarded by ``consumer = ?``: a consumer whose
lease lapsed, and whose rows were recovered meanwhile, changes nothing.

**Errors.** A write that finds the database locked is retried (SQLite's
``busy_timeout``, then with backoff) for at most ``busy_timeout`` ms in all, then
raises `DatabaseBusy` (a `dq.errors.BrokerConnectionError`); a full disk or database
(SQLITE_FULL) raises `DatabaseFull`, any other SQLite failure `DatabaseUnavailable`.
Nothing is half-done, nothing is lost.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeAlias, TypeVar

from dq.brokers.sqlite.recovery import Recovery, recover_consumer
from dq.brokers.sqlite.recovery import expire_leases as recover_lapsed
from dq.brokers.sqlite.schema import create_or_migrate
from dq.brokers.steps import Cannot, CommandTable, ServerStep
from dq.core import (
    Ack,
    AckMany,
    DeathReason,
    DeclareQueue,
    Enqueue,
    ExpireDeadLetters,
    ExpireLeases,
    Flush,
    FlushAll,
    Nack,
    Promote,
    Recover,
    Release,
    Renew,
    Replace,
    Requeue,
    Reserve,
    Run,
    Start,
    policy,
)
from dq.errors import ConnectionClosed, ConnectionFailed

__all__ = [
    "COMMANDS",
    "Database",
    "DatabaseBusy",
    "DatabaseFull",
    "DatabaseUnavailable",
    "Reserved",
    "Row",
    "wall_ms",
]

T = TypeVar("T")

#: A row to INSERT: queue, message_id, priority, eta, payload.
Row: TypeAlias = tuple[str, str, int, int | None, bytes]
#: A reserved row as RETURNING gives it: priority, seq, payload, deliveries, eta,
#: message_id (any SQLite value: a raw write may have left any type in a column).
Reserved: TypeAlias = tuple[Any, int, Any, Any, Any, Any]

_RENEW_CHUNK: Final = 500  # consumer ids per renewal statement (SQLite's variable limit)

_INSERT: Final = """INSERT INTO dq_messages (queue, message_id, priority, eta, payload)
    VALUES (?, ?, ?, ?, ?)"""
# A requeue keeps the row's delivery count (the core's Requeue keeps it) but not its
# run mark: it waits again.
_COPY_TO_TAIL: Final = """INSERT INTO dq_messages (queue, message_id, priority, eta, payload,
        deliveries)
    SELECT queue, message_id, priority, eta, payload, deliveries FROM dq_messages
    WHERE seq = ? AND consumer = ?"""
_DELETE_HELD: Final = "DELETE FROM dq_messages WHERE seq = ? AND consumer = ?"
_NACK_HELD: Final = """INSERT INTO dq_dead (queue, message_id, payload, dead_at, reason)
    SELECT ?, message_id, payload, ?, ? FROM dq_messages WHERE seq = ? AND consumer = ?"""
_INSERT_IF_HELD: Final = """INSERT INTO dq_messages (queue, message_id, priority, eta, payload)
    SELECT ?, ?, ?, ?, ? WHERE EXISTS
        (SELECT 1 FROM dq_messages WHERE seq = ? AND consumer = ?)"""

_STEP: Final = "one BEGIN IMMEDIATE transaction"

#: How SqliteBroker carries out each core command: the `Database` method that runs
#: its one ``BEGIN IMMEDIATE`` transaction, or why there is none.
COMMANDS: CommandTable = {
    DeclareQueue: Cannot(
        "queues exist in the file by their rows: declare_queue writes nothing, it "
        "applies the core's DeclareQueue in this process (names, hooks)"
    ),
    Enqueue: ServerStep("enqueue", _STEP + " (enqueue_many: one for the whole batch)"),
    Reserve: ServerStep("reserve", _STEP + " (one UPDATE ... RETURNING)"),
    Ack: ServerStep("ack", _STEP + " (acks of concurrent threads are grouped)"),
    AckMany: ServerStep("ack", _STEP),
    Nack: ServerStep("nack", _STEP + " (INSERT into dq_dead with the reason, DELETE)"),
    Requeue: ServerStep("requeue", _STEP + " (a copy at the tail, then DELETE)"),
    Promote: ServerStep("promote", _STEP + " (INSERT of the ready copy, DELETE of the held)"),
    Replace: ServerStep("replace", _STEP + " (INSERT of the retry, DELETE of the original)"),
    Start: ServerStep("start", _STEP + " (only for suspects: rows with a delivery count)"),
    Recover: ServerStep("recover", _STEP + " (SELECT, the core decides, then the moves)"),
    Renew: ServerStep("renew", _STEP + " (every live consumer of this broker at once)"),
    ExpireLeases: ServerStep(
        "expire_leases", _STEP + " (SELECT the lapsed rows, the core decides, then the moves)"
    ),
    ExpireDeadLetters: ServerStep(
        "expire_dead_letters", _STEP + " (every queue's at once: one TTL per file)"
    ),
    Flush: ServerStep("flush", _STEP),
    FlushAll: ServerStep("flush_all", _STEP),
    Release: ServerStep("release", _STEP + " (what a closing consumer holds, to the tail)"),
}


class DatabaseUnavailable(ConnectionFailed):
    """The SQLite database could not be opened or used (a bad path, a file that is
    not a database, an I/O error)."""


class DatabaseFull(DatabaseUnavailable):
    """The SQLite database could not grow: the disk is full, or the database reached
    its size limit (``max_page_count``). Nothing was changed."""


class DatabaseBusy(ConnectionClosed):
    """The SQLite database stayed locked by other connections for longer than the
    broker's ``busy_timeout`` (nothing was changed)."""


def wall_ms() -> int:
    """Wall-clock ms: leases are compared across processes."""
    return int(time.time() * 1000)


def _is_busy(error: sqlite3.Error) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


def _is_full(error: BaseException) -> bool:
    """Whether ``error`` is SQLite's SQLITE_FULL ("database or disk is full")."""
    return (
        isinstance(error, sqlite3.Error)
        and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    ) or "database or disk is full" in str(error)


def _full(path: str, error: BaseException) -> DatabaseFull:
    return DatabaseFull(
        f"SQLite database {path!r} is full: the disk has no space left, or the database "
        f"reached its maximum size (max_page_count); nothing was changed ({error})"
    )


class Database:
    """One broker's access to one SQLite file: a connection per thread, and one
    method per server step (see `COMMANDS`).

    Args:
        path: the database file.
        busy_timeout: ms a transaction waits, in all, for a file locked by other
            connections before it raises `DatabaseBusy`.
    """

    def __init__(self, path: str, busy_timeout: int) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._local = threading.local()

    # -- connections ---------------------------------------------------------------------

    def _fail(self, error: BaseException) -> DatabaseUnavailable:
        if _is_full(error):
            return _full(self.path, error)
        return DatabaseUnavailable(f"cannot open SQLite database {self.path!r}: {error}")

    def open(self) -> None:
        """Open the file, switch it to WAL and create the schema, or raise naming it.

        Raises:
            DatabaseUnavailable: the file cannot be opened or written, or is not a
                dq database.
        """
        if os.path.isdir(self.path):
            raise self._fail(IsADirectoryError("it is a directory"))
        try:
            conn = self.connection()
            deadline = time.monotonic() + self.busy_timeout / 1000
            mode: Any = None
            while True:
                try:
                    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
                    break
                except sqlite3.OperationalError as e:
                    if not _is_busy(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            if mode is None or str(mode[0]).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode!r})")
            # Create the schema, or migrate an older file in place, under the write
            # lock (another process may be doing the same).
            self.write(create_or_migrate)
        except (sqlite3.Error, DatabaseBusy, DatabaseUnavailable) as e:
            self.close()
            cause = e.__cause__ if isinstance(e, DatabaseUnavailable) and e.__cause__ else e
            raise self._fail(cause) from e

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections are not thread-safe)."""
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        pid = os.getpid()
        if conn is None or local.pid != pid:  # none yet, or inherited through fork
            conn = sqlite3.connect(
                self.path, timeout=min(self.busy_timeout, 1000) / 1000, isolation_level=None
            )
            conn.execute("PRAGMA synchronous=NORMAL")
            local.conn = conn
            local.pid = pid
        return conn

    def close(self) -> None:
        """Close this thread's connection (other threads' close when they end)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local.conn = None

    def _retrying(self, attempt: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``attempt`` until it does not find the database locked, for at most
        ``busy_timeout`` ms; other SQLite errors raise `DatabaseUnavailable`."""
        deadline = time.monotonic() + self.busy_timeout / 1000
        backoff = 0.001
        while True:
            try:
                return attempt(self.connection())
            except sqlite3.Error as e:
                if _is_full(e):
                    raise _full(self.path, e) from e
                if not (isinstance(e, sqlite3.OperationalError) and _is_busy(e)):
                    raise DatabaseUnavailable(f"SQLite database {self.path!r} failed: {e}") from e
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DatabaseBusy(
                        f"SQLite database {self.path!r} stayed locked for "
                        f"{self.busy_timeout} ms: {e}"
                    ) from e
                time.sleep(min(backoff, remaining))
                backoff = min(backoff * 2, 0.05)

    def write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction (retried when busy:
        ``body`` must only touch the database)."""

        def attempt(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            return result

        return self._retrying(attempt)

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one query (retried while the file is locked)."""
        return self._retrying(lambda conn: conn.execute(sql, params).fetchall())

    # -- the broker's steps ----------------------------------------------------------------

    def enqueue(self, rows: Sequence[Row]) -> None:
        """Store ``rows`` (`dq.core.Enqueue`), all in one transaction."""

        def body(conn: sqlite3.Connection) -> None:
            if len(rows) == 1:
                conn.execute(_INSERT, rows[0])
            else:
                conn.executemany(_INSERT, rows)

        self.write(body)

    def reserve(self, queue_name: str, consumer_id: str, limit: int, lease: int) -> list[Reserved]:
        """Reserve up to ``limit`` waiting rows of ``queue_name`` for ``lease`` ms, by
        priority then FIFO (`dq.core.Reserve`; a read first: no write lock when
        nothing waits)."""
        if not self.read(
            "SELECT 1 FROM dq_messages WHERE queue = ? AND consumer IS NULL LIMIT 1",
            (queue_name,),
        ):
            return []

        def body(conn: sqlite3.Connection) -> list[Reserved]:
            # The lease is computed once BEGIN IMMEDIATE holds the lock: computed
            # before, a wait for a locked database would eat into it.
            until = wall_ms() + lease
            rows: list[Reserved] = conn.execute(
                "UPDATE dq_messages SET consumer = ?, lease_until = ? WHERE seq IN ("
                "SELECT seq FROM dq_messages WHERE queue = ? AND consumer IS NULL "
                "ORDER BY priority, seq LIMIT ?) "
                "RETURNING priority, seq, payload, deliveries, eta, message_id",
                (consumer_id, until, queue_name, limit),
            ).fetchall()
            return rows

        return self.write(body)

    def renew(self, consumer_ids: Sequence[str], lease: int) -> int:
        """Extend by ``lease`` ms the lease of every row these consumers hold
        (`dq.core.Renew`, for all of them at once); return how many rows."""

        def body(conn: sqlite3.Connection) -> int:
            # The new end is computed once BEGIN IMMEDIATE holds the lock: computed
            # before, a wait for a locked database would eat into the lease it grants.
            until = wall_ms() + lease
            count = 0
            for start in range(0, len(consumer_ids), _RENEW_CHUNK):
                chunk = consumer_ids[start : start + _RENEW_CHUNK]
                marks = ",".join("?" * len(chunk))
                count += conn.execute(
                    f"UPDATE dq_messages SET lease_until = ? WHERE consumer IN ({marks})",
                    (until, *chunk),
                ).rowcount
            return count

        return self.write(body)

    def expire_leases(self, now_ms: int, max_deliveries: int) -> Recovery:
        """Recover every row whose lease ended before ``now_ms`` (`dq.core.ExpireLeases`;
        a read first: no write lock on every keeper tick)."""
        if not self.read(
            "SELECT 1 FROM dq_messages WHERE consumer IS NOT NULL AND lease_until < ? LIMIT 1",
            (now_ms,),
        ):
            return Recovery()
        return self.write(lambda conn: recover_lapsed(conn, now_ms, max_deliveries))

    def recover(self, consumer_id: str, now_ms: int, max_deliveries: int) -> Recovery:
        """Recover every row ``consumer_id`` holds (`dq.core.Recover`)."""
        return self.write(lambda conn: recover_consumer(conn, consumer_id, now_ms, max_deliveries))

    def expire_dead_letters(self, cutoff_ms: int) -> int:
        """Drop the dead letters of ``cutoff_ms`` or older (`dq.core.ExpireDeadLetters`;
        a read first: no write lock on every keeper tick); return how many."""
        if not self.read("SELECT 1 FROM dq_dead WHERE dead_at <= ? LIMIT 1", (cutoff_ms,)):
            return 0
        return self.write(
            lambda conn: int(
                conn.execute("DELETE FROM dq_dead WHERE dead_at <= ?", (cutoff_ms,)).rowcount
            )
        )

    def flush(self, name: str) -> None:
        """Drop the waiting rows of canonical queue ``name`` and its ``.DQ``, and its
        dead letters (`dq.core.Flush`)."""

        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM dq_messages WHERE queue IN (?, ?) AND consumer IS NULL",
                (name, policy.dq_name(name)),
            )
            conn.execute("DELETE FROM dq_dead WHERE queue = ?", (name,))

        self.write(body)

    def flush_all(self) -> None:
        """Drop every waiting row and every dead letter (`dq.core.FlushAll`)."""

        def body(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM dq_messages WHERE consumer IS NULL")
            conn.execute("DELETE FROM dq_dead")

        self.write(body)

    # -- a consumer's steps: each guarded by ``consumer = ?`` ----------------------------

    def ack(self, consumer_id: str, seqs: Sequence[int]) -> int:
        """Delete the acked rows ``consumer_id`` still holds (`dq.core.AckMany`);
        return how many."""
        return self.write(
            lambda conn: sum(
                conn.execute(_DELETE_HELD, (seq, consumer_id)).rowcount for seq in seqs
            )
        )

    def nack(
        self,
        consumer_id: str,
        queue_name: str,
        items: Iterable[tuple[int, DeathReason]],
        now_ms: int,
    ) -> int:
        """Move each held row of ``items`` to the dead letters of ``queue_name``'s
        canonical queue with its reason (`dq.core.Nack`); return how many."""
        dead_queue = policy.q_name(queue_name)

        def body(conn: sqlite3.Connection) -> int:
            moved = 0
            for seq, reason in items:
                row = (dead_queue, now_ms, reason.value, seq, consumer_id)
                if conn.execute(_NACK_HELD, row).rowcount:
                    conn.execute(_DELETE_HELD, (seq, consumer_id))
                    moved += 1
            return moved

        return self.write(body)

    def requeue(self, consumer_id: str, seqs: Sequence[int]) -> int:
        """Move the held rows ``seqs`` to the tail of their queue, in order
        (`dq.core.Requeue`); return how many ``consumer_id`` still held."""

        def body(conn: sqlite3.Connection) -> int:
            done = 0
            for seq in seqs:
                if conn.execute(_COPY_TO_TAIL, (seq, consumer_id)).rowcount:
                    conn.execute(_DELETE_HELD, (seq, consumer_id))
                    done += 1
            return done

        return self.write(body)

    def release(self, consumer_id: str, seqs: Sequence[int]) -> int:
        """What a closing consumer holds, to the tail (`dq.core.Release`: a
        `dq.core.Requeue` of each held row, oldest first); return how many."""
        return self.requeue(consumer_id, sorted(seqs))

    def promote(self, consumer_id: str, seq: int, row: Row) -> int:
        """Store ``row``, the ready copy of the held delayed row ``seq``, and delete
        ``seq`` (`dq.core.Promote`: the same moves as `replace`); return 1, or 0 if
        ``consumer_id`` no longer holds ``seq`` (nothing changed)."""
        return self.replace(consumer_id, seq, row)

    def replace(self, consumer_id: str, seq: int, row: Row) -> int:
        """Store ``row`` in place of the held row ``seq`` (`dq.core.Replace`); return
        1, or 0 if ``consumer_id`` no longer holds ``seq`` (nothing changed)."""

        def body(conn: sqlite3.Connection) -> int:
            # The new row first, and only if this consumer still holds the original;
            # then the original.
            if not conn.execute(_INSERT_IF_HELD, (*row, seq, consumer_id)).rowcount:
                return 0
            conn.execute(_DELETE_HELD, (seq, consumer_id))
            return 1

        return self.write(body)

    def start(self, consumer_id: str, seq: int, run: Run) -> int:
        """Mark how the held row ``seq`` started running (`dq.core.Start`)."""
        return self.write(
            lambda conn: int(
                conn.execute(
                    "UPDATE dq_messages SET run = ? WHERE seq = ? AND consumer = ?",
                    (run.value, seq, consumer_id),
                ).rowcount
            )
        )
