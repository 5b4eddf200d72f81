"""`Broker`, `Consumer`, `MessageProxy`, and the process-global broker.

`Broker` is Dramatiq's broker API. Concrete brokers are interpreters of `dq.core`:
each operation builds a command, applies it, performs the step's effects and turns
its events into middleware hooks.
"""

from __future__ import annotations

import abc
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, Self, TypeVar, overload

import attrs

from dq.core import DeathReason, FrozenDict
from dq.errors import ActorNotFound
from dq.logging import get_logger
from dq.middleware import Middleware, default_middleware
from dq.middleware.middleware import HOOK_NAMES, MiddlewareError

if TYPE_CHECKING:
    from dq.actor import Actor
    from dq.message import Message
    from dq.results.backend import ResultBackend

__all__ = ["Broker", "Consumer", "MessageProxy", "get_broker", "global_broker", "set_broker"]

P = ParamSpec("P")
M = TypeVar("M", bound="Message[Any]")


def _overrides(middleware: Middleware, name: str) -> bool:
    return getattr(type(middleware), name) is not getattr(Middleware, name)


class _AfterProcess(Protocol):
    def __call__(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = ...,
        exception: BaseException | None = ...,
    ) -> None: ...


_OnMessage = tuple[Callable[["Broker", "MessageProxy"], None], ...]
_OnActor = tuple[Callable[["Broker", "Actor[Any, Any]"], None], ...]
_OnQueue = tuple[Callable[["Broker", str], None], ...]
_OnEnqueue = tuple[Callable[["Broker", "Message[Any]", int | None], None], ...]
_OnObject = tuple[Callable[["Broker", Any], None], ...]  # a worker or a thread


@attrs.frozen
class HookTable:
    """For each hook, the bound methods of the middleware that override it, in order.

    Built once per change of the middleware list; dispatch walks a typed tuple, and
    hooks no middleware overrides cost nothing.
    """

    before_ack: _OnMessage = ()
    after_ack: _OnMessage = ()
    before_nack: _OnMessage = ()
    after_nack: _OnMessage = ()
    before_declare_actor: _OnActor = ()
    after_declare_actor: _OnActor = ()
    before_declare_queue: _OnQueue = ()
    after_declare_queue: _OnQueue = ()
    after_declare_delay_queue: _OnQueue = ()
    before_enqueue: _OnEnqueue = ()
    after_enqueue: _OnEnqueue = ()
    before_delay_message: _OnMessage = ()
    before_process_message: _OnMessage = ()
    after_process_message: tuple[_AfterProcess, ...] = ()
    after_skip_message: _OnMessage = ()
    after_process_boot: tuple[Callable[[Broker], None], ...] = ()
    before_worker_boot: _OnObject = ()
    after_worker_boot: _OnObject = ()
    before_worker_shutdown: _OnObject = ()
    after_worker_shutdown: _OnObject = ()
    after_consumer_thread_boot: _OnObject = ()
    before_consumer_thread_shutdown: _OnObject = ()
    after_worker_thread_boot: _OnObject = ()
    before_worker_thread_shutdown: _OnObject = ()

    @classmethod
    def build(cls, middleware: Sequence[Middleware]) -> HookTable:
        """Return the table for ``middleware``: ``before_*`` in list order, ``after_*``
        in reverse list order (Dramatiq's order)."""
        table: dict[str, tuple[Any, ...]] = {}
        for name in HOOK_NAMES:
            ordered = middleware if name.startswith("before_") else list(reversed(middleware))
            table[name] = tuple(getattr(m, name) for m in ordered if _overrides(m, name))
        return cls(**table)


