"""`AsyncIO`: the event-loop thread that runs ``async def`` actors."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from dq.asyncio import EventLoopThread, get_event_loop_thread, set_event_loop_thread
from dq.logging import get_logger
from dq.middleware.middleware import Middleware

if TYPE_CHECKING:
    from dq.broker import Broker

__all__ = ["AsyncIO"]

#: Seconds a booting worker waits for the event loop to run.
_START_TIMEOUT_S = 1.0

#: The event-loop thread the AsyncIO middleware started, and the running workers
#: (by id) that use it: one thread per process, stopped with the last of them.
_lock = threading.Lock()
_shared: EventLoopThread | None = None
_users: set[int] = set()


class AsyncIO(Middleware):
    """Run ``async def`` actors: starts the process's event-loop thread
    (`dq.asyncio.EventLoopThread`) when a worker boots and stops it when the worker
    stops.

    A worker thread running an async actor blocks until its coroutine returns, so
    ``worker_threads`` stays the number of messages processed at once; their
    coroutines overlap on the loop while they ``await``. Several workers in one
    process share one loop thread, stopped with the last worker. If an event-loop
    thread was installed by hand (`dq.asyncio.set_event_loop_thread`), workers use it
    and leave it running.
    """

    def __init__(self) -> None:
        self.logger = get_logger(__name__, type(self))

    def before_worker_boot(self, broker: Broker, worker: Any) -> None:
        """Start the event-loop thread (or join the one already running) and install it."""
        global _shared  # one loop thread per process
        with _lock:
            current = get_event_loop_thread()
            if current is not None and current is not _shared and current.is_alive():
                return  # installed by hand: use it, leave it alone
            if _shared is None or not _shared.is_alive():
                thread = EventLoopThread(self.logger)
                thread.start(timeout=_START_TIMEOUT_S)
                _shared = thread
                _users.clear()
            _users.add(id(worker))
            set_event_loop_thread(_shared)

    def after_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        """Stop the event-loop thread once no running worker uses it, and remove it."""
        global _shared  # one loop thread per process
        with _lock:
            if id(worker) not in _users:
                return  # it used a loop thread installed by hand
            _users.discard(id(worker))
            thread = _shared
            if _users or thread is None:
                return
            _shared = None
            if get_event_loop_thread() is thread:
                set_event_loop_thread(None)
            thread.stop()
