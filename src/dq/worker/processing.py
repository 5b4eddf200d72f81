"""Processing one message: run it through its middleware and its actor, then settle
it on its consumer.

`process_message` runs the actor of a message between its middleware hooks; `settle`
then acks it (storing first the retry a middleware asked for), nacks it (a middleware
failed it) or requeues it (a middleware asked for redelivery). The worker's threads
(`dq.worker.threads`) and the single-threaded `dq.runtime.Runner` share these
functions, and the dead-lettering of the messages that cannot run or cannot be
settled: each gets its reason (`MessageProxy.death_reason`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, runtime_checkable

from dq.broker import Broker, Consumer, MessageProxy
from dq.core import DeathReason, policy
from dq.errors import ActorNotFound, BrokerConnectionError, RateLimitExceeded, Retry
from dq.logging import get_logger
from dq.message import CHECKED_OPTIONS, options_problem
from dq.middleware import MiddlewareError, SkipMessage

if TYPE_CHECKING:
    from dq.message import Message

__all__ = [
    "CAPABILITIES",
    "LOGGER_NAME",
    "STARTS",
    "SUSPECTS",
    "ReplacementStored",
    "ack_stored",
    "capabilities",
    "dead_letter",
    "dead_letter_unstorable",
    "has_results_middleware",
    "implements",
    "is_suspect",
    "mark_started",
    "process_message",
    "promote",
    "settle",
    "settle_or_dead_letter",
]

#: The logger everything the worker logs goes to, as ``dq.worker.<class>`` for a
#: class's lines (Dramatiq's names: they did not change when the worker module became
#: a package).
LOGGER_NAME = "dq.worker"

_logger = get_logger(LOGGER_NAME)


@runtime_checkable
class _Promoting(Protocol):
    def promote(self, message: MessageProxy) -> Message[Any]: ...


#: (consumer class, protocol) -> whether the class implements the protocol's methods.
_IMPLEMENTS: dict[tuple[type, type], bool] = {}


def implements(kind: type, protocol: type) -> bool:
    """``issubclass(kind, protocol)`` for a runtime-checkable protocol of methods, cached:
    the check itself walks the protocol's members every time (about 7 µs), and runs
    for every message."""
    key = (kind, protocol)
    known = _IMPLEMENTS.get(key)
    if known is None:
        known = _IMPLEMENTS[key] = issubclass(kind, protocol)
    return known


def _can_promote(consumer: Consumer) -> TypeGuard[_Promoting]:
    return implements(type(consumer), _Promoting)


def has_results_middleware(broker: Broker) -> bool:
    """Return whether ``broker`` has a middleware that stores results."""
    return broker.get_results_backend() is not None


def _throws(broker: Broker, message: MessageProxy, exception: BaseException) -> bool:
    try:
        actor = broker.get_actor(message.actor_name)
    except ActorNotFound:
        return False
    throws: Any = message.options.get("throws") or actor.options.get("throws")
    return bool(throws) and isinstance(exception, throws)


def process_message(
    broker: Broker, message: MessageProxy, logger: logging.Logger = _logger
) -> None:
    """Run the actor of ``message`` between its middleware hooks (no settling).

    The hooks and the actor may fail, skip or change the proxied message; afterwards
    `settle` decides what the consumer does with it. An exception raised by the actor
    is stored on the proxy, logged as Dramatiq logs it, and passed to the
    ``after_process_message`` hooks; it never escapes.

    A message for an unknown actor, or with an option value dq cannot honour (it
    came from the wire: `dq.message.option_problem`), is failed without running
    (the latter with ``death_reason`` `DeathReason.BAD_OPTIONS`), so `settle`
    dead-letters it.
    """
    hooks = broker._hooks
    try:
        actor = broker.get_actor(message.actor_name)
    except ActorNotFound as e:
        logger.error(
            "Received message %s for undefined actor %r; dead-lettering it.",
            message.message_id,
            message.actor_name,
        )
        message.stuff_exception(e)
        message.fail()
        return
    options = message._message.options
    if options and not CHECKED_OPTIONS.isdisjoint(options):
        problem = options_problem(options)
        if problem is not None:
            # From the wire (a foreign producer): dq's own sends refuse such values.
            logger.error(
                "Dead-lettering message %s (actor %r) without running it: %s.",
                message.message_id,
                message.actor_name,
                problem,
            )
            message.stuff_exception(ValueError(problem))
            message.death_reason = DeathReason.BAD_OPTIONS
            message.fail()
            return
    # The hooks are called here rather than through Broker._run_before/_run_after
    # (same order, same error handling): this runs for every message.
    before = hooks.before_process_message
    if before:
        try:
            for hook in before:
                try:
                    hook(broker, message)
                except MiddlewareError:
                    raise
                except Exception:
                    broker._log_hook_failure(hook)
        except SkipMessage as e:
            if message._failed:
                # As Dramatiq: the reason travels with the failed message (results,
                # StubBroker.join(fail_fast=True)).
                message.stuff_exception(e)
            logger.warning("Message %s was skipped.", message)
            broker._run_after(hooks.after_skip_message, message)
            return
    result: Any = None
    exception: BaseException | None = None
    if not message._failed:
        try:
            result = actor(*message.args, **message.kwargs)
        except BaseException as e:
            exception = e
            message.stuff_exception(e)
            _log_failure(broker, message, e, logger)
    if (
        result is not None
        and exception is None
        and "pipe_target" not in message.options
        and not has_results_middleware(broker)
    ):
        logger.warning(
            "Actor %r returned a value that is not None, but the broker has no results "
            "middleware, so the value was discarded.",
            message.actor_name,
        )
    for after in hooks.after_process_message:
        try:
            after(broker, message, result=result, exception=exception)
        except Exception:
            broker._log_hook_failure(after)


def _log_failure(
    broker: Broker, message: MessageProxy, exception: BaseException, logger: logging.Logger
) -> None:
    if isinstance(exception, Retry):
        return
    if isinstance(exception, RateLimitExceeded):
        logger.debug("Rate limit exceeded in message %s: %s", message.message_id, exception)
    elif _throws(broker, message, exception):
        logger.info("Failed to process message %s with expected exception %r.", message, exception)
    else:
        logger.error(
            "Failed to process message %s with unhandled exception.",
            message,
            exc_info=exception,
        )


#: What a consumer class adds to `Consumer`'s defaults, as bit flags (see capabilities).
SUSPECTS = 1  # it overrides `Consumer.suspect`: some of its messages may have to run alone
STARTS = 2  # it overrides `Consumer.started`: it records when messages start

#: Consumer class -> its capability flags (computed once per class).
CAPABILITIES: dict[type, int] = {}


def capabilities(kind: type) -> int:
    """Return the capability flags of a consumer class (cached: this runs per message)."""
    flags = CAPABILITIES.get(kind)
    if flags is None:
        flags = 0
        if getattr(kind, "suspect", Consumer.suspect) is not Consumer.suspect:
            flags |= SUSPECTS
        if getattr(kind, "started", Consumer.started) is not Consumer.started:
            flags |= STARTS
        CAPABILITIES[kind] = flags
    return flags


def is_suspect(consumer: Consumer, message: MessageProxy, logger: logging.Logger = _logger) -> bool:
    """Return whether ``message`` must run alone (`Consumer.suspect`).

    A consumer that cannot tell (its check failed) gets the safe answer: alone.
    """
    if not capabilities(type(consumer)) & SUSPECTS:
        return False
    try:
        return bool(consumer.suspect(message))
    except Exception as e:
        logger.warning(
            "Could not tell whether message %s (actor %r) is a suspect (%s); running it alone.",
            message.message_id,
            message.actor_name,
            e,
        )
        return True


def mark_started(
    consumer: Consumer,
    message: MessageProxy,
    logger: logging.Logger = _logger,
    *,
    alone: bool = False,
) -> None:
    """Tell a consumer that tracks it that ``message`` starts running now
    (`Consumer.started`), so that a message that kills its process is recognised
    (``max_deliveries``).

    Args:
        consumer: the message's consumer.
        message: the message.
        logger: where a failure is logged.
        alone: nothing else runs in this worker until ``message`` is settled.

    A failure to record the start is logged and the message runs anyway: the record
    only serves the delivery cap.
    """
    if not capabilities(type(consumer)) & STARTS:
        return
    try:
        consumer.started(message, alone=alone)
    except Exception as e:
        logger.warning(
            "Could not record that message %s (actor %r) started: %s.",
            message.message_id,
            message.actor_name,
            e,
        )


def settle(broker: Broker, consumer: Consumer, message: MessageProxy) -> None:
    """Settle a processed message on its consumer, with the ack/nack hooks.

    Requeue when a middleware asked for redelivery, nack when it failed the message
    (it is dead-lettered with its ``death_reason``), ack otherwise — after storing
    the replacement a middleware asked for (a retry): in one step with the ack when
    the consumer can (``replace``), else by an enqueue and then the ack. Nothing is
    acked before its replacement is stored.

    Raises:
        BrokerConnectionError: the broker could not be reached (`ReplacementStored`
            when only the ack after a stored replacement is missing).
        Exception: the settlement could not be stored for another reason (a retry
            the broker refuses, ...): use `settle_or_dead_letter` to dead-letter the
            message then.
    """
    hooks = broker._hooks
    # The proxy's flags, read directly (redelivery_requested, failed, replacement).
    if message._redeliver:
        consumer.requeue([message])
    elif message._failed:
        broker._run_before(hooks.before_nack, message)
        consumer.nack(message)
        broker._run_after(hooks.after_nack, message)
    else:
        if hooks.before_ack:
            broker._run_before(hooks.before_ack, message)
        replacement = message._replacement
        if replacement is None:
            consumer.ack(message)
        else:
            _replace(broker, consumer, message, *replacement)
        if hooks.after_ack:
            broker._run_after(hooks.after_ack, message)


def ack_stored(broker: Broker, consumer: Consumer, message: MessageProxy) -> None:
    """Finish a settlement whose replacement was stored: ack, then the after-ack hooks
    (after `ReplacementStored`).

    Raises:
        BrokerConnectionError: the broker could not be reached.
    """
    consumer.ack(message)
    if broker._hooks.after_ack:
        broker._run_after(broker._hooks.after_ack, message)


def settle_or_dead_letter(
    broker: Broker, consumer: Consumer, message: MessageProxy, logger: logging.Logger = _logger
) -> None:
    """`settle` the message; if what settling must store cannot be stored for any
    reason but the connection, dead-letter it instead (`dead_letter_unstorable`).

    Raises:
        BrokerConnectionError: the broker could not be reached; nothing was settled
            (`ReplacementStored`: all but the ack). Try again later.
    """
    try:
        settle(broker, consumer, message)
    except BrokerConnectionError:
        raise
    except Exception as e:
        dead_letter_unstorable(broker, consumer, message, e, logger)


def dead_letter_unstorable(
    broker: Broker,
    consumer: Consumer,
    message: MessageProxy,
    error: Exception,
    logger: logging.Logger = _logger,
) -> None:
    """Dead-letter a message whose settlement could not be stored for a reason other
    than the connection (``error``: a retry whose delay the broker refuses...), with
    ``death_reason`` `DeathReason.UNSTORABLE`, which frees its consumer's slot; log
    which message, that it is dead-lettered, and why.

    When the failed settlement was a dead-lettering already, only the failure is
    logged: the consumer keeps the message until it closes.

    Raises:
        BrokerConnectionError: the broker could not be reached (nothing changed).
    """
    if message._failed and not message._redeliver:
        logger.error(
            "Could not dead-letter message %s (actor %r): %s. Its consumer keeps it "
            "until it closes, and it is then returned to its queue.",
            message.message_id,
            message.actor_name,
            error,
            exc_info=error,
        )
        return
    what = (
        "it could not be returned to its queue"
        if message._redeliver
        else "what replaces it (a retry) could not be stored"
        if message._replacement is not None
        else "it could not be acked"
    )
    logger.error(
        "Dead-lettering message %s (actor %r): %s: %s",
        message.message_id,
        message.actor_name,
        what,
        error,
        exc_info=error,
    )
    if message._exception is None:
        message.stuff_exception(error)
    dead_letter(broker, consumer, message, DeathReason.UNSTORABLE, logger)


def dead_letter(
    broker: Broker,
    consumer: Consumer,
    message: MessageProxy,
    reason: DeathReason,
    logger: logging.Logger = _logger,
) -> None:
    """Fail ``message`` and nack it, with the nack hooks, giving ``reason`` to the
    consumer (``message.death_reason``).

    Raises:
        BrokerConnectionError: the broker could not be reached (nothing changed).
    """
    message.death_reason = reason
    message._redeliver = False
    message.fail()
    hooks = broker._hooks
    broker._run_before(hooks.before_nack, message)
    try:
        consumer.nack(message)
    except BrokerConnectionError:
        raise
    except Exception as e:
        logger.error(
            "Could not dead-letter message %s (actor %r): %s. Its consumer keeps it until "
            "it closes, and it is then returned to its queue.",
            message.message_id,
            message.actor_name,
            e,
            exc_info=True,
        )
        return
    broker._run_after(hooks.after_nack, message)


class ReplacementStored(BrokerConnectionError):
    """The replacement of a message was stored, and acking the message then failed
    for want of a connection: only the ack is left to do (`ack_stored`)."""


@runtime_checkable
class _Replacing(Protocol):
    def replace(self, message: MessageProxy, new: Message[Any], delay: int | None) -> Any: ...


def _can_replace(consumer: Consumer) -> TypeGuard[_Replacing]:
    return implements(type(consumer), _Replacing)


def _replace(
    broker: Broker, consumer: Consumer, message: MessageProxy, new: Message[Any], delay: int | None
) -> None:
    """Store ``new`` and ack ``message``: in one atomic step when the consumer can,
    else by an enqueue, then the ack.

    Raises:
        ReplacementStored: ``new`` is stored; the ack failed for want of a connection.
        BrokerConnectionError: nothing was stored (no connection).
        Exception: ``new`` cannot be stored (the broker refuses it); nothing was.
    """
    if _can_replace(consumer):
        consumer.replace(message, new, delay)  # one atomic step
        return
    broker.enqueue(new, delay=delay)
    try:
        consumer.ack(message)
    except BrokerConnectionError as e:
        raise ReplacementStored(str(e)) from e


def promote(broker: Broker, consumer: Consumer, message: MessageProxy) -> None:
    """Move a delayed message whose eta has passed to its canonical queue: in one step
    when the consumer can (stored on the queue, forgotten on the delay queue), else by
    storing a copy without the eta, then acking the delayed one.

    Raises:
        BrokerConnectionError: the broker could not be reached.
        Exception: the broker refuses to store the copy.
    """
    if _can_promote(consumer) and policy.is_delay_queue(message.queue_name):
        consumer.promote(message)  # one step: stored on q, forgotten on q.DQ
        return
    broker.enqueue(policy.promoted(message.message))
    consumer.ack(message)
