"""dq: a distributed task queue with Dramatiq 2.2.1's API, on a typed, pure core.

``import dq as dramatiq`` works for the parts that exist; see the README.

The names below are imported on first use (PEP 562), so importing one part of dq
(``import dq.core``) does not load the rest; `_lazy_exports` does the same for the
subpackages that re-export modules of their own.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dq.actor import Actor as Actor
    from dq.actor import actor as actor
    from dq.broker import Broker as Broker
    from dq.broker import Consumer as Consumer
    from dq.broker import MessageProxy as MessageProxy
    from dq.broker import get_broker as get_broker
    from dq.broker import set_broker as set_broker
    from dq.composition import group as group
    from dq.composition import pipeline as pipeline
    from dq.encoder import Encoder as Encoder
    from dq.encoder import JSONEncoder as JSONEncoder
    from dq.encoder import PickleEncoder as PickleEncoder
    from dq.errors import ActorNotFound as ActorNotFound
    from dq.errors import BrokerConnectionError as BrokerConnectionError
    from dq.errors import BrokerError as BrokerError
    from dq.errors import ConnectionClosed as ConnectionClosed
    from dq.errors import ConnectionFailed as ConnectionFailed
    from dq.errors import DecodeError as DecodeError
    from dq.errors import DramatiqError as DramatiqError
    from dq.errors import QueueJoinTimeout as QueueJoinTimeout
    from dq.errors import QueueNotFound as QueueNotFound
    from dq.errors import RateLimitExceeded as RateLimitExceeded
    from dq.errors import Retry as Retry
    from dq.generic import GenericActor as GenericActor
    from dq.logging import get_logger as get_logger
    from dq.message import Message as Message
    from dq.message import get_encoder as get_encoder
    from dq.message import set_encoder as set_encoder
    from dq.middleware import Middleware as Middleware
    from dq.worker import ConsumerThread as ConsumerThread
    from dq.worker import Worker as Worker
    from dq.worker import WorkerThread as WorkerThread

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


def _lazy_exports(
    package: str, where: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return the ``__getattr__`` and ``__dir__`` of ``package`` (PEP 562).

    The package also imports the same names under ``TYPE_CHECKING``: that is what
    type checkers read.

    Args:
        package: the package's ``__name__``.
        where: each lazy attribute's name, and the module that defines it.

    Returns:
        ``__getattr__`` imports the module that defines a name on first use and
        binds the name in the package (later lookups do not call it again); for any
        other name it raises `AttributeError` naming the package and the attribute.
        ``__dir__`` lists the package's names, the lazy ones included.
    """

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__


#: Where each name of `__all__` is defined.
_WHERE = {
    "Actor": "dq.actor",
    "actor": "dq.actor",
    "Broker": "dq.broker",
    "Consumer": "dq.broker",
    "MessageProxy": "dq.broker",
    "get_broker": "dq.broker",
    "set_broker": "dq.broker",
    "group": "dq.composition",
    "pipeline": "dq.composition",
    "Encoder": "dq.encoder",
    "JSONEncoder": "dq.encoder",
    "PickleEncoder": "dq.encoder",
    "ActorNotFound": "dq.errors",
    "BrokerConnectionError": "dq.errors",
    "BrokerError": "dq.errors",
    "ConnectionClosed": "dq.errors",
    "ConnectionFailed": "dq.errors",
    "DecodeError": "dq.errors",
    "DramatiqError": "dq.errors",
    "QueueJoinTimeout": "dq.errors",
    "QueueNotFound": "dq.errors",
    "RateLimitExceeded": "dq.errors",
    "Retry": "dq.errors",
    "GenericActor": "dq.generic",
    "get_logger": "dq.logging",
    "Message": "dq.message",
    "get_encoder": "dq.message",
    "set_encoder": "dq.message",
    "Middleware": "dq.middleware",
    "ConsumerThread": "dq.worker",
    "Worker": "dq.worker",
    "WorkerThread": "dq.worker",
}


class _Package(types.ModuleType):
    """The type of the module ``dq``: ``dq.actor`` stays the decorator.

    The import system binds each submodule on its package once it is loaded; the
    submodule ``dq.actor`` must not replace the decorator of the same name (as in
    Dramatiq, the decorator shadows the submodule: ``from dq.actor import Actor``
    still works).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "actor" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if not TYPE_CHECKING:  # type checkers read the imports above
    _getattr, __dir__ = _lazy_exports(__name__, _WHERE)

    def __getattr__(name: str) -> Any:
        if name == "ConnectionError":
            warnings.warn(
                "dq.ConnectionError is deprecated; use dq.BrokerConnectionError",
                DeprecationWarning,
                stacklevel=2,
            )
            return _getattr("BrokerConnectionError")
        return _getattr(name)
