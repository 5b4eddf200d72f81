"""`CurrentMessage`: the message being processed, for code running inside an actor."""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any, ClassVar

from dq.middleware.middleware import Middleware

if TYPE_CHECKING:
    from dq.broker import Broker, MessageProxy
    from dq.message import Message

__all__ = ["CurrentMessage"]


class CurrentMessage(Middleware):
    """Expose the message being processed to the actor's code.

    Each worker thread (or context) sees its own message: the middleware records it
    before the actor runs and forgets it afterwards. The message lives in a context
    variable, and an async actor's coroutine runs in a copy of its worker thread's
    context (`dq.asyncio`), so coroutines, and the tasks they create, see it too.

    Example::

        broker.add_middleware(CurrentMessage())

        @dq.actor
        def example() -> None:
            message = CurrentMessage.get_current_message()
    """

    _MESSAGE: ClassVar[contextvars.ContextVar[Message[Any] | None]] = contextvars.ContextVar(
        "dq_current_message", default=None
    )

    @classmethod
    def get_current_message(cls) -> Message[Any] | None:
        """Return the message the current thread is processing, or None outside actors."""
        return cls._MESSAGE.get()

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        self._MESSAGE.set(message.message)

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        self._MESSAGE.set(None)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        # Dramatiq leaves the skipped message in place; forgetting it is safer.
        self._MESSAGE.set(None)
