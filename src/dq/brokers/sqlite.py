"""`SqliteBroker`: an embedded, persistent broker in one SQLite file (standard library).

One file, shared safely by several producer and worker processes on one machine (the
database runs in WAL mode). The schema (version 2: ``PRAGMA user_version``; a
version-1 file is migrated in place when a broker opens it, see
``dq.brokers._sqlite_schema``):

===================  ===========================================================
table                contents
===================  ===========================================================
``dq_messages``      every stored message, waiting or in flight: ``seq`` (FIFO
                     order, ``INTEGER PRIMARY KEY AUTOINCREMENT``), ``queue``
                     (``q`` or ``q.DQ``), ``message_id``, ``priority`` (the
                     locally declared actor's, else 0), ``eta`` (ms, delayed
                     copies), ``payload`` (the Dramatiq JSON envelope),
                     ``consumer`` (NULL while waiting), ``lease_until`` (ms),
                     ``deliveries`` (deliveries cut short by a consumer's death)
                     and ``run`` (how a suspect started: ``alone``/``shared``)
``dq_dead``          dead letters: ``queue`` (canonical), ``message_id``,
                     ``payload``, ``dead_at`` (ms), ``reason`` (a
                     `dq.core.DeathReason` value); dropped after
                     ``dead_message_ttl``
===================  ===========================================================

**The core decides, the SQL moves.** Every decision is `dq.core`'s: queue names
(`policy.check_queue_name`), delays and etas (`policy.eta_ms`, `policy.eta_problem`),
promotion, which lease lapsed (`policy.lease_expired`), delivery counts
(`policy.deliveries_after_death`) and the cap (`policy.over_delivery_cap`). `COMMANDS`
maps every core command to the one ``BEGIN IMMEDIATE`` transaction that carries it
out, a method named after it (``_enqueue``, ``_reserve``, ``_ack``, ``_nack``,
``_requeue``, ``_release``, ``_promote``, ``_replace``, ``_start``, ``_recover``,
``_renew``, ``_expire_leases``, ``_expire_dead_letters``, ``_flush``, ``_flush_all``),
so each is atomic across processes and its statements only move rows:

* enqueue / `SqliteBroker.enqueue_many`: INSERT (many in one transaction);
* fetch (`Reserve`): the free prefetch window of the consumer's queue, by priority
  then FIFO, marked with the consumer's id and a lease, in one ``UPDATE … RETURNING``;
  a row a raw write left undeliverable (a TEXT payload, a priority that is no number,
  an eta the core refuses) is dead-lettered with its reason (``undecodable``,
  ``bad_eta``) and logged with its seq and message id, and never holds its
  batch-mates back;
* ack: DELETE (acks of concurrent worker threads are sent together);
* nack: INSERT into ``dq_dead`` with the `dq.broker.MessageProxy.death_reason`, and
  DELETE;
* requeue / close (`Requeue`, `Release`): a copy at the tail (a new ``seq``, the same
  delivery count) and the old row deleted;
* promote and replace (a retry): the new row inserted, then the old one deleted,
  only if the consumer still holds it (if its lease expired and it was recovered,
  nothing is stored, so nothing is duplicated);
* flush: DELETE of the waiting rows and the dead letters.

**The delivery cap** (``max_deliveries``, default 10). When a consumer's rows are
recovered (`Recover`, `ExpireLeases`), the transaction SELECTs them, lets
`dq.core.apply` decide each one's fate on a small core state describing only those
rows, and moves exactly those rows (``dq.brokers._sqlite_recovery``): the first death
counts for every row the consumer held, which makes them *suspects*; after that only
a death while the row ran alone counts, so a bystander is never blamed. A reserved
row's count comes back with it (`SqliteConsumer.suspect`: dq's worker runs suspects
alone), and `SqliteConsumer.started` records how a suspect started (one UPDATE; an
ordinary message costs nothing). At ``max_deliveries`` the row is dead-lettered with
the reason ``max_deliveries``, logged with its message id.

**Errors.** A write that finds the database locked is retried (SQLite's
``busy_timeout``, then with backoff) for at most ``busy_timeout`` ms in all, then
raises `DatabaseBusy` (a `dq.errors.BrokerConnectionError`); a full disk or database
(SQLITE_FULL) raises `DatabaseFull`, any other SQLite failure `DatabaseUnavailable`.
Nothing is half-done, nothing is lost. A bad queue name raises ``ValueError`` (a
``.XQ`` name: `dq.errors.QueueNotFound`); a delay whose eta would pass
`dq.core.policy.MAX_ETA_MS` raises ``ValueError`` naming it.

**Recovery is bounded.** Each broker that consumes runs a keeper thread that, every
``sweep_interval`` ms (default ``lease / 3``), renews the leases of its live
consumers' rows, recovers the rows whose lease expired (their consumer's process
died, or its keeper stopped), and drops dead letters older than
``dead_message_ttl``. A dead consumer's messages are back in their queue at most
``lease + sweep_interval`` ms after its last renewal, as long as one broker on the
file consumes (a fresh one sweeps at once when it starts). A lease is computed once
the transaction holds the write lock (a wait for a locked file never eats into it),
and expiry compares leases with the time the keeper asked, before it waited: a lease
that lapsed only because the file stayed locked is not held against its holder.

**Waiting.** There are no notifications between processes: an idle consumer polls
(a cheap read, then a write transaction only when something waits) every
``poll_interval`` ms. Within one process, an enqueue wakes waiting consumers at once.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeAlias, TypeVar

from dq import message as _message
from dq import runtime
from dq.broker import Broker, Consumer
from dq.brokers import _sqlite_recovery as recovery
from dq.brokers._checks import (
    StoredQueueNames,
    check_consume_arguments,
    delayed_if_asked,
    is_whole,
)
from dq.brokers._declarations import LocalDeclarations
from dq.brokers._sqlite_consumer import SqliteConsumer
from dq.brokers._sqlite_schema import SCHEMA_VERSION, create_or_migrate
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
    Start,
    policy,
)
from dq.errors import (
    ConnectionClosed,
    ConnectionFailed,
    QueueJoinTimeout,
)
from dq.message import Message
from dq.middleware import Middleware
from dq.wire import encode_message

__all__ = [
    "COMMANDS",
    "DEFAULT_BUSY_TIMEOUT",
    "DEFAULT_DEAD_MESSAGE_TTL",
    "DEFAULT_LEASE",
    "DEFAULT_POLL_INTERVAL",
    "SCHEMA_VERSION",
    "DatabaseBusy",
    "DatabaseFull",
    "DatabaseUnavailable",
    "SqliteBroker",
]

M = TypeVar("M", bound=Message[Any])
T = TypeVar("T")

#: A row to INSERT: queue, message_id, priority, eta, payload.
_Row: TypeAlias = tuple[str, str, int, int | None, bytes]
#: A reserved row as RETURNING gives it: priority, seq, payload, deliveries, eta,
#: message_id (any SQLite value: a raw write may have left any type in a column).
_Reserved: TypeAlias = tuple[Any, int, Any, Any, Any, Any]

#: How long a reservation lasts without renewal (ms).
DEFAULT_LEASE: Final = 30_000
#: How long a dead letter is kept (ms): 7 days.
DEFAULT_DEAD_MESSAGE_TTL: Final = 604_800_000
#: How often an idle consumer looks for messages stored by other processes (ms).
DEFAULT_POLL_INTERVAL: Final = 100
#: How long a transition waits for a locked database in all (ms).
DEFAULT_BUSY_TIMEOUT: Final = 30_000

_INSERT: Final = """INSERT INTO dq_messages (queue, message_id, priority, eta, payload)
    VALUES (?, ?, ?, ?, ?)"""
_RENEW_CHUNK: Final = 500  # consumer ids per renewal statement (SQLite's variable limit)
#: How many valid queue names a broker remembers as checked (the hot path skips the check).
_CHECKED_NAMES: Final = 4096

_STEP: Final = "one BEGIN IMMEDIATE transaction"

#: How SqliteBroker carries out each core command: the method that runs its one
#: ``BEGIN IMMEDIATE`` transaction (on `SqliteBroker`, or on its consumer for the
#: commands that settle or mark one reserved row), or why there is none.
COMMANDS: CommandTable = {
    DeclareQueue: Cannot(
        "queues exist in the file by their rows: declare_queue writes nothing, it "
        "applies the core's DeclareQueue in this process (names, hooks)"
    ),
    Enqueue: ServerStep("_enqueue", _STEP + " (enqueue_many: one for the whole batch)"),
    Reserve: ServerStep("_reserve", _STEP + " (one UPDATE ... RETURNING)"),
    Ack: ServerStep("_ack", _STEP + " (acks of concurrent threads are grouped)"),
    AckMany: ServerStep("_ack", _STEP),
    Nack: ServerStep("_nack", _STEP + " (INSERT into dq_dead with the reason, DELETE)"),
    Requeue: ServerStep("_requeue", _STEP + " (a copy at the tail, then DELETE)"),
    Promote: ServerStep("_promote", _STEP + " (INSERT of the ready copy, DELETE of the held)"),
    Replace: ServerStep("_replace", _STEP + " (INSERT of the retry, DELETE of the original)"),
    Start: ServerStep("_start", _STEP + " (only for suspects: rows with a delivery count)"),
    Recover: ServerStep("_recover", _STEP + " (SELECT, the core decides, then the moves)"),
    Renew: ServerStep("_renew", _STEP + " (every live consumer of this broker at once)"),
    ExpireLeases: ServerStep(
        "_expire_leases", _STEP + " (SELECT the lapsed rows, the core decides, then the moves)"
    ),
    ExpireDeadLetters: ServerStep(
        "_expire_dead_letters", _STEP + " (every queue's at once: one TTL per file)"
    ),
    Flush: ServerStep("_flush", _STEP),
    FlushAll: ServerStep("_flush_all", _STEP),
    Release: ServerStep("_release", _STEP + " (what a closing consumer holds, to the tail)"),
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


def _wall_ms() -> int:
    """Wall-clock ms: leases are compared across processes."""
    return int(time.time() * 1000)


def _now() -> int:
    """The runtime clock's ms (dead letters' times, dead-letter expiry)."""
    return runtime.get_clock().now_ms()


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


class _Keeper(threading.Thread):
    """Renews this broker's leases, recovers expired ones, expires dead letters."""

    def __init__(self, broker: SqliteBroker) -> None:
        super().__init__(name="dq-sqlite-keeper", daemon=True)
        self.broker = weakref.ref(broker)
        self.interval = broker.sweep_interval / 1000
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            broker = self.broker()
            if broker is None:
                return
            try:
                broker._keeper_tick()
            except Exception:
                broker.logger.warning("SQLite keeper tick failed; retrying.", exc_info=True)
            del broker
            if self.stopped.wait(self.interval):
                return


