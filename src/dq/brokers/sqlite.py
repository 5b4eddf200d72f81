"""`SqliteBroker`: an embedded, persistent broker in one SQLite file (standard library).

One file, shared safely by several producer and worker processes on one machine (the
database runs in WAL mode). The schema:

===================  ===========================================================
table                contents
===================  ===========================================================
``dq_messages``      every stored message, waiting or in flight: ``seq`` (FIFO
                     order, ``INTEGER PRIMARY KEY AUTOINCREMENT``), ``queue``
                     (``q`` or ``q.DQ``), ``message_id``, ``priority`` (the
                     locally declared actor's, else 0), ``eta`` (ms, delayed
                     copies), ``payload`` (the Dramatiq JSON envelope),
                     ``consumer`` (NULL while waiting) and ``lease_until`` (ms)
``dq_dead``          dead letters: ``queue`` (canonical), ``message_id``,
                     ``payload``, ``dead_at`` (ms); dropped after
                     ``dead_message_ttl``
===================  ===========================================================

The core decides every transition (naming, delays, promotion, dead-lettering) and is
the oracle `dq.testing.BrokerConformance` checks this interpreter against; each
transition is one ``BEGIN IMMEDIATE`` transaction, so it is atomic across processes:

* enqueue / `SqliteBroker.enqueue_many`: INSERT (many in one transaction);
* fetch (`Reserve`): the free prefetch window of the consumer's queue, by priority
  then FIFO, marked with the consumer's id and a lease, in one ``UPDATE … RETURNING``;
* ack: DELETE (acks of concurrent worker threads are sent together);
* nack: INSERT into ``dq_dead`` and DELETE;
* requeue / close (`Requeue`, `Release`): a copy at the tail (a new ``seq``) and the
  old row deleted;
* promote and replace (a retry): the old row deleted and the new one inserted; if the
  consumer no longer holds the old one (its lease expired and it was recovered),
  nothing is stored, so nothing is duplicated;
* flush: DELETE of the waiting rows and the dead letters.

A write that finds the database locked is retried (SQLite's ``busy_timeout``, then
with backoff) for at most ``busy_timeout`` ms in all, then raises `DatabaseBusy` (a
`dq.errors.BrokerConnectionError`): nothing is half-done, nothing is lost.

**Recovery is bounded.** Each broker that consumes runs a keeper thread that, every
``sweep_interval`` ms (default ``lease / 3``), renews the leases of its live
consumers' rows, returns to the tail of their queue the rows whose lease expired
(their consumer's process died, or its keeper stopped), and drops dead letters
older than ``dead_message_ttl``. A dead consumer's messages are back in their queue
at most ``lease + sweep_interval`` ms after its last renewal, as long as one broker
on the file consumes (a fresh one sweeps at once when it starts).

**Waiting.** There are no notifications between processes: an idle consumer polls
(a cheap read, then a write transaction only when something waits) every
``poll_interval`` ms. Within one process, an enqueue wakes waiting consumers at once.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

from dq import message as _message
from dq import runtime
from dq.broker import Broker, Consumer, MessageProxy
from dq.brokers._buffered import BufferedConsumer
from dq.brokers._checks import check_consume_arguments, delayed_if_asked, is_whole
from dq.core import DeclareQueue, apply, initial_state, policy
from dq.core import events as ev
from dq.core.errors import InvalidValue
from dq.errors import (
    ConnectionClosed,
    ConnectionFailed,
    QueueJoinTimeout,
    QueueNotFound,
)
from dq.message import Message
from dq.middleware import Middleware
from dq.wire import encode_message

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "DEFAULT_DEAD_MESSAGE_TTL",
    "DEFAULT_LEASE",
    "DEFAULT_POLL_INTERVAL",
    "DatabaseBusy",
    "DatabaseUnavailable",
    "SqliteBroker",
]

M = TypeVar("M", bound=Message[Any])
T = TypeVar("T")

#: How long a reservation lasts without renewal (ms).
DEFAULT_LEASE: Final = 30_000
#: How long a dead letter is kept (ms): 7 days.
DEFAULT_DEAD_MESSAGE_TTL: Final = 604_800_000
#: How often an idle consumer looks for messages stored by other processes (ms).
DEFAULT_POLL_INTERVAL: Final = 100
#: How long a transition waits for a locked database in all (ms).
DEFAULT_BUSY_TIMEOUT: Final = 30_000

SCHEMA_VERSION: Final = 1
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS dq_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        message_id TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        eta INTEGER,
        payload BLOB NOT NULL,
        consumer TEXT,
        lease_until INTEGER
    )""",
    """CREATE INDEX IF NOT EXISTS dq_messages_waiting
        ON dq_messages (queue, priority, seq) WHERE consumer IS NULL""",
    "CREATE INDEX IF NOT EXISTS dq_messages_queue ON dq_messages (queue)",
    """CREATE INDEX IF NOT EXISTS dq_messages_consumer
        ON dq_messages (consumer) WHERE consumer IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS dq_messages_lease
        ON dq_messages (lease_until) WHERE consumer IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS dq_dead (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        message_id TEXT NOT NULL,
        payload BLOB NOT NULL,
        dead_at INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS dq_dead_queue ON dq_dead (queue, seq)",
    "CREATE INDEX IF NOT EXISTS dq_dead_at ON dq_dead (dead_at)",
)

_COPY_TO_TAIL: Final = """INSERT INTO dq_messages (queue, message_id, priority, eta, payload)
    SELECT queue, message_id, priority, eta, payload FROM dq_messages
    WHERE seq = ? AND consumer = ?"""
_DELETE_HELD: Final = "DELETE FROM dq_messages WHERE seq = ? AND consumer = ?"
_INSERT: Final = """INSERT INTO dq_messages (queue, message_id, priority, eta, payload)
    VALUES (?, ?, ?, ?, ?)"""
_RENEW_CHUNK: Final = 500  # consumer ids per renewal statement (SQLite's variable limit)


class DatabaseUnavailable(ConnectionFailed):
    """The SQLite database could not be opened or used (a bad path, a file that is
    not a database, an I/O error)."""


class DatabaseBusy(ConnectionClosed):
    """The SQLite database stayed locked by other connections for longer than the
    broker's ``busy_timeout`` (nothing was changed)."""


