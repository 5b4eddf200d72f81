"""The wire protocol of pipelines and groups: the options that chain messages, and how
a group's members are tagged and enqueued.

Wire options (Dramatiq's, so Dramatiq workers run dq's pipelines and groups):

- ``pipe_target``: on a pipeline step, the next step as a message dict;
- ``group_completion_uuid`` and ``group_completion_callbacks``: on each group
  member (a pipeline member: on its last message), the group's barrier key and the
  callback message dicts the `GroupCallbacks` middleware enqueues when the barrier
  clears.

dq-only options (Dramatiq ignores them):

- ``group_failure_callbacks``: on every message of every member, the callback
  message dicts enqueued once when a member fails for good (see
  `group.add_failure_callback`); the once-guard is the key
  ``"<group_completion_uuid>@failed"`` in the rate-limiter backend.
- ``pipe_group``: on the pipeline step before a group step, the group to run when
  the step succeeds (`GroupSpec` as JSON).
- ``group_pipe_target``: on each member (last message) of a group that is a pipeline
  step, ``{"next": <next step's message dict or None>, "index": i, "size": n}``:
  each member stores its result in the results backend under the key of
  ``ResultRef(<group_completion_uuid>, "group", str(i))`` (TTL: the barrier's), and
  the member that clears the barrier enqueues ``next`` with the list of the ``n``
  results appended to its arguments.

This module works on message records it is given: a message it decodes from a dict
is built with the class of the message at hand, so it needs no message class of its
own (`dq.message` imports the composition built on it).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import attrs

from dq.rate_limits import Barrier
from dq.wire import deep_freeze, message_from_data

if TYPE_CHECKING:
    from dq.broker import Broker
    from dq.message import Message
    from dq.rate_limits import RateLimiterBackend
    from dq.results.backend import ResultBackend

__all__ = [
    "COMPLETION_CALLBACKS",
    "COMPLETION_UUID",
    "FAILURE_CALLBACKS",
    "GROUP_PIPE_TARGET",
    "PIPE_GROUP",
    "PIPE_TARGET",
    "GroupSpec",
    "ResultRef",
    "chain",
    "member_result_ref",
    "results_backend_of",
    "run_group",
    "unchain",
    "with_group",
    "with_next",
]

#: The option names this protocol puts on the wire.
PIPE_TARGET = "pipe_target"
COMPLETION_UUID = "group_completion_uuid"
COMPLETION_CALLBACKS = "group_completion_callbacks"
FAILURE_CALLBACKS = "group_failure_callbacks"
PIPE_GROUP = "pipe_group"
GROUP_PIPE_TARGET = "group_pipe_target"

M = TypeVar("M", bound="Message[Any]")


class GroupSpec(TypedDict):
    """A group as a pipeline carries it (option ``pipe_group``), to be run later."""

    #: Each member's first message, as a dict (a member pipeline's messages are
    #: chained through ``pipe_target``).
    children: list[dict[str, Any]]
    completion_callbacks: list[dict[str, Any]]
    failure_callbacks: list[dict[str, Any]]
    #: The step after the group (a message dict), or None when the group is last.
    next: dict[str, Any] | None
    #: Whether the group is a pipeline step (its members hand their results on).
    in_pipeline: bool


@attrs.frozen
class ResultRef:
    """What a results backend needs to find a message's result."""

    queue_name: str
    actor_name: str
    message_id: str


def member_result_ref(group_key: str, index: int) -> ResultRef:
    """Return where member ``index`` of the group step ``group_key`` stores its result."""
    return ResultRef(group_key, "group", str(index))


def results_backend_of(broker: Broker) -> ResultBackend:
    """Return ``broker``'s results backend.

    Raises:
        RuntimeError: it has none.
    """
    backend = broker.get_results_backend()
    if backend is None:
        raise RuntimeError(
            "group and pipeline results need a results backend: add "
            "dq.results.Results(backend=...) to the broker's middleware"
        )
    return backend


# -- chains ------------------------------------------------------------------------------


def with_next(message: M, after: Message[Any]) -> M:
    """Return ``message`` with ``after`` as its next step (``pipe_target``)."""
    bare = message.without_option(PIPE_GROUP)
    return bare.copy(options={PIPE_TARGET: deep_freeze(after.asdict())})


