"""`MemcachedBackend`: results in Memcached (pymemcache; the ``memcached`` extra)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

try:
    from pymemcache.client.base import Client, PooledClient
    from pymemcache.client.hash import HashClient
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "dq.results.backends.MemcachedBackend needs pymemcache: "
        "install dq with the 'memcached' extra (pip install 'dq[memcached]').",
        name=e.name,
    ) from e

from dq.results.backend import Missing, MResult, Result, ResultBackend

if TYPE_CHECKING:
    from dq.encoder import Encoder

__all__ = ["MemcachedBackend", "expire_seconds", "parse_servers"]

#: Memcached reads expiry times above this many seconds as absolute UNIX times.
_RELATIVE_LIMIT_S: Final = 30 * 24 * 3600
_DEFAULT_PORT: Final = 11211


def parse_servers(servers: Sequence[str]) -> list[tuple[str, int]]:
    """Return ``(host, port)`` pairs for servers written ``"host"`` or ``"host:port"``
    (pylibmc's notation, which Dramatiq's backend takes).

    Raises:
        ValueError: a server is not ``"host"`` or ``"host:port"``.
    """
    if isinstance(servers, str):
        raise ValueError(f"servers must be a list of 'host[:port]' strings, got {servers!r}")
    parsed = []
    for server in servers:
        host, sep, port = server.rpartition(":") if ":" in server else (server, "", "")
        if not sep:
            parsed.append((server, _DEFAULT_PORT))
            continue
        if not host or not port.isdigit():
            raise ValueError(f"memcached server must be 'host' or 'host:port', got {server!r}")
        if host.startswith("[") and host.endswith("]"):  # "[::1]:11211"
            host = host[1:-1]
        parsed.append((host, int(port)))
    return parsed


def expire_seconds(ttl_ms: int, now_s: float | None = None) -> int:
    """Return the memcached expiry for a TTL of ``ttl_ms``.

    Memcached counts time in whole seconds and expires an item when its clock reaches
    the expiry, so an expiry of ``n`` keeps an item between ``n - 1`` and ``n``
    seconds. dq stores ``ceil(ttl / 1 s) + 1`` so a result lives at least its TTL (never
    0, which memcached reads as "never"); above memcached's 30-day limit for relative
    times, an absolute UNIX time."""
    seconds = -(-ttl_ms // 1000) + 1
    if seconds > _RELATIVE_LIMIT_S:
        return int(time.time() if now_s is None else now_s) + seconds
    return seconds


class MemcachedBackend(ResultBackend):
    """Store results in Memcached under Dramatiq's keys, as the raw encoded bytes
    (flags 0), so Dramatiq's pylibmc backend and this one read each other's results.

    Reads poll (Memcached cannot wait for a key). TTLs become whole seconds, rounded up
    plus one so a result lives at least its TTL (`expire_seconds`): Dramatiq truncates
    them, so its TTLs under 1 s never expire and those over 30 days expire at once.

    Args:
        namespace: the first part of every key.
        encoder: how values become bytes (the global encoder by default).
        use_namespace_prefix_keys: readable keys instead of MD5 digests (then
            namespaces, queue and actor names must not contain spaces).
        pool: a pymemcache client to use as it is (a ``PooledClient`` or a
            ``HashClient(use_pooling=True)`` is thread-safe; a plain ``Client`` is
            not); the other connection arguments are then ignored.
        pool_size: the most connections the default client opens.
        servers: ``"host[:port]"`` strings (default ``["127.0.0.1:11211"]``); more than
            one shards keys with pymemcache's ``HashClient``.
        parameters: keyword arguments of pymemcache's client (``connect_timeout``,
            ``timeout``, ...).

    Raises:
        ValueError: a server string is malformed.
    """

    def __init__(
        self,
        *,
        namespace: str = "dramatiq-results",
        encoder: Encoder | None = None,
        use_namespace_prefix_keys: bool = False,
        pool: Client | PooledClient | HashClient | None = None,
        pool_size: int = 8,
        servers: Sequence[str] | None = None,
        **parameters: Any,
    ) -> None:
        super().__init__(
            namespace=namespace,
            encoder=encoder,
            use_namespace_prefix_keys=use_namespace_prefix_keys,
        )
        if pool is not None:
            self.pool: Client | PooledClient | HashClient = pool
        else:
            hosts = parse_servers(servers if servers is not None else ["127.0.0.1"])
            if len(hosts) == 1:
                self.pool = PooledClient(hosts[0], max_pool_size=pool_size, **parameters)
            else:
                self.pool = HashClient(
                    hosts, use_pooling=True, max_pool_size=pool_size, **parameters
                )
        # pymemcache's pools raise RuntimeError("Too many objects") when more threads
        # than their size use them at once (pylibmc's pool waits): wait here instead.
        size = pool_size if pool is None else _pool_size(pool)
        self._slots = threading.BoundedSemaphore(size) if size is not None else None

    def _get(self, message_key: str) -> MResult:
        with self._slots or contextlib.nullcontext():
            data = self.pool.get(message_key)
        if data is None:
            return Missing
        if not isinstance(data, bytes | str):
            raise TypeError(
                f"the memcached client returned {type(data).__name__} for a result; "
                "give MemcachedBackend a client without a serde"
            )
        return self._decode(data)

    def _store(self, message_key: str, result: Result, ttl: int) -> None:
        data = self._encode(result)
        with self._slots or contextlib.nullcontext():
            self.pool.set(message_key, data, expire=expire_seconds(ttl), noreply=False, flags=0)


def _pool_size(client: object) -> int | None:
    """The most connections a pymemcache client opens to one server, if it is pooled."""
    pool = getattr(client, "client_pool", None)  # PooledClient
    size = getattr(pool, "max_size", None)
    if size is None:  # HashClient(use_pooling=True)
        size = getattr(client, "default_kwargs", {}).get("max_pool_size")
    return size if isinstance(size, int) and 0 < size < 2**31 else None
