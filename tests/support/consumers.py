"""A consumer that wraps another: the worker tests play what a real broker can deliver
or refuse by overriding one call of a stub broker's consumer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dq import Message, MessageProxy
from dq.broker import Consumer


class Delegating(Consumer):
    """Passes ``__next__``, ``ack``, ``nack``, ``requeue``, ``close`` and ``promote`` to
    ``inner``; ``suspect`` and ``started`` are Consumer's own (nothing is suspected)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __next__(self) -> MessageProxy:
        proxy: MessageProxy = next(self.inner)
        return proxy

    def ack(self, message: MessageProxy) -> None:
        self.inner.ack(message)

    def nack(self, message: MessageProxy) -> None:
        self.inner.nack(message)

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        self.inner.requeue(messages)

    def close(self) -> None:
        self.inner.close()

    def promote(self, message: MessageProxy) -> Message[Any]:
        promoted: Message[Any] = self.inner.promote(message)
        return promoted
