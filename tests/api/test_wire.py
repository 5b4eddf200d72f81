"""The wire envelope: byte compatibility with Dramatiq 2.2.1 (spec/wire.md §1).

The committed vectors were produced by real Dramatiq 2.2.1; every check here compares
dq against those bytes or against an independent ``json`` round trip.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dq
from dq.core import FrozenDict
from dq.encoder import JSONEncoder, PickleEncoder
from dq.wire import FIELDS, make_converter

VECTORS = Path(__file__).parent / "vectors"


def _load(name: str) -> list[tuple[str, bytes]]:
    rows: list[tuple[str, bytes]] = []
    with (VECTORS / name).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                rows.append((entry["name"], base64.b64decode(entry["payload_b64"], validate=True)))
    return rows


VALID = _load("dramatiq_2_2_1_messages.jsonl")
INVALID = _load("dramatiq_2_2_1_invalid.jsonl")
VALID_BY_NAME = dict(VALID)
INVALID_BY_NAME = dict(INVALID)
COMPACT = (",", ":")


def _same(a: Any, b: Any) -> bool:
    """JSON-structural equality: NaN equals NaN, -0.0 differs from 0.0, ints differ from
    floats, lists equal tuples, and mappings must have the same keys in the same order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _dumps(value: Any) -> bytes:
    """What Dramatiq's JSONEncoder writes: ``json.dumps`` with compact separators."""
    return json.dumps(value, separators=COMPACT).encode("utf-8")


@pytest.fixture
def restore_encoder() -> Iterator[None]:
    """Put the process-global encoder back whatever the test installs."""
    previous = dq.get_encoder()
    try:
        yield
    finally:
        dq.set_encoder(previous)
    assert dq.get_encoder() is previous


@pytest.fixture
def pickle_encoder(restore_encoder: None) -> PickleEncoder:
    encoder = PickleEncoder()
    dq.set_encoder(encoder)
    return encoder


# -- the vector files themselves ----------------------------------------------------


def test_vector_files_hold_every_documented_vector() -> None:
    assert list(VALID_BY_NAME) == [
        "plain_int_args",
        "empty_args_kwargs",
        "nested_kwargs",
        "unicode_strings",
        "float_special_values",
        "big_integers",
        "unsorted_key_order",
        "tuple_nested_in_args",
        "retried_message",
        "options_null_values",
        "delayed_stub_broker",
        "callbacks_on_success_on_failure",
        "pipeline_first_with_pipe_target",
        "group_completion_callbacks",
        "copy_options_merge_order",
        "mixed_json_types",
    ]
    assert set(INVALID_BY_NAME) == set(INVALID_EXPECTATIONS)
    assert len(INVALID) == len(INVALID_BY_NAME) == 18


def test_default_encoder_is_json() -> None:
    assert type(dq.get_encoder()) is JSONEncoder


# -- valid vectors --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "payload"), VALID, ids=[n for n, _ in VALID])
def test_vector_round_trips_byte_for_byte(name: str, payload: bytes) -> None:
    message = dq.Message.decode(payload)
    assert isinstance(message, dq.Message)
    assert message.encode() == payload
    # Re-decoding the re-encoding is stable too.
    assert dq.Message.decode(message.encode()).encode() == payload
    # Dramatiq's encoding is pure ASCII.
    assert payload.isascii()


