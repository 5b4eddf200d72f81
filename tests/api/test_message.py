"""`dq.Message` (api.md §5.1, §20 items 6, 10, 11, 12) and `FrozenDict`."""

from __future__ import annotations

import copy
import json
import pickle
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dq
from dq.brokers.stub import StubBroker
from dq.core import EMPTY, FrozenDict
from dq.message import generate_unique_id

FIELDS = (
    "queue_name",
    "actor_name",
    "args",
    "kwargs",
    "options",
    "message_id",
    "message_timestamp",
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _is_uuid4(value: str) -> bool:
    parsed = uuid.UUID(value)
    return parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == value


def _message(**changes: Any) -> dq.Message[Any]:
    fields: dict[str, Any] = {
        "queue_name": "default",
        "actor_name": "add",
        "args": (1, 2),
        "kwargs": {"a": 1},
        "options": {"max_retries": 3, "eta": 10},
        "message_id": "5eed0001-0000-4000-8000-000000000001",
        "message_timestamp": 1764028800001,
    }
    fields.update(changes)
    return dq.Message(**fields)


def _assert_deep_frozen(value: Any, path: str = "options") -> None:
    """Every mapping inside is a FrozenDict and every sequence a tuple."""
    if isinstance(value, dict):
        assert type(value) is FrozenDict, f"{path} is a mutable {type(value).__name__}"
        for key, item in value.items():
            _assert_deep_frozen(item, f"{path}[{key!r}]")
    elif isinstance(value, list | tuple):
        assert type(value) is tuple, f"{path} is a mutable {type(value).__name__}"
        for i, item in enumerate(value):
            _assert_deep_frozen(item, f"{path}[{i}]")


# -- defaults and construction ------------------------------------------------------


def test_defaults() -> None:
    before = _now_ms()
    message: dq.Message[Any] = dq.Message("q", "act", (1, 2))
    after = _now_ms()
    assert message.args == (1, 2)
    assert message.kwargs == {}
    assert message.options == {}
    assert isinstance(message.kwargs, dict)
    assert isinstance(message.options, dict)
    assert _is_uuid4(message.message_id)
    assert type(message.message_timestamp) is int
    assert before <= message.message_timestamp <= after


def test_each_message_gets_a_new_id() -> None:
    ids = {dq.Message("q", "a").message_id for _ in range(1000)}
    assert len(ids) == 1000
    assert all(_is_uuid4(i) for i in ids)
    assert _is_uuid4(generate_unique_id())


def test_fields_are_positional_in_wire_order() -> None:
    values = ("q", "a", (1,), {"k": 1}, {"o": 2}, "id", 5)
    message: dq.Message[Any] = dq.Message(*values)
    assert tuple(getattr(message, f) for f in FIELDS) == values
    assert tuple(message.asdict().values()) == values


@pytest.mark.parametrize(
    "args",
    [[1, 2], (1, 2), iter([1, 2]), (x for x in (1, 2)), range(1, 3)],
    ids=["list", "tuple", "iterator", "generator", "range"],
)
def test_args_iterable_is_coerced_to_tuple(args: Any) -> None:
    message: dq.Message[Any] = dq.Message("q", "a", args)
    assert type(message.args) is tuple
    assert message.args == (1, 2)


def test_send_returns_message_with_defaults() -> None:
    # api.md §20 item 6.
    broker = StubBroker(middleware=[])

    @dq.actor(broker=broker)
    def add(x: int, y: int) -> int:
        return x + y

    before = _now_ms()
    message = add.send(1, 2)
    after = _now_ms()
    assert isinstance(message, dq.Message)
    assert message.args == (1, 2)
    assert message.kwargs == {}
    assert message.actor_name == "add"
    assert message.queue_name == "default"
    assert _is_uuid4(message.message_id)
    assert before <= message.message_timestamp <= after
    # What went on the queue decodes to the same message.
    assert dq.Message.decode(message.encode()) == message


# -- copy, _replace and the namedtuple API ------------------------------------------


def test_copy_merges_options_and_keeps_id_and_timestamp() -> None:
    original = _message(options={"b": 1, "a": "orig", "max_retries": 3})
    merged = original.copy(options={"a": "overridden", "z": 9})
    assert type(merged) is dq.Message
    assert list(merged.options.items()) == [
        ("b", 1),
        ("a", "overridden"),
        ("max_retries", 3),
        ("z", 9),
    ]
    assert merged.message_id == original.message_id
    assert merged.message_timestamp == original.message_timestamp
    assert (merged.queue_name, merged.actor_name, merged.args, merged.kwargs) == (
        original.queue_name,
        original.actor_name,
        original.args,
        original.kwargs,
    )
    # The original is untouched.
    assert original.options == {"b": 1, "a": "orig", "max_retries": 3}
    assert type(merged.options) is FrozenDict


def test_copy_replaces_other_fields() -> None:
    original = _message()
    changed = original.copy(
        queue_name="default.DQ",
        actor_name="other",
        args=[3],
        kwargs={"b": 2},
        message_id="new-id",
        message_timestamp=7,
    )
    assert changed.asdict() == {
        "queue_name": "default.DQ",
        "actor_name": "other",
        "args": (3,),
        "kwargs": {"b": 2},
        "options": original.options,
        "message_id": "new-id",
        "message_timestamp": 7,
    }
    assert type(changed.args) is tuple
    assert type(changed.kwargs) is FrozenDict
    assert original.copy() == original
    assert original.copy(options={}) == original


def test_replace_replaces_options_without_merging() -> None:
    original = _message()
    replaced = original._replace(options={"only": 1}, args=[9], queue_name="x")
    assert replaced.options == {"only": 1}
    assert type(replaced.options) is FrozenDict
    assert replaced.args == (9,)
    assert replaced.queue_name == "x"
    assert replaced.message_id == original.message_id
    assert type(replaced) is dq.Message
    with pytest.raises(TypeError, match="nope"):
        original._replace(nope=1)


def test_namedtuple_compatibility() -> None:
    message = _message()
    assert message._fields == FIELDS
    assert dq.Message._fields == FIELDS
    assert message._field_defaults == {}
    assert dq.Message._field_defaults == {}
    assert message._asdict() == message.asdict()
    assert list(message._asdict()) == list(FIELDS)


def test_asdict_is_shallow_and_new_each_time() -> None:
    message = _message()
    data = message.asdict()
    assert data["options"] is message.options
    assert data["kwargs"] is message.kwargs
    assert data["args"] is message.args
    data["queue_name"] = "changed"
    assert message.queue_name == "default"
    assert message.asdict() is not message.asdict()


# -- timestamps, str, repr, equality -------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(2**37), max_value=2**45))
def test_message_datetime_is_utc_and_matches_timestamp(timestamp: int) -> None:
    message = _message(message_timestamp=timestamp)
    moment = message.message_datetime
    assert moment.tzinfo is not None
    assert moment.utcoffset() == timedelta(0)
    assert moment == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=timestamp)
    assert moment.timestamp() == pytest.approx(timestamp / 1000, abs=1e-6)


