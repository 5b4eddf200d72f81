"""Narrowing RESP replies (`dq.brokers.redis._resp.Reply`) to the type a command or
script is known to return.

A reply of another type (an error value inside an array or pipeline, or anything the
caller did not expect) raises `dq.brokers.redis._resp.ResponseError`: an error value is
raised as it is, anything else is described.
"""

from __future__ import annotations

from dq.brokers.redis import _resp

__all__ = ["as_bytes", "as_int", "as_list", "as_text"]


def as_int(reply: _resp.Reply) -> int:
    """An integer reply, or a string of digits."""
    if isinstance(reply, int):
        return reply
    if isinstance(reply, bytes):
        return int(reply)
    raise _unexpected(reply, "an integer")


def as_list(reply: _resp.Reply) -> list[_resp.Reply]:
    """An array reply."""
    if isinstance(reply, list):
        return reply
    raise _unexpected(reply, "an array")


def as_bytes(reply: _resp.Reply) -> bytes:
    """A string reply."""
    if isinstance(reply, bytes):
        return reply
    raise _unexpected(reply, "a string")


def as_text(reply: _resp.Reply) -> str:
    """A string reply, decoded from UTF-8."""
    return as_bytes(reply).decode()


def _unexpected(reply: _resp.Reply, expected: str) -> _resp.ResponseError:
    if isinstance(reply, _resp.ResponseError):
        return reply
    return _resp.ResponseError(f"expected {expected} from Redis, got {reply!r}")