@pytest.mark.parametrize(("name", "payload"), VALID, ids=[n for n, _ in VALID])
def test_vector_fields_match_independent_json_parse(name: str, payload: bytes) -> None:
    expected = json.loads(payload)
    assert list(expected) == list(FIELDS)
    message = dq.Message.decode(payload)

    assert message.queue_name == expected["queue_name"]
    assert message.actor_name == expected["actor_name"]
    assert type(message.args) is tuple
    assert _same(message.args, expected["args"])
    assert isinstance(message.kwargs, dict)
    assert isinstance(message.options, dict)
    assert _same(message.kwargs, expected["kwargs"])
    assert _same(message.options, expected["options"])
    assert message.message_id == expected["message_id"]
    assert type(message.message_timestamp) is int
    assert message.message_timestamp == expected["message_timestamp"]
    # The dict view is in wire order and re-serialises to the same bytes.
    assert list(message.asdict()) == list(FIELDS)
    assert _dumps(message.asdict()) == payload
    if b"NaN" not in payload:
        # Without NaN, plain dict equality holds too (kwargs are not deep-frozen).
        assert message.kwargs == expected["kwargs"]
        assert list(message.args) == expected["args"]


@pytest.mark.parametrize(("name", "payload"), VALID, ids=[n for n, _ in VALID])
def test_vector_slow_encoder_paths_agree(name: str, payload: bytes, restore_encoder: None) -> None:
    message = dq.Message.decode(payload)
    # The encoder's dict path (not the fast field path).
    assert JSONEncoder().encode(message.asdict()) == payload
    assert _same(JSONEncoder().decode(payload), json.loads(payload))

    # A JSONEncoder subclass goes through the converter path of Message.encode.
    class Sub(JSONEncoder):
        pass

    dq.set_encoder(Sub())
    assert message.encode() == payload
    assert dq.Message.decode(payload) == message


def test_special_float_vector_values() -> None:
    message = dq.Message.decode(VALID_BY_NAME["float_special_values"])
    assert message.args[0] == 1.5
    neg_zero, big, tiny, tenth, nan, inf, neg_inf = message.args[1:]
    assert neg_zero == 0.0 and math.copysign(1.0, neg_zero) == -1.0
    assert big == 1e300 and tiny == 5e-324 and tenth == 0.1
    assert math.isnan(nan)
    assert inf == math.inf and neg_inf == -math.inf
    assert message.options["time_limit"] == math.inf


def test_big_integer_vector_values() -> None:
    message = dq.Message.decode(VALID_BY_NAME["big_integers"])
    assert message.args == (
        2**64,
        2**64 + 1,
        -(2**80),
        12345678901234567890123456789,
        2**63 - 1,
        -(2**63),
    )


def test_delayed_vector_keeps_eta_last_and_dq_queue() -> None:
    message = dq.Message.decode(VALID_BY_NAME["delayed_stub_broker"])
    assert message.queue_name == "default.DQ"
    assert list(message.options) == ["max_retries", "eta"]
    assert isinstance(message.options["eta"], int)


def test_nested_option_vectors_decode_frozen() -> None:
    pipe = dq.Message.decode(VALID_BY_NAME["pipeline_first_with_pipe_target"])
    target = pipe.options["pipe_target"]
    assert type(target) is FrozenDict
    assert type(target["args"]) is tuple
    assert type(target["options"]["pipe_target"]) is FrozenDict
    assert target["options"]["pipe_target"]["actor_name"] == "finalize"
    innermost: Any = target["options"]["pipe_target"]
    with pytest.raises(TypeError):
        innermost["actor_name"] = "other"

    group = dq.Message.decode(VALID_BY_NAME["group_completion_callbacks"])
    callbacks = group.options["group_completion_callbacks"]
    assert type(callbacks) is tuple
    assert type(callbacks[0]) is FrozenDict
    assert callbacks[0]["message_id"] == "5eed0012-0000-4000-8000-000000000012"


# -- building the vectors from Python values (the encode side alone) ----------------


def _msg(
    queue_name: str,
    actor_name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: dict[str, Any],
    n: int,
) -> dq.Message[Any]:
    return dq.Message(
        queue_name,
        actor_name,
        args,
        kwargs,
        options,
        f"5eed{n:04x}-0000-4000-8000-{n:012x}",
        1764028800000 + n,
    )


