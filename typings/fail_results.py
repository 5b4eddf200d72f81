"""Misuses of results that mypy must reject (run by tests/api/test_typing.py).

Each line that must fail ends with ``# E: <code>[, <code>...]``.
"""

from __future__ import annotations

import dq
from dq.results import Results
from dq.results.backends import StubBackend


@dq.actor(store_results=True)
def add(x: int, y: int) -> int:
    return x + y


@dq.actor(store_results=True)
async def fetch(url: str) -> bytes:
    return url.encode()


def wrong_uses(backend: StubBackend) -> None:
    text: str = add.send(1, 2).get_result()  # E: assignment
    data: str = fetch.send("u").get_result()  # E: assignment
    add.send(1, 2).get_result(True)  # E: call-arg, arg-type
    add.send(1, 2).get_result(timeout="1s")  # E: arg-type
    add.send(1, 2).get_result(backend=object())  # E: arg-type
    backend.get_result(add.send(1, 2), timeout="1s")  # E: call-overload
    backend.store_result(add.send(1, 2), 3)  # E: call-arg
    Results(backend=object())  # E: arg-type
    Results(StubBackend())  # E: call-arg
