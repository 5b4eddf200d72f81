"""A persistent FIFO queue: pushing or popping returns a new queue and shares the rest.

It is a banker's queue over cons cells (``(item, rest)`` tuples): a front list to pop
from and a back list (newest first) to push onto. Pushing is one tuple allocation; a
pop that finds the front empty reverses the back once, so every item is moved at most
once on the way through. A 100,000-message queue is never copied by a step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeAlias, TypeVar

T = TypeVar("T")

# A cons list: None, or (head, tail).
_Cons: TypeAlias = "tuple[T, _Cons[T]] | None"


class PQueue(Generic[T]):
    """An immutable first-in, first-out queue."""

    __slots__ = ("_back", "_front", "_size")

    def __init__(self, items: Iterable[T] = ()) -> None:
        front: _Cons[T] = None
        for item in reversed(list(items)):
            front = (item, front)
        self._front = front
        self._back: _Cons[T] = None
        self._size = 0 if front is None else sum(1 for _ in self._iter_cons(front))

    @classmethod
    def _make(cls, front: _Cons[T], back: _Cons[T], size: int) -> PQueue[T]:
        new = cls.__new__(cls)
        new._front = front
        new._back = back
        new._size = size
        return new

    @staticmethod
    def _iter_cons(cell: _Cons[T]) -> Iterator[T]:
        while cell is not None:
            yield cell[0]
            cell = cell[1]

    def push(self, item: T) -> PQueue[T]:
        """Return a queue with ``item`` added at the tail."""
        return PQueue._make(self._front, (item, self._back), self._size + 1)

    def pop(self) -> tuple[T, PQueue[T]]:
        """Return the head and the queue without it.

        Raises:
            IndexError: the queue is empty.
        """
        front, back = self._front, self._back
        if front is None:
            while back is not None:
                front = (back[0], front)
                back = back[1]
            if front is None:
                raise IndexError("pop from an empty PQueue")
        return front[0], PQueue._make(front[1], back, self._size - 1)

    def take(self, n: int) -> tuple[list[T], PQueue[T]]:
        """Return the first ``n`` items (all of them if there are fewer), oldest first,
        and the queue without them: ``pop`` ``n`` times, in one call."""
        front, back = self._front, self._back
        count = min(n, self._size)
        items: list[T] = []
        append = items.append
        for _ in range(count):
            if front is None:
                while back is not None:
                    front = (back[0], front)
                    back = back[1]
                assert front is not None  # count <= size: an item is left
            append(front[0])
            front = front[1]
        return items, PQueue._make(front, back, self._size - len(items))

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[T]:
        """Iterate from head to tail (O(n); for queries and tests, not steps)."""
        yield from self._iter_cons(self._front)
        yield from reversed(list(self._iter_cons(self._back)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PQueue):
            return NotImplemented
        return self._size == other._size and list(self) == list(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"PQueue({list(self)!r})"


def empty_queue() -> PQueue[T]:
    """Return an empty queue (all empty queues are interchangeable)."""
    return PQueue._make(None, None, 0)
