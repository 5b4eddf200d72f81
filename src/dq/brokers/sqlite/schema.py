"""The schema of `dq.brokers.sqlite.SqliteBroker`'s file, and its migrations.

``PRAGMA user_version`` holds the schema version: 0 in a new file, `SCHEMA_VERSION`
once dq created its tables. A file of an older version is migrated in place, in one
``BEGIN IMMEDIATE`` transaction (several processes may open it at once: the first
one migrates, the others find it done); a file of a newer or unknown version is
refused.

Version 1 had no delivery cap. Version 2 adds ``dq_messages.deliveries`` (how many
deliveries of the row were cut short by its consumer's death, as
`dq.core.policy.deliveries_after_death` counts them), ``dq_messages.run`` (whether
a suspect row started running alone or beside others: a `dq.core.Run` value, NULL
while waiting) and ``dq_dead.reason`` (a `dq.core.DeathReason` value).
"""

from __future__ import annotations

import sqlite3
from typing import Final

__all__ = ["SCHEMA_VERSION", "create_or_migrate"]

SCHEMA_VERSION: Final = 2

#: The schema of a new file (version 2).
_CREATE: Final = (
    """CREATE TABLE IF NOT EXISTS dq_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        message_id TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        eta INTEGER,
        payload BLOB NOT NULL,
        consumer TEXT,
        lease_until INTEGER,
        deliveries INTEGER NOT NULL DEFAULT 0,
        run TEXT
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
        dead_at INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT 'nacked'
    )""",
    "CREATE INDEX IF NOT EXISTS dq_dead_queue ON dq_dead (queue, seq)",
    "CREATE INDEX IF NOT EXISTS dq_dead_at ON dq_dead (dead_at)",
)

#: version -> the statements that bring a file of that version to the next one.
_MIGRATIONS: Final = {
    1: (
        "ALTER TABLE dq_messages ADD COLUMN deliveries INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE dq_messages ADD COLUMN run TEXT",
        "ALTER TABLE dq_dead ADD COLUMN reason TEXT NOT NULL DEFAULT 'nacked'",
    ),
}


def user_version(conn: sqlite3.Connection) -> int:
    """Return the file's ``PRAGMA user_version``."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def create_or_migrate(conn: sqlite3.Connection) -> int:
    """Create the schema in a new file, or migrate an older one to `SCHEMA_VERSION`.

    Call inside a ``BEGIN IMMEDIATE`` transaction: the version is read under the
    write lock, so two processes opening one old file migrate it once.

    Returns:
        The version the file had (0: new).

    Raises:
        sqlite3.DatabaseError: the file's version is not one dq knows (the message
            names it and the expected one).
    """
    version = user_version(conn)
    if version == SCHEMA_VERSION:
        return version
    if version == 0:
        for statement in _CREATE:
            conn.execute(statement)
    elif version in _MIGRATIONS:
        for step in range(version, SCHEMA_VERSION):
            for statement in _MIGRATIONS[step]:
                conn.execute(statement)
    else:
        raise sqlite3.DatabaseError(
            f"schema version {version} is not dq's (expected {SCHEMA_VERSION}, or an "
            f"older one dq migrates: {sorted(_MIGRATIONS)})"
        )
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return version
