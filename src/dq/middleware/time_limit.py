"""`TimeLimit`: interrupt actors that run for too long."""

from __future__ import annotations

import math
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Any

from dq import _sources as runtime
from dq.core import policy
from dq.logging import get_logger
from dq.middleware.middleware import Middleware
from dq.options import check_options
from dq.threading import (
    Interrupt,
    interrupt_problem,
    raise_thread_exception,
)

if TYPE_CHECKING:
    from dq.broker import Broker, MessageProxy

__all__ = ["TimeLimit", "TimeLimitExceeded"]

_INF = math.inf
get_ident = threading.get_ident


class TimeLimitExceeded(Interrupt):
    """Raised inside a worker thread whose actor ran past its time limit."""


class TimeLimit(Middleware):
    """Raise `TimeLimitExceeded` inside actors that run longer than their limit.

    A watcher thread, started by the ``after_process_boot`` hook (the CLI emits it;
    tests call ``broker.emit_after("process_boot")``), checks every ``interval`` ms
    whether a worker thread has run past its deadline and, if so, raises the
    exception in that thread (CPython only). The exception is raised when the thread
    next runs Python code, so a blocking system call is not cut short.

    An async actor's worker thread only waits for its coroutine (`dq.asyncio`), so it
    gets the exception even while the coroutine awaits; the coroutine is then
    cancelled on the event loop (it sees `asyncio.CancelledError` at its current
    ``await``) and the message fails as a sync actor's would.

    Args:
        time_limit: the default limit, in ms (``float("inf")``: none). The actor
            option ``time_limit`` overrides it, and a truthy ``time_limit`` message
            option overrides both.
        interval: how often, in ms, the watcher checks the deadlines.

    Raises:
        ValueError: ``time_limit`` is not a number of ms >= 0 (``inf`` included).
    """

    def __init__(self, *, time_limit: float = 600000, interval: int = 1000) -> None:
        check_options({"time_limit": time_limit}, what="TimeLimit settings")
        self.logger = get_logger(__name__, type(self))
        self.time_limit = time_limit
        self.interval = interval
        self._lock = threading.Lock()
        #: Deadline (ms, runtime clock) of each worker thread running a message.
        self._deadlines: dict[int, float] = {}
        self._watcher: threading.Thread | None = None

    @property
    def actor_options(self) -> set[str]:
        return {"time_limit"}

    def after_process_boot(self, broker: Broker) -> None:
        """Start the watcher thread (once), where threads can be interrupted."""
        problem = interrupt_problem()
        if problem is not None:
            warnings.warn(
                f"TimeLimit {problem}; time limits will not be enforced.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        with self._lock:
            if self._watcher is not None and self._watcher.is_alive():
                return
            self._watcher = threading.Thread(
                target=_watch,
                args=(weakref.ref(self), self.interval / 1000),
                name="dq-time-limit",
                daemon=True,
            )
            self._watcher.start()

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        """Arm the current thread's deadline."""
        current = message.message  # its fields are plain reads (the proxy's, properties)
        actor = broker.get_actor(current.actor_name)
        # message_or_actor, inlined: this runs for every message.
        limit = current.options.get("time_limit") or actor.options.get(
            "time_limit", self.time_limit
        )
        if limit is None:  # an actor's time_limit=None: the default (option_problem allows it)
            limit = self.time_limit
        deadline = policy.time_limit_deadline_ms(runtime._clock.now_ms(), limit)
        thread_id = get_ident()
        with self._lock:
            if deadline == _INF:
                self._deadlines.pop(thread_id, None)
            else:
                self._deadlines[thread_id] = deadline

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Disarm the current thread's deadline."""
        with self._lock:
            self._deadlines.pop(get_ident(), None)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        """Disarm the current thread's deadline."""
        self._disarm()

    def _disarm(self) -> None:
        with self._lock:
            self._deadlines.pop(get_ident(), None)

    def check_deadlines(self) -> None:
        """Interrupt every thread past its deadline (one pass of the watcher)."""
        now = runtime.get_clock().now_ms()
        with self._lock:
            # Under the lock, so a thread cannot disarm between the check and the raise.
            expired = [tid for tid, deadline in self._deadlines.items() if now >= deadline]
            for thread_id in expired:
                del self._deadlines[thread_id]
                self.logger.warning(
                    "Time limit exceeded. Raising exception in worker thread %r.", thread_id
                )
                raise_thread_exception(thread_id, TimeLimitExceeded)


def _watch(ref: weakref.ref[TimeLimit], interval_s: float) -> None:
    """The watcher thread: check the deadlines every ``interval_s`` seconds, until
    the middleware is garbage-collected."""
    while True:
        middleware = ref()
        if middleware is None:
            return
        try:
            middleware.check_deadlines()
        except Exception:  # keep watching whatever happens
            middleware.logger.exception("Unexpected failure while checking time limits.")
        del middleware
        time.sleep(interval_s)
