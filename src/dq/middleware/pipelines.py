"""`Pipelines`: feed each pipeline step's result into the next step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dq.core import policy
from dq.errors import ActorNotFound, DecodeError, QueueNotFound
from dq.group_wire import PIPE_TARGET
from dq.logging import get_logger
from dq.middleware.middleware import Middleware
from dq.wire import message_from_data

if TYPE_CHECKING:
    from dq.broker import Broker, MessageProxy
    from dq.message import Message

__all__ = ["Pipelines"]

#: Enqueue failures that trying again cannot fix.
_PERMANENT = (DecodeError, TypeError, ValueError, QueueNotFound, ActorNotFound)


class Pipelines(Middleware):
    """Enqueue the next step of a pipeline once a step succeeds.

    Options:

    - ``pipe_target``: the next step, as a message dict (set by `dq.pipeline`).
    - ``pipe_ignore``: when truthy on the next step's options, or on the finished
      actor's options, the result is not appended to the next step's arguments.

    The next step is enqueued with the delay of its own ``delay`` option. If that
    enqueue fails, the finished message is redelivered rather than acked (nothing is
    acked before what replaces it is stored); a next step that can never be enqueued
    (malformed, unknown queue) fails the finished message instead, which keeps it
    in the dead-letter queue.
    """

    def __init__(self) -> None:
        self.logger = get_logger(__name__, type(self))

    @property
    def actor_options(self) -> set[str]:
        return {"pipe_ignore", PIPE_TARGET}

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is not None or message.failed:
            return
        target = message.options.get(PIPE_TARGET)
        if target is None:
            return
        actor = broker.get_actor(message.actor_name)
        try:
            # The class of the message that ran: a `dq.message.Message`, which this
            # module cannot import (`dq.message` imports the broker, which imports it).
            next_message: Message[Any] = message_from_data(target, type(message.message))
            ignore = policy.option(
                "pipe_ignore", next_message.options, actor.options, None, rule="truthy"
            )
            if not ignore:
                next_message = next_message.copy(args=(*next_message.args, result))
            broker.enqueue(next_message, delay=next_message.options.get("delay"))
        except _PERMANENT:
            self.logger.exception(
                "Cannot enqueue the next pipeline step of message %r; failing it.",
                message.message_id,
            )
            message.fail()
        except Exception:
            self.logger.exception(
                "Could not enqueue the next pipeline step of message %r; it will be redelivered.",
                message.message_id,
            )
            message.redeliver()
