"""Helpers for tests on the real Redis (127.0.0.1:6379): private namespaces, cleanup."""

from __future__ import annotations

import uuid

import redis

REDIS_URL = "redis://127.0.0.1:6379/0"


def client() -> redis.Redis:
    """A client of the test Redis (replies as bytes)."""
    return redis.Redis.from_url(REDIS_URL)


def new_namespace(prefix: str = "dq-test") -> str:
    """A namespace no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex}"


def keys_under(conn: redis.Redis, namespace: str) -> list[str]:
    """Every key of ``namespace``, sorted."""
    return sorted(k.decode() for k in conn.scan_iter(match=f"{namespace}:*", count=1000))


def delete_namespace(conn: redis.Redis, namespace: str) -> None:
    """Delete every key of ``namespace``."""
    keys = list(conn.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        conn.delete(*keys)