def test_message_datetime_example() -> None:
    moment = _message(message_timestamp=1764028800123).message_datetime
    assert moment == datetime(2025, 11, 25, 0, 0, 0, 123000, tzinfo=UTC)


def test_str_shows_call() -> None:
    message = _message(args=(1, "x", [2]), kwargs={"k": "v", "n": None})
    assert str(message) == "add(1, 'x', [2], k='v', n=None)"
    assert str(_message(args=(), kwargs={})) == "add()"


def test_repr_is_field_wise() -> None:
    text = repr(_message())
    assert text.startswith("Message(queue_name='default', actor_name='add', args=(1, 2), ")
    assert "message_id='5eed0001-0000-4000-8000-000000000001'" in text
    assert "message_timestamp=1764028800001" in text


def test_equality_is_field_wise() -> None:
    assert _message() == _message()
    assert _message() != _message(message_id="other")
    assert _message() != _message(options={})
    assert _message() != _message(args=(1, 3))
    as_dict: object = _message().asdict()
    assert _message() != as_dict
    assert _message(options={"a": 1, "b": 2}) == _message(options={"b": 2, "a": 1})


def test_ordering_compares_field_tuples() -> None:
    assert _message(queue_name="a") < _message(queue_name="b")
    assert _message(args=(1,)) < _message(args=(2,))
    assert not _message() < _message()
    assert sorted([_message(message_id="b"), _message(message_id="a")])[0].message_id == "a"


# -- Message.build ------------------------------------------------------------------


