"""`Barrier`: a distributed barrier (the last of N parties to arrive clears it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dq.rate_limits.backend import RateLimiterBackend

__all__ = ["Barrier"]


class Barrier:
    """A barrier for ``parties`` parties, shared through a rate-limiter backend.

    The key holds how many parties are still expected; each `wait` takes one off,
    down to 1, and the wait that finds 1 (or no key at all) *clears* the barrier:
    it returns True and pushes a notification to the list ``"<key>@events"`` that
    wakes blocked parties. These are Dramatiq's semantics, kept so a mixed fleet
    agrees on which party clears a barrier; two consequences follow:

    - every wait after the clearing one also reports cleared (the counter stays at 1);
    - a barrier whose key expired, or was never created, clears at once.

    Use a fresh key (a uuid) per barrier: reusing a key between blocking waits has no
    defined meaning.

    Example::

        barrier = Barrier(backend, str(uuid.uuid4()), ttl=30_000)
        barrier.create(3)
        barrier.wait(block=False)  # False
        barrier.wait(block=False)  # False
        barrier.wait(block=False)  # True

    Args:
        backend: where the counter and the notifications live.
        key: the counter's key.
        ttl: ms the counter and the notifications live after their last change.
    """

    def __init__(self, backend: RateLimiterBackend, key: str, *, ttl: int = 900000) -> None:
        self.backend = backend
        self.key = key
        self.key_events = key + "@events"
        self.ttl = ttl

    def create(self, parties: int) -> bool:
        """Create the barrier for ``parties`` parties.

        Returns:
            False if a barrier with this key already exists (it is left as it is).

        Raises:
            AssertionError: ``parties`` is not positive (as Dramatiq).
        """
        if parties <= 0:
            raise AssertionError(f"parties must be a positive integer, got {parties!r}")
        return self.backend.add(self.key, parties, self.ttl)

    def wait(self, *, block: bool = True, timeout: int | None = None) -> bool:
        """Arrive at the barrier.

        Args:
            block: wait for the barrier to clear when this party does not clear it.
            timeout: the most ms to wait when blocking (None: as long as it takes,
                where the backend allows it).

        Returns:
            True if this party cleared the barrier, or (blocking) if it cleared
            within ``timeout``; False otherwise.

        Raises:
            NotImplementedError: blocking on a backend that cannot block.
        """
        cleared = not self.backend.decr(self.key, 1, 1, self.ttl)
        if cleared:
            self.backend.wait_notify(self.key_events, self.ttl)
            return True
        if block:
            return self.backend.wait(self.key_events, timeout)
        return False
