"""The redis-py transport of `RedisBroker`: used when it was given a ``redis.Redis``
(``client=``) or options only redis-py understands (sentinel pools, retry objects,
custom connection classes...).

It offers what `dq.brokers.redis._resp` offers (`RedisPyConnection` like
`_resp.Connection`, `RedisPySubscriber` like `_resp.Subscriber`) on top of connections
made the way the given client makes them, and turns redis-py's errors into `_resp`'s.
Importing this module imports redis-py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis
import redis.exceptions

from dq.brokers.redis import _resp

__all__ = ["RedisPyConnection", "RedisPySubscriber", "redis_client"]

_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def redis_client(url: str | None, options: dict[str, Any]) -> redis.Redis:
    """The ``redis.Redis`` for ``url`` (a pool from the URL) or else ``options``."""
    if url is not None:
        return redis.Redis(connection_pool=redis.ConnectionPool.from_url(url))
    return redis.Redis(**options)


def _reply(value: Any) -> _resp.Reply:
    """A redis-py reply in `_resp`'s types (narrowed at this edge)."""
    if value is None or isinstance(value, bytes | int):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list | tuple):
        return [_reply(item) for item in value]
    if isinstance(value, redis.exceptions.NoScriptError):
        return _resp.NoScriptError(str(value))
    if isinstance(value, redis.exceptions.ResponseError):
        return _resp.ResponseError(str(value))
    raise _resp.RespConnectionError(f"unexpected reply from redis-py: {value!r}")


def _connection_error(error: Exception) -> _resp.RespConnectionError:
    if isinstance(error, redis.exceptions.TimeoutError):
        return _resp.RespTimeoutError(str(error))
    return _resp.RespConnectionError(str(error))


class RedisPyConnection:
    """One connection made as ``client``'s pool makes them (its connection class and
    keyword arguments), with replies as bytes.

    Args:
        client: the client whose connection settings to use.
    """

    def __init__(self, client: redis.Redis) -> None:
        pool = client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["decode_responses"] = False  # the broker reads bytes; the client may not
        self._conn = pool.connection_class(**kwargs)

    def execute(self, *args: _resp.Arg) -> _resp.Reply:
        """As `_resp.Connection.execute`."""
        reply = self.pipeline((args,))[0]
        if isinstance(reply, _resp.ResponseError):
            raise reply
        return reply

    def pipeline(self, commands: Iterable[Sequence[_resp.Arg]]) -> list[_resp.Reply]:
        """As `_resp.Connection.pipeline`."""
        conn = self._conn
        commands = list(commands)
        replies: list[_resp.Reply] = []
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            for _ in commands:
                try:
                    replies.append(_reply(conn.read_response()))
                except redis.exceptions.ResponseError as e:
                    replies.append(_reply(e))
        except _CONNECTION_ERRORS as e:
            conn.disconnect()
            raise _connection_error(e) from e
        except BaseException:
            conn.disconnect()
            raise
        return replies

    def close(self) -> None:
        """Close the socket (the next command opens a new one)."""
        self._conn.disconnect()


class RedisPySubscriber:
    """A ``client.pubsub()`` seen as a `_resp.Subscriber`.

    Args:
        client: the client to subscribe with.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated

    def subscribe(self, *channels: str | bytes) -> None:
        """As `_resp.Subscriber.subscribe`."""
        self._call(self._pubsub.subscribe, channels)

    def psubscribe(self, *patterns: str | bytes) -> None:
        """As `_resp.Subscriber.psubscribe`."""
        self._call(self._pubsub.psubscribe, patterns)

    def _call(self, method: Any, names: Sequence[str | bytes]) -> None:
        try:
            method(*names)
            for _ in names:  # the confirmations
                self._pubsub.get_message(timeout=1.0)
        except _CONNECTION_ERRORS as e:
            raise _connection_error(e) from e

    def get_message(self, timeout: float) -> _resp.PubSubMessage | None:
        """As `_resp.Subscriber.get_message`."""
        try:
            message = self._pubsub.get_message(timeout=timeout)
        except _CONNECTION_ERRORS as e:
            raise _connection_error(e) from e
        if message is None or message["type"] not in ("message", "pmessage"):
            return None
        kind = message["type"].encode()
        pattern = message.get("pattern")
        return _resp.PubSubMessage(
            kind,
            None if pattern is None else _bytes(pattern),
            _bytes(message["channel"]),
            _bytes(message["data"]),
        )

    def close(self) -> None:
        """Close the subscription's connection."""
        self._pubsub.close()


def _bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)
