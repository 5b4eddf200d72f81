"""`dq.common` (api.md §13, wire.md §2), `dq.core.policy.backoff_ms` and `dq.runtime`."""

from __future__ import annotations

import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dq
from dq import common, runtime
from dq.core import InvalidValue, policy
from dq.core.policy import backoff_ms
from dq.message import generate_unique_id

UUID4_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
SEVEN_DAYS = 604_800_000


@pytest.fixture
def restore_runtime() -> Iterator[None]:
    """Put the process's clock and id source back, whatever the test installs."""
    clock, ids = runtime.get_clock(), runtime.get_id_source()
    try:
        yield
    finally:
        runtime.set_clock(clock)
        runtime.set_id_source(ids)
    assert runtime.get_clock() is clock
    assert runtime.get_id_source() is ids


# -- queue naming -------------------------------------------------------------------

NAME_TABLE = [
    # name, q_name, dq_name, xq_name
    ("default", "default", "default.DQ", "default.XQ"),
    ("a", "a", "a.DQ", "a.XQ"),
    ("a.DQ", "a", "a.DQ", "a.XQ"),
    ("a.XQ", "a", "a.DQ", "a.XQ"),
    ("a.DQ.DQ", "a.DQ", "a.DQ.DQ", "a.DQ.XQ"),
    ("a.XQ.XQ", "a.XQ", "a.XQ.DQ", "a.XQ.XQ"),
    ("a.DQ.XQ", "a.DQ", "a.DQ.DQ", "a.DQ.XQ"),
    ("a.XQ.DQ", "a.XQ", "a.XQ.DQ", "a.XQ.XQ"),
    ("a.dq", "a.dq", "a.dq.DQ", "a.dq.XQ"),
    ("a.xq", "a.xq", "a.xq.DQ", "a.xq.XQ"),
    ("aDQ", "aDQ", "aDQ.DQ", "aDQ.XQ"),
    ("a.DQx", "a.DQx", "a.DQx.DQ", "a.DQx.XQ"),
    ("emails.v2", "emails.v2", "emails.v2.DQ", "emails.v2.XQ"),
    ("", "", ".DQ", ".XQ"),
    (".DQ", "", ".DQ", ".XQ"),
    (".XQ", "", ".DQ", ".XQ"),
]


@pytest.mark.parametrize(("name", "q", "d", "x"), NAME_TABLE)
def test_queue_name_helpers_table(name: str, q: str, d: str, x: str) -> None:
    assert common.q_name(name) == q
    assert common.dq_name(name) == d
    assert common.xq_name(name) == x


def test_common_reexports_policy_helpers() -> None:
    assert common.q_name is policy.q_name
    assert common.dq_name is policy.dq_name
    assert common.xq_name is policy.xq_name
    assert set(common.__all__) >= {
        "compute_backoff",
        "current_millis",
        "dq_name",
        "getenv_int",
        "iter_queue",
        "join_all",
        "join_queue",
        "q_name",
        "xq_name",
    }


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="aDQX._", max_size=10))
def test_queue_name_properties(name: str) -> None:
    canonical = common.q_name(name)
    assert common.dq_name(name) == canonical + ".DQ"
    assert common.xq_name(name) == canonical + ".XQ"
    assert common.q_name(canonical + ".DQ") == canonical
    assert common.q_name(canonical + ".XQ") == canonical
    assert common.dq_name(common.dq_name(name)) == common.dq_name(name)
    assert common.xq_name(common.xq_name(name)) == common.xq_name(name)
    # At most one suffix is removed.
    assert len(name) - len(canonical) in (0, 3)


