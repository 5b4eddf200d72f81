"""`Callbacks`: tell another actor how a message ended."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dq.core import policy
from dq.errors import ActorNotFound
from dq.logging import get_logger
from dq.middleware.middleware import Middleware

if TYPE_CHECKING:
    from dq.broker import Broker, MessageProxy

__all__ = ["Callbacks"]


class Callbacks(Middleware):
    """Send a message to another actor after each attempt of a message.

    Options (actor **names**; a truthy message option wins over the actor's):

    - ``on_success``: after a successful run, that actor gets
      ``(message_dict, result)``.
    - ``on_failure``: after every run that raised (retried or not), that actor gets
      ``(message_dict, {"type": exception class name, "message": str(exception)})``.

    ``message_dict`` is the message as ``Message.asdict()`` gives it, with the options
    recorded so far (``retries`` already incremented when Retries runs first, as in
    the default stack). The target actor must be declared on this broker; otherwise
    the problem is logged and nothing is sent.
    """

    def __init__(self) -> None:
        self.logger = get_logger(__name__, type(self))

    @property
    def actor_options(self) -> set[str]:
        return {"on_failure", "on_success"}

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        current = message.message  # its fields are plain reads (the proxy's, properties)
        actor = broker.get_actor(current.actor_name)
        # policy.option(..., rule="truthy"), inlined: this runs for every message.
        if exception is None:
            target = current.options.get("on_success") or actor.options.get("on_success")
            if target:
                self._send(broker, target, message, message.message.asdict(), result)
        else:
            target = policy.option(
                "on_failure", message.options, actor.options, None, rule="truthy"
            )
            if target:
                failure = {"type": type(exception).__name__, "message": str(exception)}
                self._send(broker, target, message, message.message.asdict(), failure)

    def _send(self, broker: Broker, target: Any, message: MessageProxy, *args: Any) -> None:
        # An actor object given as an actor option (Dramatiq cannot resolve those)
        # stands for its name.
        name = getattr(target, "actor_name", target)
        try:
            target_actor = broker.get_actor(name)
        except ActorNotFound:
            self.logger.error(
                "Callback actor %r of message %r is not declared on this broker; nothing was sent.",
                name,
                message.message_id,
            )
            return
        try:
            target_actor.send(*args)
        except Exception:
            self.logger.exception(
                "Could not send the callback to %r for message %r.", name, message.message_id
            )
