"""The core's recovery, replacement, lease and dead-letter-expiry transitions, and the
policy functions behind them (the delivery cap, eta validity, queue names, options)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dq import core
from dq.core import (
    Ack,
    BrokerState,
    Command,
    DeathReason,
    DeclareQueue,
    Enqueue,
    ExpireDeadLetters,
    ExpireLeases,
    InvalidTransition,
    InvalidValue,
    Nack,
    Recover,
    Release,
    Renew,
    Replace,
    Requeue,
    Reserve,
    Run,
    Start,
    apply,
    initial_state,
    policy,
)
from dq.core import effects as fx
from dq.core import events as ev
from dq.core.machine import dead_letters, deliveries_of, held_by, holding, pending, waiting
from dq.core.records import Message


def message(queue_name: str = "a", n: int = 0, **options: Any) -> Message[Any]:
    return Message(queue_name, "f", (n,), core.EMPTY, core.FrozenDict(options), f"id-{n}", 1000)


def run(*commands: Command, state: BrokerState | None = None) -> core.Step:
    step = core.Step(initial_state() if state is None else state)
    for command in commands:
        step = apply(step.state, command)
    return step


def held(n: int, consumer: str = "c", *, lease: int | None = None) -> BrokerState:
    """A state where ``consumer`` holds entries 1..n of queue ``a``."""
    enqueues = [Enqueue(message("a", i), b"%d" % i) for i in range(1, n + 1)]
    return run(DeclareQueue("a"), *enqueues, Reserve("a", consumer, n, lease)).state


# -- Recover: the delivery cap ------------------------------------------------------------


def test_a_first_death_counts_one_delivery_for_every_entry_held() -> None:
    state = held(3)
    step = apply(state, Recover("c", now_ms=50, max_deliveries=10))
    assert [e.seq for e in waiting(step.state, "a")] == [1, 2, 3]  # back, oldest first
    assert [deliveries_of(step.state, seq) for seq in (1, 2, 3)] == [1, 1, 1]
    assert [type(e) for e in step.effects] == [fx.CountDeliveries, fx.PushReady] * 3
    assert all(isinstance(e, ev.Recovered) and e.deliveries == 1 for e in step.events)
    assert held_by(step.state, "c") == ()


def test_after_the_first_death_only_a_death_while_running_alone_counts() -> None:
    state = apply(held(3), Recover("c", 0, 10)).state  # all three are suspects now
    state = apply(state, Reserve("a", "c", 3)).state
    state = apply(state, Start(1, alone=True)).state  # the poison, alone
    state = apply(state, Start(2, alone=False)).state  # ran beside others
    step = apply(state, Recover("c", 0, 10))  # 3 only waited
    assert [deliveries_of(step.state, seq) for seq in (1, 2, 3)] == [2, 1, 1]


def test_the_poison_message_is_dead_lettered_and_the_bystander_is_not() -> None:
    # 1 kills its consumer each time it runs; 2 is innocent and ran beside it once.
    state = run(Start(1, alone=False), Start(2, alone=False), state=held(2)).state
    state = apply(state, Recover("c", 0, max_deliveries=3)).state
    # Both are suspects now, so each runs alone; only 1 kills its consumer.
    state = run(Reserve("a", "c", 2), Start(1, alone=True), state=state).state
    state = apply(state, Recover("c", now_ms=99, max_deliveries=3)).state
    assert deliveries_of(state, 1) == 2 and dead_letters(state, "a") == ()
    state = run(Reserve("a", "c", 2), Start(1, alone=True), state=state).state
    step = apply(state, Recover("c", now_ms=99, max_deliveries=3))
    state = step.state
    (dead,) = dead_letters(state, "a")
    assert dead.entry.seq == 1 and dead.reason is DeathReason.MAX_DELIVERIES
    assert dead.dead_at_ms == 99
    assert ev.DeadLettered(dead.entry, 3, DeathReason.MAX_DELIVERIES) in step.events
    assert [e.seq for e in waiting(state, "a")] == [2]
    assert deliveries_of(state, 2) == 1  # only its first, unattributed death
    assert deliveries_of(state, 1) == 0  # a dead letter keeps no count


def test_no_cap_means_nothing_is_ever_dead_lettered_for_deaths() -> None:
    state = held(1)
    for _ in range(50):
        state = apply(state, Start(1, alone=True)).state
        state = apply(state, Recover("c", 0, max_deliveries=0)).state
        state = apply(state, Reserve("a", "c", 1)).state
    assert dead_letters(state, "a") == ()
    assert deliveries_of(state, 1) == 50


def test_held_delayed_entries_are_never_counted() -> None:
    delayed = policy.delayed(message("a", 1), delay_ms=10, now_ms=0)
    state = run(DeclareQueue("a"), Enqueue(delayed, b"d"), Reserve("a.DQ", "c", 1)).state
    for _ in range(5):
        step = apply(state, Recover("c", 0, max_deliveries=2))
        assert [type(e) for e in step.effects] == [fx.PushDelayed]
        state = apply(step.state, Reserve("a.DQ", "c", 1)).state
    assert deliveries_of(state, 1) == 0 and dead_letters(state, "a") == ()


def test_settling_drops_the_count_and_requeue_and_release_keep_it() -> None:
    state = apply(held(3), Recover("c", 0, 10)).state
    state = apply(state, Reserve("a", "c", 3)).state
    state = run(Ack(1), Requeue(2), state=state).state
    assert deliveries_of(state, 1) == 0 and deliveries_of(state, 2) == 1
    state = apply(state, Release("c")).state  # a clean close counts nothing
    assert deliveries_of(state, 3) == 1
    state = run(Reserve("a", "c", 2), Nack(2, 0), Nack(3, 0), state=state).state
    assert state.deliveries == core.BrokerState().deliveries


def test_start_applies_to_reserved_entries_only() -> None:
    delayed = policy.delayed(message("a", 1), delay_ms=10, now_ms=0)
    state = run(DeclareQueue("a"), Enqueue(delayed, b"d"), Reserve("a.DQ", "c", 1)).state
    with pytest.raises(InvalidTransition):
        apply(state, Start(1, alone=True))  # a held delayed message does not run
    with pytest.raises(InvalidTransition):
        apply(held(1), Start(7, alone=True))  # nobody holds 7


def test_recovering_a_consumer_that_holds_nothing_changes_nothing() -> None:
    state = held(1)
    step = apply(state, Recover("someone-else", 0, 10))
    assert step.state == state and step.effects == () and step.events == ()


# -- leases --------------------------------------------------------------------------------


def test_expire_leases_recovers_exactly_the_lapsed_reservations() -> None:
    state = held(2, "old", lease=100)
    state = run(Enqueue(message("a", 3), b"3"), Reserve("a", "new", 1, 500), state=state).state
    step = apply(state, ExpireLeases(now_ms=101, max_deliveries=10))
    assert {r.consumer for r in step.state.reserved.values()} == {"new"}
    assert [e.seq for e in waiting(step.state, "a")] == [1, 2]
    # A lease that ends exactly now has not lapsed yet.
    assert apply(state, ExpireLeases(now_ms=100)).state == state


def test_renew_extends_every_lease_of_one_consumer() -> None:
    state = held(2, "c", lease=100)
    step = apply(state, Renew("c", 1_000))
    assert step.effects == (fx.ExtendLeases("c", 1_000),)
    assert step.events == (ev.LeasesExtended("c", 1_000, 2),)
    assert apply(step.state, ExpireLeases(now_ms=500)).state == step.state
    assert not apply(step.state, ExpireLeases(now_ms=1_001)).state.reserved


def test_reservations_without_a_lease_never_expire() -> None:
    state = held(1)
    assert apply(state, ExpireLeases(now_ms=2**62)).state == state


# -- Replace -------------------------------------------------------------------------------


def test_replace_stores_the_retry_before_forgetting_the_original() -> None:
    state = apply(held(1), Recover("c", 0, 10)).state
    state = apply(state, Reserve("a", "c", 1)).state
    retry = policy.delayed(message("a", 1, retries=1), delay_ms=30, now_ms=1_000)
    step = apply(state, Replace(1, retry, b"retry"))
    push, forget = step.effects
    assert isinstance(push, fx.PushDelayed) and push.row[1:] == ("a.DQ", "id-1", 1_030, b"retry")
    assert isinstance(forget, fx.Forget) and forget.entry.seq == 1
    (replaced,) = step.events
    assert isinstance(replaced, ev.Replaced) and replaced.new.seq == push.row[0]
    assert pending(step.state, "a") == 1
    assert deliveries_of(step.state, 1) == 0  # the retry is a new copy: no count


def test_replace_with_a_ready_copy_and_from_a_held_entry() -> None:
    delayed = policy.delayed(message("a", 1), delay_ms=10, now_ms=0)
    state = run(DeclareQueue("a"), Enqueue(delayed, b"d"), Reserve("a.DQ", "c", 1)).state
    step = apply(state, Replace(1, message("a", 1), b"now"))
    assert [e.payload for e in waiting(step.state, "a")] == [b"now"]
    assert waiting(step.state, "a.DQ") == ()


@pytest.mark.parametrize("target", ["b", "b.DQ", "a.XQ"])
def test_replace_refuses_another_queue(target: str) -> None:
    state = run(DeclareQueue("b"), state=held(1)).state
    with pytest.raises(InvalidTransition, match=r"must be stored on 'a' or 'a\.DQ'"):
        apply(state, Replace(1, message(target, 1), b""))


def test_replace_refuses_a_bad_eta() -> None:
    with pytest.raises(InvalidValue, match="bad 'eta'"):
        apply(held(1), Replace(1, message("a.DQ", 1, eta=math.nan), b""))


# -- dead letters ----------------------------------------------------------------------------


def test_nack_keeps_the_reason_and_expiry_drops_only_old_dead_letters() -> None:
    state = held(3)
    state = run(
        Nack(1, 10),
        Nack(2, 20, DeathReason.BAD_ETA),
        Nack(3, 30, DeathReason.UNDECODABLE),
        state=state,
    ).state
    assert [d.reason for d in dead_letters(state, "a")] == [
        DeathReason.NACKED,
        DeathReason.BAD_ETA,
        DeathReason.UNDECODABLE,
    ]
    step = apply(state, ExpireDeadLetters("a", cutoff_ms=20))
    assert [d.entry.seq for d in dead_letters(step.state, "a")] == [3]
    assert step.events == (ev.DeadLettersExpired("a", 2),)
    assert step.effects == (fx.DropDeadLetters("a", 20),)
    with pytest.raises(InvalidTransition):
        apply(state, ExpireDeadLetters("undeclared", 0))


# -- policy ----------------------------------------------------------------------------------


@given(before=st.integers(0, 100), run_=st.sampled_from(list(Run)))
def test_deliveries_after_death(before: int, run_: Run) -> None:
    after = policy.deliveries_after_death(before, run_)
    assert after >= max(before, 1)
    # Only a first death or a death while running alone is charged.
    assert (after > before) == (before == 0 or run_ is Run.ALONE)
    assert after - before <= 1


@given(deliveries=st.integers(0, 100), cap=st.integers(0, 100))
def test_over_delivery_cap(deliveries: int, cap: int) -> None:
    assert policy.over_delivery_cap(deliveries, cap) == (cap > 0 and deliveries >= cap)


@pytest.mark.parametrize(
    ("value", "ok"),
    [(0, True), (2, True), (10, True), (1, False), (-1, False), (True, False), ("3", False)],
)
def test_delivery_cap_problem(value: object, ok: bool) -> None:
    assert (policy.delivery_cap_problem(value) is None) is ok


@pytest.mark.parametrize(
    "eta",
    [math.nan, math.inf, -math.inf, "1000", True, -1, policy.MAX_ETA_MS + 1, 1e300, [1]],
)
def test_eta_problem_refuses_what_no_clock_reaches(eta: object) -> None:
    problem = policy.eta_problem(eta)
    assert problem is not None and repr(eta) in problem


@given(eta=st.none() | st.integers(0, policy.MAX_ETA_MS) | st.floats(0, policy.MAX_ETA_MS))
def test_eta_problem_accepts_finite_times_in_range(eta: float | None) -> None:
    assert policy.eta_problem(eta) is None


def test_message_eta_ms_names_the_message() -> None:
    with pytest.raises(InvalidValue, match="id-7 has a bad 'eta' option"):
        policy.message_eta_ms(message("a.DQ", 7, eta=math.nan))
    assert policy.message_eta_ms(message("a.DQ", 7, eta=1234.9)) == 1234


def test_a_delay_past_the_year_9999_is_refused() -> None:
    with pytest.raises(InvalidValue, match="too long"):
        policy.eta_ms(1_700_000_000_000, 10**20)
    assert policy.eta_ms(0, policy.MAX_ETA_MS) == policy.MAX_ETA_MS


@pytest.mark.parametrize(
    "name",
    [
        "__heartbeats__",
        "__acks__.w.default",
        "__dq__.deliveries.default",
        "__dq__.notify.x",
        "default.msgs",
        "default.XQ",
        "default.DQ",
    ],
)
def test_names_colliding_with_broker_keys_are_refused(name: str) -> None:
    assert policy.queue_name_problem(name) is not None
    with pytest.raises(InvalidValue, match=f"invalid queue name '{name}'"):
        policy.check_queue_name(name)


def test_stored_queue_names_allow_the_delay_queue_of_a_valid_queue() -> None:
    assert policy.check_queue_name("default.DQ", stored=True) == "default.DQ"
    assert policy.stored_queue_problem("default.XQ") is not None
    assert policy.stored_queue_problem("__dq__.x.DQ") is not None
    assert policy.stored_queue_problem(7) is not None


@given(beats=st.dictionaries(st.sampled_from("abcd"), st.integers(0, 100)), now=st.integers(0, 200))
@settings(max_examples=200)
def test_dead_consumers(beats: dict[str, int], now: int) -> None:
    dead = policy.dead_consumers(beats, now, 50, alive=frozenset({"a"}))
    assert list(dead) == sorted(dead)
    for consumer, beat in beats.items():
        assert (consumer in dead) == (consumer != "a" and beat <= now - 50)
    assert policy.is_dead(None, now, 50)


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("time_limit", "x", False),
        ("time_limit", 0, True),  # Dramatiq: a message's 0 falls through to the actor's
        ("time_limit", math.inf, True),  # no limit
        ("time_limit", -1, False),
        ("time_limit", math.nan, False),
        ("max_backoff", math.inf, True),
        ("notify_shutdown", None, True),
        ("time_limit", 1.5, True),
        ("time_limit", None, True),
        ("max_retries", -1, False),
        ("max_retries", None, True),
        ("max_backoff", -100, False),
        ("min_backoff", math.inf, False),
        ("max_age", 10, True),
        ("notify_shutdown", 1, False),
        ("eta", math.nan, False),
        ("my_middlewares_option", object(), True),
    ],
)
def test_option_problem(key: str, value: object, ok: bool) -> None:
    problem = policy.option_problem(key, value)
    assert (problem is None) is ok
    if problem is not None:
        assert repr(value) in problem


def test_options_and_backoff_problems() -> None:
    assert policy.options_problem({"time_limit": 10, "retries": 2}) is None
    problem = policy.options_problem({"time_limit": 10, "retries": -2})
    assert problem is not None and "'retries'" in problem
    assert policy.backoff_problem(10, -100) is not None
    assert policy.backoff_problem(0, 0) is None


def test_enqueue_of_a_delayed_copy_with_a_bad_eta_is_refused() -> None:
    state = run(DeclareQueue("a")).state
    with pytest.raises(InvalidValue):
        apply(state, Enqueue(message("a.DQ", 1, eta=math.inf), b""))


# -- priority order --------------------------------------------------------------------------


def test_reserve_takes_lower_priorities_first_and_requeues_keep_them() -> None:
    state = run(
        DeclareQueue("a"),
        Enqueue(message("a", 1), b"1", priority=5),
        Enqueue(message("a", 2), b"2"),
        Enqueue(message("a", 3), b"3", priority=-1),
        Enqueue(message("a", 4), b"4", priority=5),
    ).state
    assert [e.seq for e in waiting(state, "a")] == [3, 2, 1, 4]
    step = apply(state, Reserve("a", "c", 2))
    assert [e.seq for e in step.effects[0].entries] == [3, 2]  # type: ignore[union-attr]  # Deliver
    state = run(Requeue(3), state=step.state).state  # back with its priority: first again
    assert [e.seq for e in waiting(state, "a")] == [3, 1, 4]
    state = run(Reserve("a", "c", 3), Recover("c", 0, 10), state=state).state
    assert [e.seq for e in waiting(state, "a")] == [3, 2, 1, 4]  # by priority again
    assert pending(state, "a") == 4


def test_a_delayed_message_gets_its_priority_when_promoted_or_replaced() -> None:
    delayed = policy.delayed(message("a", 1), delay_ms=10, now_ms=0)
    state = run(
        DeclareQueue("a"),
        Enqueue(message("a", 2), b"2"),
        Enqueue(delayed, b"d", priority=9),  # ignored on the delay queue
        Reserve("a.DQ", "c", 1),
    ).state
    promoted = policy.promoted(delayed)
    state = apply(state, core.Promote(2, promoted, b"p", priority=-3)).state
    assert [e.payload for e in waiting(state, "a")] == [b"p", b"2"]
    state = run(Reserve("a", "c", 1), state=state).state
    (seq,) = [r.entry.seq for r in held_by(state, "c")]
    state = apply(state, Replace(seq, message("a", 1), b"r", priority=4)).state
    assert [e.payload for e in waiting(state, "a")] == [b"2", b"r"]


# -- slices of a server's state ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "count", "ok"),
    [
        (None, 0, True),
        (0, 0, True),
        (3, 3, True),
        (b"4", 4, True),
        ("5", 5, True),
        (2.0, 2, True),
        (b"x", 1, False),
        (-2, 1, False),
        (2.5, 1, False),
        (True, 1, False),
    ],
)
def test_stored_deliveries_reads_what_a_server_kept(raw: object, count: int, ok: bool) -> None:
    got, problem = policy.stored_deliveries(raw)
    assert got == count
    assert (problem is None) is ok
    if problem is not None:
        assert repr(raw) in problem


def test_holding_is_the_state_in_which_reservations_are_held() -> None:
    full = held(3)  # a consumer holds 1..3 of "a"
    reservations = list(full.reserved.values())
    state = holding(reservations, {1: 2, 2: 0})
    assert state.reserved == full.reserved
    assert state.queues["a"].in_flight == 3 and pending(state, "a") == 3
    assert deliveries_of(state, 1) == 2 and deliveries_of(state, 2) == 0
    # The core answers for the slice as for the whole: the same entries come back.
    sliced = apply(holding(reservations), Recover("c", 0, 10))
    whole = apply(full, Recover("c", 0, 10))
    assert sliced.effects == whole.effects
    assert holding([]) == initial_state()
