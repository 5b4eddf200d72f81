"""Pure decisions: queue naming, delays and etas, retry backoff, the delivery cap,
which consumers count as dead, and which option values are acceptable.

Every broker asks these functions; no Lua script, SQL statement or AMQP sequence
makes one of these decisions itself.

Randomness and time come in as arguments, so each function is a plain function of its
inputs and can be property-tested exhaustively.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from dq.core._frozendict import FrozenDict
from dq.core.errors import InvalidValue
from dq.core.records import Message, Run

M = TypeVar("M", bound=Message[Any])

DELAY_SUFFIX = ".DQ"
DEAD_SUFFIX = ".XQ"

#: Dramatiq's actor queue-name pattern (it must match the whole name).
QUEUE_NAME_PATTERN = re.compile(r"[a-zA-Z_][a-zA-Z0-9._-]*")

#: Longest canonical name: RabbitMQ names are at most 255 bytes, and ``.XQ`` is added.
MAX_QUEUE_NAME_BYTES = 252

#: The latest eta (ms since the epoch) dq accepts: the last millisecond of the year
#: 9999, the largest time `datetime` represents, and exact in a double (Lua, JSON).
MAX_ETA_MS = 253_402_300_799_999

#: Prefixes and names of the brokers' own keys: no queue may be named so.
#: ``__heartbeats__`` and ``__acks__.*`` are Dramatiq's Redis keys, ``__dq__.*`` dq's.
RESERVED_QUEUE_NAMES = frozenset({"__heartbeats__"})
RESERVED_QUEUE_PREFIXES = ("__acks__.", "__dq__.")


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
    if queue_name in RESERVED_QUEUE_NAMES or queue_name.startswith(RESERVED_QUEUE_PREFIXES):
        return "the names __heartbeats__, __acks__.* and __dq__.* are reserved for broker keys"
    if len(queue_name.encode()) > MAX_QUEUE_NAME_BYTES:
        return f"queue names are at most {MAX_QUEUE_NAME_BYTES} bytes long"
    return None


def stored_queue_problem(queue_name: object) -> str | None:
    """Return why a message cannot be stored on ``queue_name``, or None if it can.

    A message is stored on a queue an actor may use (`queue_name_problem`) or on
    that queue's delay queue (``q.DQ``); never on a dead-letter queue or on a name
    that collides with a broker's own keys.
    """
    if isinstance(queue_name, str) and queue_name.endswith(DELAY_SUFFIX):
        return queue_name_problem(queue_name[:-3])
    return queue_name_problem(queue_name)


def check_queue_name(queue_name: object, *, stored: bool = False) -> str:
    """Return ``queue_name`` if an actor may use it (``stored``: if a message may be
    stored on it, delay queues included).

    Raises:
        InvalidValue: it may not; the message names it and says why.
    """
    problem = (stored_queue_problem if stored else queue_name_problem)(queue_name)
    if problem is not None:
        raise InvalidValue(f"invalid queue name {queue_name!r}: {problem}")
    assert isinstance(queue_name, str)
    return queue_name


def eta_problem(eta: object) -> str | None:
    """Return why ``eta`` (an ``eta`` option's value) is not a time a message may
    wait for, or None if it is (None itself: no eta).

    An eta is a finite number of ms since the epoch, from 0 to `MAX_ETA_MS`. A
    message stored with any other eta (NaN, infinite, a string, from a foreign
    producer or a raw write) is dead-lettered for it (`DeathReason.BAD_ETA`).
    """
    if eta is None:
        return None
    if isinstance(eta, bool) or not isinstance(eta, int | float):
        return f"an eta is a number of milliseconds since the epoch, not {eta!r}"
    if isinstance(eta, float) and not math.isfinite(eta):
        return f"an eta is a finite number of milliseconds, not {eta!r}"
    if not 0 <= eta <= MAX_ETA_MS:
        return f"an eta is between 0 and {MAX_ETA_MS} ms since the epoch, not {eta!r}"
    return None


def eta_ms(now_ms: int, delay_ms: int) -> int:
    """Return when a message delayed by ``delay_ms`` at ``now_ms`` may run.

    Raises:
        InvalidValue: ``delay_ms`` is negative, or the eta is past `MAX_ETA_MS`.
    """
    if delay_ms < 0:
        raise InvalidValue(f"delay must be >= 0 milliseconds, got {delay_ms!r}")
    eta = now_ms + delay_ms
    if eta > MAX_ETA_MS:
        raise InvalidValue(
            f"delay {delay_ms!r} ms is too long: the eta would be past {MAX_ETA_MS} ms "
            "since the epoch (the year 9999)"
        )
    return eta


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
    """Return the message's eta in ms, or None when it has none (or it is ``null``).

    Raises:
        InvalidValue: the eta is not valid (`eta_problem`); the message names the
            message and the value.
    """
    eta = message.options.get("eta")
    if eta is None:
        return None
    problem = eta_problem(eta)
    if problem is not None:
        raise InvalidValue(f"message {message.message_id} has a bad 'eta' option: {problem}")
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


# -- the delivery cap, and who counts as dead ----------------------------------------------

#: How many deliveries a message may have cut short by its consumer's death, by default.
DEFAULT_MAX_DELIVERIES = 10


def delivery_cap_problem(max_deliveries: object) -> str | None:
    """Return why ``max_deliveries`` is not a valid cap, or None if it is.

    0 means no cap; otherwise at least 2, since the first death of a consumer that
    held several messages is charged to each of them (nobody knows which one
    killed it) and must not be enough to dead-letter any.
    """
    if isinstance(max_deliveries, bool) or not isinstance(max_deliveries, int):
        return f"max_deliveries is an integer, not {max_deliveries!r}"
    if max_deliveries < 0 or max_deliveries == 1:
        return f"max_deliveries is 0 (no cap) or at least 2, not {max_deliveries!r}"
    return None


def deliveries_after_death(before: int, run: Run) -> int:
    """Return an entry's count of deliveries cut short, after its consumer died
    holding it.

    The first death counts for every entry held (nothing tells which one killed
    the process, and runtimes need not report starts before it): the entry becomes
    a *suspect*, and dq's worker runs suspects alone. After that, only a death
    while the entry ran alone counts: a message that merely waited, or ran beside
    others, is never blamed for its neighbour.
    """
    if before == 0 or run is Run.ALONE:
        return before + 1
    return before


def stored_deliveries(raw: object) -> tuple[int, str | None]:
    """Return the delivery count a stored value stands for, and what was wrong with
    it (None when nothing was).

    A server keeps counts as it can (Redis hash fields are strings, SQLite columns
    take any type): a whole number >= 0, as an int, a whole float or decimal text, is
    itself; None (no count stored) is 0. Anything else (a negative number, garbage
    from a raw write) counts as 1: the entry is treated as a suspect, which costs it
    at most running alone, and is never dead-lettered for it.
    """
    if raw is None:
        return 0, None
    value: object = raw
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", "replace")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value, None
    return 1, f"a delivery count is a whole number >= 0, not {raw!r}; taken as 1"


def over_delivery_cap(deliveries: int, max_deliveries: int) -> bool:
    """Return whether an entry with ``deliveries`` deliveries cut short is dead-lettered
    under the cap ``max_deliveries`` (0: never)."""
    return max_deliveries > 0 and deliveries >= max_deliveries


def is_dead(last_beat_ms: int | None, now_ms: int, timeout_ms: int) -> bool:
    """Return whether a consumer whose last heartbeat was at ``last_beat_ms`` counts
    as dead at ``now_ms`` (no heartbeat at all: dead)."""
    return last_beat_ms is None or last_beat_ms <= now_ms - timeout_ms


def dead_consumers(
    beats: Mapping[str, int], now_ms: int, timeout_ms: int, *, alive: frozenset[str] = frozenset()
) -> tuple[str, ...]:
    """Return, sorted, the consumers of ``beats`` that count as dead at ``now_ms``,
    except those known ``alive`` (the caller itself)."""
    return tuple(
        sorted(
            consumer
            for consumer, beat in beats.items()
            if consumer not in alive and is_dead(beat, now_ms, timeout_ms)
        )
    )


def lease_expired(lease_until_ms: int | None, now_ms: int) -> bool:
    """Return whether a reservation leased until ``lease_until_ms`` has lapsed."""
    return lease_until_ms is not None and lease_until_ms < now_ms


# -- option values -------------------------------------------------------------------------


def _whole(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _number(value: object, minimum: float, *, infinite: bool = False) -> bool:
    """Whether ``value`` is a number (not a bool) >= ``minimum``; ``infinite``: or +inf."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return infinite and value == math.inf
    return value >= minimum


#: The options dq reads from a message, and what their values must be. Unknown
#: options pass: middleware of a user's own may read them. Dramatiq's meanings are
#: kept: ``inf`` is "no limit" for ``time_limit``, ``max_age`` and ``max_backoff``; a
#: ``time_limit`` of 0 on a message falls through to the actor's; ``null`` for
#: ``notify_shutdown`` falls through too.
_OPTION_RULES: dict[str, tuple[str, Any]] = {
    "max_retries": ("an integer >= 0, or null", lambda v: v is None or _whole(v, 0)),
    "retries": ("an integer >= 0, or null", lambda v: v is None or _whole(v, 0)),
    "min_backoff": ("a number of ms >= 0", lambda v: _number(v, 0)),
    "max_backoff": ("a number of ms >= 0, or inf", lambda v: _number(v, 0, infinite=True)),
    "max_age": (
        "a number of ms >= 0, inf, or null",
        lambda v: v is None or _number(v, 0, infinite=True),
    ),
    "time_limit": (
        "a number of ms >= 0, inf, or null",
        lambda v: v is None or _number(v, 0, infinite=True),
    ),
    "notify_shutdown": ("true, false or null", lambda v: v is None or isinstance(v, bool)),
    "eta": ("a finite number of ms", lambda v: eta_problem(v) is None),
}

#: The options whose values `option_problem` checks: a message with none of them needs
#: no check (a set test, no loop: the worker runs it for every message).
CHECKED_OPTIONS = frozenset(_OPTION_RULES)


def option_problem(key: str, value: object) -> str | None:
    """Return why ``value`` is not acceptable for the option ``key``, or None.

    Used at the boundary: `dq.Actor.send_with_options` and actor declarations refuse
    such a value, and a message decoded from the wire with one is dead-lettered
    (`DeathReason.BAD_OPTIONS`) instead of running with the option ignored.
    """
    rule = _OPTION_RULES.get(key)
    if rule is None:
        return None
    expected, accepts = rule
    if accepts(value):
        return None
    if key == "eta":
        return f"option 'eta': {eta_problem(value)}"
    return f"option {key!r} must be {expected}, not {value!r}"


def options_problem(options: Mapping[str, Any]) -> str | None:
    """Return the first problem of `option_problem` among ``options``, or None."""
    if CHECKED_OPTIONS.isdisjoint(options):
        return None
    for key, value in options.items():
        problem = option_problem(key, value)
        if problem is not None:
            return problem
    return None


def backoff_problem(min_backoff: object, max_backoff: object) -> str | None:
    """Return why a backoff range is unusable, or None (both ms >= 0, min <= max is
    not required: Dramatiq caps the computed backoff at max)."""
    for key, value in (("min_backoff", min_backoff), ("max_backoff", max_backoff)):
        problem = option_problem(key, value)
        if problem is not None:
            return problem
    return None
