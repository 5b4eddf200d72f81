"""`ShutdownNotifications`: interrupt opted-in actors when their worker stops."""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING, Any

from dq.logging import get_logger
from dq.middleware.middleware import Middleware
from dq.threading import (
    Interrupt,
    interrupt_problem,
    raise_thread_exception,
)

if TYPE_CHECKING:
    from dq.actor import Actor
    from dq.broker import Broker, MessageProxy
    from dq.message import Message

__all__ = ["Shutdown", "ShutdownNotifications"]


class Shutdown(Interrupt):
    """Raised inside a worker thread whose worker is shutting down."""


class ShutdownNotifications(Middleware):
    """Raise `Shutdown` inside running actors that opted in, when the worker stops.

    Other actors are left to finish. The exception is raised when the thread next
    runs Python code (CPython only), so a blocking system call is not cut short.

    Args:
        notify_shutdown: the default; the actor option ``notify_shutdown`` overrides
            it, and a non-None message option overrides both.
    """

    def __init__(self, notify_shutdown: bool = False) -> None:
        self.logger = get_logger(__name__, type(self))
        self.notify_shutdown = notify_shutdown
        self._lock = threading.Lock()
        self._threads: set[int] = set()

    @property
    def actor_options(self) -> set[str]:
        return {"notify_shutdown"}

    def should_notify(self, actor: Actor[Any, Any], message: Message[Any] | MessageProxy) -> bool:
        """Return whether ``message`` of ``actor`` is to be interrupted on shutdown."""
        # policy.option(..., rule="not-none"), inlined: this runs for every message.
        value = message.options.get("notify_shutdown")
        if value is None:
            value = actor.options.get("notify_shutdown")
        return bool(self.notify_shutdown if value is None else value)

    def after_process_boot(self, broker: Broker) -> None:
        """Warn when threads cannot be interrupted here."""
        problem = interrupt_problem()
        if problem is not None:
            warnings.warn(f"ShutdownNotifications {problem}.", RuntimeWarning, stacklevel=2)

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        """Remember the current thread if its message opted in."""
        current = message.message  # its fields are plain reads (the proxy's, properties)
        if self.should_notify(broker.get_actor(current.actor_name), current):
            with self._lock:
                self._threads.add(threading.get_ident())

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Forget the current thread."""
        if self._threads:  # (see _forget)
            self._forget()

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        """Forget the current thread."""
        self._forget()

    def _forget(self) -> None:
        ident = threading.get_ident()
        # Only this thread adds or removes its own id, so the unlocked check is safe.
        if ident in self._threads:
            with self._lock:
                self._threads.discard(ident)

    def before_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        """Raise `Shutdown` in every thread running an opted-in message."""
        with self._lock:
            for thread_id in sorted(self._threads):
                self.logger.info(
                    "Worker shutdown notification. Raising exception in worker thread %r.",
                    thread_id,
                )
                raise_thread_exception(thread_id, Shutdown)
