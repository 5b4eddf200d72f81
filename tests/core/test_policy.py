"""Property tests of the pure middleware decisions in dq.core.policy."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from dq.core import EMPTY, FrozenDict, policy
from dq.core.records import Message

draws = st.floats(0.0, 1.0, exclude_max=True)
small = st.integers(0, 50)


@given(
    retries=small,
    max_retries=st.none() | small,
    throws=st.booleans(),
    verdict=st.none() | st.booleans(),
    explicit=st.none() | st.integers(0, 10**9),
    min_backoff=st.integers(0, 10**6),
    max_backoff=st.integers(0, 10**10),
    draw=draws,
    cap_draw=draws,
)
def test_retry_decision(
    retries: int,
    max_retries: int | None,
    throws: bool,
    verdict: bool | None,
    explicit: int | None,
    min_backoff: int,
    max_backoff: int,
    draw: float,
    cap_draw: float,
) -> None:
    decision = policy.retry_decision(
        retries_so_far=retries,
        max_retries=max_retries,
        throws_matched=throws,
        retry_when_verdict=verdict,
        explicit_delay_ms=explicit,
        min_backoff=min_backoff,
        max_backoff=max_backoff,
        draw=draw,
        cap_draw=cap_draw,
    )
    if throws:
        assert decision == policy.GiveUp("throws")
    elif verdict is not None:
        # retry_when decides alone: max_retries is not consulted.
        if verdict:
            assert isinstance(decision, policy.RetryIn)
        else:
            assert decision == policy.GiveUp("retry_when")
    elif max_retries is not None and retries >= max_retries:
        assert decision == policy.GiveUp("exhausted")
    else:
        assert isinstance(decision, policy.RetryIn)
    if isinstance(decision, policy.RetryIn):
        if explicit is not None:
            assert decision.delay_ms == explicit
        else:
            cap = min(max_backoff, policy.DEFAULT_MAX_BACKOFF)
            base = min_backoff * 2 ** min(retries, 32)
            # Dramatiq's bounds: base..2*base, or half the cap..the cap when over it.
            assert decision.delay_ms <= max(cap, 2 * base)
            if int(base * (1 + draw)) <= cap:
                assert base <= decision.delay_ms <= 2 * base
            else:
                assert cap // 2 <= decision.delay_ms <= cap


@given(ts=st.integers(0, 10**13), now=st.integers(0, 10**13), max_age=st.none() | small)
def test_is_too_old(ts: int, now: int, max_age: int | None) -> None:
    assert policy.is_too_old(ts, now, max_age) == bool(max_age and now - ts >= max_age)


values = st.none() | st.integers(-2, 2) | st.booleans() | st.text(max_size=2)


@given(
    message_value=st.just("absent") | values,
    actor_value=st.just("absent") | values,
    default=values,
)
def test_option_lookup_rules(message_value: Any, actor_value: Any, default: Any) -> None:
    m: FrozenDict[str, Any] = (
        EMPTY if message_value == "absent" else FrozenDict({"k": message_value})
    )
    a: dict[str, Any] = {} if actor_value == "absent" else {"k": actor_value}
    # By key presence: a present key wins even when it is None or falsy.
    expected_presence = m["k"] if "k" in m else a.get("k", default)
    assert policy.option("k", m, a, default) == expected_presence
    # Truthy (Dramatiq's `or`).
    assert policy.option("k", m, a, default, rule="truthy") == (m.get("k") or a.get("k") or default)
    # Not-None: only None falls through.
    for_not_none = [v for v in (m.get("k"), a.get("k")) if v is not None]
    assert policy.option("k", m, a, default, rule="not-none") == (
        for_not_none[0] if for_not_none else default
    )


@given(retries=st.none() | small, now=st.integers(0, 10**13))
def test_failed_attempt_builds_a_new_message(retries: int | None, now: int) -> None:
    options: dict[str, Any] = {"max_retries": 3}
    if retries is not None:
        options["retries"] = retries
    original: Message[Any] = Message("q", "a", (1,), EMPTY, FrozenDict(options), "id", 5)
    failed = policy.failed_attempt(original, traceback_text="tb", now_ms=now)
    assert failed is not original
    assert failed.options["retries"] == (retries or 0) + 1
    assert failed.options["traceback"] == "tb"
    assert failed.options["requeue_timestamp"] == now
    assert failed.options["max_retries"] == 3
    assert failed.message_id == "id" and failed.message_timestamp == 5
    assert original.options == options  # untouched


@given(delay=st.integers(0, 10**9), now=st.integers(0, 10**13))
def test_delayed_and_promoted_are_inverse_on_the_queue(delay: int, now: int) -> None:
    original: Message[Any] = Message("q", "a", (), EMPTY, FrozenDict({"x": 1}), "id", 5)
    stored = policy.delayed(original, delay_ms=delay, now_ms=now)
    assert stored.queue_name == "q.DQ" and stored.options["eta"] == now + delay
    assert policy.promoted(stored) == original
