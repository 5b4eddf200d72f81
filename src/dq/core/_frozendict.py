"""A read-only ``dict``: the mapping type of message ``kwargs`` and ``options``.

It subclasses ``dict`` so that code written for Dramatiq (``isinstance(o, dict)``,
``json.dumps``) keeps working and the C JSON encoder serialises it at full speed,
but every mutating method raises ``TypeError``: a frozen message really is frozen.
"""

from __future__ import annotations

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
        import copy  # noqa: PLC0415 - rare path, keep module import light

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
