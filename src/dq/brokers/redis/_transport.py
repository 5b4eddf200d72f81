"""How `RedisBroker` reaches Redis: `Transport`, the base class that gives each thread
its own connection and runs commands and scripts on it; which client makes those
connections (the native `dq.brokers.redis._resp`, or redis-py through
`dq.brokers.redis._redispy`, imported here on first need and nowhere else); and their
failures as dq's errors.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from dq.brokers.redis import _calls, _resp
from dq.brokers.redis._params import (
    CLIENT_ONLY_OPTIONS,
    NATIVE_OPTIONS,
    ConnectionParams,
    parse_url,
)
from dq.brokers.redis._replies import as_bytes, as_list, as_text
from dq.brokers.redis._scripts import SCRIPT_NAMES, Script, load_script
from dq.common import getenv_int
from dq.errors import BrokerOutOfMemory, ConnectionClosed

if TYPE_CHECKING:
    import redis

__all__ = [
    "DEFAULT_LUA_MAX_STACK",
    "ERRORS",
    "Connection",
    "RedisConnectionClosed",
    "RedisPy",
    "Subscriber",
    "Transport",
    "closed",
    "redis_py",
    "refused",
]

#: Lua's unpack limit from ``dramatiq_lua_max_stack``; None: probe the server once.
DEFAULT_LUA_MAX_STACK: Final = getenv_int("dramatiq_lua_max_stack")

#: The failures of a connection (redis-py's are turned into these by `_redispy`).
ERRORS = (_resp.RespConnectionError,)


class RedisConnectionClosed(ConnectionClosed):
    """The Redis connection failed.

    When redis-py is imported in the process at the time of the failure, the exception
    raised is also a ``redis.exceptions.ConnectionError`` (a subclass of both), so code
    written for either catches it. A process that never imports redis-py has no such
    code to satisfy, and does not pay for importing it.
    """


_redis_py_closed: type[RedisConnectionClosed] | None = None


def closed(error: BaseException) -> RedisConnectionClosed:
    """The `RedisConnectionClosed` to raise for ``error``."""
    global _redis_py_closed
    exceptions = sys.modules.get("redis.exceptions")
    if exceptions is None:
        return RedisConnectionClosed(error)
    if _redis_py_closed is None:
        base: type[Exception] = exceptions.ConnectionError
        _redis_py_closed = type(
            "_RedisPyConnectionClosed",
            (RedisConnectionClosed, base),
            {"__module__": __name__, "__doc__": RedisConnectionClosed.__doc__},
        )
        globals()["_RedisPyConnectionClosed"] = _redis_py_closed  # so it pickles
    return _redis_py_closed(error)


def refused(error: _resp.ResponseError) -> Exception:
    """The exception to raise for an error reply: `BrokerOutOfMemory` when Redis is at
    ``maxmemory`` (it says ``OOM``), else the reply itself."""
    if str(error).startswith("OOM"):
        return BrokerOutOfMemory(
            f"Redis is out of memory (maxmemory reached, noeviction): nothing was stored ({error})"
        )
    return error


class Connection(Protocol):
    """What the broker needs of one connection (`_resp.Connection`, or
    `_redispy.RedisPyConnection` on redis-py)."""

    def execute(self, *args: _resp.Arg) -> _resp.Reply: ...

    def pipeline(self, commands: Iterable[Sequence[_resp.Arg]]) -> list[_resp.Reply]: ...

    def close(self) -> None: ...


class Subscriber(Protocol):
    """What the listener needs of a pub/sub connection (`_resp.Subscriber`, or
    `_redispy.RedisPySubscriber`)."""

    def psubscribe(self, *patterns: str | bytes) -> None: ...

    def get_message(self, timeout: float) -> _resp.PubSubMessage | None: ...

    def close(self) -> None: ...


class RedisPy(Protocol):
    """What the broker takes from `dq.brokers.redis._redispy` (the module itself)."""

    @property
    def RedisPyConnection(self) -> Callable[[redis.Redis], Connection]: ...

    @property
    def RedisPySubscriber(self) -> Callable[[redis.Redis], Subscriber]: ...

    def redis_client(self, url: str | None, options: dict[str, Any]) -> redis.Redis: ...


def redis_py() -> RedisPy:
    """`dq.brokers.redis._redispy`, imported on the first call: the broker's only
    import of redis-py (about 20 MB per process, paid only when it is used)."""
    from dq.brokers.redis import _redispy  # noqa: PLC0415 - imports redis-py

    return _redispy


class Transport:
    """How a `RedisBroker` reaches Redis: one connection per thread, and the commands
    and scripts run on it (a base class of the broker)."""

    #: The Lua scripts by name.
    scripts: dict[str, Script]
    #: The native client's settings; None when the broker goes through redis-py.
    _params: ConnectionParams | None

    def _open_transport(
        self, url: str | None, parameters: Mapping[str, Any], client: redis.Redis | None
    ) -> None:
        """Choose the client (the native one unless ``client`` is given or the options
        need redis-py) and load the scripts; nothing is connected yet.

        Raises:
            ValueError: ``url`` is not a Redis URL, or an option has the wrong type.
        """
        self._url = url
        self._parameters = dict(parameters)
        self._client: redis.Redis | None = client
        self._client_lock = threading.Lock()
        self._local = threading.local()
        self._connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._max_unpack: int | None = None
        self._params = None
        self.scripts = {name: load_script(name) for name in SCRIPT_NAMES}
        if client is None:
            if url is not None and parameters:
                warnings.warn(
                    f"RedisBroker: url is given, so {sorted(parameters)} are ignored",
                    stacklevel=3,
                )
            options = parse_url(url) if url is not None else parameters
            if set(options) <= NATIVE_OPTIONS | CLIENT_ONLY_OPTIONS:
                self._params = ConnectionParams.from_options(options)
            else:
                _ = self.client  # options only redis-py understands: use it throughout

    @property
    def client(self) -> redis.Redis:
        """A ``redis.Redis`` of this broker's server: the one given as ``client``, else
        one built from ``url`` or ``parameters`` on first access (only then is
        redis-py imported). The broker itself uses its own connections."""
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = redis_py().redis_client(self._url, self._parameters)
                client = self._client
        return client

    def _new_connection(self) -> Connection:
        if self._params is not None:
            return _resp.Connection(self._params)
        return redis_py().RedisPyConnection(self.client)

    def _new_subscriber(self) -> Subscriber:
        if self._params is not None:
            return _resp.Subscriber(self._params)
        return redis_py().RedisPySubscriber(self.client)

    def _connection(self) -> Connection:
        """This thread's own connection.

        Taking a connection from a pool and returning it costs more than the round
        trip of a small script, so each thread keeps one: a dedicated connection per
        consumer, per worker thread, per producing thread.
        """
        local = self._local
        conn: Connection | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():  # none yet, or inherited by a fork
            conn = self._new_connection()
            local.conn, local.pid = conn, os.getpid()
            self._connections.add(conn)
        return conn

    def _close_connections(self) -> None:
        """Close every connection this broker opened (a thread's next call reopens)."""
        for conn in list(self._connections):
            with contextlib.suppress(Exception):
                conn.close()

    def _execute(self, *args: _resp.Arg) -> _resp.Reply:
        """Run one command on this thread's connection.

        Raises:
            RedisConnectionClosed: the connection failed (the next call opens a new one).
        """
        try:
            return self._connection().execute(*args)
        except ERRORS as e:
            raise closed(e) from e

    def _pipeline(self, commands: Sequence[Sequence[_resp.Arg]]) -> list[_resp.Reply]:
        """Run commands in one round trip on this thread's connection.

        Raises:
            ResponseError: the first error reply (the other commands ran).
            RedisConnectionClosed: the connection failed.
        """
        try:
            replies = self._connection().pipeline(commands)
        except ERRORS as e:
            raise closed(e) from e
        for reply in replies:
            if isinstance(reply, _resp.ResponseError):
                raise refused(reply) from reply
        return replies

    def _scan(self, pattern: str) -> list[str]:
        """Every key matching the glob ``pattern`` (SCAN, not KEYS)."""
        found: list[str] = []
        cursor: _resp.Arg = 0
        while True:
            reply = as_list(self._execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000))
            cursor = as_bytes(reply[0])
            found.extend(as_text(key) for key in as_list(reply[1]))
            if cursor == b"0":
                return found

    def _run(self, name: str, keys: Sequence[str], args: Sequence[_resp.Arg]) -> _resp.Reply:
        """Run script ``name`` on this thread's connection (loading it if the server
        does not know it); a connection error closes the connection (the next call
        opens a new one) and raises `RedisConnectionClosed`. Nothing is retried
        here: a retried call could run twice."""
        script = self.scripts[name]
        conn = self._connection()
        try:
            try:
                return conn.execute("EVALSHA", script.sha, len(keys), *keys, *args)
            except _resp.NoScriptError:
                conn.execute("SCRIPT", "LOAD", script.source)
                return conn.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except ERRORS as e:
            raise closed(e) from e
        except _resp.ResponseError as e:
            raise refused(e) from e

    @property
    def max_unpack(self) -> int:
        """Half of Lua's unpack limit (env ``dramatiq_lua_max_stack``, else probed):
        the largest batch one script call handles."""
        if self._max_unpack is None:
            stack = DEFAULT_LUA_MAX_STACK
            if stack is None:
                stack = _calls.maxstack(self._run)
            self._max_unpack = max(1, stack // 2)
        return self._max_unpack
