"""Pure decisions: queue naming, delays and etas, retry backoff.

Randomness and time come in as arguments, so each function is a plain function of its
inputs and can be property-tested exhaustively.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

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


# -- middleware decisions (Dramatiq's rules, as pure functions) ------------------------

#: Dramatiq's Retries defaults (ms).
DEFAULT_MAX_RETRIES = 20
DEFAULT_MIN_BACKOFF = 15_000
DEFAULT_MAX_BACKOFF = 604_800_000  # 7 days: also the cap on any computed backoff
#: Dramatiq's TimeLimit default (ms) and Results' result TTL.
DEFAULT_TIME_LIMIT = 600_000

_MISSING: Any = object()


def by_presence(key: str, message_options: Mapping[str, Any], *sources: Mapping[str, Any]) -> Any:
    """Return the first value of ``key`` found, message first, then each source.

    The "by key presence" rule (spec/wire.md §1.5): a present key wins even when its
    value is ``None``. Returns ``_MISSING`` when no mapping has the key.
    """
    for mapping in (message_options, *sources):
        value = mapping.get(key, _MISSING)
        if value is not _MISSING:
            return value
    return _MISSING


def option(
    key: str,
    message_options: Mapping[str, Any],
    actor_options: Mapping[str, Any],
    default: Any,
    *,
    rule: str = "presence",
) -> Any:
    """Look an option up as Dramatiq does: the message, then the actor, then ``default``.

    Args:
        key: the option.
        message_options: the message's options.
        actor_options: the actor's options.
        default: the middleware's default.
        rule: ``"presence"`` (a present key wins, even ``None``), ``"truthy"`` (a
            falsy value falls through: Dramatiq's ``or``), or ``"not-none"`` (only
            ``None`` falls through).

    Raises:
        InvalidValue: an unknown rule.
    """
    if rule == "presence":
        if key in message_options:
            return message_options[key]
        return actor_options.get(key, default)
    if rule == "truthy":
        return message_options.get(key) or actor_options.get(key) or default
    if rule == "not-none":
        value = message_options.get(key)
        if value is None:
            value = actor_options.get(key)
        return default if value is None else value
    raise InvalidValue(f"unknown lookup rule {rule!r}; use 'presence', 'truthy' or 'not-none'")


@attrs.frozen
class RetryIn:
    """Retry the message after ``delay_ms``."""

    delay_ms: int


@attrs.frozen
class GiveUp:
    """Do not retry: dead-letter the message.

    Attributes:
        reason: ``"throws"`` (an exception the actor declares as final),
            ``"retry_when"`` (the predicate said no) or ``"exhausted"``
            (``max_retries`` reached).
    """

    reason: str


def retry_decision(
    *,
    retries_so_far: int,
    max_retries: int | None,
    throws_matched: bool,
    retry_when_verdict: bool | None,
    explicit_delay_ms: int | None,
    min_backoff: int,
    max_backoff: int,
    draw: float,
    cap_draw: float | None = None,
) -> RetryIn | GiveUp:
    """Decide what happens to a message whose actor raised (Dramatiq's Retries rules).

    Args:
        retries_so_far: the message's ``retries`` option before this failure (0 on the
            first failure).
        max_retries: the effective ``max_retries`` (None: unlimited).
        throws_matched: the exception is one of the actor's ``throws``.
        retry_when_verdict: what ``retry_when(retries_so_far, exc)`` answered, or None
            when no predicate is set (then ``max_retries`` decides).
        explicit_delay_ms: the delay of a raised ``dq.Retry(delay=...)``, or None.
        min_backoff: the effective ``min_backoff`` (ms).
        max_backoff: the effective ``max_backoff`` (ms); capped at 7 days.
        draw: a uniform random number in [0, 1) for the backoff jitter.
        cap_draw: a second one for the cap jitter.
    """
    if throws_matched:
        return GiveUp("throws")
    if retry_when_verdict is not None:
        if not retry_when_verdict:
            return GiveUp("retry_when")
    elif max_retries is not None and retries_so_far >= max_retries:
        return GiveUp("exhausted")
    if explicit_delay_ms is not None:
        return RetryIn(explicit_delay_ms)
    return RetryIn(
        backoff_ms(
            retries_so_far,
            factor=min_backoff,
            max_backoff=min(max_backoff, DEFAULT_MAX_BACKOFF),
            draw=draw,
            cap_draw=cap_draw,
        )
    )


def failed_attempt(message: M, *, traceback_text: str, now_ms: int) -> M:
    """Return ``message`` with the options Dramatiq's Retries records after a failure:
    ``retries`` incremented (0 when absent), ``traceback`` and ``requeue_timestamp``."""
    retries = message.options.get("retries") or 0
    return message.copy(
        options={"retries": retries + 1, "traceback": traceback_text, "requeue_timestamp": now_ms}
    )


def is_too_old(message_timestamp_ms: int, now_ms: int, max_age_ms: int | None) -> bool:
    """Return whether a message is past its ``max_age`` (None or 0: no limit)."""
    if not max_age_ms:
        return False
    return now_ms - message_timestamp_ms >= max_age_ms


def time_limit_deadline_ms(start_ms: int, limit_ms: float) -> float:
    """Return when an actor started at ``start_ms`` with ``limit_ms`` runs out of time
    (``inf`` when the limit is infinite)."""
    return start_ms + limit_ms
