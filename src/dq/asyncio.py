"""Running ``async def`` actors: one event-loop thread per process.

Worker threads are plain threads. To run a coroutine, a worker thread hands it to the
process's `EventLoopThread` and blocks until it finishes, so async actors keep the
worker's concurrency (``worker_threads`` messages at once), and their coroutines
overlap on the one loop while they wait on I/O. The `dq.middleware.AsyncIO`
middleware starts that thread when a worker boots and stops it when the worker stops;
actors wrap their coroutine functions with `async_to_sync`.

Each coroutine runs as a task in a copy of the calling thread's `contextvars`
context, so context variables set before the actor runs (such as
`dq.middleware.CurrentMessage`'s) are visible inside it. When an `Interrupt`
(`TimeLimitExceeded`, `Shutdown`) is raised in the waiting thread, the task is
cancelled on the loop, so the coroutine sees `asyncio.CancelledError` at its current
``await``; the thread waits (up to a second) for it to finish cleaning up, then
re-raises the interrupt.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import threading
from collections.abc import Awaitable
from typing import Generic, TypeVar

from dq.async_actors import async_to_sync, get_event_loop_thread, set_event_loop_thread
from dq.threading import Interrupt

__all__ = [
    "EventLoopThread",
    "async_to_sync",
    "get_event_loop_thread",
    "set_event_loop_thread",
]

R = TypeVar("R")

#: How long (seconds) an interrupted thread waits for its cancelled coroutine, and
#: how long `EventLoopThread.stop` waits for the tasks it cancels.
_CANCEL_GRACE_S = 1.0


class _Call(Generic[R]):
    """One coroutine run on behalf of a waiting thread: its task and its outcome.

    Only the loop thread writes ``task``, ``result`` and ``error``, before it sets
    ``finished``; the waiting thread reads them after.
    """

    __slots__ = ("error", "finished", "result", "task")

    def __init__(self) -> None:
        self.finished = threading.Event()
        self.task: asyncio.Task[R] | None = None
        self.result: R | None = None
        self.error: BaseException | None = None

    def settle(self, task: asyncio.Task[R]) -> None:
        """Record the task's outcome (a task done-callback, on the loop thread)."""
        if task.cancelled():
            self.error = asyncio.CancelledError()
        else:
            self.error = task.exception()
            if self.error is None:
                self.result = task.result()
        self.task = None  # no cycle: task -> its callbacks -> self -> task
        self.finished.set()

    def refuse(self, coro: Awaitable[R], reason: str) -> None:
        """Never run ``coro``: fail the call with ``reason`` (on the loop thread)."""
        if inspect.iscoroutine(coro):
            coro.close()
        self.error = RuntimeError(reason)
        self.finished.set()

    def cancel(self, coro: Awaitable[R]) -> None:
        """Cancel the task, or the call if it never started (on the loop thread)."""
        if self.task is not None:
            self.task.cancel()
        elif not self.finished.is_set():  # interrupted before `begin` was scheduled
            self.refuse(coro, "The coroutine was cancelled before it started.")

    def outcome(self) -> R:
        """Return the result or raise the error (once ``finished`` is set)."""
        error = self.error
        if error is not None:
            self.error = None  # no cycle: error -> traceback -> this frame -> self
            try:
                raise error
            finally:
                del error
        return self.result  # type: ignore[return-value]  # R, set by settle


async def _await(awaitable: Awaitable[R]) -> R:
    return await awaitable


