"""`MemcachedBackend`: rate-limiter counters on Memcached (pymemcache, ``dq[memcached]``)."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pymemcache.client.base import Client, PooledClient
from pymemcache.client.hash import HashClient

from dq.rate_limits.backend import RateLimiterBackend

__all__ = ["MemcachedBackend"]

#: pylibmc's flag for a Python int stored as decimal text (what Dramatiq's backend
#: writes); values with it, or pylibmc's older int flag, read as integers there.
FLAG_INT = 4
_INT_FLAGS = (2, 4)

#: Memcached reads an expiry above 30 days as a Unix time, not a duration.
_RELATIVE_LIMIT_S = 30 * 24 * 3600

#: The first and the longest pause between two reads of a blocking `wait`, in s.
_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.1

MemcachedClient = Client | PooledClient | HashClient
ServerSpec = str | tuple[str, int]


class MemcachedBackend(RateLimiterBackend):
    """Rate-limiter counters on Memcached, on the same keys as Dramatiq's backend.

    Counters are decimal text with pylibmc's integer flag, as Dramatiq (on pylibmc)
    writes them, so both read each other's counters. Unlike Dramatiq's backend,
    which increments on the server and then compares (a refused increment stays
    counted until the key expires), every operation here is a compare-and-set loop:
    a refused operation writes nothing and a successful one refreshes the TTL, as on
    Redis. TTLs are rounded up to whole seconds (at least 1: memcached's 0 means
    "never expires"); TTLs over 30 days are sent as a Unix time, as memcached needs.

    Blocking `wait` polls the notification key (Dramatiq's memcached backend cannot
    block at all); a Dramatiq party does not write that key, so a dq party blocked on
    a barrier that a Dramatiq worker clears waits until its timeout.

    Args:
        pool: a pymemcache client to use as it is (exposed as `pool`; any serde: it
            is given bytes and flags); the other arguments are then ignored. Callers
            wait for a free connection when its pool size is known.
        pool_size: the most connections of the client built here.
        servers: ``"host"``, ``"host:port"`` or ``(host, port)`` entries (default
            ``127.0.0.1:11211``); several servers make a `HashClient`.
        parameters: keyword arguments of pymemcache's ``PooledClient`` /
            ``HashClient`` (``connect_timeout``, ``timeout``…).
    """

    def __init__(
        self,
        *,
        pool: MemcachedClient | None = None,
        pool_size: int = 8,
        servers: Sequence[ServerSpec] | None = None,
        **parameters: Any,
    ) -> None:
        # pymemcache's pool raises when all its connections are busy; pylibmc's
        # (Dramatiq's) blocks. So callers wait for a free connection here: as many
        # at once as the client's pool holds (a given client's, when it says).
        self._slots: threading.BoundedSemaphore | None = None
        if pool is not None:
            self.pool: MemcachedClient = pool
            size = _pool_size(pool)
            if size is not None:
                self._slots = threading.BoundedSemaphore(size)
            return
        if pool_size < 1:
            raise ValueError(f"pool_size must be a positive integer, got {pool_size!r}")
        self._slots = threading.BoundedSemaphore(pool_size)
        specs = [_server(s) for s in (servers or [("127.0.0.1", 11211)])]
        if len(specs) == 1:
            self.pool = PooledClient(specs[0], max_pool_size=pool_size, **parameters)
        else:
            self.pool = HashClient(specs, use_pooling=True, max_pool_size=pool_size, **parameters)

    def add(self, key: str, value: int, ttl: int) -> bool:
        with self._connection():
            return bool(
                self.pool.add(
                    key, _encode(value), expire=_expire(ttl), noreply=False, flags=FLAG_INT
                )
            )

    def incr(self, key: str, amount: int, maximum: int, ttl: int) -> bool:
        return self._update(key, lambda value: value + amount, lambda new: new <= maximum, ttl)

    def decr(self, key: str, amount: int, minimum: int, ttl: int) -> bool:
        return self._update(key, lambda value: value - amount, lambda new: new >= minimum, ttl)

    def incr_and_sum(
        self, key: str, keys: Callable[[], list[str]], amount: int, maximum: int, ttl: int
    ) -> bool:
        def within(new: int) -> bool:
            if new > maximum:
                return False
            found = self.pool.get_many(keys())
            return amount + sum(_decode(v) for v in found.values() if v is not None) <= maximum

        return self._update(key, lambda value: value + amount, within, ttl)

    def wait(self, key: str, timeout: int | None) -> bool:
        """Poll ``key`` until it holds a notification, or ``timeout`` ms pass (None:
        no limit).

        Raises:
            ValueError: ``timeout`` is negative.
        """
        if timeout is not None and timeout < 0:
            raise ValueError(f"wait timeout must be None or >= 0 ms, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        pause = _POLL_FIRST_S
        while True:
            with self._connection():
                if self.pool.get(key) is not None:
                    return True
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                pause = min(pause, left)
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_S)

    def wait_notify(self, key: str, ttl: int) -> None:
        with self._connection():
            self.pool.set(key, b"x", expire=_expire(ttl), noreply=False, flags=0)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[None]:
        """Hold one of the built client's connections (wait for a free one)."""
        if self._slots is None:
            yield
            return
        with self._slots:
            yield

    def _update(
        self, key: str, step: Callable[[int], int], allowed: Callable[[int], bool], ttl: int
    ) -> bool:
        """Replace the counter ``key`` (missing = 0) by ``step(value)`` if
        ``allowed(new value)``, atomically (gets / cas, or add for a missing key)."""
        with self._connection():
            return self._update_held(key, step, allowed, _expire(ttl))

    def _update_held(
        self, key: str, step: Callable[[int], int], allowed: Callable[[int], bool], expire: int
    ) -> bool:
        while True:
            raw, cas = self.pool.gets(key)
            new = step(0 if raw is None else _decode(raw))
            if not allowed(new):
                return False
            data = _encode(new)
            if cas is None:
                if self.pool.add(key, data, expire=expire, noreply=False, flags=FLAG_INT):
                    return True
            elif self.pool.cas(key, data, cas, expire=expire, noreply=False, flags=FLAG_INT):
                return True
            # Another client changed (or created, or expired) the key meanwhile: retry.


