"""`dq.core.persistent.PQueue`: a persistent FIFO queue, checked against ``deque``."""

from __future__ import annotations

import pickle
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dq.core import PQueue, empty_queue

#: One step: ("push", item, which version) or ("pop", _, which version).
_OPS = st.lists(
    st.tuples(
        st.sampled_from(["push", "push", "pop", "pop_twice"]),
        st.integers(min_value=-1000, max_value=1000),
        st.integers(min_value=0, max_value=10_000),
    ),
    max_size=80,
)


def _check(q: PQueue[int], model: deque[int]) -> None:
    assert list(q) == list(model)
    assert len(q) == len(model)
    assert bool(q) is bool(model)
    assert q == PQueue(model)
    assert hash(q) == hash(PQueue(model))
    assert repr(q) == f"PQueue({list(model)!r})"


@settings(max_examples=300, deadline=None)
@given(initial=st.lists(st.integers(), max_size=6), ops=_OPS)
def test_model_against_deque(initial: list[int], ops: list[tuple[str, int, int]]) -> None:
    # Every version ever produced is kept; each step applies to an arbitrary one, so
    # old versions are reused after newer ones were derived from them.
    versions: list[tuple[PQueue[int], deque[int]]] = [(PQueue(initial), deque(initial))]
    for op, item, pick in ops:
        q, model = versions[pick % len(versions)]
        if op == "push":
            new_model = deque(model)
            new_model.append(item)
            new = q.push(item)
            _check(new, new_model)
            versions.append((new, new_model))
        elif not model:
            with pytest.raises(IndexError):
                q.pop()
        else:
            head, rest = q.pop()
            assert head == model[0]
            new_model = deque(model)
            new_model.popleft()
            _check(rest, new_model)
            versions.append((rest, new_model))
            if op == "pop_twice":
                # Popping the same version again gives the same answer.
                again_head, again_rest = q.pop()
                assert again_head == head
                assert again_rest == rest
        # The version operated on is unchanged.
        _check(q, model)
    # Persistence: every version still yields exactly its own items.
    for q, model in versions:
        _check(q, model)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(), max_size=30), st.lists(st.integers(), max_size=30))
def test_equal_contents_are_equal_however_built(front: list[int], back: list[int]) -> None:
    built = PQueue(front)
    for item in back:
        built = built.push(item)
    pushed: PQueue[int] = empty_queue()
    for item in front + back:
        pushed = pushed.push(item)
    assert built == pushed == PQueue(front + back)
    assert hash(built) == hash(pushed)
    assert list(built) == front + back
    # Drain both: same items in FIFO order.
    drained: list[int] = []
    while built:
        item, built = built.pop()
        drained.append(item)
    assert drained == front + back
    assert len(built) == 0


def test_len_bool_iter() -> None:
    empty: PQueue[int] = PQueue()
    assert len(empty) == 0
    assert not empty
    assert list(empty) == []
    q = PQueue([1, 2]).push(3).push(4)
    assert len(q) == 4
    assert q
    assert list(q) == [1, 2, 3, 4]
    head, rest = q.pop()
    assert head == 1
    assert list(rest) == [2, 3, 4]
    assert list(q) == [1, 2, 3, 4]
    assert PQueue(iter([5, 6])) == PQueue(x for x in (5, 6))


def test_pop_crosses_from_back_to_front() -> None:
    q: PQueue[str] = empty_queue()
    for item in "abc":
        q = q.push(item)
    out: list[str] = []
    while q:
        item, q = q.pop()
        out.append(item)
        if item == "a":
            q = q.push("d")
    assert out == ["a", "b", "c", "d"]


def test_pop_on_empty_raises_index_error() -> None:
    with pytest.raises(IndexError, match="empty"):
        PQueue[int]().pop()
    with pytest.raises(IndexError):
        empty_queue().pop()
    _, rest = PQueue([1]).pop()
    with pytest.raises(IndexError):
        rest.pop()


def test_eq_hash_repr() -> None:
    assert PQueue([1, 2]) == PQueue[int]().push(1).push(2)
    assert PQueue([1, 2]) != PQueue([2, 1])
    assert PQueue([1, 2]) != PQueue([1, 2, 3])
    assert PQueue([1]) != [1]
    assert PQueue([1]) != (1,)
    assert empty_queue() == PQueue()
    assert hash(PQueue([1, 2])) == hash(PQueue[int]().push(1).push(2))
    assert len({PQueue([1]), PQueue([1]), PQueue([2])}) == 2
    assert repr(PQueue()) == "PQueue([])"
    assert repr(PQueue(["a", 1])) == "PQueue(['a', 1])"
    with pytest.raises(TypeError):
        hash(PQueue([[1]]))


def test_push_does_not_change_the_original() -> None:
    base = PQueue([1])
    a = base.push(2)
    b = base.push(3)
    assert list(base) == [1]
    assert list(a) == [1, 2]
    assert list(b) == [1, 3]
    _, a_rest = a.pop()
    assert list(a_rest) == [2]
    assert list(b) == [1, 3]


def test_large_queue_and_pickle() -> None:
    q: PQueue[int] = empty_queue()
    for i in range(100_000):
        q = q.push(i)
    assert len(q) == 100_000
    head, q = q.pop()
    assert head == 0
    assert len(q) == 99_999
    small = PQueue([1, 2]).push(3)
    assert pickle.loads(pickle.dumps(small)) == small


# -- priority bands ----------------------------------------------------------------------


@settings(max_examples=300)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["push", "push", "take"]), st.sampled_from([-2, 0, 0, 1, 5]))
        | st.tuples(st.just("pop"), st.just(0)),
        max_size=60,
    )
)
def test_priorities_against_a_sorted_model(ops: list[tuple[str, int]]) -> None:
    # The model: (priority, push order, item); lower priority first, FIFO within one.
    q: PQueue[int] = empty_queue()
    model: list[tuple[int, int, int]] = []
    versions: list[tuple[PQueue[int], list[int]]] = []
    for n, (op, arg) in enumerate(ops):
        if op == "push":
            q = q.push(n, arg)
            model.append((arg, n, n))
        elif op == "take":
            k = abs(arg)
            items, q = q.take(k)
            model.sort()
            assert items == [item for _, _, item in model[:k]]
            del model[:k]
        elif model:
            item, q = q.pop()
            model.sort()
            assert item == model.pop(0)[2]
        model.sort()
        assert list(q) == [item for _, _, item in model]
        assert [rank for rank, _ in q.ranked()] == [rank for rank, _, _ in model]
        assert len(q) == len(model) and bool(q) is bool(model)
        versions.append((q, list(q)))
    for version, contents in versions:  # every older version is unchanged
        assert list(version) == contents


def test_take_ranked_reports_each_items_priority() -> None:
    q: PQueue[str] = empty_queue()
    for item, rank in (("a", 0), ("b", 3), ("c", -1), ("d", 0), ("e", 3)):
        q = q.push(item, rank)
    taken, rest = q.take_ranked(3)
    assert taken == [(-1, "c"), (0, "a"), (0, "d")]
    assert list(rest.ranked()) == [(3, "b"), (3, "e")]
    empty: PQueue[str] = empty_queue()
    assert rest == empty.push("b", 3).push("e", 3)
    assert rest != PQueue(["b", "e"])  # same items, other priorities
    assert pickle.loads(pickle.dumps(q)) == q
