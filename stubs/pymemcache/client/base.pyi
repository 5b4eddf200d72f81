# Values are Any: what get() returns depends on the client's serde (bytes without one).
from collections.abc import Iterable, Mapping
from typing import Any

Key = str | bytes
ServerSpec = tuple[str, int] | str

class KeepaliveOpts:
    def __init__(self, idle: int = 1, intvl: int = 1, cnt: int = 5) -> None: ...

class _Commands:
    def close(self) -> None: ...
    def set(
        self,
        key: Key,
        value: Any,
        expire: int = 0,
        noreply: bool | None = None,
        flags: int | None = None,
    ) -> bool | None: ...
    def set_many(
        self,
        values: Mapping[Key, Any],
        expire: int = 0,
        noreply: bool | None = None,
        flags: int | None = None,
    ) -> list[Key]: ...
    def add(
        self,
        key: Key,
        value: Any,
        expire: int = 0,
        noreply: bool | None = None,
        flags: int | None = None,
    ) -> bool: ...
    def cas(
        self,
        key: Key,
        value: Any,
        cas: Any,
        expire: int = 0,
        noreply: bool | None = False,
        flags: int | None = None,
    ) -> bool | None: ...
    def get(self, key: Key, default: Any = None) -> Any: ...
    def get_many(self, keys: Iterable[Key]) -> dict[Key, Any]: ...
    def get_multi(self, keys: Iterable[Key]) -> dict[Key, Any]: ...
    def gets(self, key: Key, default: Any = None, cas_default: Any = None) -> tuple[Any, Any]: ...
    def gets_many(self, keys: Iterable[Key]) -> dict[Key, tuple[Any, Any]]: ...
    def delete(self, key: Key, noreply: bool | None = None) -> bool: ...
    def delete_many(self, keys: Iterable[Key], noreply: bool | None = None) -> bool: ...
    def incr(self, key: Key, value: int, noreply: bool | None = False) -> int | None: ...
    def decr(self, key: Key, value: int, noreply: bool | None = False) -> int | None: ...
    def touch(self, key: Key, expire: int = 0, noreply: bool | None = None) -> bool: ...
    def flush_all(self, delay: int = 0, noreply: bool | None = None) -> bool: ...

class Client(_Commands):
    server: ServerSpec
    def __init__(
        self,
        server: ServerSpec,
        serde: Any = None,
        serializer: Any = None,
        deserializer: Any = None,
        connect_timeout: float | None = None,
        timeout: float | None = None,
        no_delay: bool = False,
        ignore_exc: bool = False,
        socket_module: Any = ...,
        socket_keepalive: KeepaliveOpts | None = None,
        key_prefix: bytes = b"",
        default_noreply: bool = True,
        allow_unicode_keys: bool = False,
        encoding: str = "ascii",
        tls_context: Any = None,
    ) -> None: ...

class PooledClient(_Commands):
    server: ServerSpec
    def __init__(
        self,
        server: ServerSpec,
        serde: Any = None,
        serializer: Any = None,
        deserializer: Any = None,
        connect_timeout: float | None = None,
        timeout: float | None = None,
        no_delay: bool = False,
        ignore_exc: bool = False,
        socket_module: Any = ...,
        socket_keepalive: KeepaliveOpts | None = None,
        key_prefix: bytes = b"",
        max_pool_size: int | None = None,
        pool_idle_timeout: int = 0,
        lock_generator: Any = None,
        default_noreply: bool = True,
        allow_unicode_keys: bool = False,
        encoding: str = "ascii",
        tls_context: Any = None,
    ) -> None: ...
