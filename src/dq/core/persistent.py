"""A persistent FIFO queue: pushing or popping returns a new queue and shares the rest.

It is a banker's queue over cons cells (``(item, rest)`` tuples): a front list to pop
from and a back list (newest first) to push onto. Pushing is one tuple allocation; a
pop that finds the front empty reverses the back once, so every item is moved at most
once on the way through. A 100,000-message queue is never copied by a step.

Items may be pushed with a *priority* (an int; lower runs first, 0 is the default):
items of other priorities than 0 wait in bands of their own, kept beside the main
queue and sorted by priority. A queue that never saw a non-zero priority has no bands
and costs nothing more. ``take`` hands items out by priority, FIFO within one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeAlias, TypeVar

T = TypeVar("T")

# A cons list: None, or (head, tail).
_Cons: TypeAlias = "tuple[T, _Cons[T]] | None"
# Bands of non-zero priority, sorted by priority; each band is a queue without bands.
_Bands: TypeAlias = "tuple[tuple[int, PQueue[T]], ...]"


class PQueue(Generic[T]):
    """An immutable first-in, first-out queue, with optional priority bands."""

    __slots__ = ("_back", "_bands", "_front", "_size")

    def __init__(self, items: Iterable[T] = ()) -> None:
        front: _Cons[T] = None
        for item in reversed(list(items)):
            front = (item, front)
        self._front = front
        self._back: _Cons[T] = None
        self._size = 0 if front is None else sum(1 for _ in self._iter_cons(front))
        self._bands: _Bands[T] = ()

    @classmethod
    def _make(cls, front: _Cons[T], back: _Cons[T], size: int, bands: _Bands[T] = ()) -> PQueue[T]:
        new = cls.__new__(cls)
        new._front = front
        new._back = back
        new._size = size
        new._bands = bands
        return new

    @staticmethod
    def _iter_cons(cell: _Cons[T]) -> Iterator[T]:
        while cell is not None:
            yield cell[0]
            cell = cell[1]

    def push(self, item: T, priority: int = 0) -> PQueue[T]:
        """Return a queue with ``item`` added at the tail of its priority's items."""
        if priority:
            return self._push_band(item, priority)
        return PQueue._make(self._front, (item, self._back), self._size + 1, self._bands)

    def _push_band(self, item: T, priority: int) -> PQueue[T]:
        alone: PQueue[T] = PQueue._make((item, None), None, 1)
        bands = list(self._bands)
        for index, (rank, band) in enumerate(bands):
            if rank == priority:
                bands[index] = (rank, band.push(item))
                break
            if rank > priority:
                bands.insert(index, (priority, alone))
                break
        else:
            bands.append((priority, alone))
        return PQueue._make(self._front, self._back, self._size + 1, tuple(bands))

    def pop(self) -> tuple[T, PQueue[T]]:
        """Return the head (the oldest item of the lowest priority) and the queue
        without it.

        Raises:
            IndexError: the queue is empty.
        """
        if self._bands:
            ranked, rest = self.take_ranked(1)
            return ranked[0][1], rest  # bands are never empty: there is an item
        front, back = self._front, self._back
        if front is None:
            while back is not None:
                front = (back[0], front)
                back = back[1]
            if front is None:
                raise IndexError("pop from an empty PQueue")
        return front[0], PQueue._make(front[1], back, self._size - 1)

    def take(self, n: int) -> tuple[list[T], PQueue[T]]:
        """Return the first ``n`` items (all of them if there are fewer), by priority
        then oldest first, and the queue without them: ``pop`` ``n`` times, in one call."""
        if self._bands:
            ranked, rest = self.take_ranked(n)
            return [item for _, item in ranked], rest
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

    def take_ranked(self, n: int) -> tuple[list[tuple[int, T]], PQueue[T]]:
        """`take`, with each item's priority: ``([(priority, item), ...], rest)``."""
        main = PQueue._make(self._front, self._back, self._size - self._band_size())
        order = [
            *(b for b in self._bands if b[0] < 0),
            (0, main),
            *(b for b in self._bands if b[0] > 0),
        ]
        taken: list[tuple[int, T]] = []
        kept: list[tuple[int, PQueue[T]]] = []
        for rank, band in order:
            left = band
            want = n - len(taken)
            if want > 0 and band:
                items, left = band.take(want)
                taken.extend((rank, item) for item in items)
            if rank == 0:
                main = left
            elif left:
                kept.append((rank, left))
        return taken, PQueue._make(main._front, main._back, self._size - len(taken), tuple(kept))

    def _band_size(self) -> int:
        return sum(len(band) for _, band in self._bands)

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def ranked(self) -> Iterator[tuple[int, T]]:
        """Iterate ``(priority, item)`` in the order `take` hands items out (O(n))."""
        for rank, band in self._bands:
            if rank < 0:
                yield from ((rank, item) for item in band)
        yield from ((0, item) for item in self._iter_cons(self._front))
        yield from ((0, item) for item in reversed(list(self._iter_cons(self._back))))
        for rank, band in self._bands:
            if rank > 0:
                yield from ((rank, item) for item in band)

    def __iter__(self) -> Iterator[T]:
        """Iterate in the order `take` hands items out (O(n); for queries and tests,
        not steps)."""
        if self._bands:
            yield from (item for _, item in self.ranked())
            return
        yield from self._iter_cons(self._front)
        yield from reversed(list(self._iter_cons(self._back)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PQueue):
            return NotImplemented
        return self._size == other._size and list(self.ranked()) == list(other.ranked())

    def __hash__(self) -> int:
        return hash(tuple(self.ranked()))

    def __repr__(self) -> str:
        if self._bands:
            return f"PQueue({list(self.ranked())!r}, ranked)"
        return f"PQueue({list(self)!r})"


def empty_queue() -> PQueue[T]:
    """Return an empty queue (all empty queues are interchangeable)."""
    return PQueue._make(None, None, 0)
