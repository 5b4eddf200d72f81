"""Pinned types of results: `Message.get_result` is typed by the actor's result.

Only mypy reads this file (``typing.assert_type`` checks); nothing runs at import.
"""

from __future__ import annotations

from typing import Any, Literal, assert_type

import dq
from dq import Message
from dq.broker import MessageProxy
from dq.results import (
    Missing,
    ResultBackend,
    ResultError,
    ResultFailure,
    ResultMissing,
    Results,
    ResultTimeout,
)
from dq.results.backend import MissingType
from dq.results.backends import MemcachedBackend, RedisBackend, StubBackend


@dq.actor(store_results=True)
def add(x: int, y: int) -> int:
    return x + y


@dq.actor(store_results=True)
async def fetch(url: str) -> bytes:
    return url.encode()


@dq.actor
def nothing() -> None:
    pass


def results_follow_the_actor(backend: StubBackend) -> None:
    assert_type(add.send(1, 2), Message[int])
    assert_type(add.send(1, 2).get_result(), int)
    assert_type(add.send(1, 2).get_result(block=True, timeout=500), int)
    assert_type(add.send(1, 2).get_result(backend=backend), int)
    assert_type(add.message(1, 2).get_result(), int)
    assert_type(add.send_with_options(args=(1, 2), delay=10).get_result(), int)
    assert_type(nothing.send().get_result(), None)


def async_actors_type_by_the_awaited_result() -> None:
    assert_type(fetch.send("u"), Message[bytes])
    assert_type(fetch.send("u").get_result(block=True), bytes)


def backends_keep_the_type(
    message: Message[int],
    untyped: Message[Any],
    proxy: MessageProxy,
    stub: StubBackend,
    redis: RedisBackend,
    memcached: MemcachedBackend,
    custom: ResultBackend,
) -> None:
    assert_type(stub.get_result(message), int)
    assert_type(redis.get_result(message, block=True), int)
    assert_type(memcached.get_result(message, timeout=100), int)
    assert_type(custom.get_result(message), int)
    assert_type(custom.get_result(untyped), Any)
    assert_type(custom.get_result(proxy), Any)
    assert_type(custom.build_message_key(proxy), str)
    assert_type(custom.build_message_key(message), str)
    custom.store_result(proxy, {"any": ["json"]}, 1000)
    custom.store_exception(message, ValueError("bad"), 1000)
    assert_type(custom._get("key"), Any | MissingType)
    assert_type(Missing, Literal[MissingType.MISSING])


def middleware(backend: RedisBackend) -> None:
    results = Results(backend=backend, store_results=True, result_ttl=60_000)
    assert_type(results.backend, ResultBackend)
    assert_type(results.results_backend, ResultBackend)
    assert_type(results.result_ttl, int)


def errors(e: ResultFailure) -> None:
    assert_type(e.orig_exc_type, str)
    assert_type(e.orig_exc_msg, str)
    assert issubclass(ResultFailure, ResultError)
    assert issubclass(ResultMissing, dq.DramatiqError)
    assert issubclass(ResultTimeout, ResultError)
