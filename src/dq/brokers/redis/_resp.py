"""A small RESP2 client on the standard library: what `RedisBroker` needs, nothing more.

Importing redis-py costs a worker process about 20 MB of memory (its package imports
its asyncio, cluster and observability modules), so the broker talks to Redis through
this module instead, unless it was given a ``redis.Redis`` or options only redis-py
understands.

Theory of operation:

* Where and how to connect is a `dq.brokers.redis._params.ConnectionParams`.
* One `Connection` owns one socket (TCP, a unix socket, or TLS over TCP). It connects
  on first use, authenticates, names itself and selects its database in one round
  trip. It is not thread-safe: `RedisBroker` gives each thread its own.
* `Connection.execute` sends one command and reads its reply; `Connection.pipeline`
  sends many and reads all their replies (one round trip).
* Replies are parsed from one buffer (a ``bytearray`` filled by ``recv_into`` 64 KiB at
  a time) into ``bytes`` (bulk and simple strings), ``int``, ``None`` (nil), ``list``
  (arrays) and `ResponseError` values (error replies). A top-level error reply raises.
* Any socket error, end of stream, timeout or malformed reply raises a
  `RespConnectionError` and closes the socket: what is in flight on it is unknown, so
  it is never reused. The next command opens a new one. Nothing is retried here.
* A `Subscriber` is a connection in pub/sub mode: `Subscriber.get_message` waits up to a
  timeout for the next published message.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final, NamedTuple, TypeAlias

from dq.brokers.redis._params import ConnectionParams

if TYPE_CHECKING:
    import ssl

__all__ = [
    "Arg",
    "AuthenticationError",
    "Connection",
    "NoScriptError",
    "PubSubMessage",
    "Reply",
    "RespConnectionError",
    "RespError",
    "RespTimeoutError",
    "ResponseError",
    "Subscriber",
]

#: A command argument: str is sent as UTF-8, int and float as their decimal text.
Arg: TypeAlias = "bytes | str | int | float"
#: A parsed reply; `ResponseError` values appear only inside arrays and pipelines.
Reply: TypeAlias = "bytes | int | list[Reply] | ResponseError | None"

_CHUNK: Final = 65536
_CRLF: Final = b"\r\n"

# -- errors ------------------------------------------------------------------------------


class RespError(Exception):
    """Base class of this module's errors."""


class ResponseError(RespError):
    """The server answered with an error reply (``-ERR ...``); the connection is fine.

    Attributes:
        message: the error text, without its leading ``-``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> str:
        """The error's first word (``ERR``, ``NOSCRIPT``, ``WRONGTYPE``...)."""
        return self.message.split(" ", 1)[0]


class NoScriptError(ResponseError):
    """``EVALSHA`` named a script the server does not know (``-NOSCRIPT``)."""


class RespConnectionError(RespError):
    """The connection failed: a socket error, the server closed it, or a malformed
    reply. The socket was closed; the next command opens a new one."""


class RespTimeoutError(RespConnectionError):
    """No reply (or no connection) within the socket timeout."""


class AuthenticationError(RespConnectionError):
    """The server refused the credentials (or asked for some and got none)."""


def _error(line: bytes) -> ResponseError:
    text = line.decode("utf-8", "replace")
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    return ResponseError(text)


# -- encoding ----------------------------------------------------------------------------


def _pack(args: Sequence[Arg], out: list[bytes]) -> None:
    """Append the RESP encoding of one command to ``out``."""
    out.append(b"*%d\r\n" % len(args))
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bool):
            raise TypeError(f"a command argument cannot be a bool, got {arg!r}")
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        elif isinstance(arg, bytearray | memoryview):  # type: ignore[unreachable]  # callers may pass them
            data = bytes(arg)
        else:
            raise TypeError(f"a command argument must be bytes, str, int or float, got {arg!r}")
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(_CRLF)


# -- connections -------------------------------------------------------------------------