# -- compute_backoff and backoff_ms ---------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    attempts=st.integers(min_value=0, max_value=80),
    factor=st.integers(min_value=1, max_value=100_000),
    max_backoff=st.integers(min_value=1, max_value=SEVEN_DAYS * 4),
    max_exponent=st.integers(min_value=0, max_value=40),
    jitter=st.booleans(),
)
def test_compute_backoff_within_dramatiq_bounds(
    attempts: int, factor: int, max_backoff: int, max_exponent: int, jitter: bool
) -> None:
    next_attempts, backoff = common.compute_backoff(
        attempts,
        factor=factor,
        jitter=jitter,
        max_backoff=max_backoff,
        max_exponent=max_exponent,
    )
    assert next_attempts == attempts + 1
    assert type(backoff) is int
    base = factor * 2 ** min(attempts, max_exponent)
    if not jitter:
        assert backoff == min(base, max_backoff)
    elif base * 2 <= max_backoff:
        # Never capped: base × U(1, 2).
        assert base <= backoff <= 2 * base
    elif base > max_backoff:
        # Always capped: max × U(0.5, 1).
        assert max_backoff // 2 <= backoff <= max_backoff
    else:
        assert min(base, max_backoff // 2) <= backoff <= max_backoff
    assert backoff <= max_backoff


def test_compute_backoff_defaults_and_randomness() -> None:
    assert common.compute_backoff(0, jitter=False) == (1, 5)
    assert common.compute_backoff(3, jitter=False) == (4, 40)
    assert common.compute_backoff(20, jitter=False) == (21, 2000)
    assert common.compute_backoff(100, factor=1, jitter=False, max_backoff=10**30) == (
        101,
        2**32,
    )
    draws = {common.compute_backoff(0, factor=1_000_000, max_backoff=10**9)[1] for _ in range(50)}
    assert len(draws) > 1
    assert all(1_000_000 <= d <= 2_000_000 for d in draws)
    # First retry of a default Retries actor: 15-30 s (api.md §20 item 32).
    for _ in range(50):
        _, first = common.compute_backoff(0, factor=15_000, max_backoff=SEVEN_DAYS)
        assert 15_000 <= first <= 30_000


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"attempts": 0, "factor": 15000, "draw": 0.0}, 15000),
        ({"attempts": 0, "factor": 15000, "draw": 0.5}, 22500),
        ({"attempts": 0, "factor": 15000, "draw": 0.999}, 29985),
        ({"attempts": 3, "factor": 15000, "draw": 0.25}, 150000),
        ({"attempts": 1, "factor": 5, "draw": 0.5}, 15),
        ({"attempts": 0, "factor": 7, "draw": 0.5}, 10),  # int(10.5) truncates
        ({"attempts": 40, "factor": 1, "max_exponent": 3, "draw": 0.0}, 8),
        ({"attempts": 10, "factor": 5, "jitter": False, "max_backoff": 2000}, 2000),
        ({"attempts": 2, "factor": 5, "jitter": False, "draw": 0.9}, 20),
        # Over the maximum: max × (0.5 + cap_draw / 2), truncated.
        ({"attempts": 0, "factor": 15000, "max_backoff": 20000, "draw": 0.5}, 15000),
        (
            {"attempts": 0, "factor": 15000, "max_backoff": 20000, "draw": 0.5, "cap_draw": 0.0},
            10000,
        ),
        (
            {"attempts": 0, "factor": 15000, "max_backoff": 20001, "draw": 0.9, "cap_draw": 0.0},
            10000,
        ),
        (
            {"attempts": 0, "factor": 15000, "max_backoff": 20000, "draw": 0.5, "cap_draw": 0.999},
            19990,
        ),
        (
            {"attempts": 5, "factor": 15000, "max_backoff": 100_000, "draw": 0.0, "cap_draw": 0.3},
            65000,
        ),
        # Exactly at the maximum is not over it.
        ({"attempts": 0, "factor": 10, "max_backoff": 15, "draw": 0.5}, 15),
    ],
)
def test_backoff_ms_exact_values(kwargs: dict[str, Any], expected: int) -> None:
    assert backoff_ms(**{"max_backoff": SEVEN_DAYS, **kwargs}) == expected


@settings(max_examples=300, deadline=None)
@given(
    attempts=st.integers(min_value=0, max_value=60),
    factor=st.integers(min_value=1, max_value=100_000),
    max_backoff=st.integers(min_value=1, max_value=SEVEN_DAYS),
    draw=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    cap_draw=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_backoff_ms_matches_the_formula(
    attempts: int, factor: int, max_backoff: int, draw: float, cap_draw: float
) -> None:
    base = factor * 2 ** min(attempts, 32)
    grown = int(base * (1.0 + draw))
    expected = grown if grown <= max_backoff else int(max_backoff * (0.5 + cap_draw / 2))
    assert (
        backoff_ms(attempts, factor=factor, max_backoff=max_backoff, draw=draw, cap_draw=cap_draw)
        == expected
    )
    assert backoff_ms(
        attempts, factor=factor, max_backoff=max_backoff, jitter=False, draw=draw
    ) == min(base, max_backoff)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"draw": 1.0}, "draw"),
        ({"draw": -0.1}, "draw"),
        ({"draw": 1.5}, "draw"),
        ({"draw": float("nan")}, "draw"),
        ({"draw": 0.5, "cap_draw": 1.0}, "cap_draw"),
        ({"draw": 0.5, "cap_draw": -0.01}, "cap_draw"),
        ({"attempts": -1}, "attempts"),
    ],
)
def test_backoff_ms_rejects_invalid_inputs(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidValue) as info:
        backoff_ms(**{"attempts": 0, **kwargs})
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(name)


