"""Misuses of actors that mypy must reject (run by tests/api/test_typing.py).

Each line that must fail ends with ``# E: <code>[, <code>...]``: the exact mypy error
codes expected on that line. Every other line must type-check. mypy.ini excludes
``typings/fail_*.py`` from the normal run.
"""

from __future__ import annotations

from typing import Any

import dq
from dq import Message


def wrong_sends() -> None:
    @dq.actor
    def add(x: int, y: int) -> int:
        return x + y

    add.send("x", 2)  # E: arg-type
    add.send(1, 2, 3)  # E: call-arg
    add.send(1)  # E: call-arg
    add.send(1, 2, z=3)  # E: call-arg
    add.send(1, y="2")  # E: arg-type
    add.message("x", 2)  # E: arg-type
    add.message(1, 2, 3)  # E: call-arg
    add.message(1, 2, unknown=True)  # E: call-arg
    add("x", 2)  # E: arg-type
    add.send_with_options(1, 2)  # E: call-arg, arg-type

    @dq.actor
    def name(x: str) -> str:
        return x

    add.send_many([name.message("x")])  # E: list-item
    add.send_with_options(args=(1, 2), delay="soon")  # E: arg-type
    add.send_with_options(args=[1, 2])  # E: arg-type
    add.message_with_options(kwargs=[("x", 1)])  # E: arg-type


def wrong_results() -> None:
    @dq.actor
    def add(x: int, y: int) -> int:
        return x + y

    as_str: Message[str] = add.send(1, 2)  # E: assignment
    built: Message[str] = add.message(1, 2)  # E: assignment
    delayed: Message[str] = add.send_with_options(args=(1, 2), delay=100)  # E: assignment
    called: str = add(1, 2)  # E: assignment
    not_an_actor: dq.Actor[[str], int] = add  # E: assignment
    other_result: dq.Actor[[int, int], str] = add  # E: assignment
    fine: Message[Any] = add.send(1, 2)


def wrong_async() -> None:
    @dq.actor
    async def fetch(url: str) -> bytes:
        return url.encode()

    fetch.send(1)  # E: arg-type
    coroutine: Message[str] = fetch.send("u")  # E: assignment


def wrong_decorations() -> None:
    dq.actor(queue_name=1)  # E: call-overload
    dq.actor(priority="high")  # E: call-overload
    dq.actor(1)  # E: call-overload