class Connection:
    """One connection to Redis (not thread-safe); it connects on first use.

    Args:
        params: where and how to connect.
    """

    def __init__(self, params: ConnectionParams) -> None:
        self.params = params
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._pos = 0
        self._chunk = bytearray(_CHUNK)
        self._view = memoryview(self._chunk)

    def __repr__(self) -> str:
        p = self.params
        where = p.unix_socket_path or f"{p.host}:{p.port}"
        return f"<{type(self).__name__} {where} db={p.db} {'open' if self._sock else 'closed'}>"

    @property
    def connected(self) -> bool:
        """Whether the socket is open."""
        return self._sock is not None

    # -- lifecycle --

    def connect(self) -> None:
        """Open the socket and set the session up (AUTH, CLIENT SETNAME, SELECT) if it
        is not open yet.

        Raises:
            RespConnectionError: the server could not be reached or refused the setup.
        """
        if self._sock is not None:
            return
        p = self.params
        timeout = p.socket_connect_timeout if p.socket_connect_timeout else p.socket_timeout
        try:
            sock = self._open(timeout)
        except TimeoutError as e:
            raise RespTimeoutError(f"connecting to {self._where()} timed out") from e
        except OSError as e:
            raise RespConnectionError(f"cannot connect to {self._where()}: {e}") from e
        sock.settimeout(p.socket_timeout)
        self._sock = sock
        self._buf.clear()
        self._pos = 0
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    def _where(self) -> str:
        p = self.params
        return f"unix:{p.unix_socket_path}" if p.unix_socket_path else f"{p.host}:{p.port}"

    def _open(self, timeout: float | None) -> socket.socket:
        p = self.params
        if p.unix_socket_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(p.unix_socket_path)
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((p.host, p.port), timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if p.socket_keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if p.ssl:
                return self._wrap_tls(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _wrap_tls(self, sock: socket.socket) -> ssl.SSLSocket:
        import ssl  # noqa: PLC0415 - only TLS connections pay for it

        p = self.params
        reqs = p.ssl_cert_reqs
        if isinstance(reqs, str):
            modes = {
                "none": ssl.CERT_NONE,
                "optional": ssl.CERT_OPTIONAL,
                "required": ssl.CERT_REQUIRED,
            }
            if reqs.lower() not in modes:
                raise ValueError(
                    f"ssl_cert_reqs must be 'none', 'optional' or 'required', got {reqs!r}"
                )
            mode = modes[reqs.lower()]
        elif reqs is None:
            mode = ssl.CERT_NONE
        elif isinstance(reqs, ssl.VerifyMode):
            mode = reqs
        else:
            raise ValueError(f"ssl_cert_reqs must be a string or ssl.VerifyMode, got {reqs!r}")
        context = ssl.create_default_context()
        context.check_hostname = bool(p.ssl_check_hostname) and mode != ssl.CERT_NONE
        context.verify_mode = mode
        if p.ssl_ca_certs or p.ssl_ca_path:
            context.load_verify_locations(cafile=p.ssl_ca_certs, capath=p.ssl_ca_path)
        if p.ssl_certfile:
            context.load_cert_chain(p.ssl_certfile, p.ssl_keyfile, p.ssl_password)
        return context.wrap_socket(sock, server_hostname=p.host)

    def _handshake(self) -> None:
        p = self.params
        commands: list[tuple[Arg, ...]] = []
        if p.password is not None or p.username is not None:
            if p.username:
                commands.append(("AUTH", p.username, p.password or ""))
            else:
                commands.append(("AUTH", p.password or ""))
        if p.client_name:
            commands.append(("CLIENT", "SETNAME", p.client_name))
        if p.db:
            commands.append(("SELECT", p.db))
        if not commands:
            return
        replies = self._roundtrip(commands)
        for command, reply in zip(commands, replies, strict=True):
            if not isinstance(reply, ResponseError):
                continue
            if command[0] == "AUTH" or reply.code in ("NOAUTH", "WRONGPASS"):
                raise AuthenticationError(
                    f"Redis at {self._where()} refused the credentials: {reply.message}"
                )
            name = " ".join(str(part) for part in command[:2])
            raise RespConnectionError(f"{name} failed on {self._where()}: {reply.message}")

    def __del__(self) -> None:
        # A thread's connection is dropped with the thread: close the socket rather
        # than leave it to the garbage collector (which warns about it).
        sock = getattr(self, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        """Close the socket (the next command opens a new one)."""
        sock, self._sock = self._sock, None
        self._buf.clear()
        self._pos = 0
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # -- commands --

    def execute(self, *args: Arg) -> Reply:
        """Send one command and return its reply.

        Raises:
            ResponseError: the server answered with an error (`NoScriptError` for
                ``-NOSCRIPT``); the connection stays usable.
            RespConnectionError: the connection failed (it was closed).
        """
        reply = self.pipeline((args,))[0]
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def pipeline(self, commands: Iterable[Sequence[Arg]]) -> list[Reply]:
        """Send every command, then read every reply (one round trip).

        Returns:
            One reply per command, in order; an error reply is a `ResponseError` value
            in its place (not raised).

        Raises:
            RespConnectionError: the connection failed (it was closed; which commands
                ran is unknown).
        """
        self.connect()
        return self._roundtrip(commands)

    def _roundtrip(self, commands: Iterable[Sequence[Arg]]) -> list[Reply]:
        out: list[bytes] = []
        count = 0
        for command in commands:
            _pack(command, out)
            count += 1
        try:
            self._send(b"".join(out))
            return [self._read_reply() for _ in range(count)]
        except BaseException:
            # A reply may be left unread (an interrupted call, a timeout): never reuse.
            self.close()
            raise

    def _send(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise RespConnectionError(f"the connection to {self._where()} is closed")
        try:
            sock.sendall(data)
        except TimeoutError as e:
            raise RespTimeoutError(f"sending to {self._where()} timed out") from e
        except OSError as e:
            raise RespConnectionError(f"sending to {self._where()} failed: {e}") from e

    # -- parsing --

    def _fill(self) -> None:
        """Read up to one chunk more into the buffer (dropping what was parsed)."""
        sock = self._sock
        if sock is None:
            raise RespConnectionError(f"the connection to {self._where()} is closed")
        buf = self._buf
        if self._pos:
            del buf[: self._pos]
            self._pos = 0
        try:
            n = sock.recv_into(self._view)
        except TimeoutError as e:
            raise RespTimeoutError(
                f"no reply from {self._where()} within {self.params.socket_timeout} s"
            ) from e
        except OSError as e:
            raise RespConnectionError(f"reading from {self._where()} failed: {e}") from e
        if not n:
            raise RespConnectionError(f"{self._where()} closed the connection")
        buf += self._view[:n]

    def _line_end(self) -> int:
        """The index of the CRLF ending the line at ``_pos`` (reading as needed)."""
        end = self._buf.find(_CRLF, self._pos)
        while end < 0:
            searched = len(self._buf) - self._pos
            self._fill()
            end = self._buf.find(_CRLF, max(0, searched - 1))
        return end

    def _read_reply(self) -> Reply:
        end = self._line_end()
        buf = self._buf
        pos = self._pos
        kind = buf[pos]
        if kind == 36:  # $: bulk string
            size = int(buf[pos + 1 : end])
            if size < 0:
                self._pos = end + 2
                return None
            start = end + 2
            while len(buf) < start + size + 2:
                self._pos = start
                self._fill()
                start = 0
            self._pos = start + size + 2
            return bytes(buf[start : start + size])
        if kind == 42:  # *: array
            count = int(buf[pos + 1 : end])
            self._pos = end + 2
            if count < 0:
                return None
            return [self._read_reply() for _ in range(count)]
        if kind == 58:  # :: integer
            self._pos = end + 2
            return int(buf[pos + 1 : end])
        if kind == 43:  # +: simple string
            self._pos = end + 2
            return bytes(buf[pos + 1 : end])
        if kind == 45:  # -: error
            self._pos = end + 2
            return _error(bytes(buf[pos + 1 : end]))
        raise RespConnectionError(
            f"malformed reply from {self._where()}: {bytes(buf[pos : end + 2])!r}"
        )

    def _wait_readable(self, timeout: float) -> bool:
        """Whether a reply (or part of one) arrived within ``timeout`` s."""
        if self._pos < len(self._buf):
            return True
        sock = self._sock
        if sock is None:
            raise RespConnectionError(f"the connection to {self._where()} is closed")
        pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted
        if pending is not None and pending():
            return True
        sock.settimeout(timeout)
        try:
            self._fill()
        except RespTimeoutError:
            return False
        except BaseException:
            self.close()
            raise
        finally:
            if self._sock is not None:
                self._sock.settimeout(self.params.socket_timeout)
        return True


class PubSubMessage(NamedTuple):
    """A message received by a `Subscriber`.

    Attributes:
        kind: ``b"message"`` or ``b"pmessage"``.
        pattern: the pattern that matched (``pmessage`` only).
        channel: the channel it was published on.
        data: what was published.
    """

    kind: bytes
    pattern: bytes | None
    channel: bytes
    data: bytes


class Subscriber:
    """A connection in pub/sub mode (not thread-safe: one listener thread owns it).

    Args:
        params: where and how to connect.
    """

    def __init__(self, params: ConnectionParams) -> None:
        self._conn = Connection(params)

    def subscribe(self, *channels: str | bytes) -> None:
        """Subscribe to ``channels`` and wait for the server's confirmations.

        Raises:
            RespConnectionError: the connection failed.
            ResponseError: the server refused.
        """
        self._subscribe("SUBSCRIBE", channels)

    def psubscribe(self, *patterns: str | bytes) -> None:
        """Subscribe to the channels matching the glob ``patterns``, and wait for the
        server's confirmations.

        Raises:
            RespConnectionError: the connection failed.
            ResponseError: the server refused.
        """
        self._subscribe("PSUBSCRIBE", patterns)

    def _subscribe(self, command: str, names: Sequence[str | bytes]) -> None:
        conn = self._conn
        conn.connect()
        try:
            conn._send(b"".join(_packed((command, *names))))
            for _ in names:
                reply = conn._read_reply()
                if isinstance(reply, ResponseError):
                    raise reply
        except RespError:
            conn.close()
            raise

    def get_message(self, timeout: float) -> PubSubMessage | None:
        """Return the next published message, or None if none came within ``timeout``
        seconds (subscription confirmations and pongs are skipped).

        Raises:
            RespConnectionError: the connection failed (it was closed).
        """
        conn = self._conn
        if not conn.connected:
            raise RespConnectionError("the subscriber is not connected")
        try:
            while True:
                if not conn._wait_readable(timeout):
                    return None
                reply = conn._read_reply()
                if not isinstance(reply, list) or not reply:
                    raise RespConnectionError(f"unexpected pub/sub reply {reply!r}")
                kind = reply[0]
                if kind == b"message" and len(reply) == 3:
                    channel, data = reply[1], reply[2]
                    if isinstance(channel, bytes) and isinstance(data, bytes):
                        return PubSubMessage(kind, None, channel, data)
                elif kind == b"pmessage" and len(reply) == 4:
                    pattern, channel, data = reply[1], reply[2], reply[3]
                    if (
                        isinstance(pattern, bytes)
                        and isinstance(channel, bytes)
                        and isinstance(data, bytes)
                    ):
                        return PubSubMessage(kind, pattern, channel, data)
                else:
                    continue  # (un)subscribe confirmations, pongs
                raise RespConnectionError(f"malformed pub/sub message {reply!r}")
        except RespConnectionError:
            conn.close()
            raise

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def _packed(args: Sequence[Arg]) -> list[bytes]:
    out: list[bytes] = []
    _pack(args, out)
    return out
