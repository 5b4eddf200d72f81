"""Where and how the native RESP2 client (`dq.brokers.redis._resp`) connects:
`ConnectionParams`, built from ``redis.Redis`` keyword arguments or from a Redis URL
(`parse_url`, read as redis-py's ``from_url`` reads it), and which of those options
the client implements (`NATIVE_OPTIONS`) or may ignore (`CLIENT_ONLY_OPTIONS`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Final, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["CLIENT_ONLY_OPTIONS", "NATIVE_OPTIONS", "ConnectionParams", "parse_url"]

#: Options (keyword arguments of ``redis.Redis``) this client implements.
NATIVE_OPTIONS: Final = frozenset(
    {
        "host",
        "port",
        "db",
        "username",
        "password",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "client_name",
        "unix_socket_path",
        "ssl",
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_password",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_check_hostname",
    }
)
#: Options that only change how a ``redis.Redis`` client presents replies or pools its
#: connections: they do not change what this client does on the wire.
CLIENT_ONLY_OPTIONS: Final = frozenset(
    {
        "decode_responses",
        "encoding",
        "encoding_errors",
        "max_connections",
        "health_check_interval",
        "socket_read_size",
        "single_connection_client",
        "lib_name",
        "lib_version",
    }
)


class ConnectionParams(NamedTuple):
    """Where and how to connect (the meaning of ``redis.Redis``'s options of the same
    names).

    Attributes:
        host, port: the TCP address (ignored with ``unix_socket_path``).
        unix_socket_path: connect to this unix socket instead of TCP.
        db: the database to SELECT (0: none is sent).
        username, password: AUTH credentials (a password alone: the default user).
        client_name: sent with CLIENT SETNAME.
        socket_timeout: seconds a reply may take (None: forever).
        socket_connect_timeout: seconds connecting may take (None: ``socket_timeout``).
        socket_keepalive: enable TCP keepalive.
        ssl: wrap the socket in TLS (``rediss://``).
        ssl_keyfile, ssl_certfile, ssl_password: a client certificate.
        ssl_cert_reqs: ``"none"``, ``"optional"`` or ``"required"`` (or an
            ``ssl.VerifyMode``): whether the server's certificate is checked.
        ssl_ca_certs, ssl_ca_path: the trusted CA certificates (default: the system's).
        ssl_check_hostname: check that the certificate names ``host``.
    """

    host: str = "localhost"
    port: int = 6379
    unix_socket_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    client_name: str | None = None
    socket_timeout: float | None = None
    socket_connect_timeout: float | None = None
    socket_keepalive: bool = False
    ssl: bool = False
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_password: str | None = None
    ssl_cert_reqs: object = "required"
    ssl_ca_certs: str | None = None
    ssl_ca_path: str | None = None
    ssl_check_hostname: bool = True

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ConnectionParams:
        """Build parameters from ``redis.Redis`` keyword arguments (or what
        `parse_url` returns), ignoring `CLIENT_ONLY_OPTIONS`.

        Raises:
            ValueError: an option is not in `NATIVE_OPTIONS` or `CLIENT_ONLY_OPTIONS`,
                or a value has the wrong type.
        """
        unknown = sorted(set(options) - NATIVE_OPTIONS - CLIENT_ONLY_OPTIONS)
        if unknown:
            raise ValueError(f"options {unknown} are not supported by the native client")
        values = {k: v for k, v in options.items() if k in NATIVE_OPTIONS and v is not None}
        for name in ("port", "db"):
            if name in values:
                value = values[name]
                if isinstance(value, str) and value.strip().isdigit():
                    value = int(value)
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{name} must be an integer, got {values[name]!r}")
                values[name] = value
        for name in ("socket_timeout", "socket_connect_timeout"):
            if name in values:
                value = values[name]
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{name} must be a number of seconds, got {value!r}")
                values[name] = float(value)
        reqs = values.get("ssl_cert_reqs")
        if isinstance(reqs, str) and reqs.lower() not in ("none", "optional", "required"):
            raise ValueError(
                f"ssl_cert_reqs must be 'none', 'optional' or 'required', got {reqs!r}"
            )
        for name in ("host", "unix_socket_path", "username", "password", "client_name"):
            if name in values and not isinstance(values[name], str):
                raise ValueError(f"{name} must be a string, got {values[name]!r}")
        return cls(**values)


def _to_bool(value: str) -> bool:
    return value.strip().upper() not in ("", "0", "F", "FALSE", "N", "NO")


#: Query parameters of a URL converted as redis-py converts them; others stay strings.
_URL_QUERY: Final[dict[str, Any]] = {
    "db": int,
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "socket_keepalive": _to_bool,
    "ssl_check_hostname": _to_bool,
    "max_connections": int,
    "health_check_interval": int,
    "socket_read_size": int,
    "retry_on_timeout": _to_bool,
}


def parse_url(url: str) -> dict[str, Any]:
    """Return the ``redis.Redis`` options a Redis URL means, as redis-py's
    ``from_url`` reads it.

    ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS: ``ssl`` is
    True) and ``unix://[[user]:password@]/path/to.sock``; query parameters become
    options (``?db=1&socket_timeout=0.5``; ``db`` wins over the path's).

    Raises:
        ValueError: the scheme is none of those, or a query value is malformed.
    """
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"a Redis URL must start with redis://, rediss:// or unix://, got {url!r}")
    parts = urlsplit(url)
    options: dict[str, Any] = {}
    for name, values in parse_qs(parts.query).items():
        if not values:
            continue
        convert = _URL_QUERY.get(name)
        try:
            options[name] = convert(values[0]) if convert else values[0]
        except ValueError:
            raise ValueError(
                f"invalid value {values[0]!r} for {name!r} in the Redis URL {url!r}"
            ) from None
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    if parts.scheme == "unix":
        if parts.path:
            options["unix_socket_path"] = unquote(parts.path)
        return options
    if parts.hostname:
        options["host"] = unquote(parts.hostname)
    if parts.port:
        options["port"] = int(parts.port)
    if parts.path and "db" not in options:
        with contextlib.suppress(ValueError):
            options["db"] = int(unquote(parts.path).replace("/", ""))
    if parts.scheme == "rediss":
        options["ssl"] = True
    return options