class SqliteBroker(Broker):
    """A persistent broker in one SQLite file, for one machine.

    Args:
        path: the database file (created when missing).
        middleware: as for `Broker`.
        lease: ms a reservation lasts unless its broker's keeper renews it.
        dead_message_ttl: ms a dead letter is kept.
        poll_interval: ms between two looks of an idle consumer for messages stored
            by other processes (enqueues in this process wake it at once).
        sweep_interval: ms between two keeper ticks (lease renewal, recovery, dead
            letter expiry); default ``lease // 3``.
        busy_timeout: ms a transition waits, in all, for a database locked by other
            connections before it raises `DatabaseBusy`.
        max_deliveries: the delivery cap: a message whose consumers died running it
            this many times (as `dq.core.policy.deliveries_after_death` counts them:
            a bystander is never charged) is dead-lettered with the reason
            ``max_deliveries`` instead of being delivered again; 0: no cap, else at
            least 2 (default `dq.core.policy.DEFAULT_MAX_DELIVERIES`).

    Raises:
        DatabaseUnavailable: the file cannot be opened or written, or is not a dq
            database (the message names the path).
        ValueError: an option is out of range.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "dq.sqlite3",
        *,
        middleware: list[Middleware] | None = None,
        lease: int = DEFAULT_LEASE,
        dead_message_ttl: int = DEFAULT_DEAD_MESSAGE_TTL,
        poll_interval: int = DEFAULT_POLL_INTERVAL,
        sweep_interval: int | None = None,
        busy_timeout: int = DEFAULT_BUSY_TIMEOUT,
        max_deliveries: int = policy.DEFAULT_MAX_DELIVERIES,
    ) -> None:
        for name, value, minimum in (
            ("lease", lease, 3),
            ("dead_message_ttl", dead_message_ttl, 0),
            ("poll_interval", poll_interval, 1),
            ("busy_timeout", busy_timeout, 0),
        ):
            if not is_whole(value, minimum):
                raise ValueError(f"{name} must be an integer >= {minimum} (ms), got {value!r}")
        problem = policy.delivery_cap_problem(max_deliveries)
        if problem is not None:
            raise ValueError(problem)
        if sweep_interval is None:
            sweep_interval = lease // 3
        elif not is_whole(sweep_interval, 1):
            raise ValueError(
                f"sweep_interval must be a positive integer (ms), got {sweep_interval!r}"
            )
        self.path = os.fspath(path)
        self.lease = lease
        self.dead_message_ttl = dead_message_ttl
        self.poll_interval = poll_interval
        self.sweep_interval = sweep_interval
        self.busy_timeout = busy_timeout
        self.max_deliveries = max_deliveries
        self.broker_id = uuid.uuid4().hex
        self._local = threading.local()
        self._checked_names = StoredQueueNames(_CHECKED_NAMES)  # names accepted
        self._declarations = LocalDeclarations(self._checked_names)
        # Wakes this process's waiting consumers and joins; the generation counts changes.
        self._changed = threading.Condition(threading.Lock())
        self._generation = 0
        self._consumers: weakref.WeakSet[SqliteConsumer] = weakref.WeakSet()
        self._keeper: _Keeper | None = None
        self._keeper_lock = threading.Lock()
        self._closed = False
        super().__init__(middleware)
        self._open_database()

    # -- the database ---------------------------------------------------------------------

    def _fail(self, error: BaseException) -> DatabaseUnavailable:
        if _is_full(error):
            return _full(self.path, error)
        return DatabaseUnavailable(f"cannot open SQLite database {self.path!r}: {error}")

    def _open_database(self) -> None:
        """Open the file, switch it to WAL and create the schema, or raise naming it."""
        if os.path.isdir(self.path):
            raise self._fail(IsADirectoryError("it is a directory"))
        try:
            conn = self._connection()
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
            self._write(create_or_migrate)
        except (sqlite3.Error, DatabaseBusy, DatabaseUnavailable) as e:
            self._drop_connection()
            cause = e.__cause__ if isinstance(e, DatabaseUnavailable) and e.__cause__ else e
            raise self._fail(cause) from e

    def _connection(self) -> sqlite3.Connection:
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

    def _drop_connection(self) -> None:
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
                return attempt(self._connection())
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

    def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
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

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._retrying(lambda conn: conn.execute(sql, params).fetchall())

    def _notify(self) -> None:
        """Wake this process's waiting consumers and joins."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def _wait(self, generation: int, timeout: float) -> None:
        """Wait for a change after ``generation``, or ``timeout`` seconds."""
        with self._changed:
            if self._generation == generation:
                self._changed.wait(timeout)

    # -- threads ----------------------------------------------------------------------------

    def _start_keeper(self) -> None:
        with self._keeper_lock:
            if self._closed:
                raise RuntimeError("this SqliteBroker is closed")
            keeper = self._keeper
            if keeper is None or not keeper.is_alive():  # none, or lost through fork
                self._keeper = _Keeper(self)
                self._keeper.start()

    def _stop_keeper(self) -> None:
        """Stop the keeper thread (its consumers' leases then run out)."""
        with self._keeper_lock:
            keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.stopped.set()
            if keeper is not threading.current_thread():
                keeper.join(5)

    def close(self) -> None:
        """Stop the keeper thread and close this thread's connection (consumers are
        closed by their owners first; a worker's ``stop`` does that). Other threads'
        connections close when their threads end."""
        with self._keeper_lock:
            self._closed = True
        self._stop_keeper()
        self._notify()
        self._drop_connection()

    # -- maintenance ----------------------------------------------------------------------

    def _keeper_tick(self) -> None:
        """One keeper tick: renew this broker's leases, expire lapsed ones, drop old
        dead letters.

        The time the expiry compares leases with is read before anything waits for
        the write lock: a lease that lapsed only because the database stayed locked
        (its holder could not renew it either) is not held against its holder.
        """
        asked = _wall_ms()
        self.renew_leases()
        self.expire_leases(asked)
        self.expire_dead_letters()

    def renew_leases(self) -> int:
        """Extend the leases of every row this broker's open consumers hold (the
        keeper does it every ``sweep_interval`` ms); return how many were renewed.

        This is the `Renew` step of every live consumer of this broker at once."""
        pid = os.getpid()  # not the consumers of a parent process (fork)
        ids = [c.consumer_id for c in list(self._consumers) if not c._closed and c.pid == pid]
        if not ids:
            return 0
        return self._write(lambda conn: self._renew(conn, ids))

    def _renew(self, conn: sqlite3.Connection, ids: list[str]) -> int:
        # The new end is computed once BEGIN IMMEDIATE holds the lock: computed
        # before, a wait for a locked database would eat into the lease it grants.
        until = _wall_ms() + self.lease
        count = 0
        for start in range(0, len(ids), _RENEW_CHUNK):
            chunk = ids[start : start + _RENEW_CHUNK]
            marks = ",".join("?" * len(chunk))
            count += conn.execute(
                f"UPDATE dq_messages SET lease_until = ? WHERE consumer IN ({marks})",
                (until, *chunk),
            ).rowcount
        return count

    def expire_leases(self, now_ms: int | None = None) -> int:
        """Recover every row whose lease ended before ``now_ms`` (default: now), in
        one transaction (`ExpireLeases`): each goes back to the tail of its queue
        with its delivery count updated, or, over ``max_deliveries``, to the dead
        letters with the reason ``max_deliveries`` (logged with its message id).

        Returns:
            How many rows came back to their queue.
        """
        now = _wall_ms() if now_ms is None else now_ms
        # A read first: no write lock on every keeper tick (the transaction decides).
        if not self._read(
            "SELECT 1 FROM dq_messages WHERE consumer IS NOT NULL AND lease_until < ? LIMIT 1",
            (now,),
        ):
            return 0
        return self._recovered(
            self._write(lambda conn: self._expire_leases(conn, now)),
            "Returned %d messages whose consumer's lease expired to their queues.",
        )

    #: Dramatiq-era name of `expire_leases`.
    recover = expire_leases

    def _expire_leases(self, conn: sqlite3.Connection, now_ms: int) -> recovery.Recovery:
        return recovery.expire_leases(conn, now_ms, self.max_deliveries)

    def recover_consumer(self, consumer_id: str, now_ms: int | None = None) -> int:
        """Declare the consumer ``consumer_id`` dead (`Recover`): every row it holds
        goes back to its queue with its delivery count updated, or over
        ``max_deliveries`` to the dead letters, in one transaction. Its later
        settlements change nothing (they are logged as lost).

        Returns:
            How many rows came back to their queue.
        """
        now = _wall_ms() if now_ms is None else now_ms
        return self._recovered(
            self._write(lambda conn: self._recover(conn, consumer_id, now)),
            "Returned %d messages of a consumer declared dead to their queues.",
        )

    def _recover(
        self, conn: sqlite3.Connection, consumer_id: str, now_ms: int
    ) -> recovery.Recovery:
        return recovery.recover_consumer(conn, consumer_id, now_ms, self.max_deliveries)

    def _recovered(self, done: recovery.Recovery, returned: str) -> int:
        """Log what a recovery did and wake this process's consumers."""
        for event in done.dead:
            entry = event.entry
            self.logger.error(
                "Dead-lettered message %s of %r (row %d), reason %s: its consumer died "
                "running it %d times (max_deliveries=%d).",
                entry.message_id,
                policy.q_name(entry.queue_name),
                entry.seq,
                event.reason.value,
                event.deliveries,
                self.max_deliveries,
            )
        if done.returned:
            self.logger.warning(returned, done.returned)
        if done.returned or done.dead:
            self._notify()
        return done.returned

    def expire_dead_letters(self, now_ms: int | None = None) -> int:
        """Drop dead letters older than ``dead_message_ttl``; return how many."""
        now = _now() if now_ms is None else now_ms
        cutoff = now - self.dead_message_ttl
        if not self._read("SELECT 1 FROM dq_dead WHERE dead_at <= ? LIMIT 1", (cutoff,)):
            return 0  # no write lock on every keeper tick
        return self._write(lambda conn: self._expire_dead_letters(conn, cutoff))

    @staticmethod
    def _expire_dead_letters(conn: sqlite3.Connection, cutoff_ms: int) -> int:
        return int(conn.execute("DELETE FROM dq_dead WHERE dead_at <= ?", (cutoff_ms,)).rowcount)

    # -- declarations -------------------------------------------------------------------------

    def declare_queue(self, queue_name: str) -> None:
        """Declare ``queue_name`` and its delay queue in this process.

        Nothing is written to the database; the declare hooks run (a running Worker
        starts consumers for both). Declaring twice is a no-op.

        Raises:
            InvalidQueueName: no message may be stored on ``queue_name`` (a ``.XQ``
                name, or one colliding with a broker's keys): a `QueueNotFound` and a
                `ValueError` that says why (`dq.core.policy.stored_queue_problem`).
        """
        self._declarations.declare(self, queue_name)

    def _check_queue(self, queue_name: str) -> None:
        """Check that a message may be stored on ``queue_name`` (a queue or its
        ``.DQ``), as the core says; names found good are remembered.

        Raises:
            InvalidQueueName: it names a dead-letter queue (``.XQ``) or collides
                with a broker's keys (a `QueueNotFound` and a `ValueError` naming it
                and why).
        """
        self._checked_names.check(queue_name)

    # -- enqueueing ------------------------------------------------------------------------

    def _priority(self, actor_name: str) -> int:
        actor = self.actors.get(actor_name)
        return 0 if actor is None else int(actor.priority)

    def _prepare(
        self, message: M, delay: int | None, now_ms: int, *, hooks: bool = True
    ) -> tuple[M, _Row]:
        """The copy to store (on ``q.DQ`` with an eta when delayed, by the policy) and
        its row, after the ``before_enqueue`` hooks.

        Raises:
            QueueNotFound, ValueError: see `_check_queue`; ValueError also for a
                delay that is negative or too long, or a delayed message whose eta
                the core refuses (`dq.core.policy.eta_ms`, `message_eta_ms`).
        """
        queue_name = message.queue_name
        if queue_name not in self._checked_names:
            self._check_queue(queue_name)
        message = delayed_if_asked(message, delay, now_ms)
        if hooks and self._hooks.before_enqueue:
            self._run_before(self._hooks.before_enqueue, message, delay)
        payload = encode_message(message, _message.global_encoder)
        # As the core's Enqueue: an entry of a delay queue has its eta (a bad one is
        # refused), a ready one none.
        queue_name = message.queue_name
        eta = policy.message_eta_ms(message) if queue_name.endswith(policy.DELAY_SUFFIX) else None
        row = (
            message.queue_name,
            message.message_id,
            self._priority(message.actor_name),
            eta,
            payload,
        )
        return message, row

    def enqueue(self, message: M, *, delay: int | None = None) -> M:
        """Store ``message``; with ``delay`` (ms), a copy on ``q.DQ`` with an ``eta``.

        The queue need not be declared in this process (another process may run its
        actors).

        Returns:
            The message as stored.

        Raises:
            ValueError: ``delay`` is not a whole number of ms >= 0, or so long that
                the eta would pass `dq.core.policy.MAX_ETA_MS`; the queue name is
                one no message may be stored on (the message says why).
            TypeError: it is not serialisable by the global encoder.
            QueueNotFound: it names a dead-letter queue.
            DatabaseBusy, DatabaseUnavailable (DatabaseFull): nothing was stored.
        """
        stored, row = self._prepare(message, delay, _now())
        self._write(lambda conn: self._enqueue(conn, (row,)))
        self._notify()
        if self._hooks.after_enqueue:
            self._run_after(self._hooks.after_enqueue, stored, delay)
        return stored

    def enqueue_many(self, messages: Iterable[M], *, delay: int | None = None) -> list[M]:
        """Store many messages in one transaction: all or none.

        Returns:
            The messages as stored, in the order given.

        Raises:
            ValueError, TypeError, QueueNotFound, DatabaseBusy, DatabaseUnavailable:
                as `enqueue`; nothing of the batch was stored.
        """
        now = _now()
        prepared = [self._prepare(message, delay, now) for message in messages]
        if not prepared:
            return []
        rows = [row for _, row in prepared]
        self._write(lambda conn: self._enqueue(conn, rows))
        self._notify()
        result = [stored for stored, _ in prepared]
        if self._hooks.after_enqueue:
            for stored in result:
                self._run_after(self._hooks.after_enqueue, stored, delay)
        return result

    @staticmethod
    def _enqueue(conn: sqlite3.Connection, rows: Sequence[_Row]) -> None:
        if len(rows) == 1:
            conn.execute(_INSERT, rows[0])
        else:
            conn.executemany(_INSERT, rows)

    # -- consuming ------------------------------------------------------------------------

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """Return a consumer of ``queue_name`` (a queue or its ``.DQ``); starts this
        broker's keeper thread on first use.

        Raises:
            QueueNotFound: ``queue_name`` names a dead-letter queue.
            ValueError: ``prefetch`` < 1 or ``timeout`` < 0, or no message may be
                stored on ``queue_name`` (the message says why).
        """
        self._check_queue(queue_name)
        check_consume_arguments(prefetch, timeout)
        consumer = SqliteConsumer(self, queue_name, prefetch, timeout)
        self._consumers.add(consumer)
        self._start_keeper()
        return consumer

    def _reserve_rows(self, queue_name: str, consumer_id: str, limit: int) -> list[_Reserved]:
        """Reserve up to ``limit`` waiting rows of ``queue_name``, by priority then
        FIFO (a read first: no write lock when nothing waits)."""
        waiting = self._read(
            "SELECT 1 FROM dq_messages WHERE queue = ? AND consumer IS NULL LIMIT 1",
            (queue_name,),
        )
        if not waiting:
            return []
        return self._write(lambda conn: self._reserve(conn, queue_name, consumer_id, limit))

    def _reserve(
        self, conn: sqlite3.Connection, queue_name: str, consumer_id: str, limit: int
    ) -> list[_Reserved]:
        # The lease is computed once BEGIN IMMEDIATE holds the lock: computed before,
        # a wait for a locked database would eat into it.
        until = _wall_ms() + self.lease
        rows: list[_Reserved] = conn.execute(
            "UPDATE dq_messages SET consumer = ?, lease_until = ? WHERE seq IN ("
            "SELECT seq FROM dq_messages WHERE queue = ? AND consumer IS NULL "
            "ORDER BY priority, seq LIMIT ?) "
            "RETURNING priority, seq, payload, deliveries, eta, message_id",
            (consumer_id, until, queue_name, limit),
        ).fetchall()
        return rows

    # -- reading -----------------------------------------------------------------------------

    def flush(self, queue_name: str) -> None:
        """Drop the waiting messages of ``queue_name`` and its ``.DQ``, and its dead
        letters, in one transaction. Messages reserved by consumers stay with them."""
        name = policy.q_name(queue_name)
        self._write(lambda conn: self._flush(conn, name))
        self._notify()

    @staticmethod
    def _flush(conn: sqlite3.Connection, name: str) -> None:
        conn.execute(
            "DELETE FROM dq_messages WHERE queue IN (?, ?) AND consumer IS NULL",
            (name, policy.dq_name(name)),
        )
        conn.execute("DELETE FROM dq_dead WHERE queue = ?", (name,))

    def flush_all(self) -> None:
        """Drop every waiting message and every dead letter in the file (of every
        queue, declared here or not), in one transaction."""
        self._write(self._flush_all)
        self._notify()

    @staticmethod
    def _flush_all(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM dq_messages WHERE consumer IS NULL")
        conn.execute("DELETE FROM dq_dead")

    def qsize(self, queue_name: str) -> int:
        """How many messages of ``queue_name`` and its ``.DQ`` are stored (waiting or in
        flight, in any process)."""
        name = policy.q_name(queue_name)
        rows = self._read(
            "SELECT count(*) FROM dq_messages WHERE queue IN (?, ?)", (name, policy.dq_name(name))
        )
        return int(rows[0][0])

    def join(self, queue_name: str, *, timeout: int | None = None) -> None:
        """Block until ``queue_name`` and its ``.DQ`` hold no stored message (waiting
        or in flight, in any process). A test helper.

        Raises:
            QueueJoinTimeout: ``timeout`` ms passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        interval = self.poll_interval / 1000
        while True:
            generation = self._generation
            if self.qsize(queue_name) == 0:
                return
            wait = interval
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueJoinTimeout(queue_name)
                wait = min(wait, remaining)
            self._wait(generation, wait)

    def dead_letters_of(self, queue_name: str) -> list[tuple[str, bytes, int]]:
        """The dead letters of a queue (canonical name, or its ``.DQ``/``.XQ``), oldest
        first: (message_id, payload, ms time of the nack)."""
        rows = self._read(
            "SELECT message_id, payload, dead_at FROM dq_dead WHERE queue = ? ORDER BY seq",
            (policy.q_name(queue_name),),
        )
        return [(str(mid), bytes(payload), int(at)) for mid, payload, at in rows]

    def dead_letter_reasons_of(self, queue_name: str) -> list[tuple[str, DeathReason]]:
        """Why each dead letter of a queue died, oldest first: (message_id, reason).

        A reason this version of dq does not know (written by a newer one, or by
        hand) reads as `DeathReason.NACKED`; the raw text stays in ``dq_dead.reason``.
        """
        rows = self._read(
            "SELECT message_id, reason FROM dq_dead WHERE queue = ? ORDER BY seq",
            (policy.q_name(queue_name),),
        )
        return [(str(mid), _REASONS.get(reason, DeathReason.NACKED)) for mid, reason in rows]


_REASONS: Final = {reason.value: reason for reason in DeathReason}
