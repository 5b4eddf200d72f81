"""`AgeLimit`: dead-letter messages that waited too long, without running them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dq import _sources as runtime
from dq.core import policy
from dq.logging import get_logger
from dq.middleware.middleware import Middleware, SkipMessage
from dq.options import check_options

if TYPE_CHECKING:
    from collections.abc import Mapping

    from dq.broker import Broker, MessageProxy

__all__ = ["AgeLimit"]


def message_or_actor(
    key: str,
    message_options: Mapping[str, Any],
    actor_options: Mapping[str, Any],
    default: Any,
) -> Any:
    """Dramatiq's lookup for ``max_age`` and ``time_limit``: the message's value when
    truthy, else the actor's value when the actor has the key (even a falsy one), else
    ``default``."""
    return message_options.get(key) or actor_options.get(key, default)


class AgeLimit(Middleware):
    """Fail (dead-letter) messages older than their age limit instead of running them.

    A message's age counts from when it was built (``message_timestamp``, which
    retries keep), so time spent waiting between retries counts too.

    Args:
        max_age: the default limit, in ms; None (or 0) means no limit. The actor
            option ``max_age`` overrides it, and a truthy ``max_age`` message option
            overrides both.

    Raises:
        ValueError: ``max_age`` is not a number of ms >= 0 or None.
    """

    def __init__(self, *, max_age: int | None = None) -> None:
        check_options({"max_age": max_age}, what="AgeLimit settings")
        self.logger = get_logger(__name__, type(self))
        self.max_age = max_age

    @property
    def actor_options(self) -> set[str]:
        return {"max_age"}

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        """Fail the message and raise `SkipMessage` when it is past its age limit."""
        current = message.message  # its fields are plain reads (the proxy's, properties)
        actor = broker.get_actor(current.actor_name)
        # message_or_actor, inlined: this runs for every message.
        max_age = current.options.get("max_age") or actor.options.get("max_age", self.max_age)
        if not max_age:
            return  # no limit (policy.is_too_old): no need to read the clock
        now = runtime._clock.now_ms()
        if policy.is_too_old(current.message_timestamp, now, max_age):
            self.logger.warning("Message %r has exceeded its age limit.", message.message_id)
            message.fail()
            raise SkipMessage("Message age limit exceeded")
