"""dq: a distributed task queue with Dramatiq 2.2.1's API, on a typed, pure core.

``import dq as dramatiq`` works for the parts that exist; see the README.
"""

from __future__ import annotations

import warnings
from typing import Any

from dq.actor import Actor, actor
from dq.broker import Broker, Consumer, MessageProxy, get_broker, set_broker
from dq.composition import group, pipeline
from dq.encoder import Encoder, JSONEncoder, PickleEncoder
from dq.errors import (
    ActorNotFound,
    BrokerConnectionError,
    BrokerError,
    ConnectionClosed,
    ConnectionFailed,
    DecodeError,
    DramatiqError,
    QueueJoinTimeout,
    QueueNotFound,
    RateLimitExceeded,
    Retry,
)
from dq.generic import GenericActor
from dq.logging import get_logger
from dq.message import Message, get_encoder, set_encoder
from dq.middleware import Middleware
from dq.worker import ConsumerThread, Worker, WorkerThread

__version__ = "0.1.0"

# Sorted (ruff RUF022), not Dramatiq's order.
__all__ = [
    "Actor",
    "ActorNotFound",
    "Broker",
    "BrokerConnectionError",
    "BrokerError",
    "ConnectionClosed",
    "ConnectionFailed",
    "Consumer",
    "ConsumerThread",
    "DecodeError",
    "DramatiqError",
    "Encoder",
    "GenericActor",
    "JSONEncoder",
    "Message",
    "MessageProxy",
    "Middleware",
    "PickleEncoder",
    "QueueJoinTimeout",
    "QueueNotFound",
    "RateLimitExceeded",
    "Retry",
    "Worker",
    "WorkerThread",
    "actor",
    "get_broker",
    "get_encoder",
    "get_logger",
    "group",
    "pipeline",
    "set_broker",
    "set_encoder",
]


def __getattr__(name: str) -> Any:
    if name == "ConnectionError":
        warnings.warn(
            "dq.ConnectionError is deprecated; use dq.BrokerConnectionError",
            DeprecationWarning,
            stacklevel=2,
        )
        return BrokerConnectionError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
