"""Pinned types of actors: ``@dq.actor`` in both forms, sending, building, calling.

Only mypy reads this file (``typing.assert_type`` checks). Everything sits in functions
that nothing calls, so importing it declares no actor and needs no broker.

``assert_type`` compares callable parameters *by name* too, so exact pins use
positional-only functions (``Actor[[int, int], int]`` names no parameter); functions
with named parameters are pinned by assignability and by the types of their calls.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, assert_type

import dq
from dq import Actor, Message
from dq.actor import ActorDecorator
from dq.brokers.stub import StubBroker


def bare_decorator() -> None:
    @dq.actor
    def add(x: int, y: int, /) -> int:
        return x + y

    assert_type(add, Actor[[int, int], int])
    assert_type(add.send(1, 2), Message[int])
    assert_type(add.message(1, 2), Message[int])
    assert_type(add(1, 2), int)
    assert_type(add.send_with_options(args=(1, 2), delay=100), Message[int])
    assert_type(add.send_with_options(args=(1, 2), delay=timedelta(seconds=1)), Message[int])
    assert_type(add.send_with_options(args=(1, 2), kwargs={}, max_retries=0), Message[int])
    assert_type(add.send_with_options(), Message[int])
    assert_type(add.send_many([add.message(1, 2), add.message(3, 4)]), list[Message[int]])
    assert_type(add.send_many([add.message(1, 2)], delay=timedelta(seconds=1)), list[Message[int]])
    assert_type(add.message_with_options(args=(1, 2), delay=100), Message[int])
    assert_type(add.message_with_options(args=(1, 2), on_success=add), Message[int])
    assert_type(add.broker, dq.Broker)
    assert_type(add.actor_name, str)
    assert_type(add.queue_name, str)
    assert_type(add.priority, int)
    assert_type(add.options, dict[str, Any])


def called_decorator() -> None:
    @dq.actor(queue_name="math", max_retries=3)
    def add(x: int, y: int, /) -> int:
        return x + y

    assert_type(add, Actor[[int, int], int])
    assert_type(add.send(1, 2), Message[int])
    assert_type(add.message(1, 2), Message[int])
    assert_type(add(1, 2), int)
    assert_type(add.send_with_options(args=(1, 2), delay=100), Message[int])

    @dq.actor()
    def nothing() -> None:
        pass

    assert_type(nothing, Actor[[], None])
    assert_type(nothing.send(), Message[None])

    @dq.actor(actor_name="named", queue_name="q", priority=10, broker=StubBroker())
    def split(text: str, /) -> list[str]:
        return text.split()

    assert_type(split, Actor[[str], list[str]])
    assert_type(split.send("a b"), Message[list[str]])

    decorator = dq.actor(queue_name="q", max_retries=0)
    assert_type(decorator, ActorDecorator)

    def sub(x: int, y: int, /) -> int:
        return x - y

    assert_type(decorator(sub), Actor[[int, int], int])


def named_parameters() -> None:
    @dq.actor
    def add(x: int, y: int) -> int:
        return x + y

    @dq.actor(queue_name="q")
    def greet(name: str, *, punctuation: str = "!") -> str:
        return name + punctuation

    as_declared: Actor[[int, int], int] = add
    keyword_only: Actor[[str], str] = greet
    assert_type(add.send(1, 2), Message[int])
    assert_type(add.send(x=1, y=2), Message[int])
    assert_type(add.message(1, y=2), Message[int])
    assert_type(add(x=1, y=2), int)
    assert_type(greet.send("dq", punctuation="?"), Message[str])
    assert_type(greet("dq"), str)


def async_actors() -> None:
    @dq.actor
    async def fetch(url: str, /) -> bytes:
        return url.encode()

    @dq.actor(queue_name="io", max_retries=1)
    async def count(url: str, /, *, limit: int = 10) -> int:
        return limit

    # Typed by the awaited result, not by the coroutine.
    assert_type(fetch, Actor[[str], bytes])
    assert_type(fetch.send("https://example.com"), Message[bytes])
    assert_type(fetch.message("https://example.com"), Message[bytes])
    assert_type(fetch.send_with_options(args=("https://example.com",)), Message[bytes])
    assert_type(count.send("u", limit=3), Message[int])
    typed: Actor[[str], int] = count

    async def ping() -> None:
        pass

    assert_type(dq.actor(queue_name="io")(ping), Actor[[], None])


def messages_are_covariant() -> None:
    @dq.actor
    def add(x: int, y: int, /) -> int:
        return x + y

    wider: Message[object] = add.send(1, 2)
    anything: Message[Any] = add.message(1, 2)
    actors: list[Actor[Any, Any]] = [add]
