"""Composition: pipelines (steps chained) and groups (messages run in parallel), and
waiting for their results.

What they put on the wire, and how a group with callbacks is run, is
`dq.group_wire`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from dq.broker import get_broker
from dq.group_wire import (
    GroupSpec,
    results_backend_of,
    run_group,
    with_group,
    with_next,
)
from dq.middleware.current_message import CurrentMessage
from dq.middleware.group_callbacks import GroupCallbacks
from dq.results.errors import ResultFailure, ResultMissing

if TYPE_CHECKING:
    from dq.broker import Broker
    from dq.message import Message
    from dq.rate_limits import RateLimiterBackend
    from dq.results.backend import ResultBackend

__all__ = ["group", "pipeline"]


class pipeline:
    """A chain of steps, each step's result appended to the next step's arguments.

    Building a pipeline links its messages: every message but the last gets the
    option ``pipe_target`` holding the next message as a dict (so the first message
    carries the whole rest of the chain, and is all a broker needs to store).
    Messages keep their ids, so each step's result can be looked up later. The
    `Pipelines` middleware enqueues the next step when a step succeeds; a step that
    fails for good ends the chain. Set ``pipe_ignore=True`` on a step's options to
    not pass it the previous result.

    A step may also be a `group` (a dq addition; it needs the `GroupCallbacks`
    middleware and a results backend): its members all receive the previous step's
    result, run in parallel, and the step after the group runs once every member
    succeeded, receiving the **list of the members' results** (in member order) as
    its last argument. A member failing for good ends the pipeline (and fires the
    group's failure callbacks). A group step's members are messages or pipelines of
    messages, and the step after a group is a message.

    Example::

        dq.pipeline([add.message(1, 2), double.message(), show.message()]).run()
        (add.message(1, 2) | double.message()).run()
        dq.pipeline([fetch.message(url), dq.group([parse_a.message(), parse_b.message()]),
                     merge.message()]).run()

    Args:
        children: messages, groups and pipelines (whose steps are spliced in).
        broker: the broker to run on; defaults to the global broker.

    Raises:
        RuntimeError: no ``broker`` was given and no global broker is set.
        NotImplementedError: a group step holds a group, or a pipeline that holds a
            group; or a group step is followed by another group.
    """

    #: Every step, in order (messages linked as described above, and groups).
    steps: list[Message[Any] | group]
    #: The steps that are messages (all of them when the pipeline has no group).
    messages: list[Message[Any]]

    def __init__(
        self,
        children: Iterable[Message[Any] | pipeline | group],
        *,
        broker: Broker | None = None,
    ) -> None:
        self.broker: Broker = broker if broker is not None else get_broker()
        flat: list[Message[Any] | group] = []
        for child in children:
            if isinstance(child, pipeline):
                flat.extend(child.steps)
            else:
                flat.append(child)
        for i, step in enumerate(flat):
            if isinstance(step, group):
                _check_group_step(step)
                if i + 1 < len(flat) and isinstance(flat[i + 1], group):
                    raise NotImplementedError(
                        "a group step must be followed by a message, not another group"
                    )
        self.steps = _link(flat)
        self.messages = [s for s in self.steps if not isinstance(s, group)]

    def __len__(self) -> int:
        """Return the number of steps in the pipeline."""
        return len(self.steps)

    def __or__(self, other: Message[Any] | pipeline | group) -> pipeline:
        """Return a new pipeline, on the same broker, with ``other`` appended."""
        return type(self)([*self.steps, other], broker=self.broker)

    def __str__(self) -> str:
        return "pipeline([{}])".format(", ".join(str(m) for m in self.steps))

    def run(self, *, delay: int | None = None) -> pipeline:
        """Start the pipeline (enqueue its first step) and return it.

        Args:
            delay: ms to delay the first step by; the first message's own ``delay``
                option wins when larger.

        Raises:
            IndexError: the pipeline is empty.
            RuntimeError: a step is a group and the broker has no `GroupCallbacks`
                middleware or no results backend.
        """
        first = self.steps[0]
        if any(isinstance(step, group) for step in self.steps):
            # Checked here, not when the worker reaches the group step.
            _group_callbacks_of(self.broker)
            results_backend_of(self.broker)
        if isinstance(first, group):
            next_step = self.steps[1] if len(self.steps) > 1 else None
            assert not isinstance(next_step, group)  # checked in __init__
            spec = first._spec(None if next_step is None else next_step.asdict(), True)
            _run_group(self.broker, first, spec, delay=delay)
            return self
        effective = max(delay or 0, first.options.get("delay") or 0) or None
        self.broker.enqueue(first, delay=effective)
        return self

    def get_result(self, *, block: bool = False, timeout: int | None = None) -> Any:
        """Return the last step's result (a list of results when it is a group).

        Args:
            block: wait for the result if it is not stored yet.
            timeout: ms to wait at most when blocking (the backend's default: 10 s).

        Raises:
            RuntimeError: the broker has no results backend, or this blocking call
                was made inside an actor.
            ResultMissing: not blocking, and the result is not stored yet.
            ResultTimeout: blocking, and the result was not stored in time.
            ResultFailure: the last step failed.
        """
        if block:
            _refuse_blocking_in_actor("pipeline.get_result")
        last = self.steps[-1]
        if isinstance(last, group):
            return list(last._results(block=block, timeout=timeout))
        return results_backend_of(self.broker).get_result(last, block=block, timeout=timeout)

    def get_results(self, *, block: bool = False, timeout: int | None = None) -> Iterator[Any]:
        """Yield each step's result, in order (a list of results for a group step).

        Args:
            block: wait for each result if it is not stored yet.
            timeout: ms to wait at most for all of them, when blocking (one shared
                deadline; without it, each result waits the backend's default).

        Raises:
            RuntimeError: as `get_result`.
            ResultMissing, ResultTimeout, ResultFailure: as `get_result`, for the
                first step whose result is not there.
        """
        if block:
            _refuse_blocking_in_actor("pipeline.get_results")
        return self._results(results_backend_of(self.broker), block=block, timeout=timeout)

    def _results(
        self, backend: ResultBackend, *, block: bool, timeout: int | None
    ) -> Iterator[Any]:
        deadline = _Deadline(timeout)
        for step in self.steps:
            if isinstance(step, group):
                yield list(step._results(block=block, timeout=deadline.left()))
            else:
                yield backend.get_result(step, block=block, timeout=deadline.left())

    @property
    def completed(self) -> bool:
        """Whether the last step has a result (failures count as results).

        Uses this pipeline's broker's results backend (Dramatiq uses the global
        broker's). Steps whose actors store no results never count.

        Raises:
            RuntimeError: the broker has no results backend.
        """
        return self.completed_count == len(self.steps)

    @property
    def completed_count(self) -> int:
        """How many leading steps have a result (a group step: all its members).

        Raises:
            RuntimeError: the broker has no results backend.
        """
        count = 0
        for step in self.steps:
            done = step.completed if isinstance(step, group) else _has_result(self.broker, step)
            if not done:
                break
            count += 1
        return count


class group:
    """Messages (and pipelines, and groups) run in parallel.

    Completion callbacks (`add_completion_callback`) are enqueued once every member
    succeeded; failure callbacks (`add_failure_callback`, a dq addition) once, when
    the first member fails for good. Both need the `GroupCallbacks` middleware on
    the broker.

    Example::

        g = dq.group([resize.message(path, 640) for path in paths])
        g.add_completion_callback(notify.message("resized"))
        g.add_failure_callback(alert.message("a resize failed"))
        g.run()

    Args:
        children: messages, pipelines and groups.
        broker: the broker to run on; defaults to the global broker.

    Raises:
        RuntimeError: no ``broker`` was given and no global broker is set.
    """

    children: list[Message[Any] | pipeline | group]
    completion_callbacks: list[dict[str, Any]]
    failure_callbacks: list[dict[str, Any]]

    def __init__(
        self,
        children: Iterable[Message[Any] | pipeline | group],
        *,
        broker: Broker | None = None,
    ) -> None:
        self.children = list(children)
        self.broker: Broker = broker if broker is not None else get_broker()
        self.completion_callbacks = []
        self.failure_callbacks = []

    def __len__(self) -> int:
        """Return the number of children."""
        return len(self.children)

    def __str__(self) -> str:
        return "group([{}])".format(", ".join(str(c) for c in self.children))

    def __or__(self, other: Message[Any] | pipeline | group) -> pipeline:
        """Return the pipeline of this group followed by ``other`` (a dq addition),
        on this group's broker."""
        return pipeline([self, other], broker=self.broker)

    def add_completion_callback(self, message: Message[Any]) -> None:
        """Enqueue ``message`` once every child has succeeded (needs `GroupCallbacks`).

        The message is stored as it is now (its id and timestamp included).
        """
        self.completion_callbacks.append(message.asdict())

    def add_failure_callback(self, message: Message[Any]) -> None:
        """Enqueue ``message`` once, when the first child fails for good: its
        retries are exhausted, or it is otherwise dead-lettered (a dq addition; needs
        `GroupCallbacks`, and is ignored by Dramatiq workers).

        Without one, a group whose child fails never fires its completion callbacks
        and nothing says so. The message is enqueued as it is now; to know which
        child failed, use ``on_failure`` / ``on_retry_exhausted`` on the children.
        """
        self.failure_callbacks.append(message.asdict())

    def run(self, *, delay: int | None = None) -> group:
        """Enqueue every child message (in one batch) and run every child pipeline and
        group, all with ``delay``; return this group.

        With callbacks, a fresh barrier (uuid4 key, one party per child) is created
        in the `GroupCallbacks` middleware's backend first, and each child's last
        message is tagged with it.

        Raises:
            RuntimeError: callbacks were added and the broker has no
                `GroupCallbacks` middleware.
            NotImplementedError: callbacks were added and a child is a group (as
                Dramatiq), or a pipeline holding a group.
        """
        if not (self.completion_callbacks or self.failure_callbacks):
            messages = [c for c in self.children if not isinstance(c, pipeline | group)]
            if messages:
                self.broker.enqueue_many(messages, delay=delay)
            for child in self.children:
                if isinstance(child, pipeline | group):
                    child.run(delay=delay)
            return self
        _check_group_step(self)
        _run_group(self.broker, self, self._spec(None, False), delay=delay)
        return self

    def _spec(self, next_step: dict[str, Any] | None, in_pipeline: bool) -> GroupSpec:
        children: list[dict[str, Any]] = []
        for child in self.children:
            if isinstance(child, pipeline):
                children.append(child.messages[0].asdict())
            else:
                assert not isinstance(child, group)  # _check_group_step
                children.append(child.asdict())
        return GroupSpec(
            children=children,
            completion_callbacks=list(self.completion_callbacks),
            failure_callbacks=list(self.failure_callbacks),
            next=next_step,
            in_pipeline=in_pipeline,
        )

    def get_results(self, *, block: bool = False, timeout: int | None = None) -> Iterator[Any]:
        """Yield each child's result in child order: a nested group's as a list, a
        pipeline's as its final result.

        Args:
            block: wait for each result if it is not stored yet.
            timeout: ms to wait at most for all of them, when blocking (one shared
                deadline; without it, each child waits the backend's default, 10 s).

        Raises:
            RuntimeError: the broker has no results backend, or this blocking call
                was made inside an actor (it could wait for messages that the
                actor's own worker threads would have to run).
            ResultMissing: not blocking, and a result is not stored yet.
            ResultTimeout: blocking, and a result was not stored in time.
            ResultFailure: a child failed.
        """
        if block:
            _refuse_blocking_in_actor("group.get_results")
        return self._results(block=block, timeout=timeout)

    def _results(self, *, block: bool, timeout: int | None) -> Iterator[Any]:
        """Check the backend now (not at the first ``next``), then return the
        results' generator."""
        return self._iter_results(results_backend_of(self.broker), block=block, timeout=timeout)

    def _iter_results(
        self, backend: ResultBackend, *, block: bool, timeout: int | None
    ) -> Iterator[Any]:
        deadline = _Deadline(timeout)
        for child in self.children:
            left = deadline.left()
            if isinstance(child, group):
                yield list(child._results(block=block, timeout=left))
            elif isinstance(child, pipeline):
                yield child.get_result(block=block, timeout=left)
            else:
                yield backend.get_result(child, block=block, timeout=left)

    def wait(self, *, timeout: int | None = None) -> None:
        """Block until every child has a result.

        Args:
            timeout: ms to wait at most (default: up to 10 s per child).

        Raises:
            RuntimeError: no results backend, or called inside an actor.
            ResultTimeout: the results were not all stored in time.
            ResultFailure: a child failed.
        """
        _refuse_blocking_in_actor("group.wait")
        for _ in self._results(block=True, timeout=timeout):
            pass

    @property
    def completed(self) -> bool:
        """Whether every child has a result (failures count as results).

        Raises:
            RuntimeError: the broker has no results backend.
        """
        return self.completed_count == len(self.children)

    @property
    def completed_count(self) -> int:
        """How many children have a result, whatever the order they finished in (a
        nested group or a pipeline counts once it is completed).

        Raises:
            RuntimeError: the broker has no results backend.
        """
        count = 0
        for child in self.children:
            if isinstance(child, group | pipeline):
                count += child.completed
            else:
                count += _has_result(self.broker, child)
        return count


# -- running a group with callbacks (client side) ---------------------------------------


def _run_group(broker: Broker, g: group, spec: GroupSpec, *, delay: int | None) -> None:
    """Run ``g`` (checked by `_check_group_step`) with its callbacks, on ``broker``."""
    members: list[Sequence[Message[Any]]] = []
    for child in g.children:
        assert not isinstance(child, group)  # _check_group_step
        members.append(child.messages if isinstance(child, pipeline) else [child])
    backend, ttl = _group_callbacks_of(broker)
    run_group(broker, members, spec, backend, ttl, delay=delay)


def _link(steps: Sequence[Message[Any] | group]) -> list[Message[Any] | group]:
    """Link ``steps`` from the end: each message gets the next message as
    ``pipe_target``, or the next group (and what follows it) as ``pipe_group``."""
    linked: list[Message[Any] | group] = []
    for step in reversed(steps):
        if isinstance(step, group) or not linked:
            linked.append(step)
            continue
        after = linked[-1]
        if isinstance(after, group):
            following = linked[-2] if len(linked) > 1 else None
            assert not isinstance(following, group)
            spec = after._spec(None if following is None else following.asdict(), True)
            linked.append(with_group(step, spec))
        else:
            linked.append(with_next(step, after))
    linked.reverse()
    return linked


def _check_group_step(g: group) -> None:
    """Raise `NotImplementedError` if ``g`` cannot run with callbacks / as a step."""
    for child in g.children:
        if isinstance(child, group):
            raise NotImplementedError(
                "a group with callbacks, or used as a pipeline step, cannot hold a group"
            )
        if isinstance(child, pipeline) and any(isinstance(s, group) for s in child.steps):
            raise NotImplementedError(
                "a group with callbacks, or used as a pipeline step, cannot hold a pipeline "
                "that holds a group"
            )


def _group_callbacks_of(broker: Broker) -> tuple[RateLimiterBackend, int]:
    for m in broker.middleware:
        if isinstance(m, GroupCallbacks):
            return m.rate_limiter_backend, m.barrier_ttl
    raise RuntimeError(
        "GroupCallbacks middleware not found: group callbacks and group steps in "
        "pipelines need it; add dq.middleware.GroupCallbacks(rate_limiter_backend) "
        "to the broker"
    )


# -- results -----------------------------------------------------------------------------


def _has_result(broker: Broker, message: Message[Any]) -> bool:
    try:
        results_backend_of(broker).get_result(message)
    except ResultMissing:
        return False
    except ResultFailure:
        return True  # finished, failed
    return True


class _Deadline:
    """One deadline shared by several waits (None: each wait uses its default)."""

    def __init__(self, timeout: int | None) -> None:
        self._at = None if timeout is None else time.monotonic() + timeout / 1000

    def left(self) -> int | None:
        if self._at is None:
            return None
        return max(0, int((self._at - time.monotonic()) * 1000))


#: The threads that run actors: `dq.worker.WorkerThread`, and the event-loop thread of
#: async actors (`dq.asyncio`). Known by name: the worker imports `dq.message`, which
#: imports this module, and `dq.asyncio` imports asyncio (several MB).
_ACTOR_THREADS = frozenset({"WorkerThread", "EventLoopThread"})


def _refuse_blocking_in_actor(what: str) -> None:
    """Raise if the calling thread is running an actor.

    A worker thread that blocks on other messages' results holds a slot those
    messages may need: with every thread of every worker waiting so, nothing runs
    and the waits only end by timing out (Dramatiq's known deadlock). dq refuses
    instead; an actor should add a completion callback, or make the group a
    pipeline step, and return.

    Raises:
        RuntimeError: the caller is a worker thread, the event-loop thread of async
            actors, or runs inside an actor (`CurrentMessage` knows).
    """
    thread = threading.current_thread()
    inside = any(
        cls.__module__.partition(".")[0] == "dq" and cls.__name__ in _ACTOR_THREADS
        for cls in type(thread).__mro__
    )
    if inside or CurrentMessage.get_current_message() is not None:
        raise RuntimeError(
            f"{what}(block=True) was called inside an actor: waiting there for other "
            "messages can deadlock the workers that must run them. Add a completion "
            "callback (group.add_completion_callback), or make the group a pipeline "
            "step, instead of waiting."
        )
