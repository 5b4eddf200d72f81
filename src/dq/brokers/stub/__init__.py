"""`StubBroker`: an in-memory broker for tests, interpreting `dq.core` directly.

Every core command is interpreted by one `dq.core.apply` under the broker's lock
(`COMMANDS`). A consumer can be made to die (`StubBroker.abandon`): what it holds
stays reserved under its id until `StubBroker.recover` applies `dq.core.Recover`,
counting the deliveries it cut short and dead-lettering past ``max_deliveries``.

The package: `dq.brokers.stub.broker` (`StubBroker`, its `StubQueue` views and
`COMMANDS`), `dq.brokers.stub.consumer` (its consumer) and `dq.brokers.stub.signals`
(how waiting threads are woken). This module re-exports the public names.
"""

from __future__ import annotations

from dq.brokers.stub.broker import COMMANDS, StubBroker, StubQueue

__all__ = ["COMMANDS", "StubBroker", "StubQueue"]