def test_encode_reproduces_plain_vectors() -> None:
    assert _msg("default", "add", (1, 2), {}, {}, 1).encode() == VALID_BY_NAME["plain_int_args"]
    assert _msg("default", "add", (), {}, {}, 2).encode() == VALID_BY_NAME["empty_args_kwargs"]
    nested = _msg(
        "emails",
        "send_email",
        (),
        {
            "to": ["a@example.com", "b@example.com"],
            "meta": {"a": {"b": [1, {"c": None}]}, "flags": [True, False]},
            "empty": {},
            "empty_list": [],
        },
        {},
        3,
    )
    assert nested.encode() == VALID_BY_NAME["nested_kwargs"]
    mixed = _msg("default", "add", (None, True, False, 0, -1, "", [], {}), {"n": None}, {}, 0x14)
    assert mixed.encode() == VALID_BY_NAME["mixed_json_types"]


def test_encode_reproduces_unicode_vector() -> None:
    message = _msg(
        "default",
        "add",
        ("héllo wörld", "日本語", "emoji 😀 🧪", 'ctl\n\t"\\/\x00\x7f\u2028'),
        {"üñî": "💩"},
        {},
        4,
    )
    assert message.encode() == VALID_BY_NAME["unicode_strings"]


def test_encode_reproduces_float_and_int_vectors() -> None:
    floats = _msg(
        "default",
        "add",
        (1.5, -0.0, 1e300, 5e-324, 0.1, math.nan, math.inf, -math.inf),
        {},
        {"time_limit": math.inf},
        5,
    )
    assert floats.encode() == VALID_BY_NAME["float_special_values"]
    ints = _msg(
        "default",
        "add",
        (2**64, 2**64 + 1, -(2**80), 12345678901234567890123456789, 2**63 - 1, -(2**63)),
        {},
        {},
        6,
    )
    assert ints.encode() == VALID_BY_NAME["big_integers"]


def test_encode_reproduces_key_order_and_tuple_vectors() -> None:
    unsorted = _msg(
        "default",
        "add",
        (),
        {"zeta": 1, "alpha": 2, "Mid": 3, "beta": {"z": 0, "a": 1}},
        {"max_retries": 3, "eta": 5, "alpha_opt": "x"},
        7,
    )
    assert unsorted.encode() == VALID_BY_NAME["unsorted_key_order"]
    tuples = _msg("default", "add", ((1, 2), (3, (4, 5)), {"t": (6,)}), {}, {}, 8)
    assert tuples.encode() == VALID_BY_NAME["tuple_nested_in_args"]


def test_encode_reproduces_copy_merge_vector() -> None:
    original = _msg("default", "add", (1,), {}, {"b": 1, "a": "orig", "max_retries": 3}, 0x13)
    merged = original.copy(options={"a": "overridden", "z": 9, "eta": 1764028805000})
    assert merged.encode() == VALID_BY_NAME["copy_options_merge_order"]


def test_encode_reproduces_pipeline_and_group_vectors() -> None:
    step3 = _msg("default", "finalize", (), {}, {}, 0xF)
    step2 = _msg(
        "emails",
        "send_email",
        (),
        {"to": "x@example.com"},
        {"max_retries": 2, "pipe_target": step3.asdict()},
        0xE,
    )
    step1 = _msg("default", "add", (1, 2), {}, {"pipe_target": step2.asdict()}, 0xD)
    assert step1.encode() == VALID_BY_NAME["pipeline_first_with_pipe_target"]

    callback = _msg("default", "finalize", (), {}, {}, 0x12)
    child: dq.Message[Any] = dq.Message(
        "default",
        "add",
        (5, 6),
        {},
        {
            "group_completion_uuid": "d291bfd8-2d1d-4740-93d8-7f7d3b0f6954",
            "group_completion_callbacks": [callback.asdict()],
        },
        "5eed0010-0000-4000-8000-000000000010",
        1764028800016,
    )
    assert child.encode() == VALID_BY_NAME["group_completion_callbacks"]


