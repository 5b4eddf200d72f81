"""`Middleware`: the base class of every middleware, with every hook typed."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dq.actor import Actor
    from dq.broker import Broker, MessageProxy
    from dq.message import Message
    from dq.results.backend import ResultBackend

__all__ = ["HOOK_NAMES", "Middleware", "MiddlewareError", "SkipMessage"]


class MiddlewareError(Exception):
    """Base class of the errors middleware raise to steer processing."""


class SkipMessage(MiddlewareError):
    """Raise from ``before_process_message`` to skip the message (the actor won't run)."""


class Middleware:
    """Base class of middleware: every hook is a no-op until a subclass overrides it.

    ``broker`` is always the first argument. Brokers call only the hooks a subclass
    overrides (they look them up once, when the middleware is added), so an unused
    hook costs nothing per message.
    """

    @property
    def actor_options(self) -> set[str]:
        """The actor options this middleware understands."""
        return set()

    @property
    def forks(self) -> list[Callable[[], int]]:
        """Functions the CLI runs in processes of their own."""
        return []

    @property
    def results_backend(self) -> ResultBackend | None:
        """Where this middleware stores actors' results, if it does (a dq addition:
        `dq.results.Results` does; `dq.Broker.get_results_backend` asks each
        middleware)."""
        return None

    def before_ack(self, broker: Broker, message: MessageProxy) -> None:
        """Called before a message is acknowledged."""

    def after_ack(self, broker: Broker, message: MessageProxy) -> None:
        """Called after a message was acknowledged."""

    def before_nack(self, broker: Broker, message: MessageProxy) -> None:
        """Called before a message is rejected (dead-lettered)."""

    def after_nack(self, broker: Broker, message: MessageProxy) -> None:
        """Called after a message was rejected (dead-lettered)."""

    def before_declare_actor(self, broker: Broker, actor: Actor[Any, Any]) -> None:
        """Called before an actor is declared."""

    def after_declare_actor(self, broker: Broker, actor: Actor[Any, Any]) -> None:
        """Called after an actor was declared."""

    def before_declare_queue(self, broker: Broker, queue_name: str) -> None:
        """Called before a queue is declared."""

    def after_declare_queue(self, broker: Broker, queue_name: str) -> None:
        """Called after a queue was declared."""

    def after_declare_delay_queue(self, broker: Broker, queue_name: str) -> None:
        """Called after a delay queue was declared."""

    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        """Called before a message is enqueued (retries included)."""

    def after_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        """Called after a message was enqueued."""

    def before_delay_message(self, broker: Broker, message: MessageProxy) -> None:
        """Called before a delayed message is held in worker memory."""

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        """Called before the actor runs; raise `SkipMessage` to skip it."""

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Called after the actor ran (or raised)."""

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        """Called instead of ``after_process_message`` when a message was skipped."""

    def after_process_boot(self, broker: Broker) -> None:
        """Called once per worker process after the broker is loaded."""

    def before_worker_boot(self, broker: Broker, worker: Any) -> None:
        """Called before a worker starts."""

    def after_worker_boot(self, broker: Broker, worker: Any) -> None:
        """Called after a worker started."""

    def before_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        """Called before a worker stops."""

    def after_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        """Called after a worker stopped."""

    def after_consumer_thread_boot(self, broker: Broker, thread: Any) -> None:
        """Called when a consumer thread starts."""

    def before_consumer_thread_shutdown(self, broker: Broker, thread: Any) -> None:
        """Called when a consumer thread exits."""

    def after_worker_thread_boot(self, broker: Broker, thread: Any) -> None:
        """Called when a worker thread starts."""

    def before_worker_thread_shutdown(self, broker: Broker, thread: Any) -> None:
        """Called when a worker thread exits."""


#: Every hook, by name (the broker's hook table has one field per name).
HOOK_NAMES: tuple[str, ...] = tuple(
    name for name in vars(Middleware) if name.startswith(("before_", "after_"))
)