def _wall_ms() -> int:
    """Wall-clock ms: leases are compared across processes."""
    return int(time.time() * 1000)


def _now() -> int:
    return runtime.get_clock().now_ms()


def _is_busy(error: sqlite3.Error) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


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
                broker.renew_leases()
                broker.recover()
                broker.expire_dead_letters()
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
    ) -> None:
        for name, value, minimum in (
            ("lease", lease, 3),
            ("dead_message_ttl", dead_message_ttl, 0),
            ("poll_interval", poll_interval, 1),
            ("busy_timeout", busy_timeout, 0),
        ):
            if not is_whole(value, minimum):
                raise ValueError(f"{name} must be an integer >= {minimum} (ms), got {value!r}")
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
        self.broker_id = uuid.uuid4().hex
        self._local = threading.local()
        self._declared = initial_state()
        self._declare_lock = threading.Lock()
        # Wakes this process's waiting consumers and joins; the generation counts changes.
        self._changed = threading.Condition(threading.Lock())
        self._generation = 0
        self._consumers: weakref.WeakSet[_SqliteConsumer] = weakref.WeakSet()
        self._keeper: _Keeper | None = None
        self._keeper_lock = threading.Lock()
        self._closed = False
        super().__init__(middleware)
        self._open_database()

    # -- the database ---------------------------------------------------------------------

    def _fail(self, error: BaseException) -> DatabaseUnavailable:
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
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(
                    f"schema version {version} is not dq's (expected {SCHEMA_VERSION})"
                )

            def create(conn: sqlite3.Connection) -> None:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

            self._write(create)
        except (sqlite3.Error, DatabaseBusy) as e:
            self._drop_connection()
            raise self._fail(e) from e

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

    def renew_leases(self) -> int:
        """Extend the leases of every row this broker's open consumers hold (the
        keeper does it every ``sweep_interval`` ms); return how many were renewed."""
        pid = os.getpid()  # not the consumers of a parent process (fork)
        ids = [c.consumer_id for c in list(self._consumers) if not c._closed and c.pid == pid]
        if not ids:
            return 0
        until = _wall_ms() + self.lease

        def renew(conn: sqlite3.Connection) -> int:
            count = 0
            for start in range(0, len(ids), _RENEW_CHUNK):
                chunk = ids[start : start + _RENEW_CHUNK]
                marks = ",".join("?" * len(chunk))
                count += conn.execute(
                    f"UPDATE dq_messages SET lease_until = ? WHERE consumer IN ({marks})",
                    (until, *chunk),
                ).rowcount
            return count

        return self._write(renew)

    def recover(self, now_ms: int | None = None) -> int:
        """Return every row whose lease expired to the tail of its queue (in one
        transaction); return how many came back."""
        now = _wall_ms() if now_ms is None else now_ms

        def recover(conn: sqlite3.Connection) -> int:
            expired = "consumer IS NOT NULL AND lease_until < ?"
            count = conn.execute(
                "INSERT INTO dq_messages (queue, message_id, priority, eta, payload) "
                f"SELECT queue, message_id, priority, eta, payload FROM dq_messages "
                f"WHERE {expired} ORDER BY seq",
                (now,),
            ).rowcount
            if count:
                conn.execute(f"DELETE FROM dq_messages WHERE {expired}", (now,))
            return count

        count = self._write(recover)
        if count:
            self.logger.warning(
                "Returned %d messages whose consumer's lease expired to their queues.", count
            )
            self._notify()
        return count

    def expire_dead_letters(self, now_ms: int | None = None) -> int:
        """Drop dead letters older than ``dead_message_ttl``; return how many."""
        now = _now() if now_ms is None else now_ms
        return self._write(
            lambda conn: (
                conn.execute(
                    "DELETE FROM dq_dead WHERE dead_at <= ?", (now - self.dead_message_ttl,)
                ).rowcount
            )
        )

    # -- declarations -------------------------------------------------------------------------

    def declare_queue(self, queue_name: str) -> None:
        """Declare ``queue_name`` and its delay queue in this process.

        Nothing is written to the database; the declare hooks run (a running Worker
        starts consumers for both). Declaring twice is a no-op.

        Raises:
            QueueNotFound: ``queue_name`` names a dead-letter queue (``.XQ``).
        """
        with self._declare_lock:
            if queue_name.endswith(policy.DEAD_SUFFIX):
                raise QueueNotFound(queue_name)
            if policy.q_name(queue_name) in self._declared.queues:
                return
            self._run_before(self._hooks.before_declare_queue, queue_name)
            step = apply(self._declared, DeclareQueue(queue_name))
            self._declared = step.state
            for event in step.events:
                if isinstance(event, ev.QueueDeclared):
                    self.queues[event.queue_name] = event.queue_name
                    self._run_after(self._hooks.after_declare_queue, event.queue_name)
                elif isinstance(event, ev.DelayQueueDeclared):
                    self.delay_queues.add(event.queue_name)
                    self._run_after(self._hooks.after_declare_delay_queue, event.queue_name)

    # -- enqueueing ------------------------------------------------------------------------

    def _priority(self, actor_name: str) -> int:
        actor = self.actors.get(actor_name)
        return 0 if actor is None else int(actor.priority)

    def _prepare(
        self, message: M, delay: int | None, now_ms: int, *, hooks: bool = True
    ) -> tuple[M, tuple[str, str, int, int | None, bytes]]:
        """The copy to store (on ``q.DQ`` with an eta when delayed, by the policy) and
        its row, after the ``before_enqueue`` hooks."""
        if message.queue_name.endswith(policy.DEAD_SUFFIX):
            raise QueueNotFound(message.queue_name)
        message = delayed_if_asked(message, delay, now_ms)
        if hooks and self._hooks.before_enqueue:
            self._run_before(self._hooks.before_enqueue, message, delay)
        payload = encode_message(message, _message.global_encoder)
        try:
            eta = policy.message_eta_ms(message)
        except InvalidValue:
            eta = None
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
            ValueError: ``delay`` is not a whole number of ms >= 0.
            TypeError: it is not serialisable by the global encoder.
            QueueNotFound: it names a dead-letter queue.
            DatabaseBusy, DatabaseUnavailable: nothing was stored.
        """
        stored, row = self._prepare(message, delay, _now())
        self._write(lambda conn: conn.execute(_INSERT, row))
        self._notify()
        if self._hooks.after_enqueue:
            self._run_after(self._hooks.after_enqueue, stored, delay)
        return stored

    def enqueue_many(self, messages: Iterable[M], *, delay: int | None = None) -> list[M]:
        """Store many messages in one transaction: all or none.

        Returns:
            The messages as stored, in the order given.
        """
        now = _now()
        prepared = [self._prepare(message, delay, now) for message in messages]
        if not prepared:
            return []
        rows = [row for _, row in prepared]
        self._write(lambda conn: conn.executemany(_INSERT, rows))
        self._notify()
        result = [stored for stored, _ in prepared]
        if self._hooks.after_enqueue:
            for stored in result:
                self._run_after(self._hooks.after_enqueue, stored, delay)
        return result

    # -- consuming ------------------------------------------------------------------------

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """Return a consumer of ``queue_name`` (a queue or its ``.DQ``); starts this
        broker's keeper thread on first use.

        Raises:
            QueueNotFound: ``queue_name`` names a dead-letter queue.
            ValueError: ``prefetch`` < 1 or ``timeout`` < 0.
        """
        if queue_name.endswith(policy.DEAD_SUFFIX):
            raise QueueNotFound(queue_name)
        check_consume_arguments(prefetch, timeout)
        consumer = _SqliteConsumer(self, queue_name, prefetch, timeout)
        self._consumers.add(consumer)
        self._start_keeper()
        return consumer

    def _reserve(self, queue_name: str, consumer_id: str, limit: int) -> list[tuple[int, bytes]]:
        """Reserve up to ``limit`` waiting rows of ``queue_name``, by priority then
        FIFO, in one transaction (a read first: no write lock when nothing waits)."""
        waiting = self._read(
            "SELECT 1 FROM dq_messages WHERE queue = ? AND consumer IS NULL LIMIT 1",
            (queue_name,),
        )
        if not waiting:
            return []
        until = _wall_ms() + self.lease

        def reserve(conn: sqlite3.Connection) -> list[tuple[int, int, bytes]]:
            return conn.execute(
                "UPDATE dq_messages SET consumer = ?, lease_until = ? WHERE seq IN ("
                "SELECT seq FROM dq_messages WHERE queue = ? AND consumer IS NULL "
                "ORDER BY priority, seq LIMIT ?) RETURNING priority, seq, payload",
                (consumer_id, until, queue_name, limit),
            ).fetchall()

        rows = sorted(self._write(reserve))
        return [(int(seq), bytes(payload)) for _, seq, payload in rows]

    # -- reading -----------------------------------------------------------------------------

    def flush(self, queue_name: str) -> None:
        """Drop the waiting messages of ``queue_name`` and its ``.DQ``, and its dead
        letters, in one transaction. Messages reserved by consumers stay with them."""
        name = policy.q_name(queue_name)

        def flush(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM dq_messages WHERE queue IN (?, ?) AND consumer IS NULL",
                (name, policy.dq_name(name)),
            )
            conn.execute("DELETE FROM dq_dead WHERE queue = ?", (name,))

        self._write(flush)
        self._notify()

    def flush_all(self) -> None:
        """Drop every waiting message and every dead letter in the file (of every
        queue, declared here or not), in one transaction."""

        def flush_all(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM dq_messages WHERE consumer IS NULL")
            conn.execute("DELETE FROM dq_dead")

        self._write(flush_all)
        self._notify()

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


_consumer_ids = itertools.count(1)


class _SqliteConsumer(BufferedConsumer[int]):
    """A consumer of one queue of a SQLite file.

    When its buffer is empty it reserves as many rows as its free prefetch allows in
    one transaction, once at least half its prefetch window is free (at least one),
    then hands them out one per ``next()``. ``ack``, ``nack``, ``requeue``,
    ``promote`` and ``replace`` are thread-safe: worker threads settle directly, and
    acks arriving while another thread sends a batch join the next batch.
    """

    #: What it holds lives in the file under its id and lease, not in a connection.
    survives_connection_loss = True

    broker: SqliteBroker

    def __init__(self, broker: SqliteBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self.pid = os.getpid()
        self.consumer_id = f"{broker.broker_id}.{self.pid}.{next(_consumer_ids)}"

    def buffered(self) -> int:
        """How many reserved messages wait in memory for ``next()``."""
        return len(self._buffer)

    def _tag(self, message: MessageProxy) -> int:
        return _seq(message)

    def _dead_letter(self, tag: int) -> None:
        self._settle(tag, self._nack_body(tag))

    def _room_freed(self) -> None:
        self.broker._notify()

    def _fetch(self, deadline: float) -> bool:
        """Fill the buffer, waiting until ``deadline``; return whether it has items."""
        broker = self.broker
        interval = broker.poll_interval / 1000
        while True:
            generation = broker._generation
            with self._lock:
                closed = self._closed
                room = self.prefetch - len(self._buffer) - len(self._held)
            if closed:
                return False
            if room >= self._min_batch:
                rows = broker._reserve(self.queue_name, self.consumer_id, room)
                if rows:
                    with self._lock:
                        closed = self._closed
                        if not closed:
                            self._buffer.extend(rows)
                    if closed:  # closed by another thread meanwhile: give them back
                        self._requeue([seq for seq, _ in rows])
                        return False
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            broker._wait(generation, min(interval, remaining))

    # -- settling ------------------------------------------------------------------------

    def _settle(self, seq: int, body: Callable[[sqlite3.Connection], int]) -> int:
        """Run one settling transaction of ``seq`` and free its prefetch slot."""
        try:
            return self.broker._write(body)
        finally:
            self._forget([seq])

    def _lost(self, count: int, what: str) -> None:
        if count:
            self.broker.logger.warning(
                "%d message(s) of %r could not be %s: this consumer's lease expired and "
                "they were returned to the queue; they will run again.",
                count,
                self.queue_name,
                what,
            )

    def _send_ack_batch(self, batch: list[int]) -> None:
        """Delete the acked rows this consumer still holds, in one transaction."""
        consumer_id = self.consumer_id

        def ack(conn: sqlite3.Connection) -> int:
            return sum(conn.execute(_DELETE_HELD, (seq, consumer_id)).rowcount for seq in batch)

        self._lost(len(batch) - self.broker._write(ack), "acked")

    def _nack_body(self, seq: int) -> Callable[[sqlite3.Connection], int]:
        consumer_id = self.consumer_id
        dead_queue = policy.q_name(self.queue_name)
        now = _now()

        def nack(conn: sqlite3.Connection) -> int:
            moved = conn.execute(
                "INSERT INTO dq_dead (queue, message_id, payload, dead_at) "
                "SELECT ?, message_id, payload, ? FROM dq_messages "
                "WHERE seq = ? AND consumer = ?",
                (dead_queue, now, seq, consumer_id),
            ).rowcount
            if moved:
                conn.execute(_DELETE_HELD, (seq, consumer_id))
            return int(moved)

        return nack

    def nack(self, message: MessageProxy) -> None:
        """Move ``message`` to its canonical queue's dead letters, in one transaction."""
        seq = _seq(message)
        self._lost(1 - self._settle(seq, self._nack_body(seq)), "dead-lettered")

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Return unprocessed ``messages`` to the tail of their queue, in order, in one
        transaction."""
        seqs = [_seq(message) for message in messages]
        if not seqs:
            return
        done = self._requeue(seqs)
        self._forget(seqs)
        self._lost(len(seqs) - done, "requeued")

    def _requeue(self, seqs: list[int]) -> int:
        consumer_id = self.consumer_id

        def requeue(conn: sqlite3.Connection) -> int:
            done = 0
            for seq in seqs:
                if conn.execute(_COPY_TO_TAIL, (seq, consumer_id)).rowcount:
                    conn.execute(_DELETE_HELD, (seq, consumer_id))
                    done += 1
            return done

        try:
            return self.broker._write(requeue)
        finally:
            self.broker._notify()

    def promote(self, message: MessageProxy) -> Message[Any]:
        """Store the ready copy of a held delayed message and forget the held one, in
        one transaction.

        Returns:
            The promoted copy as stored (canonical queue, no ``eta``).
        """
        return self.replace(message, policy.promoted(message.message), None, hooks=False)

    def replace(self, message: MessageProxy, new: M, delay: int | None, *, hooks: bool = True) -> M:
        """Store ``new`` (after ``delay`` ms) and ack ``message`` in one transaction.

        This is how a retry is stored: if this consumer no longer holds ``message``
        (its lease expired and it was recovered), nothing is stored and it runs again
        instead.

        Returns:
            ``new`` as stored.
        """
        broker = self.broker
        seq = _seq(message)
        stored, row = broker._prepare(new, delay, _now(), hooks=hooks)
        consumer_id = self.consumer_id

        def replace(conn: sqlite3.Connection) -> int:
            if not conn.execute(_DELETE_HELD, (seq, consumer_id)).rowcount:
                return 0
            conn.execute(_INSERT, row)
            return 1

        replaced = self._settle(seq, replace)
        if not replaced:
            self._lost(1, "replaced")
        elif hooks and broker._hooks.after_enqueue:
            broker._run_after(broker._hooks.after_enqueue, stored, delay)
        return stored

    def close(self) -> None:
        """Send pending acks and return everything this consumer holds (reserved or
        handed out, unsettled) to the tail of its queue, oldest first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            acked = set(self._acks)
            seqs = sorted(
                [seq for seq in self._held if seq not in acked] + [seq for seq, _ in self._buffer]
            )
            self._buffer.clear()
            sending = self._sending
            self._sending = True
        try:
            if not sending:
                self._send_acks()
            if seqs:
                self._requeue(seqs)
                with self._lock:
                    self._held.clear()
        except (DatabaseBusy, DatabaseUnavailable):
            self.broker.logger.warning(
                "Could not return %d messages of %r: the database is unavailable; they "
                "come back when their lease expires.",
                len(seqs),
                self.queue_name,
            )
        finally:
            self.broker._consumers.discard(self)


def _seq(message: MessageProxy) -> int:
    tag = message._tag
    if not isinstance(tag, int) or isinstance(tag, bool):
        raise ValueError(
            f"{message!r} was not delivered by a SqliteBroker consumer (it has no row tag)"
        )
    return tag
