"""`RedisBroker`: Dramatiq's Redis wire format, with atomic transitions and bounded recovery.

The broker keeps Dramatiq 2.2.1's keys, types and payloads (``../spec/wire.md`` §3), so
dq and Dramatiq processes can share one Redis (the layout: `dq.brokers.redis._keys`).

**The core decides, the Lua moves.** Every decision is made in Python by `dq.core`:
who counts as dead (`dq.core.policy.dead_consumers`), what becomes of each message a
dead worker held (`dq.core.apply` of `dq.core.Recover`: back to its queue with a new
delivery count, or dead-lettered past ``max_deliveries``), which queue names may be
stored on (`dq.core.policy.check_queue_name`). Each core command is then carried out
by exactly one Lua script named after it, which only moves data and is guarded so
that it does nothing when the world changed since the decision. `COMMANDS` is the
table (command type -> script, or `dq.brokers.steps.Cannot` with the reason):

===================  ======================  ================================================
command              script                  notes
===================  ======================  ================================================
DeclareQueue         (none)                  declarations live in the declaring process
Enqueue              ``enqueue.lua``         one or many; refused whole at maxmemory
Reserve              ``reserve.lua``         refreshes the heartbeat after the move
Ack, AckMany         ``ack.lua``             batched
Nack                 ``nack.lua``            keeps the death reason in ``__dq__.reasons.C``
Requeue, Release     ``requeue.lua``         a closing consumer returns all it holds
Promote              ``promote.lua``         a due delayed message onto its queue
Replace              ``replace.lua``         a retry stored while its original is acked
Start                ``start.lua``           run marks of suspects only
Recover              ``recover.lua``         per dead worker's ack set and batch
Renew, ExpireLeases  (none)                  heartbeats, not leases
ExpireDeadLetters    ``expire_dead_letters``
Flush                ``flush.lua``           per queue; FlushAll: one per declared queue
===================  ======================  ================================================

Where Dramatiq is unsafe, dq fixes it inside the same keys:

* **Promotion and retries are one step.** A due delayed message is stored on its queue
  and forgotten on the delay queue by one script, and a retry is stored while its
  original is acked by one script. If the caller no longer holds the original
  (another worker recovered it), nothing is stored, so nothing is duplicated.
* **Recovery is bounded, deterministic and atomic in effect.** Every broker that
  consumes runs a thread that refreshes its heartbeat every ``min(heartbeat_timeout /
  4, 5 s)`` and, every ``requeue_interval`` ms, recovers the messages held by workers
  whose heartbeat is older than ``heartbeat_timeout``: they are back in their queue at
  most ``requeue_deadline = heartbeat_timeout + requeue_interval`` ms after the dead
  worker's last heartbeat. What a dead worker held is read and validated first (a
  count that is not a number, a payload that is gone, a key of the wrong type is
  logged with its key and given a safe outcome, and never stops the tick), then moved
  by one script per batch that stores each id elsewhere before it leaves the ack set:
  a failure part-way leaves every message reachable (`dq.brokers.redis._recovery`).
  Dramatiq's probabilistic maintenance remains an extra trigger
  (``maintenance_chance`` per million fetches).
* **Poison messages are dead-lettered, bystanders never.** The first death of a worker
  counts one delivery for every message it held (each becomes a *suspect*: the
  reserve script says so, `_RedisConsumer.suspect`); after that only a death while a
  suspect ran alone counts (`dq.core.policy.deliveries_after_death`). The worker runs
  suspects alone and reports each start (`_RedisConsumer.started`, a run mark written
  for suspects only). At ``max_deliveries`` the message is dead-lettered with reason
  ``max_deliveries``, logged with its message_id.
* **A full Redis can be drained.** Scripts that only move or free what is stored carry
  ``#!lua flags=allow-oom`` (Redis >= 7): reserve, ack, nack, requeue, promote, start,
  recover, flush, expiry, forget, and the heartbeat (``heartbeat.lua``), so at
  ``maxmemory`` with ``noeviction`` workers still drain what is stored and live
  workers never look dead. Enqueue and replace store new data: Redis refuses them
  whole, and the broker raises `dq.errors.BrokerOutOfMemory`.
* **Names that collide with the layout are refused.** `RedisBroker.enqueue`,
  `RedisBroker.enqueue_many`, `RedisBroker.declare_queue` and `RedisBroker.consume`
  raise `dq.errors.InvalidQueueName` (a `QueueNotFound` and a ``ValueError``) for
  ``__heartbeats__``, ``q.XQ``, ``q.msgs``, ``__acks__.*``, ``__dq__.*``, checked once
  per name. A consumer that meets a key somebody else wrote with the wrong type logs
  it, naming the key, and waits 30 s before it fetches again.
* **Lost replies are returned.** Ids of a fetch whose reply never arrived are found in
  this live process's ack set and requeued (`RedisBroker.reconcile`).
* **Idle consumers wake at once.** Enqueue scripts publish on the channel
  ``ns:__dq__.notify.Q`` (pub/sub: no key is written); a consumer with nothing to do
  waits for that notification instead of polling with backoff. It still polls every
  ``timeout`` ms, for messages enqueued by Dramatiq producers (which do not publish).
* **Undecodable payloads are dead-lettered** with a logged error, not looped on.
* **Batches.** Fetches take up to the consumer's free prefetch in one call, acks from
  many worker threads are sent together, and `RedisBroker.enqueue_many` stores many
  messages in one round trip.

The broker talks to Redis with its own RESP2 client (`dq.brokers.redis._resp`, one
connection per thread) and imports redis-py only when given a ``client``, options only
redis-py understands, or when `RedisBroker.client` is first read (``docs/redis.md``).

dq's only extra keys are the hashes ``ns:__dq__.deliveries.Q`` and
``ns:__dq__.started.Q`` (delivery counts and run marks), which exist only while a
message recovered from a dead worker is unsettled, and ``ns:__dq__.reasons.C`` (why a
message was dead-lettered, when not by a plain nack), dropped with its dead letter.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, cast

import attrs

from dq import message as _message
from dq import runtime
from dq.broker import Broker, Consumer, MessageProxy
from dq.brokers._buffered import BufferedConsumer
from dq.brokers._checks import (
    StoredQueueNames,
    check_consume_arguments,
    delayed_if_asked,
    is_whole,
)
from dq.brokers._declarations import LocalDeclarations
from dq.brokers.redis import _resp
from dq.brokers.redis._keys import Keys, glob_escape
from dq.brokers.redis._recovery import SHARED_MARK, RecoveryReport
from dq.brokers.redis._recovery import recover as _recover
from dq.brokers.redis._scripts import COMMANDS, SCRIPT_NAMES, Script, load_script
from dq.common import getenv_int
from dq.core import (
    Ack,
    DeathReason,
    Nack,
    Requeue,
    policy,
)
from dq.core import commands as _commands
from dq.errors import (
    BrokerOutOfMemory,
    ConnectionClosed,
    QueueJoinTimeout,
)
from dq.message import Message
from dq.middleware import Middleware
from dq.wire import encode_message

if TYPE_CHECKING:
    import redis

__all__ = [
    "COMMANDS",
    "DEFAULT_DEAD_MESSAGE_TTL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_LUA_MAX_STACK",
    "DEFAULT_MAINTENANCE_CHANCE",
    "DEFAULT_MAX_DELIVERIES",
    "MAINTENANCE_COMMAND_BLACKLIST",
    "MAINTENANCE_SCALE",
    "RecoveryReport",
    "RedisBroker",
    "Script",
]

M = TypeVar("M", bound=Message[Any])

#: Maintenance chances are counted per this many fetches.
MAINTENANCE_SCALE: Final = 1_000_000
#: Commands that never trigger maintenance (as in Dramatiq).
MAINTENANCE_COMMAND_BLACKLIST: Final = frozenset({"ack", "nack"})
DEFAULT_MAINTENANCE_CHANCE: Final = 1000
#: How long a dead letter is kept (ms): 7 days.
DEFAULT_DEAD_MESSAGE_TTL: Final = 604_800_000
#: How stale a heartbeat must be for its worker to count as dead (ms).
DEFAULT_HEARTBEAT_TIMEOUT: Final = 60_000
#: Lua's unpack limit from ``dramatiq_lua_max_stack``; None: probe the server once.
DEFAULT_LUA_MAX_STACK: Final = getenv_int("dramatiq_lua_max_stack")
#: Deliveries without a settle after which a message is dead-lettered.
DEFAULT_MAX_DELIVERIES: Final = 10

_ENQUEUE_CHUNK = 500  # messages per enqueue script call
_ERRORS = (_resp.RespConnectionError,)
#: How long a consumer waits before it fetches again from a key of the wrong type (s).
_BROKEN_KEY_BACKOFF = 30.0
#: Settlement kinds: a core command type -> its script.
_SETTLE_SCRIPTS: dict[type[_commands.Command], str] = {
    Ack: "ack",
    Nack: "nack",
    Requeue: "requeue",
}


class RedisConnectionClosed(ConnectionClosed):
    """The Redis connection failed.

    When redis-py is imported in the process at the time of the failure, the exception
    raised is also a ``redis.exceptions.ConnectionError`` (a subclass of both), so code
    written for either catches it. A process that never imports redis-py has no such
    code to satisfy, and does not pay for importing it.
    """


_redis_py_closed: type[RedisConnectionClosed] | None = None


def _closed(error: BaseException) -> RedisConnectionClosed:
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


class _Connection(Protocol):
    """What the broker needs of one connection (`_resp.Connection`, or
    `_redispy.RedisPyConnection` on redis-py)."""

    def execute(self, *args: _resp.Arg) -> _resp.Reply: ...

    def pipeline(self, commands: Iterable[Sequence[_resp.Arg]]) -> list[_resp.Reply]: ...

    def close(self) -> None: ...


class _Subscriber(Protocol):
    """What the listener needs of a pub/sub connection."""

    def psubscribe(self, *patterns: str | bytes) -> None: ...

    def get_message(self, timeout: float) -> _resp.PubSubMessage | None: ...

    def close(self) -> None: ...


def _int(reply: _resp.Reply) -> int:
    if isinstance(reply, int):
        return reply
    if isinstance(reply, bytes):
        return int(reply)
    raise _unexpected(reply, "an integer")


def _list(reply: _resp.Reply) -> list[_resp.Reply]:
    if isinstance(reply, list):
        return reply
    raise _unexpected(reply, "an array")


def _bytes(reply: _resp.Reply) -> bytes:
    if isinstance(reply, bytes):
        return reply
    raise _unexpected(reply, "a string")


def _text(reply: _resp.Reply) -> str:
    return _bytes(reply).decode()


def _refused(error: _resp.ResponseError) -> Exception:
    """The exception to raise for an error reply: `BrokerOutOfMemory` when Redis is at
    ``maxmemory`` (it says ``OOM``), else the reply itself."""
    if str(error).startswith("OOM"):
        return BrokerOutOfMemory(
            f"Redis is out of memory (maxmemory reached, noeviction): nothing was stored ({error})"
        )
    return error


def _unexpected(reply: _resp.Reply, expected: str) -> Exception:
    if isinstance(reply, _resp.ResponseError):
        return reply
    return _resp.ResponseError(f"expected {expected} from Redis, got {reply!r}")


def _positive_int(name: str, value: object, *, allow_zero: bool = False) -> int:
    if not is_whole(value, 0 if allow_zero else 1):
        expected = "an integer >= 0" if allow_zero else "a positive integer"
        raise ValueError(f"{name} must be {expected} (ms), got {value!r}")
    assert isinstance(value, int)
    return value


class _Waker:
    """Per-queue wake-up generations: consumers wait until theirs moves on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation: dict[str, int] = {}

    def generation(self, queue_name: str) -> int:
        return self._generation.get(queue_name, 0)

    def notify(self, queue_name: str) -> None:
        with self._cond:
            self._generation[queue_name] = self._generation.get(queue_name, 0) + 1
            self._cond.notify_all()

    def notify_all(self) -> None:
        with self._cond:
            for name in self._generation:
                self._generation[name] += 1
            self._cond.notify_all()

    def wait(self, queue_name: str, generation: int, timeout: float) -> None:
        """Wait up to ``timeout`` s unless ``queue_name`` moved past ``generation``."""
        with self._cond:
            if self._generation.get(queue_name, 0) == generation:
                self._cond.wait(timeout)


