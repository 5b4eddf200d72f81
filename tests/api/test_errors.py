"""The exception hierarchy of api.md §3."""

from __future__ import annotations

import warnings

import pytest

import dq
import dq.errors
from dq.middleware import MiddlewareError, SkipMessage

ERROR_NAMES = [
    "ActorNotFound",
    "BrokerConnectionError",
    "BrokerError",
    "ConnectionClosed",
    "ConnectionFailed",
    "DecodeError",
    "DramatiqError",
    "QueueJoinTimeout",
    "QueueNotFound",
    "RateLimitExceeded",
    "Retry",
]

#: class → its direct base, exactly as in api.md §3.
PARENTS: dict[type[BaseException], type[BaseException]] = {
    dq.DramatiqError: Exception,
    dq.DecodeError: dq.DramatiqError,
    dq.BrokerError: dq.DramatiqError,
    dq.ActorNotFound: dq.BrokerError,
    dq.QueueNotFound: dq.BrokerError,
    dq.BrokerConnectionError: dq.BrokerError,
    dq.ConnectionFailed: dq.BrokerConnectionError,
    dq.ConnectionClosed: dq.BrokerConnectionError,
    dq.QueueJoinTimeout: dq.DramatiqError,
    dq.RateLimitExceeded: dq.DramatiqError,
    dq.Retry: dq.DramatiqError,
    MiddlewareError: Exception,
    SkipMessage: MiddlewareError,
}


def test_errors_module_exports_exactly_the_hierarchy() -> None:
    assert sorted(dq.errors.__all__) == ERROR_NAMES
    for name in ERROR_NAMES:
        assert getattr(dq, name) is getattr(dq.errors, name)
        assert name in dq.__all__


@pytest.mark.parametrize(
    ("cls", "parent"), list(PARENTS.items()), ids=[c.__name__ for c in PARENTS]
)
def test_direct_parent(cls: type[BaseException], parent: type[BaseException]) -> None:
    assert cls.__bases__ == (parent,)
    assert issubclass(cls, parent)
    assert issubclass(cls, Exception)


def test_subclass_relations() -> None:
    for cls in (dq.ActorNotFound, dq.QueueNotFound, dq.ConnectionFailed, dq.ConnectionClosed):
        assert issubclass(cls, dq.BrokerError)
        assert issubclass(cls, dq.DramatiqError)
    assert issubclass(dq.ConnectionClosed, dq.BrokerConnectionError)
    assert issubclass(dq.ConnectionFailed, dq.BrokerConnectionError)
    # Trap (api.md §18): QueueJoinTimeout is not a BrokerError.
    assert not issubclass(dq.QueueJoinTimeout, dq.BrokerError)
    assert issubclass(dq.QueueJoinTimeout, dq.DramatiqError)
    for other in (dq.DecodeError, dq.Retry, dq.RateLimitExceeded):
        assert not issubclass(other, dq.BrokerError)
    # Middleware errors are not DramatiqErrors.
    assert not issubclass(MiddlewareError, dq.DramatiqError)
    assert not issubclass(SkipMessage, dq.DramatiqError)
    # dq does not shadow the builtin.
    assert not issubclass(dq.BrokerConnectionError, ConnectionError)


def test_message_attribute_and_str() -> None:
    error = dq.DramatiqError("boom")
    assert error.message == "boom"
    assert str(error) == "boom"
    assert error.args == ("boom",)
    assert str(dq.DramatiqError()) == "''"
    assert str(dq.ActorNotFound("missing_actor")) == "missing_actor"
    assert dq.QueueNotFound("q").message == "q"
    # A message that stringifies to empty falls back to its repr.
    assert str(dq.DramatiqError(b"")) == "b''"
    assert str(dq.DramatiqError(42)) == "42"
    with pytest.raises(dq.BrokerError, match="gone"):
        raise dq.ConnectionClosed("gone")


def test_retry() -> None:
    assert str(dq.Retry()) == "''"
    assert dq.Retry().delay is None
    assert dq.Retry().message == ""
    retry = dq.Retry("later", delay=100)
    assert retry.delay == 100
    assert retry.message == "later"
    assert str(retry) == "later"
    assert dq.Retry(delay=5).delay == 5
    assert str(dq.Retry(delay=5)) == "''"


def test_decode_error_attributes() -> None:
    cause = ValueError("bad")
    error = dq.DecodeError("Failed to decode message.", b"raw", cause)
    assert error.message == "Failed to decode message."
    assert str(error) == "Failed to decode message."
    assert error.data == b"raw"
    assert error.error is cause
    assert dq.DecodeError("m", "text", None).error is None


def test_decode_of_garbage_sets_data_and_error() -> None:
    # api.md §20 item 12.
    with pytest.raises(dq.DecodeError) as info:
        dq.Message.decode(b"garbage")
    assert info.value.data == b"garbage"
    assert info.value.error is not None


@pytest.mark.parametrize("module", [dq, dq.errors], ids=["dq", "dq.errors"])
def test_connection_error_alias_is_deprecated(module: object) -> None:
    with pytest.warns(DeprecationWarning, match="BrokerConnectionError") as record:
        alias = module.ConnectionError  # type: ignore[attr-defined]  # module __getattr__
    assert alias is dq.BrokerConnectionError
    assert len(record) == 1
    # The warning points at the caller, not at dq.
    assert record[0].filename == __file__


def test_connection_error_alias_via_import() -> None:
    with pytest.warns(DeprecationWarning):
        from dq.errors import ConnectionError as Alias
    assert Alias is dq.BrokerConnectionError


def test_other_errors_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dq.errors.BrokerConnectionError is dq.BrokerConnectionError
        assert dq.BrokerConnectionError.__name__ == "BrokerConnectionError"


@pytest.mark.parametrize("module", [dq, dq.errors], ids=["dq", "dq.errors"])
def test_unknown_attribute_raises_attribute_error(module: object) -> None:
    with pytest.raises(AttributeError, match="NoSuchError"):
        _ = module.NoSuchError  # type: ignore[attr-defined]  # the point
    assert not hasattr(module, "NoSuchError")
