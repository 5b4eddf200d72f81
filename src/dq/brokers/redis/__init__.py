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
* **Recovery is bounded, deterministic and atomic in effect.** Every consuming broker
  runs a keeper thread (`dq.brokers.redis._keeper`): a dead worker's messages are back
  in their queue at most ``requeue_deadline = heartbeat_timeout + requeue_interval``
  ms after its last heartbeat, read and validated first, then moved by one script per
  batch that never drops an id before storing it (`dq.brokers.redis._recovery`).
  Dramatiq's maintenance lottery (``maintenance_chance`` per million fetches) remains.
* **Poison messages are dead-lettered, bystanders never.** The first death of a worker
  counts one delivery for every message it held (each becomes a *suspect*); after that
  only a death while a suspect ran alone counts
  (`dq.core.policy.deliveries_after_death`; the consumer's side:
  `dq.brokers.redis._consumer`). At ``max_deliveries`` the message is dead-lettered
  with reason ``max_deliveries``, logged with its message_id.
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
* **Idle consumers wake at once** on a pub/sub notification of their queue, instead of
  polling with backoff (`dq.brokers.redis._wakeup`).
* **Undecodable payloads are dead-lettered** with a logged error, not looped on.
* **Batches.** Fetches take up to the consumer's free prefetch in one call, acks from
  many worker threads are sent together, and `RedisBroker.enqueue_many` stores many
  messages in one round trip.

The broker talks to Redis with its own RESP2 client, one connection per thread, and
imports redis-py only when given a ``client``, options only redis-py understands, or
when `RedisBroker.client` is first read (``docs/redis.md``). The package's modules:

==============  ====================================================================
``_keys``       the key names of a namespace
``_scripts``    the Lua scripts (``lua/``) and `COMMANDS`
``_calls``      one typed function per script
``_replies``    narrowing replies to the type expected
``_transport``  one connection per thread, commands and scripts on it; redis-py
                loaded on first need; connection failures as dq's errors
``_resp``       the native RESP2 client (``_params``: where and how it connects)
``_redispy``    the same connections made by redis-py
``_wakeup``     the wake-up pair: pub/sub listener and per-queue waker
``_keeper``     the heartbeat and recovery thread
``_recovery``   one recovery tick; returning ids whose fetch reply was lost
``_consumer``   `RedisConsumer`, the consumer of one queue
``_compat``     Dramatiq's ``do_*`` calls, as methods of the broker
``_timing``     the timing arguments, checked and derived
==============  ====================================================================

dq's only extra keys are the hashes ``ns:__dq__.deliveries.Q`` and
``ns:__dq__.started.Q`` (delivery counts and run marks), which exist only while a
message recovered from a dead worker is unsettled, and ``ns:__dq__.reasons.C`` (why a
message was dead-lettered, when not by a plain nack), dropped with its dead letter.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import attrs

from dq import _sources as runtime
from dq import message as _message
from dq.broker import Broker, Consumer
from dq.brokers._checks import (
    StoredQueueNames,
    check_consume_arguments,
    delayed_if_asked,
)
from dq.brokers._declarations import LocalDeclarations
from dq.brokers.redis import _calls, _resp
from dq.brokers.redis._compat import DramatiqCalls
from dq.brokers.redis._consumer import RedisConsumer
from dq.brokers.redis._keeper import Keeper
from dq.brokers.redis._keys import Keys, glob_escape
from dq.brokers.redis._recovery import RecoveryReport
from dq.brokers.redis._recovery import reconcile as _reconcile
from dq.brokers.redis._recovery import recover as _recover
from dq.brokers.redis._replies import as_int
from dq.brokers.redis._scripts import COMMANDS, Script
from dq.brokers.redis._timing import positive_ms, recovery_timing
from dq.brokers.redis._transport import DEFAULT_LUA_MAX_STACK, RedisConnectionClosed, Transport
from dq.brokers.redis._wakeup import Listener, Waker
from dq.core import commands as _commands
from dq.core import policy
from dq.errors import QueueJoinTimeout
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
    "RedisConnectionClosed",
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
#: Deliveries without a settle after which a message is dead-lettered.
DEFAULT_MAX_DELIVERIES: Final = 10

_ENQUEUE_CHUNK = 500  # messages per enqueue script call


