"""Actors: functions that run in workers, typed end to end (``Actor[P, R]``)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, cast, overload

from dq.async_actors import async_to_sync
from dq.broker import _register_floating
from dq.core import policy
from dq.logging import get_logger
from dq.message import Message
from dq.options import check_options

if TYPE_CHECKING:
    from dq.broker import Broker

__all__ = ["Actor", "ActorDecorator", "actor"]

P = ParamSpec("P")
R = TypeVar("R")

#: Options that name another actor; ``message_with_options`` turns actors into names.
_CALLBACK_OPTIONS = ("on_failure", "on_success")


class Actor(Generic[P, R]):
    """A function made runnable by workers: ``send`` enqueues, calling runs it here.

    Args:
        fn: the function (``async def`` functions are typed by their awaited result).
        broker: the broker to declare it on; None declares it on the global broker
            now, or — when none is set yet — on each broker given to ``dq.set_broker``.
        actor_name: its name on the broker.
        queue_name: its queue.
        priority: local ordering in workers: lower runs first.
        options: actor options, each understood by some middleware of the broker.

    Raises:
        ValueError: a bad queue or actor name, an option no middleware understands,
            or an actor of that name is already declared on the broker.
    """

    def __init__(
        self,
        fn: Callable[P, R] | Callable[P, Awaitable[R]],
        *,
        broker: Broker | None,
        actor_name: str,
        queue_name: str,
        priority: int,
        options: Mapping[str, Any],
    ) -> None:
        problem = policy.queue_name_problem(queue_name)
        if problem is not None:
            raise ValueError(f"Queue name {queue_name!r} is invalid: {problem}.")
        if not _is_name(actor_name):
            raise ValueError(f"actor_name must be a non-empty string, got {actor_name!r}")
        if not _is_int(priority):
            raise ValueError(f"priority must be an int, got {priority!r}")
        check_options(options, what=f"options of actor {actor_name!r}")
        self.logger = get_logger(getattr(fn, "__module__", None) or "_", actor_name)
        self.is_async = inspect.iscoroutinefunction(fn)
        #: The function workers call: coroutine functions are wrapped to run on the
        #: event-loop thread (`dq.asyncio.async_to_sync`), as Dramatiq does.
        self.fn: Callable[P, R]
        if self.is_async:
            self.fn = async_to_sync(cast("Callable[P, Awaitable[R]]", fn))
        else:
            self.fn = cast("Callable[P, R]", fn)
        self.actor_name = actor_name
        self.queue_name = queue_name
        self.priority = priority
        self.options: dict[str, Any] = dict(options)
        self._broker: Broker | None = None
        if broker is None:
            broker = _register_floating(self)
        if broker is not None:
            self._bind(broker)

    def _bind(self, broker: Broker) -> None:
        """Declare this actor on ``broker`` and send to it from now on."""
        unknown = set(self.options) - broker.actor_options
        if unknown:
            raise ValueError(
                f"Actor {self.actor_name!r} was given option(s) {sorted(unknown)} that no "
                f"middleware of {type(broker).__name__} understands; known options: "
                f"{sorted(broker.actor_options)}. Did you forget to add a middleware?"
            )
        existing = broker.actors.get(self.actor_name)
        if existing is not None and existing is not self:
            raise ValueError(f"An actor named {self.actor_name!r} is already registered.")
        self._broker = broker
        if existing is None:
            broker.declare_actor(self)

    @property
    def broker(self) -> Broker:
        """The broker this actor sends to.

        Raises:
            RuntimeError: no broker is set yet (call ``dq.set_broker``).
        """
        broker = self._broker
        if broker is None:
            raise RuntimeError(
                f"Actor {self.actor_name!r} has no broker yet: call dq.set_broker(...) "
                "before sending, or pass broker=... to @dq.actor."
            )
        return broker

    def message(self, *args: P.args, **kwargs: P.kwargs) -> Message[R]:
        """Build (not send) a message for this actor."""
        return Message(self.queue_name, self.actor_name, args, kwargs, None)

    def message_with_options(
        self,
        *,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Message[R]:
        """Build (not send) a message with arbitrary options.

        ``on_success`` / ``on_failure`` may be given as actors; they become names.

        Raises:
            TypeError: ``on_success`` / ``on_failure`` is neither an actor, a name nor None.
            ValueError: an option has a value dq cannot honour (``time_limit="x"``,
                ``max_retries=-1``, ``max_backoff=-100``...); the error names the
                option, the value and what was expected.
        """
        for name in _CALLBACK_OPTIONS:
            callback = options.get(name)
            if isinstance(callback, Actor):
                options[name] = callback.actor_name
            elif callback is not None and not isinstance(callback, str):
                raise TypeError(f"{name} value must be an Actor or an actor name, got {callback!r}")
        check_options(options, what=f"options of a message of actor {self.actor_name!r}")
        return Message(self.queue_name, self.actor_name, args, kwargs, options)

    def send(self, *args: P.args, **kwargs: P.kwargs) -> Message[R]:
        """Enqueue a message for this actor and return it as stored.

        Raises:
            TypeError: an argument is not serialisable (nothing is sent).
        """
        broker = self._broker
        if broker is None:
            broker = self.broker  # raises the explanatory RuntimeError
        return broker.enqueue(Message(self.queue_name, self.actor_name, args, kwargs, None))

    def send_many(
        self, messages: Iterable[Message[R]], *, delay: timedelta | int | None = None
    ) -> list[Message[R]]:
        """Enqueue many messages of this actor at once (build them with `message`);
        server brokers store them in one round trip.

        Returns:
            The messages as stored, in order.

        Raises:
            ValueError: a message is not for this actor.
        """
        batch = list(messages)
        for message in batch:
            if message.actor_name != self.actor_name:
                raise ValueError(
                    f"send_many of actor {self.actor_name!r} got a message for "
                    f"{message.actor_name!r}"
                )
        if isinstance(delay, timedelta):
            delay = int(delay.total_seconds() * 1000)
        return self.broker.enqueue_many(batch, delay=delay)

    def send_with_options(
        self,
        *,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        delay: timedelta | int | None = None,
        **options: Any,
    ) -> Message[R]:
        """Enqueue a message with options, after ``delay`` (ms or a timedelta).

        Returns:
            The message as stored (when delayed, on ``<queue>.DQ`` with an ``eta``).

        Raises:
            ValueError: an option has a value dq cannot honour (see
                `message_with_options`); nothing is sent.
        """
        if isinstance(delay, timedelta):
            delay = int(delay.total_seconds() * 1000)
        message = self.message_with_options(args=args, kwargs=kwargs, **options)
        return self.broker.enqueue(message, delay=delay)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function synchronously in this thread and return its result.

        An async actor's coroutine runs on the event-loop thread (`dq.asyncio`) while
        this thread waits for it.

        Raises:
            RuntimeError: the actor is async and no event-loop thread is set (add the
                AsyncIO middleware), or this is the event-loop thread itself.
        """
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            if self.logger.isEnabledFor(10):
                self.logger.debug(
                    "Completed %s in %.02fms.",
                    self.actor_name,
                    (time.perf_counter() - start) * 1000,
                )

    def __repr__(self) -> str:
        return f"Actor({self.fn!r}, queue_name={self.queue_name!r}, actor_name={self.actor_name!r})"

    def __str__(self) -> str:
        return f"Actor({self.actor_name})"


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ActorDecorator(Protocol):
    """What ``@actor(...)`` returns: a decorator making an `Actor` of a function."""

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]], /) -> Actor[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Actor[P, R]: ...
    def __call__(self, fn: Callable[P, Any], /) -> Actor[P, Any]: ...


@overload
def actor(fn: Callable[P, Awaitable[R]], /) -> Actor[P, R]: ...
@overload
def actor(fn: Callable[P, R], /) -> Actor[P, R]: ...
@overload
def actor(
    fn: None = None,
    /,
    *,
    actor_class: Callable[..., Actor[Any, Any]] = ...,
    actor_name: str | None = None,
    queue_name: str = "default",
    priority: int = 0,
    broker: Broker | None = None,
    **options: Any,
) -> ActorDecorator: ...
def actor(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    actor_class: Callable[..., Actor[Any, Any]] = Actor,
    actor_name: str | None = None,
    queue_name: str = "default",
    priority: int = 0,
    broker: Broker | None = None,
    **options: Any,
) -> Actor[Any, Any] | ActorDecorator:
    """Make a function an actor; use as ``@actor`` or ``@actor(...)``.

    Args:
        fn: the function (bare form).
        actor_class: builds the actor (keyword signature of `Actor`).
        actor_name: defaults to the function's ``__name__``.
        queue_name: the queue (default ``"default"``).
        priority: local ordering in workers: lower runs first.
        broker: defaults to the global broker (see `Actor`).
        options: actor options (``max_retries=3``, …).

    Raises:
        ValueError: a bad queue name (checked first), an unknown option, or an
            option value dq cannot honour (``max_retries=-1``...).
    """
    problem = policy.queue_name_problem(queue_name)
    if problem is not None:
        raise ValueError(f"Queue name {queue_name!r} is invalid: {problem}.")

    def decorator(fn: Callable[..., Any]) -> Actor[Any, Any]:
        return actor_class(
            fn,
            actor_name=actor_name or fn.__name__,
            queue_name=queue_name,
            priority=priority,
            broker=broker,
            options=options,
        )

    if fn is None:
        return decorator
    return decorator(fn)
