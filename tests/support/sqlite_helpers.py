"""Helpers for tests on SQLite database files: read rows behind the broker's back and
remove a database with its journal files."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Sequence
from typing import Any


def select_rows(path: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """The rows ``sql`` selects from the database at ``path`` (its own connection)."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def remove_database(path: str) -> None:
    """Delete the database at ``path`` and its ``-wal``, ``-shm`` and ``-journal`` files
    (missing ones are fine)."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)