# -- getenv_int and current_millis ----------------------------------------------------

ENV = "DQ_TEST_GETENV_INT"


def test_getenv_int_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert common.getenv_int(ENV) is None


@pytest.mark.parametrize(("raw", "value"), [("42", 42), ("-7", -7), ("0", 0), (" 5 ", 5)])
def test_getenv_int_parses(monkeypatch: pytest.MonkeyPatch, raw: str, value: int) -> None:
    monkeypatch.setenv(ENV, raw)
    result = common.getenv_int(ENV)
    assert result == value
    assert type(result) is int


@pytest.mark.parametrize("raw", ["abc", "1.5", "", "0x10", "1e3"])
def test_getenv_int_rejects_non_integers(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(ENV, raw)
    with pytest.raises(ValueError, match=ENV):
        common.getenv_int(ENV)


def test_current_millis_is_the_wall_clock() -> None:
    before = time.time_ns() // 1_000_000
    now = common.current_millis()
    after = time.time_ns() // 1_000_000
    assert type(now) is int
    assert before <= now <= after


# -- iter_queue, join_queue, join_all -------------------------------------------------


def test_iter_queue_drains_without_blocking() -> None:
    q: queue.Queue[int] = queue.Queue()
    for i in range(5):
        q.put(i)
    assert list(common.iter_queue(q)) == [0, 1, 2, 3, 4]
    assert q.empty()
    started = time.monotonic()
    assert list(common.iter_queue(q)) == []
    assert time.monotonic() - started < 1.0


def test_iter_queue_is_lazy() -> None:
    q: queue.Queue[int] = queue.Queue()
    q.put(1)
    q.put(2)
    items = common.iter_queue(q)
    assert next(items) == 1
    q.put(3)
    assert list(items) == [2, 3]


def test_join_queue_returns_when_done() -> None:
    q: queue.Queue[int] = queue.Queue()
    common.join_queue(q)
    common.join_queue(q, timeout=0)
    common.join_queue(q, timeout=0.01)
    q.put(1)
    q.get()
    q.task_done()
    common.join_queue(q, timeout=0)


def test_join_queue_times_out() -> None:
    q: queue.Queue[int] = queue.Queue()
    q.put(1)
    with pytest.raises(dq.QueueJoinTimeout):
        common.join_queue(q, timeout=0)
    started = time.monotonic()
    with pytest.raises(dq.QueueJoinTimeout) as info:
        common.join_queue(q, timeout=0.1)
    elapsed = time.monotonic() - started
    assert 0.1 <= elapsed < 2.0
    assert not isinstance(info.value, dq.BrokerError)
    assert q.unfinished_tasks == 1


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_join_queue_waits_for_a_worker(timeout: float | None) -> None:
    q: queue.Queue[int] = queue.Queue()
    for i in range(3):
        q.put(i)
    done: list[int] = []

    def worker() -> None:
        for _ in range(3):
            item = q.get()
            time.sleep(0.01)
            done.append(item)
            q.task_done()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        common.join_queue(q, timeout=timeout)
        assert done == [0, 1, 2]
    finally:
        thread.join(5)


class _Joinable:
    def __init__(self, sleep: float) -> None:
        self.sleep = sleep
        self.timeouts: list[int | None] = []

    def join(self, *, timeout: int | None = None) -> None:
        self.timeouts.append(timeout)
        time.sleep(self.sleep)


def test_join_all_shares_one_budget() -> None:
    first, second = _Joinable(0.1), _Joinable(0)
    common.join_all([first, second], 1000)
    first_timeout, second_timeout = first.timeouts[0], second.timeouts[0]
    assert first_timeout is not None and second_timeout is not None
    assert 900 <= first_timeout <= 1000
    assert second_timeout <= first_timeout - 100
    unlimited = _Joinable(0)
    common.join_all([unlimited], None)
    assert unlimited.timeouts == [None]


# -- the runtime: ids -----------------------------------------------------------------


def test_uuid4_source_ids_are_unique_lowercase_uuid4() -> None:
    source = runtime.UUID4Source()
    ids = [source.new_id() for _ in range(10_000)]
    assert len(set(ids)) == 10_000
    for value in ids:
        assert UUID4_RE.fullmatch(value), value
    for value in ids[:500]:
        parsed = uuid.UUID(value)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == value
    # Every hex digit and every variant digit shows up: the bits are random.
    assert {v[19] for v in ids} == set("89ab")
    assert set("".join(v[:8] for v in ids)) == set("0123456789abcdef")


def test_two_sources_do_not_collide() -> None:
    a, b = runtime.UUID4Source(), runtime.UUID4Source()
    assert not {a.new_id() for _ in range(1000)} & {b.new_id() for _ in range(1000)}


def _ids_from_forked_child(make_id: Any, count: int) -> list[str]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_end)
            payload = "\n".join(make_id() for _ in range(count)).encode()
            view = memoryview(payload)
            while view:
                written = os.write(write_end, view)
                view = view[written:]
            os.close(write_end)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks: list[bytes] = []
    try:
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ids = b"".join(chunks).decode().split("\n")
    assert len(ids) == count
    return ids


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_different_ids() -> None:
    source = runtime.UUID4Source()
    source.new_id()  # the parent now holds a partly used batch
    child = _ids_from_forked_child(source.new_id, 600)
    parent = [source.new_id() for _ in range(600)]
    assert len(set(child)) == 600
    assert all(UUID4_RE.fullmatch(i) for i in child)
    assert not set(child) & set(parent)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_messages_get_different_ids() -> None:
    dq.Message("q", "a")  # make sure the default source holds a batch

    def message_id() -> str:
        return dq.Message("q", "a").message_id

    child = _ids_from_forked_child(message_id, 300)
    parent = [message_id() for _ in range(300)]
    assert not set(child) & set(parent)


