"""`Worker`: processes messages in threads (Dramatiq 2.2.1's worker, observably).

A worker runs one `ConsumerThread` per declared queue and per delay queue, and
``worker_threads`` `WorkerThread`s. Consumer threads take messages from the broker
and put ready ones on one in-memory priority queue (lower actor ``priority`` first,
arrival order among equals); delayed ones are held in memory until their eta and
then promoted to their canonical queue (atomically, when the consumer can). Worker
threads run the actors and settle each message directly on its consumer: ack after
success (storing first the retry a middleware asked for), nack when a middleware
failed the message, requeue when a middleware asked for redelivery.

Messages that cannot run are dead-lettered, each with its reason
(`MessageProxy.death_reason`): an invalid ``eta`` (`DeathReason.BAD_ETA`, by the
consumer thread, which goes on with the others), an option value dq cannot honour
(`DeathReason.BAD_OPTIONS`, before its actor runs), and a settlement that cannot be
stored for any reason but the connection, such as a retry the broker refuses
(`DeathReason.UNSTORABLE`; this frees the message's prefetch slot). Only while the
broker is unreachable does a worker thread keep trying to settle a message.

A message its consumer suspects (`Consumer.suspect`: a worker died holding it)
runs alone: no other message of the worker runs meanwhile (`RunGate`).

`process_message` is the processing of one message, shared with single-threaded
runtimes (`dq.runtime.Runner`).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue as _queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, cast, runtime_checkable

from dq import runtime
from dq.broker import Broker, Consumer, MessageProxy
from dq.common import getenv_int
from dq.core import DeathReason, InvalidValue, policy
from dq.errors import ActorNotFound, BrokerConnectionError, RateLimitExceeded, Retry
from dq.logging import get_logger
from dq.message import CHECKED_OPTIONS, options_problem
from dq.middleware import Middleware, MiddlewareError, SkipMessage

_allocate_lock = threading.Lock

if TYPE_CHECKING:
    from dq.message import Message

__all__ = [
    "CONSUMER_RESTART_DELAY",
    "CONSUMER_RESTART_DELAY_SECS",
    "DELAY_QUEUE_PREFETCH",
    "POST_PROCESS_MESSAGE_RETRY_DELAY_SECS",
    "QUEUE_PREFETCH",
    "WORKER_TIMEOUT",
    "ConsumerThread",
    "ReplacementStored",
    "RunGate",
    "Runner",
    "WorkQueue",
    "Worker",
    "WorkerThread",
    "has_results_middleware",
    "process_message",
]

#: Prefetch per queue consumer (0: ``min(2 × threads, 65535)``).
QUEUE_PREFETCH = getenv_int("dramatiq_queue_prefetch") or 0
#: Prefetch per delay-queue consumer (0: ``min(1000 × threads, 65535)``).
DELAY_QUEUE_PREFETCH = getenv_int("dramatiq_delay_queue_prefetch") or 0
#: Consumer idle timeout and worker-thread poll interval (ms).
WORKER_TIMEOUT = getenv_int("dramatiq_worker_timeout") or 1000
#: Pause before a failed consumer restarts (ms).
CONSUMER_RESTART_DELAY = getenv_int("dramatiq_restart_delay") or 3000
CONSUMER_RESTART_DELAY_SECS = CONSUMER_RESTART_DELAY / 1000
#: Pause between attempts to settle a message while the broker connection is down.
POST_PROCESS_MESSAGE_RETRY_DELAY_SECS = 5

_logger = get_logger(__name__)


@runtime_checkable
class _Promoting(Protocol):
    def promote(self, message: MessageProxy) -> Message[Any]: ...


#: (consumer class, protocol) -> whether the class implements the protocol's methods.
_IMPLEMENTS: dict[tuple[type, type], bool] = {}


def _implements(kind: type, protocol: type) -> bool:
    """``issubclass(kind, protocol)`` for a runtime-checkable protocol of methods, cached:
    the check itself walks the protocol's members every time (about 7 µs), and runs
    for every message."""
    key = (kind, protocol)
    known = _IMPLEMENTS.get(key)
    if known is None:
        known = _IMPLEMENTS[key] = issubclass(kind, protocol)
    return known


def _can_promote(consumer: Consumer) -> TypeGuard[_Promoting]:
    return _implements(type(consumer), _Promoting)


@runtime_checkable
class _Buffering(Protocol):
    def buffered(self) -> int: ...


def _nothing_buffered() -> int:
    return 0


def _buffered_of(consumer: Consumer) -> Callable[[], int]:
    """A function returning how many messages ``consumer`` holds in memory, ready to
    hand out without waiting (the next ``next()`` calls return them at once); it
    returns 0 if the consumer cannot tell."""
    if _implements(type(consumer), _Buffering):
        return cast("_Buffering", consumer).buffered
    return _nothing_buffered


def has_results_middleware(broker: Broker) -> bool:
    """Return whether ``broker`` has a middleware that stores results."""
    return broker.get_results_backend() is not None


# -- processing one message ---------------------------------------------------------------


def _throws(broker: Broker, message: MessageProxy, exception: BaseException) -> bool:
    try:
        actor = broker.get_actor(message.actor_name)
    except ActorNotFound:
        return False
    throws: Any = message.options.get("throws") or actor.options.get("throws")
    return bool(throws) and isinstance(exception, throws)


def process_message(
    broker: Broker, message: MessageProxy, logger: logging.Logger = _logger
) -> None:
    """Run the actor of ``message`` between its middleware hooks (no settling).

    The hooks and the actor may fail, skip or change the proxied message; afterwards
    `settle` decides what the consumer does with it. An exception raised by the actor
    is stored on the proxy, logged as Dramatiq logs it, and passed to the
    ``after_process_message`` hooks; it never escapes.

    A message for an unknown actor, or with an option value dq cannot honour (it
    came from the wire: `dq.message.option_problem`), is failed without running
    (the latter with ``death_reason`` `DeathReason.BAD_OPTIONS`), so `settle`
    dead-letters it.
    """
    hooks = broker._hooks
    try:
        actor = broker.get_actor(message.actor_name)
    except ActorNotFound as e:
        logger.error(
            "Received message %s for undefined actor %r; dead-lettering it.",
            message.message_id,
            message.actor_name,
        )
        message.stuff_exception(e)
        message.fail()
        return
    options = message._message.options
    if options and not CHECKED_OPTIONS.isdisjoint(options):
        problem = options_problem(options)
        if problem is not None:
            # From the wire (a foreign producer): dq's own sends refuse such values.
            logger.error(
                "Dead-lettering message %s (actor %r) without running it: %s.",
                message.message_id,
                message.actor_name,
                problem,
            )
            message.stuff_exception(ValueError(problem))
            message.death_reason = DeathReason.BAD_OPTIONS
            message.fail()
            return
    # The hooks are called here rather than through Broker._run_before/_run_after
    # (same order, same error handling): this runs for every message.
    before = hooks.before_process_message
    if before:
        try:
            for hook in before:
                try:
                    hook(broker, message)
                except MiddlewareError:
                    raise
                except Exception:
                    broker._log_hook_failure(hook)
        except SkipMessage as e:
            if message._failed:
                # As Dramatiq: the reason travels with the failed message (results,
                # StubBroker.join(fail_fast=True)).
                message.stuff_exception(e)
            logger.warning("Message %s was skipped.", message)
            broker._run_after(hooks.after_skip_message, message)
            return
    result: Any = None
    exception: BaseException | None = None
    if not message._failed:
        try:
            result = actor(*message.args, **message.kwargs)
        except BaseException as e:
            exception = e
            message.stuff_exception(e)
            _log_failure(broker, message, e, logger)
    if (
        result is not None
        and exception is None
        and "pipe_target" not in message.options
        and not has_results_middleware(broker)
    ):
        logger.warning(
            "Actor %r returned a value that is not None, but the broker has no results "
            "middleware, so the value was discarded.",
            message.actor_name,
        )
    for after in hooks.after_process_message:
        try:
            after(broker, message, result=result, exception=exception)
        except Exception:
            broker._log_hook_failure(after)


def _log_failure(
    broker: Broker, message: MessageProxy, exception: BaseException, logger: logging.Logger
) -> None:
    if isinstance(exception, Retry):
        return
    if isinstance(exception, RateLimitExceeded):
        logger.debug("Rate limit exceeded in message %s: %s", message.message_id, exception)
    elif _throws(broker, message, exception):
        logger.info("Failed to process message %s with expected exception %r.", message, exception)
    else:
        logger.error(
            "Failed to process message %s with unhandled exception.",
            message,
            exc_info=exception,
        )


#: What a consumer class adds to `Consumer`'s defaults, as bit flags (see _capabilities).
_SUSPECTS = 1  # it overrides `Consumer.suspect`: some of its messages may have to run alone
_STARTS = 2  # it overrides `Consumer.started`: it records when messages start

#: Consumer class -> its capability flags (computed once per class).
_CAPABILITIES: dict[type, int] = {}


def _capabilities(kind: type) -> int:
    """Return the capability flags of a consumer class (cached: this runs per message)."""
    flags = _CAPABILITIES.get(kind)
    if flags is None:
        flags = 0
        if getattr(kind, "suspect", Consumer.suspect) is not Consumer.suspect:
            flags |= _SUSPECTS
        if getattr(kind, "started", Consumer.started) is not Consumer.started:
            flags |= _STARTS
        _CAPABILITIES[kind] = flags
    return flags


def is_suspect(consumer: Consumer, message: MessageProxy, logger: logging.Logger = _logger) -> bool:
    """Return whether ``message`` must run alone (`Consumer.suspect`).

    A consumer that cannot tell (its check failed) gets the safe answer: alone.
    """
    if not _capabilities(type(consumer)) & _SUSPECTS:
        return False
    try:
        return bool(consumer.suspect(message))
    except Exception as e:
        logger.warning(
            "Could not tell whether message %s (actor %r) is a suspect (%s); running it alone.",
            message.message_id,
            message.actor_name,
            e,
        )
        return True


def mark_started(
    consumer: Consumer,
    message: MessageProxy,
    logger: logging.Logger = _logger,
    *,
    alone: bool = False,
) -> None:
    """Tell a consumer that tracks it that ``message`` starts running now
    (`Consumer.started`), so that a message that kills its process is recognised
    (``max_deliveries``).

    Args:
        consumer: the message's consumer.
        message: the message.
        logger: where a failure is logged.
        alone: nothing else runs in this worker until ``message`` is settled.

    A failure to record the start is logged and the message runs anyway: the record
    only serves the delivery cap.
    """
    if not _capabilities(type(consumer)) & _STARTS:
        return
    try:
        consumer.started(message, alone=alone)
    except Exception as e:
        logger.warning(
            "Could not record that message %s (actor %r) started: %s.",
            message.message_id,
            message.actor_name,
            e,
        )


def settle(broker: Broker, consumer: Consumer, message: MessageProxy) -> None:
    """Settle a processed message on its consumer, with the ack/nack hooks.

    Requeue when a middleware asked for redelivery, nack when it failed the message
    (it is dead-lettered with its ``death_reason``), ack otherwise — after storing
    the replacement a middleware asked for (a retry): in one step with the ack when
    the consumer can (``replace``), else by an enqueue and then the ack. Nothing is
    acked before its replacement is stored.

    Raises:
        BrokerConnectionError: the broker could not be reached (`ReplacementStored`
            when only the ack after a stored replacement is missing).
        Exception: the settlement could not be stored for another reason (a retry
            the broker refuses, ...): use `settle_or_dead_letter` to dead-letter the
            message then.
    """
    hooks = broker._hooks
    # The proxy's flags, read directly (redelivery_requested, failed, replacement).
    if message._redeliver:
        consumer.requeue([message])
    elif message._failed:
        broker._run_before(hooks.before_nack, message)
        consumer.nack(message)
        broker._run_after(hooks.after_nack, message)
    else:
        if hooks.before_ack:
            broker._run_before(hooks.before_ack, message)
        replacement = message._replacement
        if replacement is None:
            consumer.ack(message)
        else:
            _replace(broker, consumer, message, *replacement)
        if hooks.after_ack:
            broker._run_after(hooks.after_ack, message)


def ack_stored(broker: Broker, consumer: Consumer, message: MessageProxy) -> None:
    """Finish a settlement whose replacement was stored: ack, then the after-ack hooks
    (after `ReplacementStored`).

    Raises:
        BrokerConnectionError: the broker could not be reached.
    """
    consumer.ack(message)
    if broker._hooks.after_ack:
        broker._run_after(broker._hooks.after_ack, message)


def settle_or_dead_letter(
    broker: Broker, consumer: Consumer, message: MessageProxy, logger: logging.Logger = _logger
) -> None:
    """`settle` the message; if what settling must store cannot be stored for any
    reason but the connection, dead-letter it instead (`dead_letter_unstorable`).

    Raises:
        BrokerConnectionError: the broker could not be reached; nothing was settled
            (`ReplacementStored`: all but the ack). Try again later.
    """
    try:
        settle(broker, consumer, message)
    except BrokerConnectionError:
        raise
    except Exception as e:
        dead_letter_unstorable(broker, consumer, message, e, logger)


def dead_letter_unstorable(
    broker: Broker,
    consumer: Consumer,
    message: MessageProxy,
    error: Exception,
    logger: logging.Logger = _logger,
) -> None:
    """Dead-letter a message whose settlement could not be stored for a reason other
    than the connection (``error``: a retry whose delay the broker refuses...), with
    ``death_reason`` `DeathReason.UNSTORABLE`, which frees its consumer's slot; log
    which message, that it is dead-lettered, and why.

    When the failed settlement was a dead-lettering already, only the failure is
    logged: the consumer keeps the message until it closes.

    Raises:
        BrokerConnectionError: the broker could not be reached (nothing changed).
    """
    if message._failed and not message._redeliver:
        logger.error(
            "Could not dead-letter message %s (actor %r): %s. Its consumer keeps it "
            "until it closes, and it is then returned to its queue.",
            message.message_id,
            message.actor_name,
            error,
            exc_info=error,
        )
        return
    what = (
        "it could not be returned to its queue"
        if message._redeliver
        else "what replaces it (a retry) could not be stored"
        if message._replacement is not None
        else "it could not be acked"
    )
    logger.error(
        "Dead-lettering message %s (actor %r): %s: %s",
        message.message_id,
        message.actor_name,
        what,
        error,
        exc_info=error,
    )
    if message._exception is None:
        message.stuff_exception(error)
    dead_letter(broker, consumer, message, DeathReason.UNSTORABLE, logger)


def dead_letter(
    broker: Broker,
    consumer: Consumer,
    message: MessageProxy,
    reason: DeathReason,
    logger: logging.Logger = _logger,
) -> None:
    """Fail ``message`` and nack it, with the nack hooks, giving ``reason`` to the
    consumer (``message.death_reason``).

    Raises:
        BrokerConnectionError: the broker could not be reached (nothing changed).
    """
    message.death_reason = reason
    message._redeliver = False
    message.fail()
    hooks = broker._hooks
    broker._run_before(hooks.before_nack, message)
    try:
        consumer.nack(message)
    except BrokerConnectionError:
        raise
    except Exception as e:
        logger.error(
            "Could not dead-letter message %s (actor %r): %s. Its consumer keeps it until "
            "it closes, and it is then returned to its queue.",
            message.message_id,
            message.actor_name,
            e,
            exc_info=True,
        )
        return
    broker._run_after(hooks.after_nack, message)


class ReplacementStored(BrokerConnectionError):
    """The replacement of a message was stored, and acking the message then failed
    for want of a connection: only the ack is left to do (`ack_stored`)."""


@runtime_checkable
class _Replacing(Protocol):
    def replace(self, message: MessageProxy, new: Message[Any], delay: int | None) -> Any: ...


def _can_replace(consumer: Consumer) -> TypeGuard[_Replacing]:
    return _implements(type(consumer), _Replacing)


def _replace(
    broker: Broker, consumer: Consumer, message: MessageProxy, new: Message[Any], delay: int | None
) -> None:
    """Store ``new`` and ack ``message``: in one atomic step when the consumer can,
    else by an enqueue, then the ack.

    Raises:
        ReplacementStored: ``new`` is stored; the ack failed for want of a connection.
        BrokerConnectionError: nothing was stored (no connection).
        Exception: ``new`` cannot be stored (the broker refuses it); nothing was.
    """
    if _can_replace(consumer):
        consumer.replace(message, new, delay)  # one atomic step
        return
    broker.enqueue(new, delay=delay)
    try:
        consumer.ack(message)
    except BrokerConnectionError as e:
        raise ReplacementStored(str(e)) from e


# -- threads ------------------------------------------------------------------------------

#: Work items: (actor priority, arrival order, message, its consumer).
_WorkItem = tuple[int, int, MessageProxy, Consumer]


class WorkQueue:
    """The worker's in-memory queue: lowest actor priority first, then arrival order.

    Items sit in a heap under a plain lock. An idle worker thread parks on a lock of
    its own; a put wakes one parked thread only when no other is already on its way,
    and a thread that takes an item wakes the next parked one while items are left (a
    chain), so that items behind an actor that blocks are taken by other threads. A
    burst of puts thus wakes threads one at a time, as fast as they get going, rather
    than one per item (each wake-up is a context switch, and under the GIL most of
    them would only find the items taken already). Parked threads are woken last-in,
    first-out: the threads that just ran stay the busy ones. ``join`` waits until
    every item taken was marked done (`task_done`).
    """

    def __init__(self) -> None:
        self._heap: list[_WorkItem] = []
        self._arrivals = itertools.count()  # the FIFO tie-break, shared by all consumers
        self._lock = threading.Lock()
        self._parked: list[threading.Lock] = []  # idle threads' locks (held), a stack
        self._waking = 0  # threads unparked and not yet back in `get`'s locked section
        self._wakes = 0  # `wake` calls not yet taken by a thread (each raises Empty once)
        self._queued: dict[Consumer, int] = {}  # items waiting here, by consumer
        self._drain_waiters: dict[Consumer, threading.Lock] = {}  # see wait_drained
        self._unfinished = 0
        self._all_done = threading.Condition(threading.Lock())
        self._joining = 0  # threads in join(): task_done notifies only when some wait

    def put(
        self, priority: int, message: MessageProxy, consumer: Consumer, *, wake: bool = True
    ) -> None:
        """Add a message and, if no thread is already on its way, wake one idle thread.

        Messages are ordered by ``priority`` (lower first), then by when they were
        put here, whichever consumer they come from. With ``wake=False`` nobody is
        woken: the caller puts more at once and then calls `notify`.
        """
        item = (priority, next(self._arrivals), message, consumer)
        with self._lock:
            heapq.heappush(self._heap, item)
            self._unfinished += 1
            queued = self._queued
            queued[consumer] = queued.get(consumer, 0) + 1
            if wake and self._parked and not self._waking:
                self._waking = 1
                self._parked.pop().release()

    def notify(self) -> None:
        """Wake one idle thread if items wait and no thread is already on its way."""
        with self._lock:
            if self._heap and self._parked and not self._waking:
                self._waking = 1
                self._parked.pop().release()

    def get(self, timeout: float | None = None, *, done: bool = False) -> _WorkItem:
        """Take the first item, waiting up to ``timeout`` seconds.

        With ``done``, first mark the item the caller took before as processed (as
        `task_done` does, in the same locked step).

        Raises:
            queue.Empty: nothing arrived in time, or the caller was woken (`wake`)
                with nothing to take.
        """
        with self._lock:
            if done:
                self._unfinished -= 1
                if not self._unfinished and self._joining:
                    self._notify_all_done()
            if self._heap:
                return self._take()
            if self._wakes:
                self._wakes -= 1
                raise _queue.Empty
            park = _allocate_lock()
            park.acquire()
            self._parked.append(park)
        woken = park.acquire(True, -1 if timeout is None else timeout)
        with self._lock:
            if woken or park not in self._parked:
                self._waking -= 1  # whoever unparked us counted us
            else:
                self._parked.remove(park)  # timed out
            if self._heap:
                return self._take()
        raise _queue.Empty

    def get_nowait(self) -> _WorkItem:
        """Take the first item without waiting.

        Raises:
            queue.Empty: there is none.
        """
        with self._lock:
            if self._heap:
                return self._take()
        raise _queue.Empty

    def _take(self) -> _WorkItem:
        """Pop the first item; wake the next idle thread if items are left (call with
        the lock held)."""
        item = heapq.heappop(self._heap)
        if self._heap and self._parked and not self._waking:
            self._waking = 1
            self._parked.pop().release()
        consumer = item[3]
        left = self._queued[consumer] - 1
        if left:
            self._queued[consumer] = left
        else:
            del self._queued[consumer]
            if self._drain_waiters:
                waiter = self._drain_waiters.pop(consumer, None)
                if waiter is not None:
                    waiter.release()
        return item

    def wait_drained(self, consumer: Consumer, timeout: float) -> None:
        """Wait until no item of ``consumer`` waits here (taken, not necessarily done),
        or for ``timeout`` seconds."""
        with self._lock:
            if consumer not in self._queued:
                return
            waiter = _allocate_lock()
            waiter.acquire()
            self._drain_waiters[consumer] = waiter
        if not waiter.acquire(True, timeout):
            with self._lock:
                if self._drain_waiters.get(consumer) is waiter:
                    del self._drain_waiters[consumer]

    def wake(self, n: int) -> None:
        """Wake up to ``n`` threads blocked in `get`, or about to block there: they get
        `queue.Empty` if nothing is waiting. Stopping and pausing use it, so no thread
        depends on its timeout to notice."""
        with self._lock:
            for _ in range(n):
                if self._parked:
                    self._waking += 1
                    self._parked.pop().release()
                else:
                    self._wakes += 1

    def task_done(self) -> None:
        """Mark one item taken earlier as processed."""
        with self._lock:
            self._unfinished -= 1
            finished = self._unfinished == 0
        if finished and self._joining:
            self._notify_all_done()

    def _notify_all_done(self) -> None:
        with self._all_done:
            self._all_done.notify_all()

    def join(self) -> None:
        """Block until every item put was marked done."""
        with self._all_done:
            self._joining += 1
            try:
                while self._unfinished:
                    self._all_done.wait(0.1)
            finally:
                self._joining -= 1

    @property
    def unfinished_tasks(self) -> int:
        """Items put and not yet marked done."""
        return self._unfinished

    def qsize(self) -> int:
        """Items waiting (not yet taken)."""
        return len(self._heap)


class _Pausable(threading.Thread):
    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.running = False
        self.paused = False
        self.paused_event = threading.Event()

    def pause(self) -> None:
        """Ask the thread to pause (see `Worker.pause`)."""
        self.paused = True
        self.paused_event.clear()

    def resume(self) -> None:
        """Let a paused thread go on."""
        self.paused = False
        self.paused_event.clear()

    def stop(self) -> None:
        """Ask the thread to stop once its current message is done."""
        self.running = False


class ConsumerThread(_Pausable):
    """Takes messages of one queue from the broker and feeds the worker.

    Ready messages go to the work queue; delayed ones (an ``eta``) are held, ordered
    by eta, and promoted when due.
    """

    def __init__(
        self,
        *,
        broker: Broker,
        queue_name: str,
        prefetch: int,
        work_queue: WorkQueue,
        worker_timeout: int,
    ) -> None:
        super().__init__(name=f"dq-consumer-{queue_name}")
        self.logger = get_logger(__name__, type(self))
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = prefetch
        self.work_queue = work_queue
        self.worker_timeout = worker_timeout
        self.consumer: Consumer | None = None
        self.delay_queue: list[tuple[int, int, MessageProxy]] = []  # a heap by eta
        self._order = itertools.count()
        self._held_back = False  # messages were put on the work queue without a wake-up
        self._buffered: Callable[[], int] | None = None  # the consumer's, in _consume

    def run(self) -> None:
        self.running = True
        broker = self.broker
        broker._run_after(broker._hooks.after_consumer_thread_boot, self)
        try:
            while self.running:
                try:
                    if self.consumer is None:
                        self.consumer = broker.consume(
                            self.queue_name, prefetch=self.prefetch, timeout=self.worker_timeout
                        )
                    self._consume(self.consumer)
                except BrokerConnectionError:
                    self.logger.critical(
                        "Consumer of %r lost its connection; restarting in %.1f s.",
                        self.queue_name,
                        CONSUMER_RESTART_DELAY_SECS,
                        exc_info=True,
                    )
                    if not getattr(self.consumer, "survives_connection_loss", False):
                        # Its deliveries died with the connection: the broker
                        # redelivers them (and what it holds for later).
                        self.delay_queue.clear()
                        self.consumer = None
                    # Otherwise (Redis) the consumer and what it holds stay valid: it
                    # carries on, and its messages are settled once Redis is back.
                    time.sleep(CONSUMER_RESTART_DELAY_SECS)
                except Exception:
                    self.logger.critical(
                        "Consumer of %r crashed; restarting in %.1f s.",
                        self.queue_name,
                        CONSUMER_RESTART_DELAY_SECS,
                        exc_info=True,
                    )
                    self.close()
                    time.sleep(CONSUMER_RESTART_DELAY_SECS)
        finally:
            broker._run_before(broker._hooks.before_consumer_thread_shutdown, self)

    def _consume(self, consumer: Consumer) -> None:
        buffered = self._buffered = _buffered_of(consumer)
        if self._held_back:  # the last run of this loop ended before it woke anyone
            self._held_back = False
            self.work_queue.notify()
        # A consumer that says what it holds in memory (the stub) fetches more only
        # once none of its messages waits on the work queue: fetching earlier would
        # not run anything sooner (every idle thread has taken one), and the broker
        # would wake this thread for room while a worker thread still holds the GIL.
        drain_first = buffered is not _nothing_buffered
        while self.running:
            if self.paused:
                self.paused_event.set()
                time.sleep(self.worker_timeout / 1000)
                continue
            if drain_first and not buffered():
                timeout = self.worker_timeout / 1000
                if self.delay_queue:
                    due = (self.delay_queue[0][0] - runtime.get_clock().now_ms()) / 1000
                    timeout = max(0.0, min(timeout, due))
                self.work_queue.wait_drained(consumer, timeout)
            try:
                message = next(consumer)
            except StopIteration:
                message = None
            if message is not None:
                self.handle_message(message)
            if self._held_back and not buffered():
                # What handle_message put without waking anyone: wake a thread now.
                self._held_back = False
                self.work_queue.notify()
            if self.delay_queue:
                self.handle_delayed_messages()

    def handle_message(self, message: MessageProxy) -> None:
        """Send a ready message to the work queue, or hold a delayed one."""
        consumer = self.consumer
        assert consumer is not None
        options = message.options
        if "eta" in options:
            eta = options["eta"]
            if eta is None:
                message.update_message(message.message.without_option("eta"))
            else:
                try:
                    eta_ms = policy.message_eta_ms(message.message)
                except InvalidValue as e:
                    # NaN, infinite, a string... (a foreign producer, a raw write): it
                    # can never come due. Dead-letter it (handle_delayed_messages, at
                    # once), and go on with the others.
                    self.logger.error(
                        "Dead-lettering message %s (actor %r) of %r: %s.",
                        message.message_id,
                        message.actor_name,
                        self.queue_name,
                        e,
                    )
                    message.stuff_exception(e)
                    message.death_reason = DeathReason.BAD_ETA
                    eta_ms = runtime.get_clock().now_ms()
                else:
                    assert eta_ms is not None
                    self.broker._run_before(self.broker._hooks.before_delay_message, message)
                heapq.heappush(self.delay_queue, (eta_ms, next(self._order), message))
                return
        try:
            priority = self.broker.get_actor(message.actor_name).priority
        except ActorNotFound:
            priority = 0  # the worker thread dead-letters it
        buffered = self._buffered
        if (_buffered_of(consumer) if buffered is None else buffered)():
            # More are in memory already and come next: put them all, then wake a
            # thread once (see _consume), rather than wake one now that would only
            # wait for this thread to let go of the GIL.
            self.work_queue.put(priority, message, consumer, wake=False)
            self._held_back = True
        else:
            self.work_queue.put(priority, message, consumer)

    def handle_delayed_messages(self) -> None:
        """Promote every held message whose eta has passed, oldest eta first, and
        dead-letter those whose eta is invalid (`DeathReason.BAD_ETA`)."""
        consumer = self.consumer
        assert consumer is not None
        now = runtime.get_clock().now_ms()
        while self.delay_queue and self.delay_queue[0][0] <= now:
            _, _, message = heapq.heappop(self.delay_queue)
            try:
                if message.death_reason is DeathReason.BAD_ETA:
                    dead_letter(self.broker, consumer, message, DeathReason.BAD_ETA, self.logger)
                else:
                    self._promote(consumer, message)
            except BrokerConnectionError:
                heapq.heappush(self.delay_queue, (now, next(self._order), message))
                raise
            except Exception as e:
                # One message the broker refuses to move must not stop the others (nor
                # restart this thread, which would bring it back): dead-letter it.
                self.logger.error(
                    "Dead-lettering message %s (actor %r) of %r: it could not be moved "
                    "to its queue: %s",
                    message.message_id,
                    message.actor_name,
                    self.queue_name,
                    e,
                    exc_info=e,
                )
                if message._exception is None:
                    message.stuff_exception(e)
                try:
                    dead_letter(self.broker, consumer, message, DeathReason.UNSTORABLE, self.logger)
                except BrokerConnectionError:
                    heapq.heappush(self.delay_queue, (now, next(self._order), message))
                    raise

    def _promote(self, consumer: Consumer, message: MessageProxy) -> None:
        if _can_promote(consumer) and policy.is_delay_queue(message.queue_name):
            consumer.promote(message)  # one step: stored on q, forgotten on q.DQ
            return
        # A consumer that cannot promote in one step: store the copy, then ack.
        self.broker.enqueue(policy.promoted(message.message))
        consumer.ack(message)

    def requeue_messages(self, messages: list[MessageProxy]) -> None:
        """Return unprocessed messages to the broker (connection errors are logged)."""
        if not messages or self.consumer is None:
            return
        try:
            self.consumer.requeue(messages)
        except BrokerConnectionError:
            self.logger.warning(
                "Could not requeue %d messages of %r: the broker will redeliver them.",
                len(messages),
                self.queue_name,
                exc_info=True,
            )

    def close(self) -> None:
        """Return held delayed messages and close the consumer."""
        held = [message for _, _, message in self.delay_queue]
        self.delay_queue.clear()
        self.requeue_messages(held)
        if self.consumer is not None:
            try:
                self.consumer.close()
            except Exception:
                self.logger.warning("Error closing consumer of %r.", self.queue_name, exc_info=True)
            self.consumer = None


class RunGate:
    """Lets a suspect message run alone among a worker's threads.

    A reader-writer gate: ordinary messages share it, a suspect (`Consumer.suspect`)
    takes it exclusively. A suspect waits until the messages running finish, and
    ordinary messages that arrive meanwhile wait until it is done; suspects run one
    at a time. While no suspect waits or runs, an ordinary message only sets its
    thread's ``busy`` flag and reads `waiting` (no lock): a suspect first counts
    itself in `waiting`, then looks at the flags, so one of the two always sees the
    other (the interpreter orders these reads and writes).

    Args:
        threads: the worker threads (the list is read whenever a suspect arrives).
        single: the worker has one thread: every message runs alone.
    """

    def __init__(self, threads: list[WorkerThread], *, single: bool = False) -> None:
        self.threads = threads
        self.single = single
        #: Suspects waiting or running; ordinary messages take the slow path while > 0.
        self.waiting = 0
        self._alone: WorkerThread | None = None  # the thread running a suspect
        self._changed = threading.Condition(threading.Lock())

    def enter_shared(self, thread: WorkerThread) -> None:
        """The slow path of an ordinary message (``thread.busy`` set, `waiting` seen
        non-zero): wait until no suspect waits or runs."""
        with self._changed:
            thread.busy = False
            self._changed.notify_all()  # a suspect may wait for this thread
            while self.waiting:
                self._changed.wait(_GATE_POLL_SECS)
            thread.busy = True

    def left_shared(self) -> None:
        """An ordinary message is done (its ``busy`` flag cleared) while a suspect
        waits: let the suspect look again."""
        with self._changed:
            self._changed.notify_all()

    def enter_alone(self, thread: WorkerThread) -> None:
        """Wait until ``thread`` may run a suspect: no other suspect runs and no other
        thread runs a message."""
        with self._changed:
            self.waiting += 1
            try:
                while self._alone is not None or any(
                    other.busy for other in self.threads if other is not thread
                ):
                    self._changed.wait(_GATE_POLL_SECS)
            except BaseException:
                self.waiting -= 1
                self._changed.notify_all()
                raise
            self._alone = thread

    def leave_alone(self) -> None:
        """The suspect is settled: let the others go on."""
        with self._changed:
            self._alone = None
            self.waiting -= 1
            self._changed.notify_all()


#: How long a thread waits at the `RunGate` before it looks again anyway (a safety net:
#: every change notifies).
_GATE_POLL_SECS = 0.5


class WorkerThread(_Pausable):
    """Runs actors: takes messages from the work queue, processes and settles them.

    Args:
        broker: the broker.
        consumers: the worker's consumer threads, by queue.
        work_queue: where messages come from.
        worker_timeout: ms to wait for work before looking at the flags again.
        gate: the worker's `RunGate` (default: one of its own, for this thread alone).
    """

    def __init__(
        self,
        *,
        broker: Broker,
        consumers: dict[str, ConsumerThread],
        work_queue: WorkQueue,
        worker_timeout: int,
        gate: RunGate | None = None,
    ) -> None:
        super().__init__(name="dq-worker")
        self.logger = get_logger(__name__, type(self))
        self.broker = broker
        self.consumers = consumers
        self.work_queue = work_queue
        self.timeout = worker_timeout / 1000
        #: Whether this thread runs (or settles) an ordinary message (see `RunGate`).
        self.busy = False
        self.gate = RunGate([self], single=True) if gate is None else gate
        self._stopping = threading.Event()  # cuts short a wait to settle again

    def stop(self) -> None:
        """Ask the thread to stop once its current message is done (a message it
        cannot settle for want of a connection is left to its consumer)."""
        super().stop()
        self._stopping.set()

    def run(self) -> None:
        self.running = True
        broker = self.broker
        broker._run_after(broker._hooks.after_worker_thread_boot, self)
        get = self.work_queue.get
        done = self.work_queue.task_done
        finished = False  # a message was processed and not yet marked done
        try:
            while self.running:
                if self.paused:
                    if finished:
                        finished = False
                        done()
                    self.paused_event.set()
                    time.sleep(self.timeout)
                    continue
                # The last message is marked done in the same locked step as the next
                # one is taken (one lock round trip less per message).
                mark, finished = finished, False
                try:
                    _, _, message, consumer = get(self.timeout, done=mark)
                except _queue.Empty:
                    continue
                try:
                    self.process_message(message, consumer)
                finally:
                    finished = True
        finally:
            if finished:
                done()
            broker._run_before(broker._hooks.before_worker_thread_shutdown, self)

    def process_message(self, message: MessageProxy, consumer: Consumer) -> None:
        """Process one message and settle it on its consumer.

        A suspect (`Consumer.suspect`) runs and is settled while no other message of
        this worker runs (`RunGate`), and its consumer is told so
        (``started(message, alone=True)``).
        """
        flags = _CAPABILITIES.get(type(consumer))
        if flags is None:
            flags = _capabilities(type(consumer))
        if flags & _SUSPECTS and is_suspect(consumer, message, self.logger):
            self._process_alone(message, consumer)
            return
        gate = self.gate
        self.busy = True
        if gate.waiting:  # a suspect waits or runs (see RunGate)
            gate.enter_shared(self)
        try:
            if flags & _STARTS:
                mark_started(consumer, message, self.logger, alone=gate.single)
            self._run_and_settle(message, consumer)
        finally:
            self.busy = False
            if gate.waiting:
                gate.left_shared()

    def _process_alone(self, message: MessageProxy, consumer: Consumer) -> None:
        gate = self.gate
        gate.enter_alone(self)
        try:
            mark_started(consumer, message, self.logger, alone=True)
            self._run_and_settle(message, consumer)
        finally:
            gate.leave_alone()

    def _run_and_settle(self, message: MessageProxy, consumer: Consumer) -> None:
        """Run ``message`` between its hooks, then settle it on ``consumer``."""
        try:
            process_message(self.broker, message, self.logger)
        except BaseException as e:
            self.logger.error("Error processing message %s.", message, exc_info=True)
            if message._exception is None:
                message.stuff_exception(e)
        try:
            settle(self.broker, consumer, message)
        except Exception as e:
            self._settle_failed(message, consumer, e)

    def _settle_failed(self, message: MessageProxy, consumer: Consumer, error: Exception) -> None:
        """Deal with a failed `settle`: while the broker is unreachable, try again every
        `POST_PROCESS_MESSAGE_RETRY_DELAY_SECS`; a settlement that cannot be stored for
        another reason dead-letters the message (`dead_letter_unstorable`)."""
        broker = self.broker
        stored = False  # its replacement is stored: only the ack is left
        while True:
            try:
                if not isinstance(error, BrokerConnectionError):
                    if stored:  # never dead-letter a message whose retry is stored
                        self.logger.error(
                            "Could not ack message %s (actor %r) after storing its "
                            "retry: %s. Its consumer keeps it until it closes.",
                            message.message_id,
                            message.actor_name,
                            error,
                            exc_info=error,
                        )
                        return
                    dead_letter_unstorable(broker, consumer, message, error, self.logger)
                    return
                stored = stored or isinstance(error, ReplacementStored)
                if not self.running:
                    # Stopping: its consumer is closed next, which returns it (or the
                    # broker does, once the connection is gone).
                    self.logger.warning(
                        "Could not settle message %s (actor %r): %s; the worker stops, "
                        "so it is left to its consumer, which returns it to its queue.",
                        message.message_id,
                        message.actor_name,
                        error,
                    )
                    return
                self.logger.warning(
                    "Could not settle message %s (actor %r): %s; retrying in %d s.",
                    message.message_id,
                    message.actor_name,
                    error,
                    POST_PROCESS_MESSAGE_RETRY_DELAY_SECS,
                )
                self._stopping.wait(POST_PROCESS_MESSAGE_RETRY_DELAY_SECS)
                if stored:
                    ack_stored(broker, consumer, message)
                else:
                    settle(broker, consumer, message)
                return
            except Exception as e:
                error = e


# -- the worker ----------------------------------------------------------------------------


class _WorkerMiddleware(Middleware):
    """Starts a consumer for every queue declared on the broker while the worker runs."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def after_declare_queue(self, broker: Broker, queue_name: str) -> None:
        self.worker._add_consumer(queue_name)

    def after_declare_delay_queue(self, broker: Broker, queue_name: str) -> None:
        self.worker._add_consumer(queue_name, delay=True)