class _Listener(threading.Thread):
    """Turns enqueue notifications (pub/sub) into wake-ups, reconnecting as needed."""

    def __init__(self, broker: RedisBroker) -> None:
        super().__init__(name=f"dq-redis-listener-{broker.broker_id[:8]}", daemon=True)
        self.broker = broker
        self.stopped = threading.Event()
        self.ready = threading.Event()
        self._prefix = len(broker._keys.channel("").encode())

    def run(self) -> None:
        broker = self.broker
        pattern = glob_escape(broker._keys.channel("")) + "*"
        while not self.stopped.is_set():
            subscriber = broker._new_subscriber()
            try:
                subscriber.psubscribe(pattern)
                self.ready.set()
                # Anything published while we were (re)connecting was missed: poll now.
                broker._waker.notify_all()
                while not self.stopped.is_set():
                    message = subscriber.get_message(timeout=0.5)
                    if message is not None:
                        broker._waker.notify(message.channel[self._prefix :].decode())
            except _ERRORS:
                if not self.stopped.is_set():
                    broker.logger.warning(
                        "Lost the notification connection; reconnecting.", exc_info=True
                    )
                    self.stopped.wait(0.5)
            except Exception:
                broker.logger.exception("Notification listener failed; restarting it.")
                self.stopped.wait(0.5)
            finally:
                with contextlib.suppress(Exception):  # closing a broken connection
                    subscriber.close()


