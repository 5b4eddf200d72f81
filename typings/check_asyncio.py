"""Pinned types of async actors and ``dq.asyncio`` (only mypy reads this file).

Everything sits in functions that nothing calls, so importing it declares no actor and
starts no thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, assert_type

import dq
from dq import Actor, Message
from dq.asyncio import (
    EventLoopThread,
    async_to_sync,
    get_event_loop_thread,
    set_event_loop_thread,
)
from dq.middleware import AsyncIO, CurrentMessage, Middleware
from dq.middleware.asyncio import AsyncIO as AsyncIOFromModule


def async_actors_are_typed_by_their_awaited_result() -> None:
    @dq.actor
    async def f() -> int:
        await asyncio.sleep(0)
        return 1

    @dq.actor(max_retries=3, time_limit=1000)
    async def fetch(url: str, /, *, retries: int = 0) -> bytes:
        return url.encode()

    assert_type(f, Actor[[], int])
    assert_type(f.send(), Message[int])
    assert_type(f.message(), Message[int])
    assert_type(f.send_with_options(delay=100), Message[int])
    assert_type(f(), int)  # run on the event-loop thread, this thread waits
    assert_type(fetch.send("https://example.com", retries=1), Message[bytes])
    assert_type(fetch("https://example.com"), bytes)
    assert_type(f.fn, Callable[[], int])


def the_event_loop_thread() -> None:
    thread = EventLoopThread(logging.getLogger("app"), interrupt_check_ival=0.05)
    thread.start(timeout=1.0)
    assert_type(thread.loop, asyncio.AbstractEventLoop)
    assert_type(thread.interrupt_check_ival, float)

    async def answer() -> int:
        return 42

    assert_type(thread.run_coroutine(answer()), int)
    set_event_loop_thread(thread)
    assert_type(get_event_loop_thread(), EventLoopThread | None)
    set_event_loop_thread(None)
    thread.stop()


def async_to_sync_keeps_the_signature() -> None:
    async def scale(x: int, /, factor: float = 2.0) -> float:
        return x * factor

    sync_scale = async_to_sync(scale)
    assert_type(sync_scale(3), float)
    assert_type(sync_scale(3, factor=0.5), float)


def the_middleware() -> None:
    middleware: Middleware = AsyncIO()
    assert AsyncIO is AsyncIOFromModule
    assert_type(middleware.actor_options, set[str])
    assert_type(CurrentMessage.get_current_message(), Message[Any] | None)
