"""Where time, ids and random draws come from: the runtime seam's sources.

The pure core takes time and ids as arguments; everything that needs them asks a
`Clock`, an `IdSource` or a `RandomSource` here. The defaults read the system clock
and the operating system's random source; a custom runtime (or a deterministic test)
installs its own with `dq.runtime.set_clock` / `set_id_source` / `set_random`.

This module sits below the rest of dq (it imports only the standard library), so
that the modules `dq.runtime.Runner` is built on can read the time; `dq.runtime` is
its public face.
"""

from __future__ import annotations

import os
import random
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """A source of wall-clock time."""

    def now_ms(self) -> int:
        """Return milliseconds since the Unix epoch."""
        ...


@runtime_checkable
class RandomSource(Protocol):
    """A source of uniform random numbers (retry jitter)."""

    def random(self) -> float:
        """Return a number in [0, 1)."""
        ...


@runtime_checkable
class IdSource(Protocol):
    """A source of unique message ids."""

    def new_id(self) -> str:
        """Return a new unique id (Dramatiq's wire format: a uuid4 string)."""
        ...


class SystemClock:
    """The system's wall clock."""

    __slots__ = ()

    def now_ms(self) -> int:
        """Return milliseconds since the Unix epoch, truncated."""
        return time.time_ns() // 1_000_000


_BATCH = 256  # ids per read of the OS random source


class UUID4Source:
    """Random (version 4) UUID strings from the OS random source, made in batches.

    Same format and randomness as ``str(uuid.uuid4())``, several times cheaper: one
    ``os.urandom`` call serves 256 ids, formatted together. Taking an id is one
    ``list.pop`` (atomic, so no lock). The batch is dropped in a forked child, so
    parent and child never hand out the same ids.
    """

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: list[str] = []
        os.register_at_fork(after_in_child=self._ids.clear)

    def new_id(self) -> str:
        """Return a new uuid4 string (36 lowercase hex characters and hyphens)."""
        try:
            return self._ids.pop()
        except IndexError:
            self._ids.extend(_uuid4_batch())
            return self._ids.pop()


def _uuid4_batch() -> list[str]:
    h = os.urandom(16 * _BATCH).hex()
    variant = _VARIANT
    # Version nibble 4; variant bits 10xx (8, 9, a or b).
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
        f"{variant[h[i + 16]]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * _BATCH, 32)
    ]


_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}

_clock: Clock = SystemClock()
_ids: IdSource = UUID4Source()
# The random module's functions: reseeded in forked children by the stdlib.
_random: RandomSource = random._inst


def get_random() -> RandomSource:
    """Return the process's source of random numbers."""
    return _random


def set_random(source: RandomSource) -> None:
    """Install the process's source of random numbers (tests and embedding runtimes)."""
    global _random
    _random = source


def get_clock() -> Clock:
    """Return the process's clock."""
    return _clock


def set_clock(clock: Clock) -> None:
    """Install the process's clock (tests and embedding runtimes)."""
    global _clock
    _clock = clock


def get_id_source() -> IdSource:
    """Return the process's id source."""
    return _ids


def set_id_source(source: IdSource) -> None:
    """Install the process's id source (tests and embedding runtimes)."""
    global _ids
    _ids = source