def test_build_valid_equals_constructor() -> None:
    built: dq.Message[Any] = dq.Message.build(
        queue_name="q",
        actor_name="a",
        args=[1],
        kwargs={"k": 1},
        options={"pipe_target": {"args": [1]}},
        message_id="id",
        message_timestamp=5,
    )
    assert type(built) is dq.Message
    assert built == dq.Message("q", "a", (1,), {"k": 1}, {"pipe_target": {"args": [1]}}, "id", 5)
    _assert_deep_frozen(built.options)
    defaulted: dq.Message[Any] = dq.Message.build(queue_name="q", actor_name="a")
    assert defaulted.args == () and defaulted.kwargs == {} and defaulted.options == {}
    assert _is_uuid4(defaulted.message_id)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("queue_name", 1),
        ("queue_name", None),
        ("actor_name", b"add"),
        ("kwargs", [("a", 1)]),
        ("kwargs", {1: "x"}),
        ("options", "x"),
        ("options", {None: 1}),
        ("message_id", 5),
        ("message_id", uuid.uuid4()),
        ("message_timestamp", "1"),
        ("message_timestamp", 1.5),
        ("message_timestamp", True),
        ("args", 5),
        ("args", "ab"),
    ],
)
def test_build_type_checks_name_the_field(field: str, value: object) -> None:
    fields: dict[str, Any] = {"queue_name": "q", "actor_name": "a", field: value}
    with pytest.raises(TypeError, match=field):
        dq.Message.build(**fields)


# -- immutability -------------------------------------------------------------------


_MUTATIONS: list[tuple[str, Callable[[Any], object]]] = [
    ("options_setitem", lambda m: m.options.__setitem__("x", 1)),
    ("kwargs_setitem", lambda m: m.kwargs.__setitem__("x", 1)),
    ("kwargs_delitem", lambda m: m.kwargs.__delitem__("a")),
    ("options_delitem", lambda m: m.options.__delitem__("eta")),
    ("options_update", lambda m: m.options.update({"x": 1})),
    ("options_update_kw", lambda m: m.options.update(x=1)),
    ("options_pop", lambda m: m.options.pop("eta")),
    ("options_popitem", lambda m: m.options.popitem()),
    ("options_setdefault", lambda m: m.options.setdefault("x", 1)),
    ("options_clear", lambda m: m.options.clear()),
    ("options_ior", lambda m: m.options.__ior__({"x": 1})),
    ("kwargs_clear", lambda m: m.kwargs.clear()),
]


@pytest.mark.parametrize(("name", "mutate"), _MUTATIONS, ids=[n for n, _ in _MUTATIONS])
def test_mappings_refuse_every_change(name: str, mutate: Callable[[Any], object]) -> None:
    message = _message()
    before = message.asdict()
    with pytest.raises(TypeError, match="read-only"):
        mutate(message)
    assert message.asdict() == before
    assert message.options == {"max_retries": 3, "eta": 10}
    assert message.kwargs == {"a": 1}


def test_statement_forms_of_mutation_raise() -> None:
    message = _message()
    options: Any = message.options
    kwargs: Any = message.kwargs
    with pytest.raises(TypeError):
        options["x"] = 1
    with pytest.raises(TypeError):
        del kwargs["a"]
    with pytest.raises(TypeError):
        options |= {"x": 1}
    assert message.options == {"max_retries": 3, "eta": 10}


def test_fields_cannot_be_reassigned() -> None:
    message = _message()
    anything: Any = message
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        anything.queue_name = "x"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        anything.options = {}
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        del anything.message_id
    assert message.queue_name == "default"
    assert type(message.args) is tuple


_NESTED = {
    "pipe_target": {
        "queue_name": "q",
        "actor_name": "next",
        "args": [1, [2, {"deep": [3]}]],
        "kwargs": {"to": ["a@example.com"]},
        "options": {"pipe_target": {"args": [], "options": {}}},
    },
    "group_completion_callbacks": [{"args": [1], "kwargs": {}, "options": {"x": [1]}}],
    "plain": 1,
}


def _nested_via(path: str) -> dq.Message[Any]:
    base = _message(options={"max_retries": 3})
    if path == "constructor":
        return _message(options=_NESTED)
    if path == "build":
        return dq.Message.build(queue_name="default", actor_name="add", options=_NESTED)
    if path == "decode":
        return dq.Message.decode(_message(options=_NESTED).encode())
    if path == "copy":
        return base._replace(options={}).copy(options=_NESTED)  # merge into no options
    if path == "_replace":
        return base._replace(options=_NESTED)
    if path == "frozendict_input":
        return _message(options=FrozenDict(_NESTED))
    raise AssertionError(path)


_PATHS = ["constructor", "build", "decode", "copy", "_replace", "frozendict_input"]


@pytest.mark.parametrize("path", _PATHS)
def test_nested_option_values_are_frozen(path: str) -> None:
    message = _nested_via(path)
    _assert_deep_frozen(message.options)
    target: Any = message.options["pipe_target"]
    with pytest.raises(TypeError):
        target["kwargs"]["to"] = "b@example.com"
    with pytest.raises((TypeError, AttributeError)):
        target["args"][1].append(4)
    # Frozen values encode exactly like the plain ones.
    expected_options = json.dumps(_NESTED, separators=(",", ":"))
    assert f'"options":{expected_options},' in message.encode().decode()
    assert json.loads(message.encode())["options"] == _NESTED


