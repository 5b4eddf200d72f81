"""Pure decisions: queue naming, delays and etas, retry backoff.

Randomness and time come in as arguments, so each function is a plain function of its
inputs and can be property-tested exhaustively.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from dq.core._frozendict import FrozenDict
from dq.core.errors import InvalidValue
from dq.core.records import Message

M = TypeVar("M", bound=Message[Any])

DELAY_SUFFIX = ".DQ"
DEAD_SUFFIX = ".XQ"

#: Dramatiq's actor queue-name pattern (it must match the whole name).
QUEUE_NAME_PATTERN = re.compile(r"[a-zA-Z_][a-zA-Z0-9._-]*")

#: Longest canonical name: RabbitMQ names are at most 255 bytes, and ``.XQ`` is added.
MAX_QUEUE_NAME_BYTES = 252


def q_name(queue_name: str) -> str:
    """Return the canonical name: one trailing ``.DQ`` or ``.XQ`` removed."""
    if queue_name.endswith((DELAY_SUFFIX, DEAD_SUFFIX)):
        return queue_name[:-3]
    return queue_name


def dq_name(queue_name: str) -> str:
    """Return the delay-queue name of a queue (unchanged if it already is one)."""
    if queue_name.endswith(DELAY_SUFFIX):
        return queue_name
    if queue_name.endswith(DEAD_SUFFIX):
        queue_name = queue_name[:-3]
    return queue_name + DELAY_SUFFIX


def xq_name(queue_name: str) -> str:
    """Return the dead-letter-queue name of a queue (unchanged if it already is one)."""
    if queue_name.endswith(DEAD_SUFFIX):
        return queue_name
    if queue_name.endswith(DELAY_SUFFIX):
        queue_name = queue_name[:-3]
    return queue_name + DEAD_SUFFIX


def is_delay_queue(queue_name: str) -> bool:
    """Return whether ``queue_name`` names a delay queue."""
    return queue_name.endswith(DELAY_SUFFIX)


def queue_name_problem(queue_name: object) -> str | None:
    """Return why ``queue_name`` cannot name an actor's queue, or None if it can.

    Stricter than Dramatiq, compatibly so: besides its pattern, names that the
    brokers would map onto another queue or onto their own keys are refused.
    """
    if not isinstance(queue_name, str):
        return f"queue names are strings, not {type(queue_name).__name__}"
    if not QUEUE_NAME_PATTERN.fullmatch(queue_name):
        return (
            "queue names must start with a letter or underscore and contain only "
            "letters, digits, '.', '_' and '-'"
        )
    if queue_name.endswith((DELAY_SUFFIX, DEAD_SUFFIX)):
        return "the suffixes .DQ and .XQ are reserved for delay and dead-letter queues"
    if queue_name.endswith(".msgs"):
        return "the suffix .msgs is reserved (Redis stores a queue's messages under it)"
    if queue_name == "__heartbeats__" or queue_name.startswith("__acks__."):
        return "the names __heartbeats__ and __acks__.* are reserved by the Redis broker"
    if len(queue_name.encode()) > MAX_QUEUE_NAME_BYTES:
        return f"queue names are at most {MAX_QUEUE_NAME_BYTES} bytes long"
    return None


def eta_ms(now_ms: int, delay_ms: int) -> int:
    """Return when a message delayed by ``delay_ms`` at ``now_ms`` may run."""
    if delay_ms < 0:
        raise InvalidValue(f"delay must be >= 0 milliseconds, got {delay_ms!r}")
    return now_ms + delay_ms


def delayed(message: M, *, delay_ms: int, now_ms: int) -> M:
    """Return the copy of ``message`` to store on its delay queue.

    The copy is on ``dq_name(queue_name)`` with ``options["eta"]`` set (Dramatiq's
    convention, so a Dramatiq worker promotes it too).
    """
    return message.copy(
        queue_name=dq_name(message.queue_name),
        options={"eta": eta_ms(now_ms, delay_ms)},
    )


def promoted(message: M) -> M:
    """Return the copy of a due delayed message to store on its canonical queue."""
    return message.copy(queue_name=q_name(message.queue_name)).without_option("eta")


def message_eta_ms(message: Message[Any]) -> int | None:
    """Return the message's eta in ms, or None when it has none (or it is ``null``)."""
    eta = message.options.get("eta")
    if eta is None:
        return None
    if isinstance(eta, bool) or not isinstance(eta, int | float):
        raise InvalidValue(f"option 'eta' must be a number of milliseconds, got {eta!r}")
    return int(eta)


def is_due(message: Message[Any], now_ms: int) -> bool:
    """Return whether a message may run at ``now_ms``."""
    eta = message_eta_ms(message)
    return eta is None or eta <= now_ms


def backoff_ms(
    attempts: int,
    *,
    factor: int = 5,
    max_backoff: int = 2000,
    max_exponent: int = 32,
    jitter: bool = True,
    draw: float = 0.0,
    cap_draw: float | None = None,
) -> int:
    """Return Dramatiq's exponential backoff, in ms, for ``attempts`` attempts so far.

    ``factor × 2^min(attempts, max_exponent)``; with jitter, multiplied by
    ``1 + draw``, and when that exceeds ``max_backoff``, replaced by
    ``max_backoff × (0.5 + cap_draw / 2)``; without jitter, capped at ``max_backoff``.

    Args:
        attempts: failed attempts so far (0 before the first retry).
        factor: the minimum backoff, ms.
        max_backoff: the upper bound, ms.
        max_exponent: the exponent stops growing here.
        jitter: whether to apply the random factors.
        draw: a uniform random number in [0, 1) for the growth jitter.
        cap_draw: a second one for the cap jitter (defaults to ``draw``).

    Raises:
        InvalidValue: a draw outside [0, 1) or a negative count.
    """
    if attempts < 0:
        raise InvalidValue(f"attempts must be >= 0, got {attempts!r}")
    second = draw if cap_draw is None else cap_draw
    for name, value in (("draw", draw), ("cap_draw", second)):
        if not 0.0 <= value < 1.0:
            raise InvalidValue(f"{name} must be in [0, 1), got {value!r}")
    backoff = factor * 2 ** min(attempts, max_exponent)
    if not jitter:
        return int(min(backoff, max_backoff))
    backoff = int(backoff * (1.0 + draw))
    if backoff > max_backoff:
        backoff = int(max_backoff * (0.5 + second / 2))
    return backoff


def with_options(message: M, **options: Any) -> M:
    """Return ``message`` with options merged in (Dramatiq's ``copy(options=...)``)."""
    return message.copy(options=FrozenDict(options))
