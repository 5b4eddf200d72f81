"""`Results`: store what actors return (or how they failed) in a result backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from dq.core import policy
from dq.errors import ActorNotFound
from dq.logging import get_logger
from dq.middleware.middleware import Middleware
from dq.results.backend import ResultBackend

if TYPE_CHECKING:
    from dq.broker import Broker, MessageProxy

__all__ = ["DEFAULT_RESULT_TTL", "Results"]

#: How long results are kept by default, in ms (10 minutes).
DEFAULT_RESULT_TTL: Final = 600000


class Results(Middleware):
    """Store actor results in ``backend``, for `dq.Message.get_result` to read.

    What is stored, for actors with ``store_results`` (Dramatiq's rules, and wire
    format, so Dramatiq clients read dq results and the reverse):

    - the return value, when the actor succeeded;
    - the exception, when the message failed for good: it is dead-lettered (retries
      exhausted, ``throws``, age limit...), or, without a `Retries` middleware, it
      raised and no retry was scheduled. Reading it raises `ResultFailure` with the
      exception's type name and message. A failed attempt that will be retried stores
      nothing;
    - ``None``, when a middleware skipped the message without failing it.

    Failures are stored before the message is settled, results right after the actor
    returned (before the ack). A result that cannot be encoded is replaced by a stored
    failure (``TypeError``) so readers do not wait in vain; when the backend cannot be
    reached, the message is not acked but returned to its queue, to run again.

    Args:
        backend: where results are stored.
        store_results: the default of the ``store_results`` option.
        result_ttl: the default of the ``result_ttl`` option, in ms; None or 0 means
            `DEFAULT_RESULT_TTL`.

    Actor (or message) options: ``store_results`` (bool) and ``result_ttl`` (ms); a
    message option wins over the actor's, which wins over the constructor's.

    Raises:
        TypeError: ``backend`` is not a `ResultBackend`.
    """

    def __init__(
        self,
        *,
        backend: ResultBackend,
        store_results: bool = False,
        result_ttl: int | None = None,
    ) -> None:
        if not isinstance(backend, ResultBackend):
            raise TypeError(
                f"Results(backend=...) expects a dq.results.ResultBackend, got {backend!r}"
            )
        self.logger = get_logger(__name__, type(self))
        self.backend = backend
        self.store_results = store_results
        self.result_ttl: int = result_ttl or DEFAULT_RESULT_TTL

    @property
    def results_backend(self) -> ResultBackend:
        """The backend (what `dq.Broker.get_results_backend` returns)."""
        return self.backend

    @property
    def actor_options(self) -> set[str]:
        return {"store_results", "result_ttl"}

    def _lookup_options(self, broker: Broker, message: MessageProxy) -> tuple[bool, int]:
        """Return ``(store_results, result_ttl)`` for ``message``; an unknown actor
        stores nothing."""
        try:
            actor = broker.get_actor(message.actor_name)
        except ActorNotFound:
            return False, 0
        options, actor_options = message.options, actor.options
        store = policy.option("store_results", options, actor_options, self.store_results)
        ttl = policy.option("result_ttl", options, actor_options, self.result_ttl)
        return bool(store), ttl

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        store_results, result_ttl = self._lookup_options(broker, message)
        if not store_results:
            if result is not None and "pipe_target" not in message.options:
                self.logger.warning(
                    "Actor %r returned a value that is not None, but its store_results "
                    "option is not True, so the value was discarded.",
                    message.actor_name,
                )
            return
        if exception is not None or message.failed:
            return  # stored when the message is settled, if it failed for good
        try:
            self.backend.store_result(message, result, result_ttl)
        except (TypeError, ValueError) as e:
            self.logger.error(
                "Could not store the result of message %s: %s; storing the error instead.",
                message.message_id,
                e,
            )
            self._store_failure(message, e, result_ttl)
        except Exception:
            self.logger.exception(
                "Could not store the result of message %s; it will be redelivered.",
                message.message_id,
            )
            message.redeliver()

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        store_results, result_ttl = self._lookup_options(broker, message)
        if store_results and not message.failed:
            # A skipped message that failed (AgeLimit) is stored when it is nacked.
            self.backend.store_result(message, None, result_ttl)

    def before_nack(self, broker: Broker, message: MessageProxy) -> None:
        if not message.failed:
            return
        store_results, result_ttl = self._lookup_options(broker, message)
        if store_results:
            self._store_failure(message, message._exception or Exception("unknown"), result_ttl)

    def before_ack(self, broker: Broker, message: MessageProxy) -> None:
        # A failed attempt acked with no retry scheduled (no Retries middleware) is
        # its final outcome too (Dramatiq stores nothing, so readers time out).
        if message._exception is None or message.replacement is not None or message.failed:
            return
        store_results, result_ttl = self._lookup_options(broker, message)
        if store_results:
            self._store_failure(message, message._exception, result_ttl)

    def _store_failure(self, message: MessageProxy, exception: BaseException, ttl: int) -> None:
        try:
            self.backend.store_exception(message, exception, ttl)
        except Exception:
            self.logger.exception("Could not store the failure of message %s.", message.message_id)