class _Keeper(threading.Thread):
    """Refreshes this process's heartbeat and runs recovery on a timer."""

    def __init__(self, broker: RedisBroker) -> None:
        super().__init__(name=f"dq-redis-keeper-{broker.broker_id[:8]}", daemon=True)
        self.broker = broker
        self.stopped = threading.Event()
        self.wake = threading.Event()  # run recovery now (maintenance won the draw)

    def run(self) -> None:
        broker = self.broker
        beat_every = broker.heartbeat_interval / 1000
        recover_every = broker.requeue_interval / 1000
        next_recovery = time.monotonic() + recover_every
        failing = False
        while not self.stopped.is_set():
            wait = beat_every
            try:
                broker.heartbeat()
                broker._settle_orphans()
                if self.wake.is_set() or time.monotonic() >= next_recovery:
                    self.wake.clear()
                    next_recovery = time.monotonic() + recover_every
                    broker.recover()
                    broker.reconcile()
                if failing:
                    failing = False
                    broker.logger.info("Redis is reachable again.")
                wait = min(beat_every, next_recovery - time.monotonic())
            except RedisConnectionClosed:
                if not failing:  # once per outage, not once per attempt
                    failing = True
                    broker.logger.warning(
                        "Heartbeat or recovery failed: Redis is unreachable; retrying every "
                        "%.2f s.",
                        beat_every,
                    )
            except Exception:
                broker.logger.exception("Heartbeat or recovery failed.")
            self.wake.wait(max(0.01, wait))


