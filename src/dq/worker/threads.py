"""The worker's threads: consumer threads take messages from the broker, worker
threads run and settle them.

A `ConsumerThread` consumes one queue (or delay queue): it puts ready messages on the
worker's `WorkQueue`, holds delayed ones in memory until their eta and then promotes
them to their canonical queue. A `WorkerThread` takes messages from the work queue,
runs each between its middleware hooks and settles it on its consumer
(`dq.worker.processing`); a message its consumer suspects runs alone (`RunGate`).
"""

from __future__ import annotations

import heapq
import itertools
import queue as _queue
import threading
import time
from collections.abc import Callable
from typing import Protocol, cast, runtime_checkable

from dq import _sources
from dq.broker import Broker, Consumer, MessageProxy
from dq.core import DeathReason, InvalidValue, policy
from dq.errors import ActorNotFound, BrokerConnectionError
from dq.logging import get_logger
from dq.worker import tuning
from dq.worker.gate import RunGate
from dq.worker.processing import (
    CAPABILITIES,
    LOGGER_NAME,
    STARTS,
    SUSPECTS,
    ReplacementStored,
    ack_stored,
    capabilities,
    dead_letter,
    dead_letter_unstorable,
    implements,
    is_suspect,
    mark_started,
    process_message,
    promote,
    settle,
)
from dq.worker.work_queue import WorkQueue

__all__ = ["ConsumerThread", "WorkerThread"]


@runtime_checkable
class _Buffering(Protocol):
    def buffered(self) -> int: ...


def _nothing_buffered() -> int:
    return 0


def _buffered_of(consumer: Consumer) -> Callable[[], int]:
    """A function returning how many messages ``consumer`` holds in memory, ready to
    hand out without waiting (the next ``next()`` calls return them at once); it
    returns 0 if the consumer cannot tell."""
    if implements(type(consumer), _Buffering):
        return cast("_Buffering", consumer).buffered
    return _nothing_buffered


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
        self.logger = get_logger(LOGGER_NAME, type(self))
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
                    self._log_restart("lost its connection")
                    if not getattr(self.consumer, "survives_connection_loss", False):
                        # Its deliveries died with the connection: the broker
                        # redelivers them (and what it holds for later).
                        self.delay_queue.clear()
                        self.consumer = None
                    # Otherwise (Redis) the consumer and what it holds stay valid: it
                    # carries on, and its messages are settled once Redis is back.
                    time.sleep(tuning.CONSUMER_RESTART_DELAY_SECS)
                except Exception:
                    self._log_restart("crashed")
                    self.close()
                    time.sleep(tuning.CONSUMER_RESTART_DELAY_SECS)
        finally:
            broker._run_before(broker._hooks.before_consumer_thread_shutdown, self)

    def _log_restart(self, what: str) -> None:
        """Log (with the exception being handled) that the consumer ``what`` and
        restarts after a pause."""
        self.logger.critical(
            "Consumer of %r %s; restarting in %.1f s.",
            self.queue_name,
            what,
            tuning.CONSUMER_RESTART_DELAY_SECS,
            exc_info=True,
        )

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
                    due = (self.delay_queue[0][0] - _sources.get_clock().now_ms()) / 1000
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
                    eta_ms = _sources.get_clock().now_ms()
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
        now = _sources.get_clock().now_ms()
        while self.delay_queue and self.delay_queue[0][0] <= now:
            _, _, message = heapq.heappop(self.delay_queue)
            try:
                if message.death_reason is DeathReason.BAD_ETA:
                    dead_letter(self.broker, consumer, message, DeathReason.BAD_ETA, self.logger)
                else:
                    promote(self.broker, consumer, message)
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
        self.logger = get_logger(LOGGER_NAME, type(self))
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
        flags = CAPABILITIES.get(type(consumer))
        if flags is None:
            flags = capabilities(type(consumer))
        if flags & SUSPECTS and is_suspect(consumer, message, self.logger):
            self._process_alone(message, consumer)
            return
        gate = self.gate
        self.busy = True
        if gate.waiting:  # a suspect waits or runs (see RunGate)
            gate.enter_shared(self)
        try:
            if flags & STARTS:
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
                    tuning.POST_PROCESS_MESSAGE_RETRY_DELAY_SECS,
                )
                self._stopping.wait(tuning.POST_PROCESS_MESSAGE_RETRY_DELAY_SECS)
                if stored:
                    ack_stored(broker, consumer, message)
                else:
                    settle(broker, consumer, message)
                return
            except Exception as e:
                error = e