# -- invalid vectors ----------------------------------------------------------------


class _NoCause(Exception):
    """Marker: the encoder's own DecodeError is the cause, and it has no cause itself."""


#: name → (words the error text must contain, the innermost cause type or None when
#: the envelope itself is rejected and there is no underlying exception).
INVALID_EXPECTATIONS: dict[str, tuple[tuple[str, ...], type[BaseException] | None]] = {
    "not_utf8": (("UTF-8",), UnicodeDecodeError),
    "not_utf8_lone_continuation": (("UTF-8",), UnicodeDecodeError),
    "not_json": (("JSON",), json.JSONDecodeError),
    "empty_bytes": (("JSON",), json.JSONDecodeError),
    "truncated_json": (("JSON",), json.JSONDecodeError),
    "utf8_bom_prefix": (("JSON",), json.JSONDecodeError),
    "trailing_garbage": (("JSON",), json.JSONDecodeError),
    "top_level_array": (("must be", "object", "list"), _NoCause),
    "top_level_string": (("must be", "object", "str"), _NoCause),
    "top_level_null": (("must be", "object"), _NoCause),
    "missing_args": (("missing", "args"), None),
    "missing_queue_name": (("missing", "queue_name"), None),
    "missing_actor_name": (("missing", "actor_name"), None),
    "missing_kwargs": (("missing", "kwargs"), None),
    "missing_options": (("missing", "options"), None),
    "unknown_extra_key": (("unknown", "extra"), None),
    "args_not_iterable_int": (("must be", "args"), None),
    "args_null": (("must be", "args"), None),
}


def _assert_shows_excerpt(error: dq.DecodeError, data: bytes | str) -> None:
    text = str(error)
    if not data:
        assert repr(data) in text
    else:
        # The start of the data's repr, without the closing quote.
        assert repr(data[:24])[:-1] in text


@pytest.mark.parametrize(("name", "payload"), INVALID, ids=[n for n, _ in INVALID])
def test_invalid_vector_raises_decode_error(name: str, payload: bytes) -> None:
    words, cause = INVALID_EXPECTATIONS[name]
    with pytest.raises(dq.DecodeError) as info:
        dq.Message.decode(payload)
    error = info.value
    assert isinstance(error, dq.DramatiqError)
    text = str(error)
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    _assert_shows_excerpt(error, payload)
    assert error.data is payload
    if cause is None:
        assert error.error is None
    elif cause is _NoCause:
        inner = error.error
        assert isinstance(inner, dq.DecodeError)
        assert inner.data == payload
        assert inner.error is None
    else:
        # Dramatiq's chain for steps 1-2: DecodeError(.error=DecodeError(.error=cause)).
        inner = error.error
        assert isinstance(inner, dq.DecodeError)
        assert inner.data == payload
        assert isinstance(inner.error, cause)
        assert error.__cause__ is inner


def test_decode_rejects_str_input() -> None:
    text = VALID_BY_NAME["plain_int_args"].decode("ascii")
    with pytest.raises(dq.DecodeError) as info:
        dq.Message.decode(text)  # type: ignore[arg-type]  # str on purpose
    assert info.value.data is text
    assert info.value.error is not None