def _pool_size(client: object) -> int | None:
    """Return how many connections a pymemcache client pools, if it says."""
    pooled = getattr(client, "client_pool", None)  # PooledClient's pool
    size = getattr(pooled, "max_size", None)
    if size is None:  # a HashClient keeps the pool size for its per-server clients
        size = getattr(client, "default_kwargs", {}).get("max_pool_size")
    if isinstance(size, int) and 0 < size < 2**31:  # pymemcache's "unbounded" is 2**31
        return size
    return None


def _server(spec: ServerSpec) -> ServerSpec:
    """Return ``spec`` as pymemcache takes it: ``(host, port)`` (11211 by default).

    Raises:
        ValueError: the port is not a number.
    """
    if isinstance(spec, tuple):
        return spec
    host, sep, port = spec.rpartition(":")
    if not sep or "]" in port:
        return (spec, 11211)
    if not port.isdigit():
        raise ValueError(f"a memcached server is 'host' or 'host:port', got {spec!r}")
    return (host, int(port))


def _encode(value: int) -> bytes:
    return str(int(value)).encode()


def _decode(raw: Any) -> int:
    """Return a counter as read through any serde (bytes without one).

    Raises:
        ValueError: the key does not hold an integer.
    """
    if isinstance(raw, int):
        return raw
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"rate limiter counter must hold an integer, got {raw!r}") from None


def _expire(ttl: int) -> int:
    """Return memcached's expiry for ``ttl`` ms: whole seconds rounded up, at least 1,
    and a Unix time beyond 30 days."""
    seconds = max(1, math.ceil(ttl / 1000))
    if seconds > _RELATIVE_LIMIT_S:
        return int(time.time()) + seconds
    return seconds