def test_nested_values_inside_tuple_options_are_frozen() -> None:
    message = _message(options={"callbacks": ({"args": [1]}, [2])})
    _assert_deep_frozen(message.options)
    assert json.loads(message.encode())["options"] == {"callbacks": [{"args": [1]}, [2]]}


def test_nested_frozendict_values_are_frozen_all_the_way_down() -> None:
    inner = FrozenDict({"kwargs": FrozenDict({"to": ["a@example.com"]})})
    message = _message(options={"pipe_target": inner})
    _assert_deep_frozen(message.options)


def test_kwargs_and_args_keep_their_values() -> None:
    # Only options are deep-frozen; args/kwargs values are the caller's (as Dramatiq).
    message = _message(args=([1],), kwargs={"k": [2]})
    assert message.args == ([1],)
    assert message.kwargs == {"k": [2]}


# -- pickling and copying ------------------------------------------------------------


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_round_trip(protocol: int) -> None:
    message = _message(options=_NESTED)
    restored = pickle.loads(pickle.dumps(message, protocol=protocol))
    assert type(restored) is dq.Message
    assert restored == message
    assert restored.encode() == message.encode()
    assert type(restored.options) is FrozenDict
    assert type(restored.kwargs) is FrozenDict
    _assert_deep_frozen(restored.options)
    options: Any = restored.options
    with pytest.raises(TypeError):
        options["x"] = 1


def test_copy_module_on_messages() -> None:
    message = _message(options=_NESTED)
    assert copy.copy(message) == message
    deep = copy.deepcopy(message)
    assert deep == message
    assert type(deep.options) is FrozenDict
    assert deep.encode() == message.encode()


# -- FrozenDict ---------------------------------------------------------------------


def test_frozendict_is_a_read_only_dict() -> None:
    frozen = FrozenDict({"a": 1, "b": [2]})
    assert isinstance(frozen, dict)
    plain = {"a": 1, "b": [2]}
    assert frozen == plain
    assert plain == frozen
    assert frozen != {"a": 1}
    assert list(frozen) == ["a", "b"]
    assert FrozenDict([("x", 1), ("y", 2)]) == {"x": 1, "y": 2}
    assert FrozenDict() == {} == EMPTY
    assert json.dumps(frozen) == '{"a": 1, "b": [2]}'
    assert repr(FrozenDict({"a": 1})) == "FrozenDict({'a': 1})"
    assert repr(FrozenDict()) == "FrozenDict({})"


def test_frozendict_hash() -> None:
    one = FrozenDict({"a": 1, "b": (2, 3)})
    same = FrozenDict({"b": (2, 3), "a": 1})
    assert one == same
    assert hash(one) == hash(same)
    assert len({one, same, FrozenDict({"a": 2})}) == 2
    assert {one: "value"}[same] == "value"
    assert hash(FrozenDict()) == hash(EMPTY)
    with pytest.raises(TypeError):
        hash(FrozenDict({"a": [1]}))


def test_frozendict_or() -> None:
    left = FrozenDict({"a": 1, "b": 2})
    merged = left | {"b": 3, "c": 4}
    assert type(merged) is FrozenDict
    assert list(merged.items()) == [("a", 1), ("b", 3), ("c", 4)]
    assert left == {"a": 1, "b": 2}
    ror = {"z": 0} | left
    assert ror == {"z": 0, "a": 1, "b": 2}


def test_frozendict_copy_and_deepcopy() -> None:
    nested = [1, [2]]
    frozen = FrozenDict({"n": nested})
    assert copy.copy(frozen) is frozen
    deep = copy.deepcopy(frozen)
    assert type(deep) is FrozenDict
    assert deep == frozen
    assert deep is not frozen
    assert deep["n"] is not nested
    assert deep["n"][1] is not nested[1]
    shared = [1]
    both = copy.deepcopy(FrozenDict({"x": shared, "y": shared}))
    assert both["x"] is both["y"]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_frozendict_pickles(protocol: int) -> None:
    frozen = FrozenDict({"a": 1, "b": FrozenDict({"c": (1, 2)})})
    restored = pickle.loads(pickle.dumps(frozen, protocol=protocol))
    assert type(restored) is FrozenDict
    assert restored == frozen
    assert type(restored["b"]) is FrozenDict
    assert list(restored) == ["a", "b"]
