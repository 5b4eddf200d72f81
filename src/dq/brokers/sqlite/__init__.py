"""`SqliteBroker`: an embedded, persistent broker in one SQLite file (standard library).

The package: `dq.brokers.sqlite.schema` (the tables and their migrations),
`dq.brokers.sqlite.database` (the connections and the ``BEGIN IMMEDIATE``
transactions, one per core command), `dq.brokers.sqlite.recovery` (recovery: the
core decides, the SQL moves), `dq.brokers.sqlite.consumer` (`SqliteConsumer`) and
`dq.brokers.sqlite.broker` (`SqliteBroker`). This module re-exports the public names.

One file, shared safely by several producer and worker processes on one machine (the
database runs in WAL mode). The schema (version 2: ``PRAGMA user_version``; a
version-1 file is migrated in place when a broker opens it, see
`dq.brokers.sqlite.schema`):

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
out, a method of `dq.brokers.sqlite.database.Database` named after it (``enqueue``,
``reserve``, ``ack``, ``nack``, ``requeue``, ``release``, ``promote``, ``replace``,
``start``, ``recover``, ``renew``, ``expire_leases``, ``expire_dead_letters``,
``flush``, ``flush_all``), so each is atomic across processes and its statements
only move rows:

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
rows, and moves exactly those rows (`dq.brokers.sqlite.recovery`): the first death
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

from dq.brokers.sqlite.broker import (
    DEFAULT_BUSY_TIMEOUT,
    DEFAULT_DEAD_MESSAGE_TTL,
    DEFAULT_LEASE,
    DEFAULT_POLL_INTERVAL,
    SqliteBroker,
)
from dq.brokers.sqlite.database import (
    COMMANDS,
    DatabaseBusy,
    DatabaseFull,
    DatabaseUnavailable,
)
from dq.brokers.sqlite.schema import SCHEMA_VERSION

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
