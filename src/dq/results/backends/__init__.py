"""Result backends: `StubBackend`, and `RedisBackend` / `MemcachedBackend` when their
client library is installed.

The server backends are imported on first access: when redis-py or pymemcache is
missing, the access emits an ``ImportWarning`` naming the extra to install and fails
(``from dq.results.backends import MemcachedBackend`` raises ``ImportError``).
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from dq.results.backends.stub import StubBackend

if TYPE_CHECKING:
    from dq.results.backends.memcached import MemcachedBackend
    from dq.results.backends.redis import RedisBackend

__all__ = ["MemcachedBackend", "RedisBackend", "StubBackend"]

# name -> (module, extra that installs its dependency)
_LAZY = {
    "MemcachedBackend": ("dq.results.backends.memcached", "memcached"),
    "RedisBackend": ("dq.results.backends.redis", "redis"),
}


def __getattr__(name: str) -> Any:
    lazy = _LAZY.get(name)
    if lazy is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, extra = lazy
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        message = (
            f"{name} is not available: {e.name or 'its client library'} is not installed. "
            f"Run `pip install 'dq[{extra}]'` to add support for it."
        )
        warnings.warn(message, ImportWarning, stacklevel=2)
        raise AttributeError(message) from e
    return getattr(module, name)
