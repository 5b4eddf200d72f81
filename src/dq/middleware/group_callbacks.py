"""`GroupCallbacks`: group completion and failure callbacks, and group pipeline steps."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from dq.errors import ActorNotFound, DecodeError, QueueNotFound
from dq.group_wire import (
    COMPLETION_CALLBACKS,
    COMPLETION_UUID,
    FAILURE_CALLBACKS,
    GROUP_PIPE_TARGET,
    PIPE_GROUP,
    member_result_ref,
    results_backend_of,
    run_group,
    unchain,
)
from dq.logging import get_logger
from dq.middleware.middleware import Middleware
from dq.rate_limits import Barrier
from dq.results.errors import ResultMissing
from dq.wire import message_from_data

if TYPE_CHECKING:
    from dq.broker import Broker, MessageProxy
    from dq.message import Message
    from dq.rate_limits import RateLimiterBackend

__all__ = ["GroupCallbacks"]

#: Enqueue failures that trying again cannot fix.
_PERMANENT = (
    DecodeError,
    TypeError,
    ValueError,
    KeyError,
    QueueNotFound,
    ActorNotFound,
    RuntimeError,
)


class GroupCallbacks(Middleware):
    """Fire `dq.group` callbacks, and run groups that are pipeline steps.

    - **Completion** (Dramatiq's): after each successful message carrying
      ``group_completion_uuid`` and ``group_completion_callbacks``, a non-blocking
      `Barrier` wait on that key; the wait that clears the barrier (the group's last
      member to finish) enqueues every callback message. Counting is atomic in the
      backend, so each callback is enqueued once per run.
    - **Failure** (dq): when a message carrying ``group_failure_callbacks`` is
      dead-lettered (it failed for good), the first such member of its group — the
      key ``"<group_completion_uuid>@failed"`` is added once — enqueues every
      failure callback. The completion callbacks then never fire.
    - **Group steps** (dq): a message carrying ``pipe_group`` runs that group when it
      succeeds, its result appended to each member's arguments; the member that
      clears the group's barrier enqueues the step after the group with the list of
      the members' results.

    If a callback or a next step cannot be enqueued, the finished message is
    redelivered rather than acked (and then counts again: the barrier stays
    cleared, so the callbacks may be enqueued twice rather than never); one that can
    never be enqueued (malformed, unknown queue) is logged and dropped.

    Args:
        rate_limiter_backend: where barriers live (every process of the fleet must
            use the same one).
        barrier_ttl: ms a group's barrier lives (after its last change): a group
            must complete within it. The deprecated environment variable
            ``dramatiq_group_callback_barrier_ttl`` overrides it, with a
            ``FutureWarning``.
    """

    def __init__(
        self, rate_limiter_backend: RateLimiterBackend, *, barrier_ttl: int = 86400000
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.rate_limiter_backend = rate_limiter_backend
        from_env = os.getenv("dramatiq_group_callback_barrier_ttl")  # noqa: SIM112 - Dramatiq's name
        if from_env is not None:
            warnings.warn(
                "The dramatiq_group_callback_barrier_ttl environment variable is "
                "deprecated; pass barrier_ttl to GroupCallbacks instead.",
                FutureWarning,
                stacklevel=2,
            )
            try:
                barrier_ttl = int(from_env)
            except ValueError:
                raise ValueError(
                    "dramatiq_group_callback_barrier_ttl must be an integer number of ms, "
                    f"got {from_env!r}"
                ) from None
        self.barrier_ttl = barrier_ttl

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
        options = message.options
        spec = options.get(PIPE_GROUP)
        if spec is not None:
            self._run_group_step(broker, message, spec, result)
        key = options.get(COMPLETION_UUID)
        if not key:
            return
        callbacks = options.get(COMPLETION_CALLBACKS)
        handoff = options.get(GROUP_PIPE_TARGET)
        if not callbacks and handoff is None:
            return
        try:
            if handoff is not None:
                # Stored before this member counts itself in, so whoever clears the
                # barrier finds every member's result.
                ref = member_result_ref(key, handoff["index"])
                results_backend_of(broker).store_result(ref, result, self.barrier_ttl)
            barrier = Barrier(self.rate_limiter_backend, key, ttl=self.barrier_ttl)
            if not barrier.wait(block=False):
                return
            self._enqueue_all(broker, message, callbacks or ())
            if handoff is not None and handoff.get("next") is not None:
                self._enqueue_next(broker, message, key, handoff)
        except (*_PERMANENT, ResultMissing):
            self.logger.exception(
                "Cannot run the group callbacks of message %r; dropping them.",
                message.message_id,
            )
        except Exception:
            self.logger.exception(
                "Could not run the group callbacks of message %r; it will be redelivered.",
                message.message_id,
            )
            message.redeliver()

    def after_nack(self, broker: Broker, message: MessageProxy) -> None:
        options = message.options
        callbacks = options.get(FAILURE_CALLBACKS)
        key = options.get(COMPLETION_UUID)
        if not (callbacks and key):
            return
        try:
            if self.rate_limiter_backend.add(f"{key}@failed", 1, self.barrier_ttl):
                self._enqueue_all(broker, message, callbacks)
        except Exception:
            # The message is already dead-lettered: nothing can be redelivered.
            self.logger.exception(
                "Could not enqueue the failure callbacks of the group of message %r.",
                message.message_id,
            )

    def _run_group_step(
        self, broker: Broker, message: MessageProxy, spec: Mapping[str, Any], result: Any
    ) -> None:
        try:
            actor = broker.get_actor(message.actor_name)
            # Built with the class of the message that ran (see `_messages`).
            members = [unchain(m) for m in _messages(message, spec["children"])]
            run_group(
                broker,
                members,
                spec,
                self.rate_limiter_backend,
                self.barrier_ttl,
                previous=(result,),
                pipe_ignore=bool(actor.options.get("pipe_ignore")),
            )
        except _PERMANENT:
            self.logger.exception(
                "Cannot run the group step after message %r; failing it.", message.message_id
            )
            message.fail()
        except Exception:
            self.logger.exception(
                "Could not run the group step after message %r; it will be redelivered.",
                message.message_id,
            )
            message.redeliver()

    def _enqueue_next(
        self, broker: Broker, message: MessageProxy, key: str, handoff: Mapping[str, Any]
    ) -> None:
        backend = results_backend_of(broker)
        size = handoff["size"]
        results = [backend.get_result(member_result_ref(key, i)) for i in range(size)]
        (next_message,) = _messages(message, [handoff["next"]])
        if not next_message.options.get("pipe_ignore"):
            next_message = next_message.copy(args=(*next_message.args, results))
        broker.enqueue(next_message, delay=next_message.options.get("delay"))

    def _enqueue_all(
        self, broker: Broker, message: MessageProxy, callbacks: Iterable[Mapping[str, Any]]
    ) -> None:
        # Built first, so a malformed callback enqueues none of them; enqueued one by
        # one: they may go to different queues.
        for callback in _messages(message, callbacks):
            broker.enqueue(callback)


def _messages(message: MessageProxy, data: Iterable[Mapping[str, Any]]) -> list[Message[Any]]:
    """Return the messages ``data`` holds, built with the class of ``message``'s
    (a `dq.message.Message`, which this module cannot import: `dq.message` imports
    the composition that imports it).

    Raises:
        DecodeError: an item is not a valid message.
    """
    cls = type(message.message)
    return [message_from_data(item, cls) for item in data]