@pytest.mark.parametrize(
    "payload",
    [
        # An integer longer than Python's int/str conversion limit (4300 digits).
        b'{"queue_name":"q","actor_name":"a","args":['
        + b"1" * 5000
        + b'],"kwargs":{},"options":{},"message_id":"x","message_timestamp":1}',
        # Nesting deeper than the recursion limit.
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["huge_integer", "deep_nesting"],
)
def test_every_decode_failure_is_a_decode_error(payload: bytes) -> None:
    # wire.md §1.3: Dramatiq wraps *any* failure of decode in DecodeError, so a
    # consumer can dead-letter the payload instead of crashing on it.
    with pytest.raises(dq.DecodeError) as info:
        dq.Message.decode(payload)
    assert info.value.data is payload


# -- dq is stricter than Dramatiq on types -----------------------------------------

_GOOD = {
    "queue_name": "default",
    "actor_name": "add",
    "args": [1],
    "kwargs": {"a": 1},
    "options": {"max_retries": 1},
    "message_id": "5eed0063-0000-4000-8000-000000000063",
    "message_timestamp": 1764028800000,
}

_MISSING = object()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("args", "abc"),
        ("args", {"a": 1}),
        ("kwargs", []),
        ("kwargs", None),
        ("kwargs", "x"),
        ("options", []),
        ("options", None),
        ("options", 1),
        ("queue_name", 1),
        ("queue_name", None),
        ("actor_name", ["add"]),
        ("message_id", 5),
        ("message_id", None),
        ("message_timestamp", 1.5),
        ("message_timestamp", 1764028800000.0),
        ("message_timestamp", "1764028800000"),
        ("message_timestamp", True),
        ("message_timestamp", None),
        ("message_id", _MISSING),
        ("message_timestamp", _MISSING),
    ],
)
def test_decode_rejects_wrong_field_types(field: str, value: object) -> None:
    data = dict(_GOOD)
    if value is _MISSING:
        del data[field]
    else:
        data[field] = value
    payload = _dumps(data)
    with pytest.raises(dq.DecodeError) as info:
        dq.Message.decode(payload)
    text = str(info.value)
    assert field in text
    assert ("missing" if value is _MISSING else "must") in text
    assert info.value.data is payload
    _assert_shows_excerpt(info.value, payload)


def test_decode_accepts_pretty_json_any_key_order_and_duplicates() -> None:
    shuffled = dict(reversed(list(_GOOD.items())))
    pretty = json.dumps(shuffled, indent=2).encode()
    message = dq.Message.decode(pretty)
    assert message.encode() == _dumps(_GOOD)

    duplicated = _dumps(_GOOD)[:-1] + b',"actor_name":"last"}'
    assert dq.Message.decode(duplicated).actor_name == "last"


def test_decode_accepts_raw_utf8() -> None:
    data = dict(_GOOD, args=["héllo 😀"])
    raw = json.dumps(data, separators=COMPACT, ensure_ascii=False).encode("utf-8")
    assert not raw.isascii()
    message = dq.Message.decode(raw)
    assert message.args == ("héllo 😀",)
    assert message.encode() == _dumps(data)


# -- the converter ------------------------------------------------------------------


def test_converter_unstructures_in_wire_order_and_structures_back() -> None:
    converter = make_converter()
    message: dq.Message[Any] = dq.Message(
        "q",
        "act",
        (1, [2]),
        {"k": "v"},
        {"pipe_target": {"args": [1]}, "eta": 5},
        "id-1",
        1234,
    )
    data = converter.unstructure(message)
    assert isinstance(data, dict)
    assert list(data) == list(FIELDS)
    assert data == message.asdict()
    assert data["options"] is message.options
    assert _dumps(data) == message.encode()

    back = converter.structure(data, dq.Message)
    assert type(back) is dq.Message
    assert back == message

    from_json = converter.structure(json.loads(message.encode()), dq.Message)
    assert from_json == message
    assert from_json.encode() == message.encode()


@pytest.mark.parametrize(("name", "payload"), VALID, ids=[n for n, _ in VALID])
def test_converter_structure_matches_decode_on_vectors(name: str, payload: bytes) -> None:
    converter = make_converter()
    message = converter.structure(json.loads(payload), dq.Message)
    assert message.encode() == payload
    assert _same(converter.unstructure(message), json.loads(payload))


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"args": "abc"}, "args"),
        ({"message_timestamp": 1.5}, "message_timestamp"),
        ({"extra": 1}, "unknown"),
    ],
)
def test_converter_structure_rejects_bad_dicts(change: dict[str, Any], word: str) -> None:
    data = dict(_GOOD, **change)
    with pytest.raises(dq.DecodeError) as info:
        make_converter().structure(data, dq.Message)
    assert word in str(info.value)
    assert info.value.data is data