class RedisBroker(Broker):
    """A broker on Redis, wire-compatible with Dramatiq 2.2.1.

    Args:
        url: a Redis URL; it wins over ``parameters``.
        middleware: as for `Broker`.
        namespace: the key prefix (Dramatiq's default, so mixed fleets share keys).
        maintenance_chance: per million fetches, the chance that a fetch also
            triggers recovery at once (Dramatiq's lottery; the timer does the rest).
        heartbeat_timeout: ms after its last heartbeat at which a worker counts as
            dead. Use one no shorter than the rest of the fleet's.
        dead_message_ttl: ms a dead letter is kept.
        requeue_deadline: ms after a dead worker's last heartbeat by which its unacked
            messages are back in their queue; it must be larger than
            ``heartbeat_timeout`` (default: ``heartbeat_timeout + requeue_interval``).
        requeue_interval: ms between two recovery runs of a live broker (default:
            ``requeue_deadline - heartbeat_timeout`` when a deadline is given, else a
            tenth of ``heartbeat_timeout``, at least 100 ms).
        client: a ``redis.Redis`` to use (exposed as `client`): the broker's own
            connections are made as its pool makes them, through redis-py.
        max_deliveries: how many times a message of a canonical queue may be
            delivered without ever being acked or nacked (each time, the worker
            running it died) before recovery dead-letters it; 0 disables the limit,
            else at least 2. Its first such delivery is counted for every message the
            dead worker held; later ones only when the message had started running
            (so messages merely prefetched beside a poison message are spared).
        parameters: keyword arguments of ``redis.Redis`` when neither ``url`` nor
            ``client`` is given.

    Without ``client``, the broker talks to Redis with its own small client and does
    not import redis-py, unless ``url`` or ``parameters`` hold options that client
    does not implement (see ``docs/redis.md``): then it uses redis-py for everything.
    `client` is created on first access in either case.

    Raises:
        ValueError: a timing argument is not a positive integer, the requeue deadline
            and interval contradict each other, ``url`` is not a Redis URL, or a
            connection option has the wrong type.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        middleware: list[Middleware] | None = None,
        namespace: str = "dramatiq",
        maintenance_chance: int = DEFAULT_MAINTENANCE_CHANCE,
        heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
        dead_message_ttl: int = DEFAULT_DEAD_MESSAGE_TTL,
        requeue_deadline: int | None = None,
        requeue_interval: int | None = None,
        client: redis.Redis | None = None,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        **parameters: Any,
    ) -> None:
        super().__init__(middleware)
        if not namespace:
            raise ValueError(f"namespace must be a non-empty string, got {namespace!r}")
        self.heartbeat_timeout = _positive_int("heartbeat_timeout", heartbeat_timeout)
        self.dead_message_ttl = _positive_int("dead_message_ttl", dead_message_ttl)
        self.maintenance_chance = _positive_int(
            "maintenance_chance", maintenance_chance, allow_zero=True
        )
        self.max_deliveries = _positive_int("max_deliveries", max_deliveries, allow_zero=True)
        if self.max_deliveries == 1:
            raise ValueError(
                "max_deliveries must be 0 (no limit) or at least 2, got 1: the first "
                "delivery of a message that dies with its worker is not attributed to it"
            )
        self.requeue_interval, self.requeue_deadline = _recovery_timing(
            heartbeat_timeout, requeue_deadline, requeue_interval
        )
        #: How often the heartbeat is refreshed (ms).
        self.heartbeat_interval = max(50, min(self.heartbeat_timeout // 4, 5000))
        self._url = url
        self._parameters = parameters
        self._client: redis.Redis | None = client
        self._client_lock = threading.Lock()
        #: The native client's settings; None when the broker goes through redis-py.
        self._params: _resp.ConnectionParams | None = None
        if client is None:
            if url is not None and parameters:
                warnings.warn(
                    f"RedisBroker: url is given, so {sorted(parameters)} are ignored",
                    stacklevel=2,
                )
            options = _resp.parse_url(url) if url is not None else parameters
            if set(options) <= _resp.NATIVE_OPTIONS | _resp.CLIENT_ONLY_OPTIONS:
                self._params = _resp.ConnectionParams.from_options(options)
            else:
                _ = self.client  # options only redis-py understands: use it throughout
        self.namespace = namespace
        self.broker_id = runtime.get_id_source().new_id()
        self._keys = Keys(namespace)
        #: The Lua scripts by name.
        self.scripts: dict[str, Script] = {name: load_script(name) for name in SCRIPT_NAMES}
        # Declarations live in this process only (nothing is written to Redis): a core
        # state with no messages, whose events drive the declare hooks.
        self._waker = _Waker()
        self._threads_lock = threading.Lock()
        self._listener: _Listener | None = None
        self._keeper: _Keeper | None = None
        self._max_unpack: int | None = None
        self._closed = False
        self._local = threading.local()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        # Settlements closed consumers could not send (Redis was down): the keeper
        # retries them, so nothing stays in this live process's ack sets for ever.
        self._orphans: list[tuple[str, type[_commands.Command], list[str]]] = []
        self._orphans_lock = threading.Lock()
        # Open consumers, and one lock per queue that a fetch holds from its call
        # until its reply is buffered (`reconcile` holds it to see a settled picture).
        self._consumers: set[_RedisConsumer] = set()
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._valid_names = StoredQueueNames()  # names `_stored_name` accepted
        self._declarations = LocalDeclarations(self._valid_names)

    # -- plumbing ----------------------------------------------------------------------

    @property
    def consumer_class(self) -> type[Consumer]:
        """The class of this broker's consumers (`consume` makes them; a subclass may
        name a subclass of it)."""
        return _RedisConsumer

    @property
    def client(self) -> redis.Redis:
        """A ``redis.Redis`` of this broker's server: the one given as ``client``, else
        one built from ``url`` or ``parameters`` on first access (only then is
        redis-py imported). The broker itself uses its own connections."""
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    from dq.brokers.redis._redispy import (  # noqa: PLC0415 - imports redis-py
                        redis_client,
                    )

                    self._client = redis_client(self._url, self._parameters)
                client = self._client
        return client

    def _new_connection(self) -> _Connection:
        if self._params is not None:
            return _resp.Connection(self._params)
        from dq.brokers.redis._redispy import RedisPyConnection  # noqa: PLC0415 - redis-py

        return RedisPyConnection(self.client)

    def _new_subscriber(self) -> _Subscriber:
        if self._params is not None:
            return _resp.Subscriber(self._params)
        from dq.brokers.redis._redispy import RedisPySubscriber  # noqa: PLC0415 - redis-py

        return RedisPySubscriber(self.client)

    def _connection(self) -> _Connection:
        """This thread's own connection.

        Taking a connection from a pool and returning it costs more than the round
        trip of a small script, so each thread keeps one: a dedicated connection per
        consumer, per worker thread, per producing thread.
        """
        local = self._local
        conn: _Connection | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():  # none yet, or inherited by a fork
            conn = self._new_connection()
            local.conn, local.pid = conn, os.getpid()
            self._connections.add(conn)
        return conn

    def _execute(self, *args: _resp.Arg) -> _resp.Reply:
        """Run one command on this thread's connection.

        Raises:
            RedisConnectionClosed: the connection failed (the next call opens a new one).
        """
        try:
            return self._connection().execute(*args)
        except _ERRORS as e:
            raise _closed(e) from e

    def _pipeline(self, commands: Sequence[Sequence[_resp.Arg]]) -> list[_resp.Reply]:
        """Run commands in one round trip on this thread's connection.

        Raises:
            ResponseError: the first error reply (the other commands ran).
            RedisConnectionClosed: the connection failed.
        """
        try:
            replies = self._connection().pipeline(commands)
        except _ERRORS as e:
            raise _closed(e) from e
        for reply in replies:
            if isinstance(reply, _resp.ResponseError):
                raise _refused(reply) from reply
        return replies

    def _scan(self, pattern: str) -> list[str]:
        """Every key matching the glob ``pattern`` (SCAN, not KEYS)."""
        found: list[str] = []
        cursor: _resp.Arg = 0
        while True:
            reply = _list(self._execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000))
            cursor = _bytes(reply[0])
            found.extend(_text(key) for key in _list(reply[1]))
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
        except _ERRORS as e:
            raise _closed(e) from e
        except _resp.ResponseError as e:
            raise _refused(e) from e

    @property
    def max_unpack(self) -> int:
        """Half of Lua's unpack limit (env ``dramatiq_lua_max_stack``, else probed):
        the largest batch one script call handles."""
        if self._max_unpack is None:
            stack = DEFAULT_LUA_MAX_STACK
            if stack is None:
                stack = _int(self._run("maxstack", (), ()))
            self._max_unpack = max(1, stack // 2)
        return self._max_unpack

    def _start_threads(self) -> None:
        """Start the heartbeat/recovery thread and the notification listener."""
        with self._threads_lock:
            if self._closed:
                raise RuntimeError("this RedisBroker is closed")
            if self._keeper is None:
                try:
                    self.heartbeat()  # before the first fetch
                except _resp.ResponseError as e:
                    # Never a reason not to consume: reserve.lua refreshes it too, and
                    # the keeper retries (logging each failure).
                    self.logger.error("Could not write this broker's heartbeat: %s", e)
                self._keeper = _Keeper(self)
                self._keeper.start()
            if self._listener is None:
                self._listener = _Listener(self)
                self._listener.start()
                self._listener.ready.wait(2.0)

    def close(self) -> None:
        """Stop this broker's threads and drop its heartbeat (consumers are closed by
        their owners first; a worker's `stop` does that)."""
        with self._threads_lock:
            self._closed = True
            threads: list[_Keeper | _Listener] = [
                t for t in (self._keeper, self._listener) if t is not None
            ]
            for thread in threads:
                thread.stopped.set()
                if isinstance(thread, _Keeper):
                    thread.wake.set()
            for thread in threads:
                thread.join(5)
            self._keeper = self._listener = None
        self._waker.notify_all()
        self._forget_self()
        for conn in list(self._connections):
            with contextlib.suppress(Exception):
                conn.close()

    def _forget_self(self) -> None:
        """Drop this broker's heartbeat if it holds no message any more (otherwise
        the heartbeat expires and recovery returns what it holds)."""
        try:
            prefix = self._keys.acks(self.broker_id, "")
            if not self._scan(glob_escape(prefix) + "*"):
                self._execute("ZREM", self._keys.heartbeats, self.broker_id)
        except RedisConnectionClosed:
            self.logger.warning("Could not remove this broker's heartbeat: Redis is unreachable.")

    def _settle_orphans(self) -> None:
        with self._orphans_lock:
            orphans, self._orphans = self._orphans, []
        for index, (queue_name, command, rids) in enumerate(orphans):
            if not rids:
                continue
            try:
                _settle(self, command, queue_name, rids)
            except RedisConnectionClosed:
                with self._orphans_lock:
                    self._orphans[:0] = orphans[index:]
                raise

    def _fetch_lock(self, queue_name: str) -> threading.Lock:
        lock = self._fetch_locks.get(queue_name)
        if lock is None:
            lock = self._fetch_locks.setdefault(queue_name, threading.Lock())
        return lock

    def reconcile(self) -> int:
        """Return to their queues the messages this live process's ack sets hold but
        none of its consumers knows about, and return how many there were.

        That happens when a fetch ran on the server but its reply was lost (a
        timeout, a killed connection, a client that retried the call): the ids
        joined this process's ack set, and no consumer got them. Recovery would
        never return them, since this process is alive. The keeper runs this after
        each recovery tick.

        Raises:
            ConnectionClosed: Redis could not be reached.
        """
        stray_total = 0
        for queue_name in sorted({c.queue_name for c in list(self._consumers)}):
            with self._fetch_lock(queue_name):
                known: set[str] = set()
                for consumer in list(self._consumers):
                    if consumer.queue_name == queue_name:
                        known |= consumer._known()
                with self._orphans_lock:
                    for name, _, rids in self._orphans:
                        if name == queue_name:
                            known.update(rids)
                key = self._keys.acks(self.broker_id, queue_name)
                members = [_text(m) for m in _list(self._execute("SMEMBERS", key))]
                stray = [rid for rid in members if rid not in known]
                if stray:
                    returned = _settle(self, Requeue, queue_name, stray)
                    stray_total += len(stray)
                    self.logger.warning(
                        "Returned %d messages of %r whose fetch reply was lost (%d were still "
                        "stored).",
                        len(stray),
                        queue_name,
                        returned,
                    )
        return stray_total

    def heartbeat(self) -> None:
        """Record that this process is alive (the keeper thread does it on a timer).

        ``heartbeat.lua`` runs at ``maxmemory`` too: a live worker never looks dead
        because Redis is full.
        """
        self._run("heartbeat", (self._keys.heartbeats,), (_now(), self.broker_id))

    def _stored_name(self, queue_name: str) -> str:
        """Return ``queue_name`` if a message may be stored on it (checked once per
        name: enqueue pays a set lookup).

        Raises:
            InvalidQueueName: it names a dead-letter queue or collides with a key of
                Redis's layout (``__heartbeats__``, ``q.msgs``...).
        """
        if queue_name in self._valid_names:
            return queue_name
        return self._valid_names.check(queue_name)

    # -- declarations --------------------------------------------------------------------

    def declare_queue(self, queue_name: str) -> None:
        """Declare ``queue_name`` and its delay queue in this process.

        Nothing is written to Redis; the declare hooks run (a running Worker starts
        consumers for both). Declaring twice is a no-op.

        Raises:
            InvalidQueueName: ``queue_name`` names a dead-letter queue (``.XQ``) or
                collides with a key of the broker (a `QueueNotFound` and a
                ``ValueError``).
        """
        self._declarations.declare(self, queue_name)

    # -- enqueueing ------------------------------------------------------------------------

    def _prepare(self, message: M, delay: int | None, now_ms: int) -> tuple[M, bytes]:
        """The copy to store (fresh redis_message_id; on ``q.DQ`` with an eta when
        delayed) and its bytes, after the ``before_enqueue`` hooks."""
        message = delayed_if_asked(message, delay, now_ms)
        message = message.copy(options={"redis_message_id": runtime.get_id_source().new_id()})
        if self._hooks.before_enqueue:
            self._run_before(self._hooks.before_enqueue, message, delay)
        return message, encode_message(message, _message.global_encoder)

    def enqueue(self, message: M, *, delay: int | None = None) -> M:
        """Store ``message`` under a new ``redis_message_id``; with ``delay`` (ms), a
        copy on ``q.DQ`` with an ``eta``.

        The queue need not be declared in this process (as in Dramatiq: a producer
        may send to actors defined elsewhere).

        Returns:
            The message as stored.

        Raises:
            InvalidQueueName: its queue name collides with a key of the broker or
                names a dead-letter queue (nothing was stored).
            ValueError: ``delay`` is not a whole number of ms >= 0.
            TypeError: it is not serialisable by the global encoder.
            BrokerOutOfMemory: Redis is at ``maxmemory`` (nothing was stored).
            ConnectionClosed: Redis could not be reached (nothing was stored).
        """
        stored, payload = self._prepare(message, delay, _now())
        name = self._stored_name(stored.queue_name)
        keys = self._keys
        self._run(
            "enqueue",
            (keys.queue(name), keys.msgs(name)),
            (keys.channel(name), stored.options["redis_message_id"], payload),
        )
        if self._hooks.after_enqueue:
            self._run_after(self._hooks.after_enqueue, stored, delay)
        return stored

    def enqueue_many(self, messages: Iterable[M], *, delay: int | None = None) -> list[M]:
        """Store many messages in one round trip (one atomic script per queue and
        chunk of 500, all sent in one pipeline).

        Returns:
            The messages as stored, in the order given.

        Raises:
            InvalidQueueName, ValueError, TypeError: as `enqueue`; nothing is stored.
            BrokerOutOfMemory: Redis is at ``maxmemory``. Chunks already stored stay
                stored (each chunk is atomic).
            ConnectionClosed: Redis could not be reached. Chunks already stored stay
                stored (each chunk is atomic).
        """
        now = _now()
        prepared = [self._prepare(message, delay, now) for message in messages]
        by_queue: dict[str, list[tuple[M, bytes]]] = {}
        for item in prepared:
            by_queue.setdefault(item[0].queue_name, []).append(item)
        for name in by_queue:
            self._stored_name(name)
        keys = self._keys
        script = self.scripts["enqueue"]
        # The script is loaded in the same round trip, so no EVALSHA can miss it.
        commands: list[list[_resp.Arg]] = [["SCRIPT", "LOAD", script.source]]
        for name, items in by_queue.items():
            for start in range(0, len(items), _ENQUEUE_CHUNK):
                command: list[_resp.Arg] = [
                    "EVALSHA",
                    script.sha,
                    2,
                    keys.queue(name),
                    keys.msgs(name),
                    keys.channel(name),
                ]
                for stored, payload in items[start : start + _ENQUEUE_CHUNK]:
                    command.append(stored.options["redis_message_id"])
                    command.append(payload)
                commands.append(command)
        if len(commands) > 1:
            self._pipeline(commands)
        result = [stored for stored, _ in prepared]
        if self._hooks.after_enqueue:
            for stored in result:
                self._run_after(self._hooks.after_enqueue, stored, delay)
        return result

    # -- consuming -----------------------------------------------------------------------

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """Return a consumer of ``queue_name`` (a queue or its ``.DQ``).

        Starts this broker's heartbeat/recovery thread and its notification listener
        on first use.

        Args:
            queue_name: the queue.
            prefetch: how many unsettled messages the consumer may hold.
            timeout: ms ``next()`` waits before raising ``StopIteration``.

        Raises:
            InvalidQueueName: ``queue_name`` names a dead-letter queue or collides
                with a key of the broker (a `QueueNotFound`).
            ValueError: ``prefetch`` < 1 or ``timeout`` < 0.
        """
        self._stored_name(queue_name)
        check_consume_arguments(prefetch, timeout)
        self._start_threads()
        make = cast("type[_RedisConsumer]", self.consumer_class)  # typed as the base's
        return make(self, queue_name, prefetch, timeout)

    # -- maintenance --------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Run one recovery tick now (the keeper thread does it every
        ``requeue_interval`` ms).

        The core decides, the Lua moves: `dq.core.policy.dead_consumers` finds the
        workers whose heartbeat is older than ``heartbeat_timeout``; for what each
        held (read and validated first), `dq.core.apply` of `dq.core.Recover`
        decides whether it goes back to the tail of its queue with a new delivery
        count or is dead-lettered (``max_deliveries``); ``recover.lua`` moves exactly
        that, guarded. Then their heartbeats are dropped (once they hold nothing) and
        dead letters older than ``dead_message_ttl`` expire on the queues declared
        here. A key of the wrong type never stops a tick: it is logged, what it
        concerns stays reachable, and the other keys are recovered
        (`RecoveryReport.skipped`).

        Raises:
            ConnectionClosed: Redis could not be reached.
        """
        now = _now()
        report = _recover(self, now)
        return attrs.evolve(report, expired=self.expire_dead_letters(now))

    def expire_dead_letters(self, now_ms: int | None = None) -> int:
        """Remove dead letters older than ``dead_message_ttl`` from the queues
        declared here; return how many were removed."""
        cutoff = (_now() if now_ms is None else now_ms) - self.dead_message_ttl
        batch = min(1000, self.max_unpack)
        removed = 0
        for name in sorted(self.queues):
            while True:
                count = _int(
                    self._run(
                        "expire_dead_letters",
                        (
                            self._keys.dead(name),
                            self._keys.dead_msgs(name),
                            self._keys.reasons(name),
                        ),
                        (cutoff, batch),
                    )
                )
                removed += count
                if count < batch:
                    break
        return removed

    def _maybe_maintain(self) -> None:
        chance = self.maintenance_chance
        if chance and random.randint(1, MAINTENANCE_SCALE) <= chance:
            keeper = self._keeper
            if keeper is not None:
                keeper.wake.set()

    # -- flushing and joining ----------------------------------------------------------------

    def _purge(self, queue_name: str) -> int:
        keys = self._keys
        return _int(
            self._run(
                "flush",
                (
                    keys.queue(queue_name),
                    keys.msgs(queue_name),
                    keys.dead(queue_name),
                    keys.dead_msgs(queue_name),
                    keys.reasons(queue_name),
                    keys.deliveries(queue_name),
                    keys.started(queue_name),
                ),
                (),
            )
        )

    def flush(self, queue_name: str) -> None:
        """Drop the waiting messages of ``queue_name`` and its ``.DQ``, and its dead
        letters. Messages reserved by consumers stay with them."""
        name = policy.q_name(queue_name)
        self._purge(name)
        self._purge(policy.dq_name(name))

    def flush_all(self) -> None:
        """Flush every queue declared in this process."""
        for name in sorted(self.queues):
            self.flush(name)

    def join(self, queue_name: str, *, interval: int = 100, timeout: int | None = None) -> None:
        """Block until ``queue_name`` and its ``.DQ`` hold no stored message (waiting
        or in flight, in any process). A test helper.

        Args:
            queue_name: the queue.
            interval: ms between two polls.
            timeout: ms to wait at most; None waits forever.

        Raises:
            QueueJoinTimeout: ``timeout`` passed first.
        """
        name = policy.q_name(queue_name)
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while True:
            if self.qsize(name) == 0:
                return
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueJoinTimeout(queue_name)
                time.sleep(min(interval / 1000, remaining))
            else:
                time.sleep(interval / 1000)

    def qsize(self, queue_name: str) -> int:
        """Return how many messages of ``queue_name`` and its ``.DQ`` are stored
        (waiting or in flight)."""
        name = policy.q_name(queue_name)
        replies = self._pipeline(
            [("HLEN", self._keys.msgs(name)), ("HLEN", self._keys.msgs(policy.dq_name(name)))]
        )
        return sum(_int(reply) for reply in replies)

    # -- Dramatiq's semi-public dispatch ------------------------------------------------------

    def __getattr__(self, name: str) -> Callable[..., Any]:
        """``do_<command>``: run one atomic command (Dramatiq's semi-public API:
        ``do_enqueue(queue, id, data)``, ``do_fetch(queue, n)``, ``do_ack(queue, id)``,
        ``do_nack(queue, id)``, ``do_requeue(queue, *ids)``, ``do_purge(queue)``,
        ``do_qsize(queue)``)."""
        command = _DISPATCH.get(name)
        if command is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return lambda *args: command(self, *args)

    def _do_enqueue(self, queue_name: str, rid: str, data: bytes) -> None:
        self._stored_name(queue_name)
        keys = self._keys
        self._run(
            "enqueue",
            (keys.queue(queue_name), keys.msgs(queue_name)),
            (keys.channel(queue_name), rid, data),
        )

    def _do_fetch(self, queue_name: str, n: int) -> list[bytes]:
        keys = self._keys
        reply = self._run(
            "reserve",
            (
                keys.queue(queue_name),
                keys.msgs(queue_name),
                keys.acks(self.broker_id, queue_name),
                keys.heartbeats,
                keys.deliveries(queue_name),
            ),
            (min(n, self.max_unpack), _now(), self.broker_id),
        )
        return [_bytes(payload) for payload in _list(reply)[1::3]]

    def _do_settle(self, command: type[_commands.Command], queue_name: str, *ids: str) -> None:
        _settle(self, command, queue_name, list(ids))

    def _do_qsize(self, queue_name: str) -> int:
        return self.qsize(queue_name)


def _recovery_timing(
    heartbeat_timeout: int, deadline: int | None, interval: int | None
) -> tuple[int, int]:
    """Return (requeue_interval, requeue_deadline) from what was given."""
    if interval is not None:
        _positive_int("requeue_interval", interval)
    if deadline is not None:
        _positive_int("requeue_deadline", deadline)
        if deadline <= heartbeat_timeout:
            raise ValueError(
                f"requeue_deadline ({deadline} ms) must be larger than heartbeat_timeout "
                f"({heartbeat_timeout} ms): a worker counts as dead only after that long"
            )
        if interval is None:
            interval = deadline - heartbeat_timeout
        elif heartbeat_timeout + interval > deadline:
            raise ValueError(
                f"requeue_deadline ({deadline} ms) cannot be met with heartbeat_timeout "
                f"({heartbeat_timeout} ms) and requeue_interval ({interval} ms): it must be "
                "at least their sum"
            )
        return interval, deadline
    if interval is None:
        interval = max(100, heartbeat_timeout // 10)
    return interval, heartbeat_timeout + interval


def _now() -> int:
    return runtime.get_clock().now_ms()


def _settle(
    broker: RedisBroker,
    command: type[_commands.Command],
    queue_name: str,
    rids: list[str],
    reason: DeathReason = DeathReason.NACKED,
) -> int:
    """Carry out ``command`` (`Ack`, `Nack` with ``reason`` or `Requeue`, a core
    command type) for ids this broker holds on a queue, with its one script."""
    keys = broker._keys
    acks = keys.acks(broker.broker_id, queue_name)
    name = _SETTLE_SCRIPTS[command]
    if command is Ack:
        reply = broker._run(
            name,
            (acks, keys.msgs(queue_name), keys.deliveries(queue_name), keys.started(queue_name)),
            rids,
        )
    elif command is Nack:
        reply = broker._run(
            name,
            (
                acks,
                keys.msgs(queue_name),
                keys.dead(queue_name),
                keys.dead_msgs(queue_name),
                keys.deliveries(queue_name),
                keys.started(queue_name),
                keys.reasons(queue_name),
            ),
            # A plain nack is Dramatiq's dead letter: no reason is kept for it.
            [_now(), "" if reason is DeathReason.NACKED else reason.value, *rids],
        )
    else:
        reply = broker._run(
            name,
            (acks, keys.msgs(queue_name), keys.queue(queue_name)),
            [keys.channel(queue_name), *rids],
        )
    return _int(reply)


_DISPATCH: dict[str, Callable[..., Any]] = {
    "do_enqueue": RedisBroker._do_enqueue,
    "do_fetch": RedisBroker._do_fetch,
    "do_ack": lambda b, q, rid: b._do_settle(Ack, q, rid),
    "do_nack": lambda b, q, rid: b._do_settle(Nack, q, rid),
    "do_requeue": lambda b, q, *rids: b._do_settle(Requeue, q, *rids),
    "do_purge": lambda b, q: b._purge(q),
    "do_qsize": RedisBroker._do_qsize,
}


class _RedisConsumer(BufferedConsumer[str]):
    """A consumer of one Redis queue.

    When its buffer is empty it fetches as many messages as its free prefetch allows
    (at most the unpack limit) in one script call, once at least half its prefetch
    window is free, then hands them out one per ``next()``. With nothing to fetch it
    waits for an enqueue notification, or ``timeout`` ms. ``ack``, ``nack``,
    ``requeue`` and ``promote`` are thread-safe: worker threads settle directly, and
    acks arriving while another thread sends a batch join the next batch.
    """

    #: What it holds lives in Redis under this process's id, not in a connection: after
    #: a connection error the worker keeps using it (and the messages it holds).
    survives_connection_loss = True

    broker: RedisBroker

    def __init__(self, broker: RedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self._room = threading.Condition(self._lock)  # prefetch room freed
        self._suspects: set[str] = set()  # recovered from dead workers before
        self._broken_until = 0.0  # monotonic time before which no fetch is tried
        broker._consumers.add(self)

    def _known(self) -> set[str]:
        """The ids this consumer holds in any form (buffered, handed out, acked but
        not yet sent)."""
        with self._lock:
            return {rid for rid, _ in self._buffer} | set(self._held) | set(self._acks)

    @property
    def _outstanding(self) -> int:
        return len(self._buffer) + len(self._held)

    def _tag(self, message: MessageProxy) -> str:
        return _rid(message)

    def _dead_letter(self, tag: str) -> None:
        self._send(Nack, [tag], DeathReason.UNDECODABLE)

    def _send_ack_batch(self, batch: list[str]) -> None:
        _settle(self.broker, Ack, self.queue_name, batch)

    def _room_freed(self) -> None:
        with self._room:
            self._room.notify_all()

    def _forget(self, tags: list[str]) -> None:
        if self._suspects:  # a settled suspect is no longer this consumer's concern
            with self._lock:
                self._suspects.difference_update(tags)
        super()._forget(tags)

    def _fetch(self, deadline: float) -> bool:
        """Fill the buffer, waiting until ``deadline``; return whether it has items."""
        broker = self.broker
        while True:
            with self._lock:
                room = self.prefetch - self._outstanding
                while room < self._min_batch:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._closed:
                        return False
                    self._room.wait(remaining)
                    room = self.prefetch - self._outstanding
                pause = self._broken_until - time.monotonic()
                if pause > 0:  # a key of the wrong type: back off, do not crash-loop
                    self._room.wait(min(pause, max(0.0, deadline - time.monotonic())))
                    if time.monotonic() >= deadline or self._closed:
                        return False
                    continue
            generation = broker._waker.generation(self.queue_name)
            limit = min(room, broker.max_unpack)
            keys = (
                broker._keys.queue(self.queue_name),
                broker._keys.msgs(self.queue_name),
                broker._keys.acks(broker.broker_id, self.queue_name),
                broker._keys.heartbeats,
                broker._keys.deliveries(self.queue_name),
            )
            with broker._fetch_lock(self.queue_name):
                try:
                    reply = broker._run("reserve", keys, (limit, _now(), broker.broker_id))
                except _resp.ResponseError as e:
                    if not str(e).startswith("WRONGTYPE"):
                        raise
                    self._broken_until = time.monotonic() + _BROKEN_KEY_BACKOFF
                    broker.logger.error(
                        "Cannot reserve messages of %r: %s (keys %s); somebody else wrote "
                        "that key. Retrying in %.0f s.",
                        self.queue_name,
                        e,
                        ", ".join(keys[:3]),
                        _BROKEN_KEY_BACKOFF,
                    )
                    continue
                if reply:
                    with self._lock:
                        it = iter(_list(reply))
                        for rid, data, suspect in zip(it, it, it, strict=True):
                            self._buffer.append((_text(rid), _bytes(data)))
                            if _int(suspect):
                                self._suspects.add(_text(rid))
            broker._maybe_maintain()
            if reply:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            broker._waker.wait(self.queue_name, generation, remaining)
            if (
                time.monotonic() >= deadline
                and broker._waker.generation(self.queue_name) == generation
            ):
                return False  # no notification came in time

    def _send(
        self,
        command: type[_commands.Command],
        rids: list[str],
        reason: DeathReason = DeathReason.NACKED,
    ) -> None:
        """Settle ``rids`` now (``command``: `Ack`, `Nack` or `Requeue`) and free their
        prefetch slots."""
        try:
            _settle(self.broker, command, self.queue_name, rids, reason)
        finally:
            self._forget(rids)

    def suspect(self, message: MessageProxy) -> bool:
        """Whether a consumer died holding ``message`` before (its delivery count in
        Redis is at least one, as the reserve script said): the worker then runs it
        alone, so a death while it runs is charged to it alone."""
        return bool(self._suspects) and _rid(message) in self._suspects

    def started(self, message: MessageProxy, *, alone: bool) -> None:
        """Record that ``message`` starts running (``alone``: nothing else runs in this
        process meanwhile), if it is a suspect: its run mark (`dq.core.Start`, one
        ``start.lua`` call). If this process dies while it runs alone, recovery
        counts one more delivery towards ``max_deliveries``. Nothing is written for
        other messages (no lock taken either).

        Raises:
            ConnectionClosed: Redis could not be reached.
        """
        if not self._suspects:  # the common case: costs nothing
            return
        rid = _rid(message)
        if rid not in self._suspects:
            return
        broker = self.broker
        mark = broker.broker_id if alone else broker.broker_id + SHARED_MARK
        broker._run(
            "start",
            (
                broker._keys.acks(broker.broker_id, self.queue_name),
                broker._keys.started(self.queue_name),
            ),
            (rid, mark),
        )

    def nack(self, message: MessageProxy) -> None:
        """Dead-letter ``message``.

        Raises:
            ConnectionClosed: Redis could not be reached (nothing changed).
        """
        self._send(Nack, [_rid(message)], message.death_reason)

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Return unprocessed ``messages`` to the tail of their queue, in one call."""
        rids = [_rid(message) for message in messages]
        if rids:
            self._send(Requeue, rids)

    def promote(self, message: MessageProxy) -> Message[Any]:
        """Move a held delayed message to its canonical queue in one step.

        Returns:
            The promoted copy as stored (canonical queue, no ``eta``, a new
            ``redis_message_id``).
        """
        promoted = policy.promoted(message.message)
        return self._replace(message, promoted, None, hooks=False, script="promote")

    def replace(self, message: MessageProxy, new: M, delay: int | None, *, hooks: bool = True) -> M:
        """Store ``new`` (after ``delay`` ms) and ack ``message`` in one step.

        This is how a retry is stored: if this consumer no longer holds ``message``
        (another worker recovered it), nothing is stored and it runs again instead.

        Returns:
            ``new`` as stored.

        Raises:
            BrokerOutOfMemory: Redis is at ``maxmemory`` (nothing changed).
            ConnectionClosed: Redis could not be reached (nothing changed).
        """
        return self._replace(message, new, delay, hooks=hooks, script="replace")

    def _replace(
        self, message: MessageProxy, new: M, delay: int | None, *, hooks: bool, script: str
    ) -> M:
        """`replace` or `promote` (``script``) ``message`` with ``new``."""
        broker = self.broker
        old = _rid(message)
        if hooks:
            stored, payload = broker._prepare(new, delay, _now())
        else:
            stored = new.copy(options={"redis_message_id": runtime.get_id_source().new_id()})
            payload = encode_message(stored, _message.global_encoder)
        keys = broker._keys
        name = stored.queue_name
        try:
            replaced = broker._run(
                script,
                (
                    keys.acks(broker.broker_id, self.queue_name),
                    keys.msgs(self.queue_name),
                    keys.deliveries(self.queue_name),
                    keys.started(self.queue_name),
                    keys.queue(name),
                    keys.msgs(name),
                ),
                (old, stored.options["redis_message_id"], payload, keys.channel(name)),
            )
        finally:
            self._forget([old])
        if not replaced:
            broker.logger.warning(
                "Message %s on %r was recovered by another worker before it could be "
                "replaced; it will run again.",
                message.message_id,
                self.queue_name,
            )
        elif hooks and broker._hooks.after_enqueue:
            broker._run_after(broker._hooks.after_enqueue, stored, delay)
        return stored

    def close(self) -> None:
        """Send pending acks, and return every message this consumer holds (fetched
        or handed out, unsettled) to its queue."""
        try:
            self._close()
        finally:
            self.broker._consumers.discard(self)

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            acked = set(self._acks)
            rids = [rid for rid in self._held if rid not in acked]
            rids += [rid for rid, _ in self._buffer]
            self._buffer.clear()
            self._room.notify_all()
        try:
            if self._acks:
                with self._lock:
                    self._sending = True
                self._send_acks()
            if rids:
                self._send(Requeue, rids)
        except RedisConnectionClosed:
            self.broker.logger.warning(
                "Could not return %d messages of %r: Redis is unreachable; this broker "
                "retries until it can (or they come back when its heartbeat expires).",
                len(rids),
                self.queue_name,
            )
            with self.broker._orphans_lock:
                self.broker._orphans.append((self.queue_name, Ack, list(self._acks)))
                self.broker._orphans.append((self.queue_name, Requeue, rids))
                self._acks.clear()


def _rid(message: MessageProxy) -> str:
    tag = message._tag
    if not isinstance(tag, str):
        raise ValueError(
            f"{message!r} was not delivered by a RedisBroker consumer (it has no "
            "redis_message_id tag)"
        )
    return tag