class EventLoopThread(threading.Thread):
    """A thread running an asyncio event loop, on which other threads run coroutines.

    Args:
        logger: where the thread logs its start and stop.
        interrupt_check_ival: how often (seconds) a thread waiting in `run_coroutine`
            wakes up, so that an `Interrupt` raised in it is noticed.
    """

    logger: logging.Logger
    loop: asyncio.AbstractEventLoop
    interrupt_check_ival: float

    def __init__(self, logger: logging.Logger, interrupt_check_ival: float = 0.1) -> None:
        if not interrupt_check_ival > 0:
            raise ValueError(
                f"interrupt_check_ival must be a positive number of seconds, got "
                f"{interrupt_check_ival!r}"
            )
        super().__init__(name="dq-event-loop", daemon=True)
        self.logger = logger
        self.interrupt_check_ival = interrupt_check_ival
        self.loop = asyncio.new_event_loop()
        #: Whether the loop still takes new coroutines (read and written on the loop
        #: thread only).
        self._accepting = True

    def run(self) -> None:
        """Run the loop until `stop`; then cancel what is left and close the loop."""
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            self.logger.info("Starting event loop...")
            loop.run_forever()
        finally:
            self._accepting = False
            try:
                self._cancel_leftovers()
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                self.logger.info("Event loop stopped.")

    def _cancel_leftovers(self) -> None:
        """Cancel the tasks still pending when the loop stopped and let them finish,
        so none is destroyed while pending."""
        loop = self.loop
        tasks = asyncio.all_tasks(loop)
        if not tasks:
            return
        # Cancel again what is still pending now and then: a coroutine may catch one
        # cancellation to clean up, and await something long in doing so.
        pending = tasks
        deadline = loop.time() + _CANCEL_GRACE_S
        while pending and loop.time() < deadline:
            for task in pending:
                task.cancel()
            _, pending = loop.run_until_complete(asyncio.wait(pending, timeout=0.1))
        done = tasks - pending
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                self.logger.warning(
                    "Task %r failed while the event loop stopped.",
                    task,
                    exc_info=task.exception(),
                )
        if pending:
            self.logger.warning(
                "%d task(s) ignored cancellation and were abandoned when the event loop "
                "stopped: %r",
                len(pending),
                sorted(map(repr, pending)),
            )

    def start(self, *, timeout: float | None = None) -> None:
        """Start the thread and wait until its loop runs.

        Args:
            timeout: how long (seconds) to wait for the loop (None: as long as it takes).

        Raises:
            RuntimeError: the loop did not start within ``timeout``, or the thread was
                started before.
        """
        super().start()
        ready = threading.Event()
        self.loop.call_soon_threadsafe(ready.set)
        if not ready.wait(timeout=timeout):
            raise RuntimeError(f"Event loop failed to start within {timeout!r} seconds.")
        self.logger.info("Event loop is running.")

    def stop(self) -> None:
        """Stop the loop, cancel the tasks still running on it (each sees
        `asyncio.CancelledError`), close it and wait for the thread to exit.

        Stopping a stopped or never-started thread does nothing but close the loop.

        Raises:
            RuntimeError: called from the event-loop thread itself.
        """
        if threading.get_ident() == self.ident:
            raise RuntimeError("EventLoopThread.stop() cannot be called from its own thread.")
        if self.is_alive():
            self.logger.info("Stopping event loop...")
            # A RuntimeError says the loop closed meanwhile: the thread is exiting anyway.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.loop.stop)
            self.join()
        elif not self.loop.is_closed() and not self.loop.is_running():
            self.loop.close()

    def run_coroutine(self, coro: Awaitable[R]) -> R:
        """Run ``coro`` on the loop and block until it finishes; return its result.

        The coroutine runs in a copy of the calling thread's context. If an `Interrupt`
        is raised in the calling thread meanwhile, the coroutine is cancelled, and the
        interrupt re-raised once it finished.

        Args:
            coro: the awaitable to run.

        Returns:
            What it returned.

        Raises:
            RuntimeError: the loop is not running; the caller is the loop thread
                (waiting there would deadlock: ``await`` instead); or an interrupted
                coroutine did not finish within a second of its cancellation.
            BaseException: whatever the coroutine raised (`asyncio.CancelledError`
                if it was cancelled by anyone else).
        """
        problem = None
        if not self.loop.is_running():
            problem = "Event loop is not running."
        elif threading.get_ident() == self.ident:
            problem = (
                "run_coroutine() was called from the event-loop thread, where waiting "
                "would deadlock: await the coroutine instead."
            )
        if problem is not None:
            if inspect.iscoroutine(coro):
                coro.close()  # never started: no "was never awaited" warning
            raise RuntimeError(problem)
        call: _Call[R] = _Call()
        context = contextvars.copy_context()
        loop = self.loop

        def begin() -> None:
            if not self._accepting:  # the loop stopped after the check above
                call.refuse(coro, "Event loop stopped before the coroutine could start.")
                return
            task = loop.create_task(_await(coro), context=context)
            call.task = task
            task.add_done_callback(call.settle)

        try:
            loop.call_soon_threadsafe(begin)
            wait, interval = call.finished.wait, self.interrupt_check_ival
            # Wake up now and then: an Interrupt is raised in this thread only when it
            # runs Python code.
            while not wait(interval):
                if loop.is_closed() and not call.finished.is_set():
                    # Closed before running `begin`, or after abandoning the task
                    # (it ignored its cancellation): nothing will finish the call.
                    if call.task is None and inspect.iscoroutine(coro):
                        coro.close()
                    raise RuntimeError("Event loop closed before the coroutine finished.")
        except Interrupt as e:
            # Callbacks run in order: if `begin` was scheduled, the task exists by the
            # time `cancel` runs; if not, `cancel` makes sure it never starts.
            loop.call_soon_threadsafe(call.cancel, coro)
            if not call.finished.wait(_CANCEL_GRACE_S):
                raise RuntimeError(
                    f"The coroutine did not finish within {_CANCEL_GRACE_S} s of its cancellation."
                ) from e
            raise
        return call.outcome()
