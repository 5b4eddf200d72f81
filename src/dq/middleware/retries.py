"""`Retries`: retry failed messages with exponential backoff."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dq import _sources as runtime
from dq.core import policy
from dq.errors import ActorNotFound, Retry
from dq.logging import get_logger
from dq.middleware.middleware import Middleware
from dq.options import check_options

if TYPE_CHECKING:
    from dq.actor import Actor
    from dq.broker import Broker, MessageProxy

__all__ = ["DEFAULT_MAX_BACKOFF", "DEFAULT_MIN_BACKOFF", "Retries"]

#: The default minimum backoff of a retry, in ms (15 seconds).
DEFAULT_MIN_BACKOFF = policy.DEFAULT_MIN_BACKOFF

#: The default maximum backoff of a retry, in ms (7 days); also the cap on any
#: computed backoff.
DEFAULT_MAX_BACKOFF = policy.DEFAULT_MAX_BACKOFF

#: Frames kept in the ``traceback`` option.
TRACEBACK_LIMIT = 30


class Retries(Middleware):
    """Retry messages whose actor raised, with exponential backoff and jitter.

    A failed attempt records ``retries`` (incremented), ``traceback`` and
    ``requeue_timestamp`` on the message, then either enqueues the retry — a new
    message with the same id, delayed — or gives up and fails the message, which
    dead-letters it. The retry is stored before the original is acked. While the
    broker is unreachable the worker keeps trying; if the broker refuses the retry
    (a ``Retry(delay=...)`` past the year 9999...), the original is dead-lettered
    instead, with ``death_reason`` `DeathReason.UNSTORABLE`.

    Without this middleware, failed messages are acked rather than dead-lettered;
    to stop retrying an actor, give it ``max_retries=0`` instead of removing it.

    Raise `dq.Retry` from an actor to retry without an error being logged
    (``Retry(delay=...)`` replaces the computed backoff).

    Args:
        max_retries: retries allowed after the first attempt (None: unlimited).
        min_backoff: the backoff of the first retry, in ms (default 15 s; 0 also
            means the default).
        max_backoff: the largest backoff, in ms (default, and at most, 7 days; 0 also
            means the default).
        retry_when: ``retry_when(retries_so_far, exception)`` decides alone whether
            to retry, instead of ``max_retries``.

    Raises:
        ValueError: ``max_retries`` is not an integer >= 0 or None, or a backoff is
            not a number of ms >= 0.

    Actor options: ``max_retries``, ``min_backoff``, ``max_backoff`` (message option,
    else actor option, else the constructor's value); ``retry_when`` (actor option,
    else the constructor's); ``throws`` (an exception class, or a tuple of them, that
    fails the message at once); ``on_retry_exhausted`` (the name of an actor sent
    ``(message_dict, {"retries": n, "max_retries": m})`` when retries run out).
    """

    def __init__(
        self,
        *,
        max_retries: int | None = 20,
        min_backoff: int | None = None,
        max_backoff: int | None = None,
        retry_when: Callable[[int, BaseException], bool] | None = None,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.max_retries = max_retries
        self.min_backoff = min_backoff or DEFAULT_MIN_BACKOFF
        self.max_backoff = max_backoff or DEFAULT_MAX_BACKOFF
        check_options(
            {
                "max_retries": max_retries,
                "min_backoff": self.min_backoff,
                "max_backoff": self.max_backoff,
            },
            what="Retries settings",
        )
        self.retry_when = retry_when

    @property
    def actor_options(self) -> set[str]:
        return {
            "max_retries",
            "min_backoff",
            "max_backoff",
            "retry_when",
            "throws",
            "on_retry_exhausted",
        }

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            return
        actor = broker.get_actor(message.actor_name)
        try:
            retries_so_far, max_retries, decision = self._decide(actor, message, exception)
        except Exception:
            # A malformed option or a failing retry_when: keep the message (in the
            # dead-letter queue) rather than ack it with no retry.
            self.logger.exception(
                "Could not decide whether to retry message %r; failing it.", message.message_id
            )
            message.fail()
            return

        if isinstance(decision, policy.GiveUp) and decision.reason == "throws":
            self.logger.info("Aborting message %r.", message.message_id)
            message.fail()
            return

        attempt = policy.failed_attempt(
            message.message,
            traceback_text="".join(traceback.format_exception(exception, limit=TRACEBACK_LIMIT)),
            now_ms=runtime.get_clock().now_ms(),
        )
        message.update_message(attempt)

        if isinstance(decision, policy.GiveUp):
            self.logger.warning("Retries exceeded for message %r.", message.message_id)
            message.fail()
            self._notify_exhausted(broker, actor, message, retries_so_far, max_retries)
            return

        retry = attempt.copy(queue_name=policy.q_name(attempt.queue_name)).without_option("eta")
        self.logger.info(
            "Retrying message %r in %d milliseconds.", message.message_id, decision.delay_ms
        )
        # Stored when the worker settles the message: with its ack in one atomic step
        # on brokers that can, else before the ack (if the broker refuses it, the
        # original is dead-lettered instead of being acked: DeathReason.UNSTORABLE).
        message.replace_with(retry, delay=decision.delay_ms)

    def _decide(
        self,
        actor: Actor[Any, Any],
        message: MessageProxy,
        exception: BaseException,
    ) -> tuple[int, int | None, policy.RetryIn | policy.GiveUp]:
        """Return the failed attempts so far, the effective ``max_retries`` and what
        to do with the message.

        Raises:
            TypeError, ValueError: the message's ``retries`` option is not an integer,
                or the raised ``Retry`` has an invalid delay.
        """
        options, actor_options = message.options, actor.options
        retries_so_far = options.get("retries") or 0
        if isinstance(retries_so_far, bool) or not isinstance(retries_so_far, int):
            raise TypeError(f"option 'retries' must be an integer, got {retries_so_far!r}")
        throws = self._throws(message, actor)
        throws_matched = throws is not None and isinstance(exception, throws)
        max_retries: int | None = policy.option(
            "max_retries", options, actor_options, self.max_retries
        )
        # retry_when is never read from the message (it cannot travel on the wire).
        retry_when = policy.option("retry_when", {}, actor_options, self.retry_when)
        verdict = None
        if retry_when is not None and not throws_matched:
            verdict = bool(retry_when(retries_so_far, exception))
        explicit_delay = exception.delay if isinstance(exception, Retry) else None
        if explicit_delay is not None:
            if isinstance(explicit_delay, bool) or not isinstance(explicit_delay, int | float):
                raise TypeError(f"Retry.delay must be a number of ms, got {explicit_delay!r}")
            if explicit_delay < 0:
                raise ValueError(f"Retry.delay must be >= 0 ms, got {explicit_delay!r}")
            explicit_delay = int(explicit_delay)
        random = runtime.get_random()
        decision = policy.retry_decision(
            retries_so_far=retries_so_far,
            max_retries=max_retries,
            throws_matched=throws_matched,
            retry_when_verdict=verdict,
            explicit_delay_ms=explicit_delay,
            min_backoff=policy.option("min_backoff", options, actor_options, self.min_backoff),
            max_backoff=policy.option("max_backoff", options, actor_options, self.max_backoff),
            draw=random.random(),
            cap_draw=random.random(),
        )
        return retries_so_far, max_retries, decision

    def _throws(
        self, message: MessageProxy, actor: Actor[Any, Any]
    ) -> type[BaseException] | tuple[type[BaseException], ...] | None:
        """Return the exception classes that fail the message at once, if any.

        A truthy message option wins over the actor's (Dramatiq's rule); a value that
        is not exception classes (it cannot come from JSON) is ignored, with an error.
        """
        for source, value in (
            ("message", message.options.get("throws")),
            ("actor", actor.options.get("throws")),
        ):
            if not value:
                continue
            if _is_exception_classes(value):
                return value  # type: ignore[no-any-return]  # checked just above
            self.logger.error(
                "Ignoring the %s option throws=%r of message %r: it must be an exception "
                "class or a tuple of them.",
                source,
                value,
                message.message_id,
            )
        return None

    def _notify_exhausted(
        self,
        broker: Broker,
        actor: Actor[Any, Any],
        message: MessageProxy,
        retries_so_far: int,
        max_retries: int | None,
    ) -> None:
        name = policy.option(
            "on_retry_exhausted", message.options, actor.options, None, rule="truthy"
        )
        if not name:
            return
        try:
            target = broker.get_actor(name)
        except ActorNotFound:
            self.logger.error(
                "on_retry_exhausted actor %r of message %r is not declared on this broker; "
                "nothing was sent.",
                name,
                message.message_id,
            )
            return
        try:
            target.send(
                message.message.asdict(), {"retries": retries_so_far, "max_retries": max_retries}
            )
        except Exception:
            self.logger.exception(
                "Could not notify %r that message %r exhausted its retries.",
                name,
                message.message_id,
            )


def _is_exception_classes(value: object) -> bool:
    """Return whether ``value`` is a valid second argument of ``isinstance`` made of
    exception classes."""
    if isinstance(value, tuple):
        return all(_is_exception_classes(v) for v in value)
    return isinstance(value, type) and issubclass(value, BaseException)
