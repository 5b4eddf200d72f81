"""Composition: pipelines (messages chained) and groups (messages run in parallel).

Fetching results (``get_result(s)``, ``completed``, ``wait``) and group completion
callbacks need a results backend and the ``GroupCallbacks`` middleware, which arrive
with the results issue: until then those calls raise `RuntimeError`, as Dramatiq's do
on a broker without them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dq.broker import get_broker
from dq.wire import deep_freeze

if TYPE_CHECKING:
    from dq.broker import Broker
    from dq.message import Message

__all__ = ["group", "pipeline"]


class pipeline:
    """A chain of messages, each step's result appended to the next step's arguments.

    Building a pipeline links its messages: every message but the last gets the
    option ``pipe_target`` holding the next message as a dict (so the first message
    carries the whole rest of the chain, and is all a broker needs to store).
    Messages keep their ids, so each step's result can be looked up later. The
    `Pipelines` middleware enqueues the next step when a step succeeds; a step that
    fails for good ends the chain. Set ``pipe_ignore=True`` on a step's options to
    not pass it the previous result.

    Example::

        dq.pipeline([add.message(1, 2), double.message(), show.message()]).run()
        (add.message(1, 2) | double.message()).run()

    Args:
        children: messages and pipelines (whose messages are spliced in).
        broker: the broker to run on; defaults to the global broker.

    Raises:
        RuntimeError: no ``broker`` was given and no global broker is set.
    """

    messages: list[Message[Any]]

    def __init__(
        self, children: Iterable[Message[Any] | pipeline], *, broker: Broker | None = None
    ) -> None:
        self.broker: Broker = broker if broker is not None else get_broker()
        flat: list[Message[Any]] = []
        for child in children:
            if isinstance(child, pipeline):
                flat.extend(child.messages)
            else:
                flat.append(child)
        # Link from the end, so each step's target already holds the rest of the chain.
        linked: list[Message[Any]] = []
        for message in reversed(flat):
            linked.append(
                message.copy(options={"pipe_target": deep_freeze(linked[-1].asdict())})
                if linked
                else message
            )
        linked.reverse()
        self.messages = linked

    def __len__(self) -> int:
        """Return the number of messages in the pipeline."""
        return len(self.messages)

    def __or__(self, other: Message[Any] | pipeline) -> pipeline:
        """Return a new pipeline, on the same broker, with ``other`` appended."""
        return type(self)([*self.messages, other], broker=self.broker)

    def __str__(self) -> str:
        return "pipeline([{}])".format(", ".join(str(m) for m in self.messages))

    def run(self, *, delay: int | None = None) -> pipeline:
        """Enqueue the first step and return this pipeline.

        Args:
            delay: ms to delay the first step by; the first message's own ``delay``
                option wins when larger.

        Raises:
            IndexError: the pipeline is empty.
        """
        first = self.messages[0]
        effective = max(delay or 0, first.options.get("delay") or 0) or None
        self.broker.enqueue(first, delay=effective)
        return self


class group:
    """Messages (and pipelines, and groups) run in parallel.

    Example::

        dq.group([resize.message(path, 640) for path in paths]).run()

    Args:
        children: messages, pipelines and groups.
        broker: the broker to run on; defaults to the global broker.

    Raises:
        RuntimeError: no ``broker`` was given and no global broker is set.
    """

    children: list[Message[Any] | pipeline | group]
    completion_callbacks: list[dict[str, Any]]

    def __init__(
        self,
        children: Iterable[Message[Any] | pipeline | group],
        *,
        broker: Broker | None = None,
    ) -> None:
        self.children = list(children)
        self.broker: Broker = broker if broker is not None else get_broker()
        self.completion_callbacks = []

    def __len__(self) -> int:
        """Return the number of children."""
        return len(self.children)

    def __str__(self) -> str:
        return "group([{}])".format(", ".join(str(c) for c in self.children))

    def add_completion_callback(self, message: Message[Any]) -> None:
        """Run ``message`` once every child has completed (needs ``GroupCallbacks``)."""
        self.completion_callbacks.append(message.asdict())

    def run(self, *, delay: int | None = None) -> group:
        """Enqueue every child message (in one batch) and run every child pipeline and
        group, all with ``delay``; return this group.

        Raises:
            RuntimeError: completion callbacks were added: they need the
                ``GroupCallbacks`` middleware, which dq does not provide yet.
        """
        if self.completion_callbacks:
            raise RuntimeError(
                "group completion callbacks need the GroupCallbacks middleware, which "
                "dq does not provide yet (it arrives with results and rate limits)"
            )
        messages = [c for c in self.children if not isinstance(c, pipeline | group)]
        if messages:
            self.broker.enqueue_many(messages, delay=delay)
        for child in self.children:
            if isinstance(child, pipeline | group):
                child.run(delay=delay)
        return self

    def _no_results(self) -> RuntimeError:
        return RuntimeError(
            "group results need a results backend (the Results middleware), which dq "
            "does not provide yet"
        )

    @property
    def completed(self) -> bool:
        """Whether every child has a result (needs a results backend)."""
        raise self._no_results()

    @property
    def completed_count(self) -> int:
        """How many children have a result (needs a results backend)."""
        raise self._no_results()

    def get_results(self, *, block: bool = False, timeout: int | None = None) -> Any:
        """The children's results, in order (needs a results backend)."""
        raise self._no_results()

    def wait(self, *, timeout: int | None = None) -> None:
        """Block until every child has a result (needs a results backend)."""
        raise self._no_results()