def test_converter_structure_reports_missing_field() -> None:
    data = dict(_GOOD)
    del data["options"]
    with pytest.raises(dq.DecodeError, match="missing") as info:
        make_converter().structure(data, dq.Message)
    assert "options" in str(info.value)


# -- properties: arbitrary JSON-able content ---------------------------------------

_TEXT = st.text(
    st.characters() | st.sampled_from(["\ud800", "\udfff", "\u2028", "\x00", '"', "\\", "é"]),
    max_size=12,
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**100), max_value=2**100)
    | st.floats(allow_nan=True, allow_infinity=True)
    | _TEXT
)
_JSON = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(_TEXT, children, max_size=4)
    ),
    max_leaves=15,
)
_MESSAGES: st.SearchStrategy[dq.Message[Any]] = st.builds(
    dq.Message,
    queue_name=_TEXT,
    actor_name=_TEXT,
    args=st.lists(_JSON, max_size=4),
    kwargs=st.dictionaries(_TEXT, _JSON, max_size=4),
    options=st.dictionaries(_TEXT, _JSON, max_size=4),
    message_id=_TEXT | st.uuids().map(str),
    message_timestamp=st.integers(min_value=-(2**63), max_value=2**70),
)

_PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(_MESSAGES)
def test_property_encode_equals_stdlib_json_dumps(message: dq.Message[Any]) -> None:
    encoded = message.encode()
    assert encoded == _dumps(message.asdict())
    assert encoded == JSONEncoder().encode(message.asdict())
    assert encoded.isascii()


@_PROPERTY
@given(_MESSAGES)
def test_property_decode_encode_round_trip(message: dq.Message[Any]) -> None:
    encoded = message.encode()
    decoded = dq.Message.decode(encoded)
    assert decoded.encode() == encoded
    assert _same(decoded.asdict(), message.asdict())
    assert _same(decoded.asdict(), json.loads(encoded))


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False), _SCALARS
    )
)
def test_property_non_string_keys_are_coerced_like_json(options: dict[Any, Any]) -> None:
    message: dq.Message[Any] = dq.Message("q", "a", (), None, options, "id", 1)
    assert message.encode() == _dumps(message.asdict())


# -- values JSON cannot carry ------------------------------------------------------

_UNSERIALISABLE = [
    pytest.param(b"bytes", id="bytes"),
    pytest.param({1, 2}, id="set"),
    pytest.param(object(), id="object"),
    pytest.param(decimal.Decimal("1.5"), id="decimal"),
    pytest.param(datetime.datetime(2024, 1, 1), id="datetime"),
    pytest.param(1 + 2j, id="complex"),
]


@pytest.mark.parametrize("where", ["args", "kwargs", "options", "nested"])
@pytest.mark.parametrize("value", _UNSERIALISABLE)
def test_unserialisable_values_raise_type_error_at_encode(where: str, value: object) -> None:
    fields: dict[str, Any] = {"args": (), "kwargs": {}, "options": {}}
    if where == "args":
        fields["args"] = (1, value)
    elif where == "nested":
        fields["options"] = {"pipe_target": {"args": [[value]]}}
    else:
        fields[where] = {"x": value}
    message: dq.Message[Any] = dq.Message("q", "a", **fields)
    with pytest.raises(TypeError, match="not JSON serializable"):
        message.encode()
    with pytest.raises(TypeError):
        json.dumps(message.asdict())


@pytest.mark.parametrize("where", ["args", "kwargs", "options"])
def test_circular_list_raises_value_error_at_encode(where: str) -> None:
    # wire.md §1.2: what json.dumps does (check_circular) - a ValueError at send time.
    circular: list[Any] = [1]
    circular.append(circular)
    fields: dict[str, Any] = {"args": (), "kwargs": {}, "options": {}}
    fields[where] = (circular,) if where == "args" else {"loop": circular}
    with pytest.raises(ValueError, match="Circular reference"):
        dq.Message("q", "a", **fields).encode()


