"""Composition: chaining messages into pipelines.

(`group` arrives with the results issue.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dq.broker import get_broker
from dq.wire import deep_freeze

if TYPE_CHECKING:
    from dq.broker import Broker
    from dq.message import Message

__all__ = ["pipeline"]


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
