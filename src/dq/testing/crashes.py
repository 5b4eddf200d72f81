"""`Crashes`: how a broker's consumers die and come back, the hooks behind the crash
and recovery steps of `dq.testing.BrokerConformance`.
"""

from __future__ import annotations

from dq.broker import Broker, Consumer

__all__ = ["Crashes"]


class Crashes:
    """How a broker's consumers die and come back: the machine's crash steps.

    Subclass it for your broker and pass the class (or any callable taking the
    broker) as ``conformance_test(..., crashes=...)``; one instance is made per
    example, with that example's broker.

    Attributes:
        broker: the example's broker (the machine enqueues, flushes and joins on it).
        max_deliveries: the delivery cap the broker applies when it recovers (0: none);
            the model dead-letters with the same cap.
        expires_leases: recovery is lease expiry (the model renews the live
            consumers' leases, then applies `dq.core.ExpireLeases`) rather than
            `dq.core.Recover` of each dead consumer.
        recovers_at_once: the death itself gives back what the consumer held (a
            server that requeues a closed connection's deliveries): the model applies
            `dq.core.Recover` at the crash, and `recover` is never called.
    """

    max_deliveries: int = 0
    expires_leases: bool = False
    recovers_at_once: bool = False

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def consume(self, queue_name: str, prefetch: int, timeout: int) -> Consumer:
        """Open a consumer that can die on its own (on a broker of its own, when the
        broker's unit of death is a process). The default: ``broker.consume``."""
        return self.broker.consume(queue_name, prefetch=prefetch, timeout=timeout)

    def crash(self, consumer: Consumer) -> None:
        """Make ``consumer`` die holding what it holds: it is never used, settled or
        closed again. Return once the broker would see it dead."""
        raise NotImplementedError

    def recover(self) -> None:
        """Have the broker give back what every dead consumer held (return once it
        has): a reaper's tick, lease expiry."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what `consume` made (called at the end of each example)."""
