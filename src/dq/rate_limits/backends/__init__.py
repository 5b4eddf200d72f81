"""Rate-limiter backends: `StubBackend` (in memory), `RedisBackend` (``dq[redis]``)
and `MemcachedBackend` (``dq[memcached]``).

The server backends are imported on first use, so this package imports without
their client libraries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dq.rate_limits.backends.stub import StubBackend

if TYPE_CHECKING:
    from dq.rate_limits.backends.memcached import MemcachedBackend as MemcachedBackend
    from dq.rate_limits.backends.redis import RedisBackend as RedisBackend

# Dramatiq's order.
__all__ = ["StubBackend", "MemcachedBackend", "RedisBackend"]  # noqa: RUF022

_LAZY = {
    "RedisBackend": ("dq.rate_limits.backends.redis", "redis"),
    "MemcachedBackend": ("dq.rate_limits.backends.memcached", "memcached"),
}


if not TYPE_CHECKING:  # mypy sees the imports above, so a typo is still an error

    def __getattr__(name: str) -> Any:
        """Import ``RedisBackend`` / ``MemcachedBackend`` on first use.

        Raises:
            AttributeError: the name is unknown, or the backend's client library is
                not installed (the message names the extra to install).
        """
        target = _LAZY.get(name)
        if target is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        module_name, extra = target
        try:
            module = __import__(module_name, fromlist=[name])
        except ModuleNotFoundError as e:
            raise AttributeError(
                f"{name} is not available ({e}); install it with `pip install dq[{extra}]`"
            ) from e
        return getattr(module, name)
