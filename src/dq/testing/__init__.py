"""Conformance testing: check a broker against the pure core.

`BrokerConformance` is a Hypothesis rule-based state machine. It drives a broker
through its public API (declare, enqueue with and without delay, consume, ack, nack,
requeue, promote, replace, start, close, flush, join; with `Crashes`, consumers that
die and recovery) and applies the same commands to `dq.core`, the oracle. It accepts
every behaviour the consumer contract allows and nothing else:

* A consumer may reserve at any time up to ``prefetch`` unsettled messages: what it
  reserved and has not handed out is invisible, so the model records a reservation
  (`dq.core.Reserve`) only when ``next()`` reveals it.
* ``next()`` returns a message the core says is waiting on that queue, with the bytes
  it was stored with: never one settled, dead-lettered, held by a consumer, flushed or
  never stored, and never more than ``prefetch`` unsettled at once.
* FIFO where it is certain: among messages never returned to a queue (requeued,
  released by a close, recovered), a consumer hands them out in the order they were
  stored; it may skip one only if another open consumer of the queue has room to
  hold it unseen, or (delay queues) it is not due yet.
* ``StopIteration`` is allowed unless the consumer holds nothing and the model proves
  a message is there for it: more messages wait than the other consumers of the
  queue have room to hold unseen (on a delay queue: due ones, while fewer not-due
  ones wait than its prefetch). A broker that delivers asynchronously gets
  ``delivery_patience_ms`` to deliver it.
* Dead letters, joins, declare hooks, refused queue names and delivery counts
  (``suspect``) agree with the core.

Every broker dq ships runs it; so can yours::

    from dq.testing import conformance_test

    TestMyBroker = conformance_test(lambda: MyBroker(...), max_examples=200)

The broker factory is called once per example and must return a broker with no
queues declared (a fresh namespace on a shared server). Pass ``crashes`` (a
`Crashes` subclass) to add crash and recovery steps.

The package: `dq.testing.machine` (the state machine), `dq.testing.contract` (the
checks it makes of what the broker did), `dq.testing.crashes` (the crash hooks), and
here `conformance_test`, which builds a test case from the machine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings

from dq.broker import Broker
from dq.testing.crashes import Crashes
from dq.testing.machine import BrokerConformance, DeadLetterReader

__all__ = ["BrokerConformance", "Crashes", "DeadLetterReader", "conformance_test"]


def conformance_test(
    broker_factory: Callable[[], Broker],
    *,
    dead_letters: DeadLetterReader | None = None,
    queue_names: tuple[str, str] = ("conformance_a", "conformance_b"),
    consumer_timeout_ms: int = 5,
    strict_queues: bool = True,
    broker_options: tuple[str, ...] = (),
    max_examples: int = 200,
    stateful_step_count: int = 50,
    crashes: Callable[[Broker], Crashes] | None = None,
    delivery_patience_ms: int = 2000,
    check_queue_names: bool = True,
    check_declare_hooks: bool = True,
) -> Any:
    """Return a ``unittest.TestCase`` class running `BrokerConformance` on a broker.

    Args:
        broker_factory: returns a fresh broker (no queues declared).
        dead_letters: reads the broker's dead-letter message ids of a canonical queue.
        queue_names: two canonical queue names the machine may use.
        consumer_timeout_ms: the consumers' timeout (time ``next()`` may wait).
        strict_queues: see `BrokerConformance`.
        broker_options: see `BrokerConformance`.
        max_examples: how many runs Hypothesis makes.
        stateful_step_count: the most steps in one run.
        crashes: makes each example's `Crashes` from its broker (a `Crashes`
            subclass will do); None: no crash steps.
        delivery_patience_ms: see `BrokerConformance`.
        check_queue_names: see `BrokerConformance`.
        check_declare_hooks: see `BrokerConformance`.
    """
    machine: Any = type(
        "BrokerConformanceMachine",
        (BrokerConformance,),
        {
            "broker_factory": staticmethod(broker_factory),
            "dead_letters": None if dead_letters is None else staticmethod(dead_letters),
            "queue_names": queue_names,
            "consumer_timeout_ms": consumer_timeout_ms,
            "strict_queues": strict_queues,
            "broker_options": broker_options,
            "crashes": None if crashes is None else staticmethod(crashes),
            "delivery_patience_ms": delivery_patience_ms,
            "check_queue_names": check_queue_names,
            "check_declare_hooks": check_declare_hooks,
        },
    )
    case = machine.TestCase
    case.settings = settings(
        max_examples=max_examples,
        stateful_step_count=stateful_step_count,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    return case