class Worker:
    """Processes messages from a broker's queues in background threads.

    Args:
        broker: the broker.
        queues: canonical queue names to consume (None or empty: all). A queue's delay
            queue is consumed when the queue is.
        worker_timeout: ms consumers wait for messages and threads poll for work.
        worker_threads: how many messages run at once.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        queues: set[str] | None = None,
        worker_timeout: int = WORKER_TIMEOUT,
        worker_threads: int = 8,
    ) -> None:
        if worker_threads < 1:
            raise ValueError(f"worker_threads must be >= 1, got {worker_threads!r}")
        if worker_timeout < 1:
            raise ValueError(f"worker_timeout must be >= 1 ms, got {worker_timeout!r}")
        self.logger = get_logger(__name__, type(self))
        self.broker = broker
        self.consumers: dict[str, ConsumerThread] = {}
        self.consumer_whitelist = set(queues) if queues else None
        self.queue_prefetch = min(QUEUE_PREFETCH or worker_threads * 2, 65535)
        self.delay_prefetch = min(DELAY_QUEUE_PREFETCH or worker_threads * 1000, 65535)
        self.workers: list[WorkerThread] = []
        self.gate = RunGate(self.workers, single=worker_threads == 1)
        self.work_queue = WorkQueue()
        self.worker_timeout = worker_timeout
        self.worker_threads = worker_threads
        self._middleware: _WorkerMiddleware | None = None
        self._lock = threading.RLock()

    def start(self) -> None:
        """Start consuming every (whitelisted) queue, now and as they are declared."""
        broker = self.broker
        broker._run_before(broker._hooks.before_worker_boot, self)
        self._middleware = _WorkerMiddleware(self)
        broker.add_middleware(self._middleware)  # replays the declared queues
        for _ in range(self.worker_threads):
            self._add_worker()
        broker._run_after(broker._hooks.after_worker_boot, self)

    def _add_consumer(self, queue_name: str, *, delay: bool = False) -> None:
        with self._lock:
            if queue_name in self.consumers:
                return
            canonical = policy.q_name(queue_name)
            if self.consumer_whitelist and canonical not in self.consumer_whitelist:
                return
            consumer = ConsumerThread(
                broker=self.broker,
                queue_name=queue_name,
                prefetch=self.delay_prefetch if delay else self.queue_prefetch,
                work_queue=self.work_queue,
                worker_timeout=self.worker_timeout,
            )
            self.consumers[queue_name] = consumer
            consumer.start()

    def _add_worker(self) -> None:
        worker = WorkerThread(
            broker=self.broker,
            consumers=self.consumers,
            work_queue=self.work_queue,
            worker_timeout=self.worker_timeout,
            gate=self.gate,
        )
        self.workers.append(worker)
        worker.start()

    def _threads(self) -> list[_Pausable]:
        return [*self.consumers.values(), *self.workers]

    def pause(self) -> None:
        """Stop taking and running messages; returns once every thread is idle."""
        threads = self._threads()
        for thread in threads:
            thread.pause()
        self.work_queue.wake(len(self.workers))
        for thread in threads:
            while thread.is_alive() and not thread.paused_event.wait(0.05):
                pass

    def resume(self) -> None:
        """Go on after `pause`."""
        for thread in self._threads():
            thread.resume()

    def stop(self, timeout: int = 600000) -> None:
        """Stop: finish running messages (within ``timeout`` ms, shared by all threads),
        return every message not started to the broker, close the consumers."""
        broker = self.broker
        broker._run_before(broker._hooks.before_worker_shutdown, self)
        for worker in self.workers:
            worker.stop()
        self.work_queue.wake(len(self.workers))
        deadline = time.monotonic() + timeout / 1000
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for consumer in self.consumers.values():
            consumer.stop()
        for consumer in self.consumers.values():
            consumer.join()
        # Whatever is still in memory was never started: give it back.
        unstarted: dict[Consumer, list[MessageProxy]] = defaultdict(list)
        while True:
            try:
                _, _, message, owner = self.work_queue.get_nowait()
            except _queue.Empty:
                break
            unstarted[owner].append(message)
            self.work_queue.task_done()
        for consumer_thread in self.consumers.values():
            if consumer_thread.consumer is not None:
                consumer_thread.requeue_messages(unstarted.pop(consumer_thread.consumer, []))
            consumer_thread.close()
        for owner, messages in unstarted.items():  # consumers replaced after a restart
            owner.requeue(messages)
        if self._middleware is not None:
            broker._remove_middleware(self._middleware)
            self._middleware = None
        broker._run_after(broker._hooks.after_worker_shutdown, self)

    def join(self) -> None:
        """Block until every message taken is processed and no delayed one is held."""
        while True:
            self.work_queue.join()
            if any(c.delay_queue for c in self.consumers.values()):
                time.sleep(self.worker_timeout / 1000 / 10)
                continue
            if self.work_queue.unfinished_tasks:
                continue
            return


# -- a single-threaded runtime ---------------------------------------------------------------


class Runner:
    """Processes messages in the calling thread, one step at a time, with no threads
    and no sleeps: the seam for embedding dq in another runtime (an event loop, a
    simulation, a deterministic test).

    Time is the runtime clock's (`dq.runtime.set_clock`), so with a fake clock a test
    decides when delayed messages and retries come due. Each `step` takes what the
    broker has ready, promotes held delayed messages whose eta has passed, then runs
    one ready message (lowest actor priority first, oldest first) and settles it, as
    a `Worker` would. Middleware that need threads of their own (TimeLimit,
    ShutdownNotifications) have nothing to interrupt here.

    Args:
        broker: the broker.
        queues: canonical queue names to consume (None: every declared queue).
        prefetch: how many messages each consumer may hold.
    """

    def __init__(
        self, broker: Broker, *, queues: set[str] | None = None, prefetch: int = 100
    ) -> None:
        self.broker = broker
        self.logger = get_logger(__name__, type(self))
        self.prefetch = prefetch
        self.whitelist = set(queues) if queues else None
        self.consumers: dict[str, Consumer] = {}
        self.ready: list[tuple[int, int, MessageProxy, Consumer]] = []
        self.delayed: list[tuple[int, int, MessageProxy, Consumer]] = []
        self._order = itertools.count()

    def _sync_consumers(self) -> None:
        for name in sorted(
            self.broker.get_declared_queues() | self.broker.get_declared_delay_queues()
        ):
            if name in self.consumers or name.endswith(policy.DEAD_SUFFIX):
                continue
            if self.whitelist and policy.q_name(name) not in self.whitelist:
                continue
            self.consumers[name] = self.broker.consume(name, prefetch=self.prefetch, timeout=0)

    def _take(self) -> None:
        for consumer in self.consumers.values():
            for message in consumer:
                try:
                    eta = (
                        policy.message_eta_ms(message.message) if "eta" in message.options else None
                    )
                except InvalidValue as e:  # it can never come due (see ConsumerThread)
                    self.logger.error(
                        "Dead-lettering message %s (actor %r) of %r: %s.",
                        message.message_id,
                        message.actor_name,
                        message.queue_name,
                        e,
                    )
                    message.stuff_exception(e)
                    dead_letter(self.broker, consumer, message, DeathReason.BAD_ETA, self.logger)
                    continue
                if eta is not None:
                    self.broker._run_before(self.broker._hooks.before_delay_message, message)
                    heapq.heappush(self.delayed, (eta, next(self._order), message, consumer))
                    continue
                try:
                    priority = self.broker.get_actor(message.actor_name).priority
                except ActorNotFound:
                    priority = 0
                heapq.heappush(self.ready, (priority, next(self._order), message, consumer))

    def _promote_due(self) -> int:
        now = runtime.get_clock().now_ms()
        promoted = 0
        while self.delayed and self.delayed[0][0] <= now:
            _, _, message, consumer = heapq.heappop(self.delayed)
            if _can_promote(consumer) and policy.is_delay_queue(message.queue_name):
                consumer.promote(message)
            else:
                self.broker.enqueue(policy.promoted(message.message))
                consumer.ack(message)
            promoted += 1
        return promoted

    def step(self) -> bool:
        """Do one unit of work; return False when there was nothing to do now."""
        self._sync_consumers()
        self._take()
        promoted = self._promote_due()
        if promoted:
            self._take()
        if not self.ready:
            return promoted > 0
        _, _, message, consumer = heapq.heappop(self.ready)
        # One message at a time: each runs alone, suspects included.
        mark_started(consumer, message, self.logger, alone=True)
        process_message(self.broker, message, self.logger)
        settle_or_dead_letter(self.broker, consumer, message, self.logger)
        return True

    def run_until_idle(self, max_steps: int = 1_000_000) -> int:
        """Step until nothing is ready and nothing held is due; return the steps taken.

        Raises:
            RuntimeError: ``max_steps`` were taken and there is still work (a loop).
        """
        for steps in range(max_steps):
            if not self.step():
                return steps
        raise RuntimeError(f"still busy after {max_steps} steps")

    def next_eta_ms(self) -> int | None:
        """When the earliest held delayed message comes due (None: none is held)."""
        return self.delayed[0][0] if self.delayed else None

    def close(self) -> None:
        """Return every message taken and not processed to the broker; close consumers."""
        for items in (self.ready, self.delayed):
            for _, _, message, consumer in items:
                consumer.requeue([message])
            items.clear()
        for consumer in self.consumers.values():
            consumer.close()
        self.consumers.clear()
