"""Broker implementations, and `from_url` to pick one by URL.

* `dq.brokers.stub.StubBroker`: in memory, for tests.
* `dq.brokers.redis.RedisBroker`: Redis, wire-compatible with Dramatiq (``dq[redis]``).
* `dq.brokers.sqlite.SqliteBroker`: one SQLite file, no server (standard library).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from dq.broker import Broker

__all__ = ["SCHEMES", "from_url"]

#: The URL schemes `from_url` knows, and the broker each one makes.
SCHEMES = {
    "sqlite": "dq.brokers.sqlite.SqliteBroker",
    "redis": "dq.brokers.redis.RedisBroker",
    "rediss": "dq.brokers.redis.RedisBroker",
    "unix": "dq.brokers.redis.RedisBroker",
    "amqp": "dq.brokers.rabbitmq.RabbitmqBroker",
    "amqps": "dq.brokers.rabbitmq.RabbitmqBroker",
}


def from_url(url: str, **options: Any) -> Broker:
    """Return a broker for ``url``; ``options`` go to the broker's constructor.

    * ``sqlite:///relative/path.sqlite3``, ``sqlite:////absolute/path.sqlite3``:
      `SqliteBroker` on that file;
    * ``redis://…``, ``rediss://…``, ``unix://…``: `RedisBroker(url=url)`;
    * ``amqp://…``, ``amqps://…``: ``RabbitmqBroker(url=url)``.

    Raises:
        ValueError: the scheme is unknown, or the URL names no SQLite file.
        ImportError: the broker's module (or its client library) is not available.
    """
    if "://" not in url:
        raise ValueError(f"a broker URL looks like 'scheme://…', got {url!r}")
    scheme = urlsplit(url).scheme.lower()
    target = SCHEMES.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ValueError(f"unknown broker URL scheme {scheme!r} in {url!r}; dq knows {known}")
    path = ""
    if scheme == "sqlite":
        path = unquote(url[len("sqlite:///") :]) if url.lower().startswith("sqlite:///") else ""
        if not path:
            raise ValueError(f"a SQLite broker URL names a file: 'sqlite:///path', got {url!r}")
    module_name, _, class_name = target.rpartition(".")
    try:
        module = __import__(module_name, fromlist=[class_name])
    except ImportError as e:
        extra = {"redis": "redis", "rediss": "redis", "unix": "redis"}.get(scheme, scheme)
        raise ImportError(
            f"the {scheme}:// broker is not available ({e}); install dq[{extra}]"
        ) from e
    broker_class: Any = getattr(module, class_name)  # its own constructor
    made = broker_class(path, **options) if path else broker_class(url=url, **options)
    assert isinstance(made, Broker)
    return made
