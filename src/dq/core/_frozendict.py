"""A read-only ``dict``: the mapping type of message ``kwargs`` and ``options``.

It subclasses ``dict`` so that code written for Dramatiq (``isinstance(o, dict)``,
``json.dumps``) keeps working and the C JSON encoder serialises it at full speed,
but every mutating method raises ``TypeError``: a frozen message really is frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, Never, NoReturn, TypeVar

K = TypeVar("K")
V = TypeVar("V")


def _read_only(self: object, *args: object, **kwargs: object) -> NoReturn:
    raise TypeError(
        f"{type(self).__name__} is read-only: build a new mapping "
        "(e.g. message.copy(options={...})) instead of changing this one"
    )


class FrozenDict(dict[K, V]):
    """A ``dict`` that refuses every in-place change.

    Build one from a mapping or pairs, like ``dict``. Hashable when its values are.
    """

    __slots__ = ()

    def __init__(self, data: Mapping[K, V] | Iterable[tuple[K, V]] = (), /) -> None:
        dict.__init__(self, data)

    # Parameters typed ``Never``: a type checker rejects every call, at the call site.
    def __setitem__(self, key: Never, value: Never) -> NoReturn:  # type: ignore[override]  # refusing is the point
        _read_only(self)

    def __delitem__(self, key: Never) -> NoReturn:  # type: ignore[override]  # refusing is the point
        _read_only(self)

    def __ior__(self, other: Never) -> NoReturn:  # type: ignore[override,misc]  # refusing is the point
        _read_only(self)

    def pop(self, *args: Never) -> NoReturn:  # type: ignore[override]  # refusing is the point
        _read_only(self)

    def setdefault(self, *args: Never) -> NoReturn:  # type: ignore[override]  # refusing is the point
        _read_only(self)

    def update(self, *args: Never, **kwargs: Never) -> NoReturn:  # type: ignore[override]  # refusing is the point
        _read_only(self)

    def clear(self) -> NoReturn:
        _read_only(self)

    def popitem(self) -> NoReturn:
        _read_only(self)

    def __hash__(self) -> int:  # type: ignore[override]  # dict is unhashable; this is not
        return hash(frozenset(self.items()))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"

    def __reduce__(self) -> tuple[type[FrozenDict[K, V]], tuple[dict[K, V]]]:
        # pickle would otherwise rebuild the dict item by item through __setitem__.
        return (type(self), (dict(self),))

    def __copy__(self) -> FrozenDict[K, V]:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> FrozenDict[K, V]:
        return type(self)(copy.deepcopy(dict(self), memo))

    def __or__(self, other: Mapping[K, V]) -> FrozenDict[K, V]:  # type: ignore[override]  # returns a FrozenDict
        return type(self)({**self, **other})


EMPTY: FrozenDict[Any, Any] = FrozenDict()


def freeze(mapping: Mapping[K, V] | None) -> FrozenDict[K, V]:
    """Return ``mapping`` as a `FrozenDict`, without copying one that already is."""
    if mapping is None or not mapping:
        return EMPTY
    if type(mapping) is FrozenDict:
        return mapping
    return FrozenDict(mapping)


#: Values that are immutable already (JSON's scalars).
_ATOMIC = frozenset({str, int, float, bool, type(None)})


def _is_frozen(value: Any) -> bool:
    kind = type(value)
    if kind in _ATOMIC:
        return True
    if kind is FrozenDict:
        return all(_is_frozen(v) for v in value.values())
    if kind is tuple:
        return all(_is_frozen(v) for v in value)
    return False


def deep_freeze(value: Any, _path: frozenset[int] = frozenset()) -> Any:
    """Return ``value`` with every dict a `FrozenDict` and every list a tuple, at every
    depth (encodes to the same JSON). Values frozen already are returned as they are.

    A container that contains itself is left as it is, so that encoding it reports the
    cycle (``ValueError: Circular reference detected``) as Dramatiq's encoder does.
    """
    if type(value) in _ATOMIC or _is_frozen_shallow(value):
        return value
    if id(value) in _path:
        return value
    path = _path | {id(value)}
    if isinstance(value, dict):
        return FrozenDict({k: deep_freeze(v, path) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(deep_freeze(v, path) for v in value)
    return value


def _is_frozen_shallow(value: Any) -> bool:
    # Only containers need a walk; their walk stops at cycles.
    kind = type(value)
    if kind is FrozenDict or kind is tuple:
        try:
            return _is_frozen(value)
        except RecursionError:
            return False
    return False


def freeze_options(options: Mapping[str, Any] | None) -> FrozenDict[str, Any]:
    """Return ``options`` as a `FrozenDict` frozen all the way down (no copy when it
    already is one)."""
    if not options:
        return EMPTY
    if type(options) is FrozenDict and all(type(v) in _ATOMIC for v in options.values()):
        return options
    return FrozenDict({k: deep_freeze(v) for k, v in options.items()})