# -- the runtime: swapping the clock and the id source ------------------------------


class _FixedClock:
    def __init__(self, now: int) -> None:
        self.now = now

    def now_ms(self) -> int:
        return self.now


class _CountingIds:
    def __init__(self) -> None:
        self.n = 0

    def new_id(self) -> str:
        self.n += 1
        return f"id-{self.n}"


def test_defaults_are_system_clock_and_uuid4(restore_runtime: None) -> None:
    assert isinstance(runtime.get_clock(), runtime.SystemClock)
    assert isinstance(runtime.get_id_source(), runtime.UUID4Source)
    assert isinstance(runtime.get_clock(), runtime.Clock)
    assert isinstance(runtime.get_id_source(), runtime.IdSource)
    assert isinstance(_FixedClock(1), runtime.Clock)
    assert isinstance(_CountingIds(), runtime.IdSource)
    before = time.time_ns() // 1_000_000
    now = runtime.SystemClock().now_ms()
    assert before <= now <= time.time_ns() // 1_000_000


def test_set_clock_and_id_source_swap_and_restore(restore_runtime: None) -> None:
    original_clock, original_ids = runtime.get_clock(), runtime.get_id_source()
    clock, ids = _FixedClock(1_700_000_000_123), _CountingIds()
    runtime.set_clock(clock)
    runtime.set_id_source(ids)
    assert runtime.get_clock() is clock
    assert runtime.get_id_source() is ids

    message: dq.Message[Any] = dq.Message("q", "a")
    assert message.message_id == "id-1"
    assert message.message_timestamp == 1_700_000_000_123
    assert generate_unique_id() == "id-2"
    assert common.current_millis() == 1_700_000_000_123
    clock.now = 5
    assert dq.Message("q", "a").message_timestamp == 5
    # Explicit values bypass the sources.
    explicit: dq.Message[Any] = dq.Message("q", "a", (), None, None, "mine", 9)
    assert (explicit.message_id, explicit.message_timestamp) == ("mine", 9)
    assert ids.n == 3

    runtime.set_clock(original_clock)
    runtime.set_id_source(original_ids)
    restored: dq.Message[Any] = dq.Message("q", "a")
    assert UUID4_RE.fullmatch(restored.message_id)
    assert abs(restored.message_timestamp - time.time() * 1000) < 60_000
    assert ids.n == 3