def with_group(message: M, spec: GroupSpec) -> M:
    """Return ``message`` with the group ``spec`` as its next step (``pipe_group``)."""
    bare = message.without_option(PIPE_TARGET)
    return bare.copy(options={PIPE_GROUP: deep_freeze(dict(spec))})


def chain(messages: Sequence[M]) -> list[M]:
    """Link ``messages`` from the end: each one gets the next as ``pipe_target``."""
    linked: list[M] = []
    for message in reversed(messages):
        linked.append(with_next(message, linked[-1]) if linked else message)
    linked.reverse()
    return linked


def unchain(first: M) -> list[M]:
    """Return the messages of the chain ``first`` starts (following ``pipe_target``),
    each built with the class of ``first``.

    Raises:
        NotImplementedError: the chain holds a group step.
        DecodeError: a ``pipe_target`` is not a valid message.
    """
    found = [first]
    while True:
        options = found[-1].options
        if PIPE_GROUP in options:
            raise NotImplementedError("a pipeline inside a group cannot hold a group step")
        target = options.get(PIPE_TARGET)
        if target is None:
            return found
        found.append(message_from_data(target, type(first)))


# -- running a group with callbacks ------------------------------------------------------


def run_group(
    broker: Broker,
    members: Sequence[Sequence[Message[Any]]],
    spec: Mapping[str, Any],
    rate_limiter_backend: RateLimiterBackend,
    barrier_ttl: int,
    *,
    delay: int | None = None,
    previous: tuple[Any] | None = None,
    pipe_ignore: bool = False,
) -> str:
    """Run a group: create its barrier, tag its members, enqueue them; return the
    barrier key.

    Args:
        broker: where to enqueue the members.
        members: each member's messages, in chain order (a message alone is a chain
            of one).
        spec: the group's callbacks, next step and whether it is a pipeline step, as
            in `GroupSpec` (or its frozen JSON form); its ``children`` are not read.
        rate_limiter_backend: where the barrier lives.
        barrier_ttl: the barrier's TTL, in ms.
        delay: ms to delay every member by (a member pipeline's first message's own
            ``delay`` option wins when larger, as in `pipeline.run`).
        previous: ``(result,)`` of the pipeline step before the group, appended to
            each member's first message's arguments (unless its ``pipe_ignore``
            option, or ``pipe_ignore``, is truthy).
        pipe_ignore: do not append ``previous`` to any member.

    Raises:
        RuntimeError: the group is a pipeline step and the broker has no results
            backend (members hand their results on through it).
    """
    key = str(uuid.uuid4())
    completion = list(spec.get("completion_callbacks") or ())
    failure = list(spec.get("failure_callbacks") or ())
    next_step = spec.get("next")
    in_pipeline = bool(spec.get("in_pipeline"))
    if in_pipeline:
        results_backend_of(broker)
    if completion or in_pipeline:
        Barrier(rate_limiter_backend, key, ttl=barrier_ttl).create(len(members))
    # Only the last message of a member pipeline says it belongs to the group (as
    # Dramatiq), unless failure callbacks must hear of any step failing.
    every_tags: dict[str, Any] = {}
    if failure:
        every_tags = {COMPLETION_UUID: key, FAILURE_CALLBACKS: failure}
    firsts: list[tuple[Message[Any], int | None]] = []
    for index, messages in enumerate(members):
        last_tags = {**every_tags, COMPLETION_UUID: key}
        if completion:
            last_tags[COMPLETION_CALLBACKS] = completion
        if in_pipeline:
            last_tags[GROUP_PIPE_TARGET] = {"next": next_step, "index": index, "size": len(members)}
        tagged = [
            m.copy(options=last_tags if i == len(messages) - 1 else every_tags)
            for i, m in enumerate(messages)
        ]
        if previous is not None and not pipe_ignore and not tagged[0].options.get("pipe_ignore"):
            tagged[0] = tagged[0].copy(args=(*tagged[0].args, previous[0]))
        first = chain(tagged)[0]
        own = first.options.get("delay") if len(messages) > 1 else None
        firsts.append((first, max(delay or 0, own or 0) or None))
    plain = [m for m, d in firsts if d == delay]
    if plain:
        broker.enqueue_many(plain, delay=delay)
    for m, d in firsts:
        if d != delay:
            broker.enqueue(m, delay=d)
    return key
