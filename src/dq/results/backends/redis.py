"""`RedisBackend`: results in Redis, in Dramatiq's format (a one-element list per key)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, TypeVar, overload

import redis

from dq.results.backend import (
    Missing,
    MResult,
    Result,
    ResultBackend,
    StoredMessage,
    _timeout_ms,
)
from dq.results.errors import ResultMissing, ResultTimeout

if TYPE_CHECKING:
    from dq.encoder import Encoder
    from dq.message import Message

__all__ = ["RedisBackend"]

R = TypeVar("R")


class RedisBackend(ResultBackend):
    """Store results in Redis, readable by Dramatiq's ``RedisBackend`` and the reverse.

    Each result is a LIST holding exactly one element, the encoded value, written by
    one MULTI/EXEC (DEL, LPUSH, PEXPIRE) so readers never see a half-written key.
    A blocking read waits on the server (``BLMOVE key key RIGHT LEFT``, which rotates
    the one element onto the same key, so the result and its TTL stay for other
    readers); unlike Dramatiq's ``BRPOPLPUSH`` read, sub-second timeouts are honoured.
    A blocked read holds one connection of the client's pool; a client built with a
    ``socket_timeout`` shorter than the read's timeout fails with redis-py's
    ``TimeoutError``.

    Args:
        namespace: the first part of every key.
        encoder: how values become bytes (the global encoder by default).
        use_namespace_prefix_keys: readable keys instead of MD5 digests.
        client: a ``redis.Redis`` to use as it is (exposed as `client`); the other
            connection arguments are then ignored.
        url: a Redis URL (``redis://host:port/db``); it wins over ``parameters``.
        parameters: keyword arguments of ``redis.Redis``.
    """

    def __init__(
        self,
        *,
        namespace: str = "dramatiq-results",
        encoder: Encoder | None = None,
        use_namespace_prefix_keys: bool = False,
        client: redis.Redis | None = None,
        url: str | None = None,
        **parameters: Any,
    ) -> None:
        super().__init__(
            namespace=namespace,
            encoder=encoder,
            use_namespace_prefix_keys=use_namespace_prefix_keys,
        )
        if client is not None:
            self.client: redis.Redis = client
        elif url is not None:
            self.client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(url))
        else:
            self.client = redis.Redis(**parameters)
        # Servers older than 6.2 have no BLMOVE; then BRPOPLPUSH (whole seconds).
        self._blmove = True

    @overload
    def get_result(
        self, message: Message[R], *, block: bool = False, timeout: int | None = None
    ) -> R: ...
    @overload
    def get_result(
        self, message: StoredMessage, *, block: bool = False, timeout: int | None = None
    ) -> Any: ...
    def get_result(
        self, message: StoredMessage, *, block: bool = False, timeout: int | None = None
    ) -> Any:
        """Return the result of ``message`` (see `ResultBackend.get_result`).

        Raises:
            ResultMissing: ``block`` is false and no result is stored.
            ResultTimeout: ``block`` is true and no result was stored in time.
            ResultFailure: the actor failed for good.
            redis.exceptions.ConnectionError: Redis could not be reached.
        """
        message_key = self.build_message_key(message)
        if not block:
            data = self.client.lindex(message_key, 0)
            if data is None:
                raise ResultMissing(message)
            return self.unwrap_result(self._decode(data))
        timeout_ms = _timeout_ms(timeout)
        deadline = time.monotonic() + timeout_ms / 1000
        data = self.client.lindex(message_key, 0)
        while data is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResultTimeout(message)
            data = self._wait(message_key, remaining)
        return self.unwrap_result(self._decode(data))

    def _wait(self, message_key: str, seconds: float) -> bytes | str | None:
        """Wait up to ``seconds`` on the server for ``message_key``; return its element."""
        if self._blmove:
            # Redis reads the timeout as seconds with a decimal part (0 would mean
            # forever: the caller never passes less than 1 ms).
            timeout = f"{max(seconds, 0.001):.3f}"
            try:
                reply: Any = self.client.execute_command(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                    "BLMOVE", message_key, message_key, "RIGHT", "LEFT", timeout
                )
            except redis.exceptions.ResponseError as e:
                if "unknown command" not in str(e).lower():
                    raise
                self._blmove = False
            else:
                if reply is None or isinstance(reply, bytes | str):
                    return reply
                raise TypeError(f"unexpected BLMOVE reply from Redis: {reply!r}")
        data = self.client.brpoplpush(message_key, message_key, max(1, math.ceil(seconds)))
        return data if isinstance(data, bytes | str) else None

    def _get(self, message_key: str) -> MResult:
        data = self.client.lindex(message_key, 0)
        return Missing if data is None else self._decode(data)

    def _store(self, message_key: str, result: Result, ttl: int) -> None:
        data = self._encode(result)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(message_key)
            pipe.lpush(message_key, data)
            pipe.pexpire(message_key, ttl)
            pipe.execute()
