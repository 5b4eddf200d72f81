"""A private ``redis-server`` for crash tests: started on a free port, restartable,
killable, and always stopped by the test that started it.

Tests that stop, restart or kill Redis (or every client connection) must not do it to
the shared server on 6379, so each one starts its own with `RedisServer`.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

__all__ = [
    "REDIS_SERVER",
    "RedisServer",
    "delete_namespace",
    "free_port",
    "keys_under",
    "leftover_keys",
    "private_redis",
]

#: The server binary (``/usr/bin/redis-server`` on the test machines).
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, with its data in ``directory``.

    Args:
        directory: the server's ``--dir`` (AOF files and the log go there).
        appendonly: run with ``--appendonly yes --appendfsync always`` (every write is
            on disk before it is answered), else with no persistence at all.
        port: a fixed port (default: a free one, chosen at the first `start`).
        options: more command-line options (``("--maxmemory", "2mb")``...).
    """

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = False,
        port: int | None = None,
        options: tuple[str, ...] = (),
    ):
        self.options = options
        self.directory = directory
        self.appendonly = appendonly
        self.port = port or 0
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.logfile = directory / "redis-server.log"

    # -- lifecycle -------------------------------------------------------------------

    def _command(self) -> list[str]:
        command = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.logfile),
            "--daemonize",
            "no",
        ]
        if self.appendonly:
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            command += ["--appendonly", "no"]
        return command + list(self.options)

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (on the same port and dir as before, after a stop) and
        wait until it answers PING (after loading its AOF)."""
        assert self.process is None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        fixed = self.port != 0
        for _ in range(5):
            if not fixed:
                self.port = free_port()
            self.process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._wait_ready(timeout):
                self.starts += 1
                return
            self._reap(signal.SIGKILL)
            if fixed:
                # The old socket may linger briefly after a restart; try once more.
                time.sleep(0.2)
        raise RuntimeError(f"redis-server did not start on port {self.port}: {self.log_tail()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        client = self.client(socket_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def _reap(self, sig: signal.Signals, timeout: float = 10.0) -> int | None:
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def stop(self) -> int | None:
        """SIGTERM: a clean shutdown (with AOF, everything acknowledged is on disk)."""
        return self._reap(signal.SIGTERM)

    def kill(self) -> int | None:
        """SIGKILL: the server dies at once."""
        return self._reap(signal.SIGKILL)

    def restart(self, *, downtime: float = 0.0, hard: bool = False) -> float:
        """Stop (SIGTERM, or SIGKILL if ``hard``), wait ``downtime`` s, start again on
        the same port and dir. Returns how long the server was unreachable (s)."""
        began = time.monotonic()
        if hard:
            self.kill()
        else:
            self.stop()
        if downtime:
            time.sleep(downtime)
        self.start()
        return time.monotonic() - began

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        """Stop the server for good (teardown): SIGKILL, so nothing can hang."""
        self.kill()

    def __enter__(self) -> Self:
        if self.process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- access ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, *, socket_timeout: float | None = 5.0) -> redis.Redis:
        """A new client of this server (bytes replies)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=socket_timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def aof_files(self) -> list[Path]:
        return sorted(p for p in self.directory.rglob("*.aof*") if p.is_file())

    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


# -- keys ------------------------------------------------------------------------------


def keys_under(client: redis.Redis, namespace: str) -> list[str]:
    """Every key under ``namespace:`` (SCAN, not KEYS), sorted, as text."""
    pattern = f"{_glob_escape(namespace)}:*"
    return sorted(k.decode() for k in client.scan_iter(match=pattern, count=1000))


def leftover_keys(client: redis.Redis, namespace: str) -> list[str]:
    """Keys under the namespace that mean a message is stored, queued or in flight:
    everything except ``__heartbeats__`` (a live or recently closed broker's entry)."""
    return [k for k in keys_under(client, namespace) if k != f"{namespace}:__heartbeats__"]


def delete_namespace(client: redis.Redis, namespace: str) -> int:
    """Delete every key under ``namespace:``; returns how many were deleted."""
    keys = keys_under(client, namespace)
    if keys:
        deleted: int = client.delete(*keys)
        return deleted
    return 0


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@contextlib.contextmanager
def private_redis(directory: Path, *, appendonly: bool = False) -> Iterator[RedisServer]:
    """A started `RedisServer`, killed on exit."""
    server = RedisServer(directory, appendonly=appendonly)
    server.start()
    try:
        yield server
    finally:
        server.close()