def test_encoder_still_works_after_a_circular_failure() -> None:
    circular: list[Any] = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular reference"):
        dq.Message("q", "a", (circular,)).encode()
    message: dq.Message[Any] = dq.Message("q", "a", ([1, [2]],), {}, {}, "id", 1)
    assert message.encode() == _dumps(message.asdict())


# -- the pickle encoder -------------------------------------------------------------


def test_pickle_encoder_round_trip(pickle_encoder: PickleEncoder) -> None:
    assert dq.get_encoder() is pickle_encoder
    message: dq.Message[Any] = dq.Message(
        "q",
        "act",
        (1, b"bytes", {1, 2}),
        {"k": decimal.Decimal("1.5")},
        {"pipe_target": {"args": [1]}, "eta": 5},
    )
    encoded = message.encode()
    data = pickle.loads(encoded)
    assert list(data) == list(FIELDS)
    decoded = dq.Message.decode(encoded)
    assert type(decoded) is dq.Message
    assert decoded == message
    assert decoded.args[1] == b"bytes"
    assert type(decoded.options["pipe_target"]) is FrozenDict


def test_pickle_encoder_rejects_garbage(pickle_encoder: PickleEncoder) -> None:
    with pytest.raises(dq.DecodeError) as info:
        dq.Message.decode(b"garbage")
    assert info.value.data == b"garbage"
    assert info.value.error is not None
    assert "garbage" in str(info.value)


@pytest.mark.parametrize(
    ("payload", "word"),
    [
        (pickle.dumps([1, 2]), "must"),
        (pickle.dumps({"queue_name": "q"}), "missing"),
        (pickle.dumps(dict(_GOOD, args="abc")), "args"),
    ],
    ids=["not_a_dict", "missing_fields", "string_args"],
)
def test_pickle_encoder_rejects_bad_data(
    pickle_encoder: PickleEncoder, payload: bytes, word: str
) -> None:
    with pytest.raises(dq.DecodeError, match=word) as info:
        dq.Message.decode(payload)
    assert info.value.data == payload


def test_pickle_encoder_direct() -> None:
    encoder = PickleEncoder()
    data = dict(_GOOD)
    assert encoder.decode(encoder.encode(data)) == data
    with pytest.raises(dq.DecodeError):
        encoder.decode(b"\x80\x05garbage")


def test_set_encoder_rejects_non_encoders(restore_encoder: None) -> None:
    with pytest.raises(TypeError):
        dq.set_encoder(json)  # type: ignore[arg-type]  # not an Encoder, on purpose
    assert type(dq.get_encoder()) is JSONEncoder


def test_json_encoder_decode_direct() -> None:
    encoder = JSONEncoder()
    assert encoder.decode(b'{"a":NaN}')["a"] != encoder.decode(b'{"a":NaN}')["a"]
    with pytest.raises(dq.DecodeError, match="must be a JSON object") as info:
        encoder.decode(b"[1]")
    assert info.value.data == b"[1]"
    with pytest.raises(dq.DecodeError, match="UTF-8") as info:
        encoder.decode(b"\xff")
    assert isinstance(info.value.error, UnicodeDecodeError)


json_objects = st.dictionaries(
    st.text(max_size=5),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
        max_leaves=8,
    ),
    max_size=5,
)


@given(obj=json_objects, indent=st.none() | st.integers(0, 2), pad=st.sampled_from(["", " ", "\n"]))
def test_the_fast_json_path_agrees_with_json_loads(
    obj: dict[str, Any], indent: int | None, pad: str
) -> None:
    text = pad + json.dumps(obj, indent=indent) + pad
    assert JSONEncoder().decode(text.encode()) == json.loads(text)