class Broker(abc.ABC):
    """Base class of brokers (Dramatiq's ``Broker`` API).

    Args:
        middleware: the middleware stack; None installs one fresh instance of each
            class in `dq.middleware.default_middleware`; a list (even empty) is used
            as given.
    """

    def __init__(self, middleware: list[Middleware] | None = None) -> None:
        self.logger = get_logger(__name__, type(self))
        self.actors: dict[str, Actor[Any, Any]] = {}
        self.queues: dict[str, Any] = {}
        self.delay_queues: set[str] = set()
        self.actor_options: set[str] = set()
        self.middleware: list[Middleware] = []
        self._hooks = HookTable()
        if middleware is None:
            middleware = [cls() for cls in default_middleware]
        for m in middleware:
            self.add_middleware(m)

    # -- hooks ---------------------------------------------------------------------

    def _run_before(
        self,
        hooks: tuple[Callable[Concatenate[Broker, P], None], ...],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> None:
        """Call ``before_*`` hooks: `MiddlewareError` propagates, others are logged."""
        for hook in hooks:
            try:
                hook(self, *args, **kwargs)
            except MiddlewareError:
                raise
            except Exception:
                self._log_hook_failure(hook)

    def _run_after(
        self,
        hooks: tuple[Callable[Concatenate[Broker, P], None], ...],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> None:
        """Call ``after_*`` hooks: every exception is logged, none propagates."""
        for hook in hooks:
            try:
                hook(self, *args, **kwargs)
            except Exception:
                self._log_hook_failure(hook)

    def _log_hook_failure(self, hook: Callable[..., None]) -> None:
        """Log the exception being handled, naming the hook and its middleware."""
        self.logger.critical(
            "Unexpected failure in %s of %s.",
            getattr(hook, "__name__", repr(hook)),
            type(getattr(hook, "__self__", hook)).__name__,
            exc_info=True,
        )

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """Call ``before_<signal>`` on every middleware, in order (Dramatiq's API).

        Raises:
            ValueError: no hook is named ``before_<signal>``.
        """
        self._run_before(self._hook_tuple("before_", signal), *args, **kwargs)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """Call ``after_<signal>`` on every middleware, in reverse order (Dramatiq's API).

        Raises:
            ValueError: no hook is named ``after_<signal>``.
        """
        self._run_after(self._hook_tuple("after_", signal), *args, **kwargs)

    def _hook_tuple(self, prefix: str, signal: str) -> tuple[Callable[..., None], ...]:
        name = prefix + signal
        if name not in HOOK_NAMES:
            raise ValueError(f"no middleware hook is named {name!r}; hooks are {HOOK_NAMES}")
        hooks: tuple[Callable[..., None], ...] = getattr(self._hooks, name)
        return hooks

    # -- middleware ----------------------------------------------------------------

    def add_middleware(
        self,
        middleware: Middleware,
        *,
        before: type[Middleware] | None = None,
        after: type[Middleware] | None = None,
    ) -> None:
        """Add ``middleware`` at the end, or just before / after the first instance of a
        class, then replay the declare hooks of what is already declared on it.

        Raises:
            AssertionError: both ``before`` and ``after`` were given (as Dramatiq).
            ValueError: the ``before`` / ``after`` class is not in the stack (the
                message names it).
        """
        assert not (before and after), "provide either 'before' or 'after', but not both"
        if not isinstance(middleware, Middleware):
            raise TypeError(f"add_middleware expects a dq.Middleware instance, got {middleware!r}")
        reference = before or after
        stack = list(self.middleware)
        if reference is not None:
            index = next((i for i, m in enumerate(stack) if isinstance(m, reference)), None)
            if index is None:
                raise ValueError(
                    f"Middleware {reference.__name__} not found in the stack "
                    f"({[type(m).__name__ for m in stack]}); cannot add "
                    f"{type(middleware).__name__} {'before' if before else 'after'} it"
                )
            stack.insert(index if before else index + 1, middleware)
        else:
            if any(type(m) is type(middleware) for m in stack):
                self.logger.warning(
                    "Middleware of type %s is already in the stack; adding another.",
                    type(middleware).__name__,
                )
            stack.append(middleware)
        self.middleware = stack
        self.actor_options = self.actor_options | middleware.actor_options
        self._hooks = HookTable.build(stack)

        for actor_name in self.get_declared_actors():
            middleware.after_declare_actor(self, self.actors[actor_name])
        for queue_name in self.get_declared_queues():
            middleware.after_declare_queue(self, queue_name)
        for queue_name in self.get_declared_delay_queues():
            middleware.after_declare_delay_queue(self, queue_name)

    def _remove_middleware(self, middleware: Middleware) -> None:
        """Take ``middleware`` out of the stack (a stopping worker's own middleware)."""
        self.middleware = [m for m in self.middleware if m is not middleware]
        self._hooks = HookTable.build(self.middleware)

    # -- actors and queues -----------------------------------------------------------

    def declare_actor(self, actor: Actor[Any, Any]) -> None:
        """Declare ``actor`` (and its queue) on this broker."""
        self._run_before(self._hooks.before_declare_actor, actor)
        self.declare_queue(actor.queue_name)
        self.actors[actor.actor_name] = actor
        self._run_after(self._hooks.after_declare_actor, actor)

    def get_actor(self, actor_name: str) -> Actor[Any, Any]:
        """Return the actor declared under ``actor_name``.

        Raises:
            ActorNotFound: no such actor is declared.
        """
        try:
            return self.actors[actor_name]
        except KeyError:
            raise ActorNotFound(actor_name) from None

    def get_declared_actors(self) -> set[str]:
        """Return the names of the declared actors."""
        return set(self.actors)

    def get_declared_queues(self) -> set[str]:
        """Return the names of the declared queues."""
        return set(self.queues)

    def get_declared_delay_queues(self) -> set[str]:
        """Return the names of the declared delay queues."""
        return set(self.delay_queues)

    def get_results_backend(self) -> ResultBackend | None:
        """Return the backend of the first middleware that stores results, or None.

        A middleware stores results when its ``results_backend`` is not None
        (`dq.results.Results`'s is its backend). dq returns None where Dramatiq
        raises: the call that needs a backend raises a clear error.
        """
        for m in self.middleware:
            backend = m.results_backend
            if backend is not None:
                return backend
        return None

    # -- to implement ------------------------------------------------------------------

    def close(self) -> None:  # noqa: B027 - a no-op by default, as Dramatiq's
        """Release the broker's resources."""

    @abc.abstractmethod
    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> Consumer:
        """Return a consumer of ``queue_name``.

        Raises:
            QueueNotFound: the queue is not declared.
        """

    @abc.abstractmethod
    def declare_queue(self, queue_name: str) -> None:
        """Declare ``queue_name`` (and its delay queue); declaring twice is a no-op."""

    @abc.abstractmethod
    def enqueue(self, message: M, *, delay: int | None = None) -> M:
        """Store ``message`` (after ``delay`` ms, if given) and return it as stored.

        Raises:
            QueueNotFound: its queue is not declared.
        """

    def enqueue_many(self, messages: Iterable[M], *, delay: int | None = None) -> list[M]:
        """Store many messages (after ``delay`` ms, if given); return them as stored.

        This default enqueues them one by one; server brokers send them in one round
        trip.
        """
        return [self.enqueue(message, delay=delay) for message in messages]

    @abc.abstractmethod
    def flush(self, queue_name: str) -> None:
        """Drop every waiting message of ``queue_name``."""

    @abc.abstractmethod
    def flush_all(self) -> None:
        """Drop every waiting message of every queue."""

    @abc.abstractmethod
    def join(self, queue_name: str, *, timeout: int | None = None) -> None:
        """Block until ``queue_name`` has no unfinished messages (a test helper).

        Raises:
            QueueJoinTimeout: ``timeout`` ms passed first.
        """


class Consumer(abc.ABC):
    """An iterator over the messages of one queue (not thread-safe).

    ``next()`` returns the next message, waiting up to the consumer's timeout, and
    raises ``StopIteration`` when none arrived in time; the consumer can be iterated
    again until it is closed.
    """

    def __iter__(self) -> Self:
        return self

    @abc.abstractmethod
    def __next__(self) -> MessageProxy:
        """Return the next message.

        Raises:
            StopIteration: none arrived within the timeout, or the consumer is closed.
        """

    @abc.abstractmethod
    def ack(self, message: MessageProxy) -> None:
        """Settle ``message`` as done."""

    @abc.abstractmethod
    def nack(self, message: MessageProxy) -> None:
        """Settle ``message`` as failed: dead-letter it."""

    def requeue(self, messages: Iterable[MessageProxy]) -> None:  # noqa: B027
        """Return unprocessed ``messages`` to their queue."""

    def close(self) -> None:  # noqa: B027
        """Close the consumer."""

    # -- optional capabilities the worker uses (defaults: the consumer lacks them) --------

    def suspect(self, message: MessageProxy) -> bool:
        """Whether a consumer died holding ``message`` before (its delivery count is
        at least one): dq's worker then runs it alone, so that a death while it runs
        is charged to it and to nothing else (`dq.core.policy.deliveries_after_death`).
        The default, for consumers with no delivery cap: False."""
        return False

    def started(self, message: MessageProxy, *, alone: bool) -> None:  # noqa: B027
        """Record that ``message`` starts running (``alone``: nothing else runs in this
        process meanwhile), for the delivery cap (`dq.core.Start`). The default: nothing
        to record.

        Raises:
            BrokerConnectionError: the broker could not be reached.
        """


class MessageProxy:
    """A message as a consumer delivered it, plus its processing outcome.

    Built as ``MessageProxy(message)`` (Dramatiq) or ``MessageProxy(broker, message)``
    (the Brokers chapter). Unknown attributes are read from the message.
    """

    @overload
    def __init__(self, message: Message[Any], /) -> None: ...
    @overload
    def __init__(self, broker: Broker, message: Message[Any], /) -> None: ...
    def __init__(self, *args: Any) -> None:
        if len(args) == 1:
            broker, message = None, args[0]
        elif len(args) == 2:
            broker, message = args
        else:
            raise TypeError(
                f"MessageProxy takes (message) or (broker, message), got {len(args)} arguments"
            )
        self._broker: Broker | None = broker
        self._message: Message[Any] = message
        self._exception: BaseException | None = None
        self._failed = False
        self._redeliver = False
        #: The consumer's handle on the stored copy (opaque to everyone else).
        self._tag: object = None
        #: A message to store in place of this one when it is acked (and its delay).
        self._replacement: tuple[Message[Any], int | None] | None = None
        #: Why it is dead-lettered when it is nacked (consumers log and keep it).
        self.death_reason: DeathReason = DeathReason.NACKED

    @property
    def message(self) -> Message[Any]:
        """The delivered message."""
        return self._message

    @property
    def failed(self) -> bool:
        """Whether the message will be rejected (nacked) instead of acked."""
        return self._failed

    def fail(self) -> None:
        """Mark the message for rejection."""
        self._failed = True

    def update_message(self, message: Message[Any]) -> None:
        """Proxy ``message`` (a changed copy of the delivered one) from now on.

        This is how middleware record facts about this attempt (``retries``,
        ``traceback``…) without changing a message in place. Settling is unaffected:
        the consumer settles the copy it delivered.
        """
        self._message = message

    def redeliver(self) -> None:
        """Ask the worker to return this message to its queue instead of settling it
        (for example, because the next pipeline step could not be enqueued)."""
        self._redeliver = True

    def replace_with(self, message: Message[Any], *, delay: int | None = None) -> None:
        """Ask the worker to store ``message`` (after ``delay`` ms) in place of this one
        when it settles it as done (a retry).

        The replacement is stored before this message is acked — in the same atomic
        step when the consumer can (``replace``), else by an enqueue then the ack. While
        the broker is unreachable, the worker tries again; if the broker refuses it, this
        message is dead-lettered instead (``death_reason`` `DeathReason.UNSTORABLE`).
        """
        self._replacement = (message, delay)

    @property
    def replacement(self) -> tuple[Message[Any], int | None] | None:
        """The message (and delay) `replace_with` asked for, or None."""
        return self._replacement

    @property
    def redelivery_requested(self) -> bool:
        """Whether `redeliver` was called."""
        return self._redeliver

    def stuff_exception(self, exception: BaseException) -> None:
        """Remember the exception processing raised."""
        self._exception = exception

    def clear_exception(self) -> None:
        """Forget the remembered exception."""
        self._exception = None

    # Typed views of the message's fields (everything else goes through __getattr__).
    @property
    def queue_name(self) -> str:
        return self._message.queue_name

    @property
    def actor_name(self) -> str:
        return self._message.actor_name

    @property
    def args(self) -> tuple[Any, ...]:
        return self._message.args

    @property
    def kwargs(self) -> FrozenDict[str, Any]:
        return self._message.kwargs

    @property
    def options(self) -> FrozenDict[str, Any]:
        return self._message.options

    @property
    def message_id(self) -> str:
        return self._message.message_id

    @property
    def message_timestamp(self) -> int:
        return self._message.message_timestamp

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally: forward to the message.
        if name.startswith("__") or name in ("_message",):
            raise AttributeError(name)
        return getattr(self._message, name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MessageProxy):
            other = other._message
        return bool(self._message == other)

    __hash__ = None  # type: ignore[assignment]  # equal to messages, so not hashable

    def __lt__(self, other: object) -> bool:
        warnings.warn(
            "Comparing MessageProxy objects is deprecated and always returns True.",
            DeprecationWarning,
            stacklevel=2,
        )
        return True

    def __str__(self) -> str:
        return str(self._message)

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {self._message!r}>"


# -- the process-global broker ----------------------------------------------------------

_lock = threading.RLock()
#: The global broker (Dramatiq's module attribute). Prefer `get_broker`.
global_broker: Broker | None = None
_floating: list[Actor[Any, Any]] = []


def get_broker() -> Broker:
    """Return the process-global broker.

    Raises:
        RuntimeError: none was set (dq does not build one silently, unlike Dramatiq):
            call ``dq.set_broker(...)`` first.
    """
    broker = global_broker
    if broker is None:
        raise RuntimeError(
            "No broker is set. Call dq.set_broker(broker) first, e.g. "
            "dq.set_broker(dq.brokers.stub.StubBroker())."
        )
    return broker


def set_broker(broker: Broker) -> None:
    """Install ``broker`` as the process-global broker.

    Actors decorated while no broker was set (and without an explicit ``broker=``) are
    declared on it now, and on every broker set later, so modules can define actors at
    import time.

    Raises:
        TypeError: ``broker`` is not a `Broker`.
    """
    global global_broker
    if not isinstance(broker, Broker):
        raise TypeError(f"set_broker expects a dq.Broker instance, got {broker!r}")
    with _lock:
        global_broker = broker
        for actor in list(_floating):
            actor._bind(broker)


def _register_floating(actor: Actor[Any, Any]) -> Broker | None:
    """Remember an actor with no broker; return the global broker if there is one now."""
    with _lock:
        if global_broker is None:
            _floating.append(actor)
        return global_broker