class RedisBroker(Broker, Transport, DramatiqCalls):
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
        self.heartbeat_timeout = positive_ms("heartbeat_timeout", heartbeat_timeout)
        self.dead_message_ttl = positive_ms("dead_message_ttl", dead_message_ttl)
        self.maintenance_chance = positive_ms(
            "maintenance_chance", maintenance_chance, allow_zero=True
        )
        self.max_deliveries = positive_ms("max_deliveries", max_deliveries, allow_zero=True)
        if self.max_deliveries == 1:
            raise ValueError(
                "max_deliveries must be 0 (no limit) or at least 2, got 1: the first "
                "delivery of a message that dies with its worker is not attributed to it"
            )
        self.requeue_interval, self.requeue_deadline = recovery_timing(
            heartbeat_timeout, requeue_deadline, requeue_interval
        )
        #: How often the heartbeat is refreshed (ms).
        self.heartbeat_interval = max(50, min(self.heartbeat_timeout // 4, 5000))
        self._open_transport(url, parameters, client)
        self.namespace = namespace
        self.broker_id = runtime.get_id_source().new_id()
        self._keys = Keys(namespace)
        # Declarations live in this process only (nothing is written to Redis): a core
        # state with no messages, whose events drive the declare hooks.
        self._waker = Waker()
        self._threads_lock = threading.Lock()
        self._listener: Listener | None = None
        self._keeper: Keeper | None = None
        self._closed = False
        # Settlements closed consumers could not send (Redis was down): the keeper
        # retries them, so nothing stays in this live process's ack sets for ever.
        self._orphans: list[tuple[str, type[_commands.Command], list[str]]] = []
        self._orphans_lock = threading.Lock()
        # Open consumers, and one lock per queue that a fetch holds from its call
        # until its reply is buffered (`reconcile` holds it to see a settled picture).
        self._consumers: set[RedisConsumer] = set()
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._valid_names = StoredQueueNames()  # names `_stored_name` accepted
        self._declarations = LocalDeclarations(self._valid_names)

    # -- plumbing ----------------------------------------------------------------------

    @property
    def consumer_class(self) -> type[Consumer]:
        """The class of this broker's consumers (`consume` makes them; a subclass may
        name a subclass of it)."""
        return RedisConsumer

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
                self._keeper = Keeper(self)
                self._keeper.start()
            if self._listener is None:
                self._listener = Listener(
                    f"dq-redis-listener-{self.broker_id[:8]}",
                    self._keys.channel(""),
                    self._new_subscriber,
                    self._waker,
                    self.logger,
                )
                self._listener.start()
                self._listener.ready.wait(2.0)

    def close(self) -> None:
        """Stop this broker's threads and drop its heartbeat (consumers are closed by
        their owners first; a worker's `stop` does that)."""
        with self._threads_lock:
            self._closed = True
            threads: list[Keeper | Listener] = [
                t for t in (self._keeper, self._listener) if t is not None
            ]
            for thread in threads:
                thread.stopped.set()
                if isinstance(thread, Keeper):
                    thread.wake.set()
            for thread in threads:
                thread.join(5)
            self._keeper = self._listener = None
        self._waker.notify_all()
        self._forget_self()
        self._close_connections()

    def _forget_self(self) -> None:
        """Drop this broker's heartbeat if it holds no message any more (otherwise
        the heartbeat expires and recovery returns what it holds)."""
        try:
            prefix = self._keys.acks(self.broker_id, "")
            if not self._scan(glob_escape(prefix) + "*"):
                self._execute("ZREM", self._keys.heartbeats, self.broker_id)
        except RedisConnectionClosed:
            self.logger.warning("Could not remove this broker's heartbeat: Redis is unreachable.")

    def _settle(self, command: type[_commands.Command], queue_name: str, rids: list[str]) -> int:
        """Ack or requeue (``command``) ids this broker holds on ``queue_name``."""
        return _calls.settle(
            self._run, self._keys, self.broker_id, command, queue_name, rids, _now()
        )

    def _settle_orphans(self) -> None:
        with self._orphans_lock:
            orphans, self._orphans = self._orphans, []
        for index, (queue_name, command, rids) in enumerate(orphans):
            if not rids:
                continue
            try:
                self._settle(command, queue_name, rids)
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
        return _reconcile(self)

    def heartbeat(self) -> None:
        """Record that this process is alive (the keeper thread does it on a timer).

        ``heartbeat.lua`` runs at ``maxmemory`` too: a live worker never looks dead
        because Redis is full.
        """
        _calls.heartbeat(self._run, self._keys, self.broker_id, _now())

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
        _calls.enqueue(self._run, self._keys, name, stored.options["redis_message_id"], payload)
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
        script = self.scripts["enqueue"]
        # The script is loaded in the same round trip, so no EVALSHA can miss it.
        commands: list[list[_resp.Arg]] = [["SCRIPT", "LOAD", script.source]]
        for name, items in by_queue.items():
            for start in range(0, len(items), _ENQUEUE_CHUNK):
                chunk = items[start : start + _ENQUEUE_CHUNK]
                stored_items = [(m.options["redis_message_id"], data) for m, data in chunk]
                commands.append(_calls.enqueue_command(script, self._keys, name, stored_items))
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
        make = cast("type[RedisConsumer]", self.consumer_class)  # typed as the base's
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
                count = _calls.expire_dead_letters(self._run, self._keys, name, cutoff, batch)
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

    def flush(self, queue_name: str) -> None:
        """Drop the waiting messages of ``queue_name`` and its ``.DQ``, and its dead
        letters. Messages reserved by consumers stay with them."""
        name = policy.q_name(queue_name)
        _calls.flush(self._run, self._keys, name)
        _calls.flush(self._run, self._keys, policy.dq_name(name))

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
        return sum(as_int(reply) for reply in replies)


def _now() -> int:
    return runtime.get_clock().now_ms()
