"""The native RESP2 client (`dq.brokers.redis._resp`) and how `RedisBroker` chooses
between it and redis-py, against real Redis servers: the shared one on 6379, and
private ones for passwords, ACL users, unix sockets and TLS."""

from __future__ import annotations

import contextlib
import logging
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.backoff
import redis.connection
import redis.retry

from dq.brokers.redis import RedisBroker, RedisConnectionClosed, _params, _resp
from dq.brokers.redis._redispy import RedisPyConnection
from dq.errors import ConnectionClosed
from dq.message import Message
from tests.support.redis_helpers import client, delete_namespace, keys_under, new_namespace
from tests.support.redis_server import REDIS_SERVER, RedisServer, free_port
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.redis]

SHARED = _params.ConnectionParams(host="127.0.0.1", port=6379)
SRC = str(Path(__file__).resolve().parents[3] / "src")


@pytest.fixture
def conn() -> Iterator[_resp.Connection]:
    c = _resp.Connection(SHARED)
    yield c
    c.close()


@pytest.fixture
def key() -> Iterator[str]:
    name = f"dq-resp-test-{uuid.uuid4().hex}"
    yield name
    conn = client()
    keys = list(conn.scan_iter(match=f"{name}*"))
    if keys:
        conn.delete(*keys)


@pytest.fixture
def namespace() -> Iterator[str]:
    name = new_namespace("dq-resp")
    yield name
    delete_namespace(client(), name)


# -- a private server --------------------------------------------------------------------


@contextlib.contextmanager
def private_server(directory: Path, *args: str, port: int | None = None) -> Iterator[Path]:
    """A ``redis-server`` with ``args`` and a unix socket (returned), killed on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / "redis.sock"
    command = [
        REDIS_SERVER,
        "--port",
        str(port if port is not None else free_port()),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        "--unixsocket",
        str(sock),
        *args,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert process.poll() is None, f"redis-server exited: {command}"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        yield sock
    finally:
        process.kill()
        process.wait()


# -- URLs --------------------------------------------------------------------------------

URLS = [
    "redis://localhost",
    "redis://127.0.0.1:6380",
    "redis://127.0.0.1:6379/3",
    "redis://:secret@127.0.0.1:6379/0",
    "redis://alice:p%40ss@example.com:7000/2",
    "redis://127.0.0.1/4?db=5",
    "redis://127.0.0.1?socket_timeout=0.5&socket_connect_timeout=2",
    "rediss://cache.example.com:6380/1?ssl_cert_reqs=none",
    "unix:///tmp/redis.sock",
    "unix://:pw@/var/run/redis.sock?db=2",
]


@pytest.mark.parametrize("url", URLS)
def test_urls_mean_what_they_mean_to_redis_py(url: str) -> None:
    expected = dict(redis.connection.parse_url(url))  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    connection_class = expected.pop("connection_class", None)
    if connection_class is redis.connection.UnixDomainSocketConnection:
        expected["unix_socket_path"] = expected.pop("path")
    elif connection_class is redis.connection.SSLConnection:
        expected["ssl"] = True
    assert _params.parse_url(url) == expected


def test_url_options_become_connection_parameters() -> None:
    params = _params.ConnectionParams.from_options(
        _params.parse_url("redis://bob:pw@127.0.0.1:6390/3?socket_timeout=0.25")
    )
    assert params == _params.ConnectionParams(
        host="127.0.0.1", port=6390, db=3, username="bob", password="pw", socket_timeout=0.25
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1", "must start with redis://"),
        ("redis://127.0.0.1?db=x", "invalid value 'x' for 'db'"),
    ],
)
def test_bad_urls_are_rejected_naming_the_problem(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _params.parse_url(url)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"port": "x"}, "port must be an integer, got 'x'"),
        ({"socket_timeout": "1"}, "socket_timeout must be a number of seconds"),
        ({"ssl_cert_reqs": "maybe"}, "ssl_cert_reqs must be 'none', 'optional' or 'required'"),
        ({"retry": object()}, r"options \['retry'\] are not supported"),
    ],
)
def test_bad_options_are_rejected_naming_them(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _params.ConnectionParams.from_options(options)


# -- commands and replies ----------------------------------------------------------------


def test_replies_are_parsed_into_bytes_ints_lists_and_none(
    conn: _resp.Connection, key: str
) -> None:
    assert conn.execute("SET", key, "é") == b"OK"  # a simple string
    assert conn.execute("GET", key) == "é".encode()  # a bulk string
    assert conn.execute("GET", key + ".missing") is None  # nil
    assert conn.execute("RPUSH", key + ".l", b"a", 2, 3.5) == 3  # an integer
    assert conn.execute("LRANGE", key + ".l", 0, -1) == [b"a", b"2", b"3.5"]
    assert conn.execute("LRANGE", key + ".missing", 0, -1) == []
    nested = conn.execute("EVAL", "return {1, {'x', false}, 'y'}", 0)
    assert nested == [1, [b"x", None], b"y"]


def test_large_values_and_arrays_cross_many_reads(conn: _resp.Connection, key: str) -> None:
    big = bytes(range(256)) * 1200 + b"\r\n$-1\r\n"  # > 64 KiB, with RESP-like bytes
    assert conn.execute("SET", key, big) == b"OK"
    assert conn.execute("GET", key) == big
    items = [f"item-{n}".encode() * (n % 7 + 1) for n in range(20_000)]
    for start in range(0, len(items), 5000):
        conn.execute("RPUSH", key + ".l", *items[start : start + 5000])
    assert conn.execute("LRANGE", key + ".l", 0, -1) == items


def test_an_error_reply_raises_and_the_connection_stays_usable(
    conn: _resp.Connection, key: str
) -> None:
    conn.execute("SET", key, "text")
    with pytest.raises(_resp.ResponseError) as caught:
        conn.execute("LPUSH", key, "x")
    assert caught.value.code == "WRONGTYPE"
    assert conn.connected
    assert conn.execute("GET", key) == b"text"


def test_an_unknown_script_raises_no_script_error(conn: _resp.Connection) -> None:
    with pytest.raises(_resp.NoScriptError):
        conn.execute("EVALSHA", "0" * 40, 0)
    sha = conn.execute("SCRIPT", "LOAD", "return 7")
    assert isinstance(sha, bytes)
    assert conn.execute("EVALSHA", sha, 0) == 7


def test_a_pipeline_returns_every_reply_with_errors_in_place(
    conn: _resp.Connection, key: str
) -> None:
    replies = conn.pipeline(
        [("SET", key, "1"), ("INCR", key), ("HGET", key, "f"), ("INCRBY", key, 10)]
    )
    assert replies[:2] == [b"OK", 2]
    assert isinstance(replies[2], _resp.ResponseError) and replies[2].code == "WRONGTYPE"
    assert replies[3] == 12
    assert conn.pipeline([]) == []


def test_arguments_that_are_not_strings_or_numbers_are_rejected(
    conn: _resp.Connection,
) -> None:
    with pytest.raises(TypeError, match="cannot be a bool, got True"):
        conn.execute("SET", "k", True)
    with pytest.raises(TypeError, match="must be bytes, str, int or float, got None"):
        conn.execute("SET", "k", None)  # type: ignore[arg-type]  # what is tested


# -- connection failures -----------------------------------------------------------------


def test_nothing_listening_is_a_connection_error() -> None:
    c = _resp.Connection(_params.ConnectionParams(host="127.0.0.1", port=free_port()))
    with pytest.raises(_resp.RespConnectionError, match=r"cannot connect to 127\.0\.0\.1"):
        c.execute("PING")
    assert not c.connected


def test_a_timeout_closes_the_connection_and_the_next_command_reconnects(key: str) -> None:
    c = _resp.Connection(SHARED._replace(socket_timeout=0.2))
    try:
        with pytest.raises(_resp.RespTimeoutError):
            c.execute("BLPOP", key, 5)  # blocks longer than the socket timeout
        assert not c.connected
        assert c.execute("PING") == b"PONG"
    finally:
        c.close()


def test_a_killed_connection_raises_then_reconnects(conn: _resp.Connection) -> None:
    client_id = conn.execute("CLIENT", "ID")
    admin = _resp.Connection(SHARED)
    try:
        assert admin.execute("CLIENT", "KILL", "ID", _int(client_id)) == 1
    finally:
        admin.close()
    with pytest.raises(_resp.RespConnectionError):
        conn.execute("PING")
    assert conn.execute("PING") == b"PONG"
    assert conn.execute("CLIENT", "ID") != client_id


def _int(reply: _resp.Reply) -> int:
    assert isinstance(reply, int), reply
    return reply


# -- sessions: passwords, ACL users, databases, names, unix sockets -------------------------


def test_password_acl_user_db_name_and_unix_socket(tmp_path: Path) -> None:
    with private_server(tmp_path, "--requirepass", "s3cret") as sock:
        admin = _resp.Connection(_params.ConnectionParams(unix_socket_path=str(sock)))
        with pytest.raises(_resp.ResponseError) as caught:
            admin.execute("PING")  # no AUTH
        assert caught.value.code == "NOAUTH"
        admin = _resp.Connection(
            _params.ConnectionParams(unix_socket_path=str(sock), password="s3cret")
        )
        assert admin.execute("ACL", "SETUSER", "alice", "on", ">pw", "~*", "+@all") == b"OK"

        url = f"unix://alice:pw@{sock}?db=3"
        params = _params.ConnectionParams.from_options(
            {**_params.parse_url(url), "client_name": "dq-test"}
        )
        alice = _resp.Connection(params)
        assert alice.execute("ACL", "WHOAMI") == b"alice"
        assert alice.execute("CLIENT", "GETNAME") == b"dq-test"
        alice.execute("SET", "k", "v")
        assert admin.execute("GET", "k") is None  # db 0
        assert admin.pipeline([("SELECT", 3), ("GET", "k")]) == [b"OK", b"v"]

        for wrong in (
            params._replace(username=None, password="nope"),
            params._replace(password="nope"),
        ):
            bad = _resp.Connection(wrong)
            with pytest.raises(_resp.AuthenticationError, match="refused the credentials"):
                bad.execute("PING")
            assert not bad.connected
        for c in (admin, alice):
            c.close()


def _certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            shutil.which("openssl") or "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_with_certificate_checks(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    port = free_port()
    tls = (
        f"--tls-port {port} --tls-cert-file {cert} --tls-key-file {key} "
        f"--tls-ca-cert-file {cert} --tls-auth-clients no"
    ).split()
    with private_server(tmp_path / "server", *tls, port=0):
        url = f"rediss://127.0.0.1:{port}/2?ssl_ca_certs={cert}"
        trusted = _resp.Connection(_params.ConnectionParams.from_options(_params.parse_url(url)))
        assert trusted.pipeline([("SET", "k", "v"), ("GET", "k")]) == [b"OK", b"v"]
        trusted.close()
        # Not trusted (the system's CAs only): refused, as redis-py refuses.
        untrusted = _resp.Connection(
            _params.ConnectionParams(host="127.0.0.1", port=port, ssl=True)
        )
        with pytest.raises(_resp.RespConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusted.execute("PING")
        unchecked = _resp.Connection(
            _params.ConnectionParams(host="127.0.0.1", port=port, ssl=True, ssl_cert_reqs="none")
        )
        assert unchecked.execute("PING") == b"PONG"
        unchecked.close()


# -- pub/sub -------------------------------------------------------------------------------


def test_a_subscriber_receives_published_messages(conn: _resp.Connection, key: str) -> None:
    subscriber = _resp.Subscriber(SHARED)
    try:
        subscriber.psubscribe(f"{key}.*")
        subscriber.subscribe(f"{key}-plain")
        assert subscriber.get_message(timeout=0.05) is None  # nothing published yet
        assert conn.execute("PUBLISH", f"{key}.a", b"one") == 1
        assert conn.execute("PUBLISH", f"{key}-plain", "two") == 1
        assert subscriber.get_message(timeout=2) == _resp.PubSubMessage(
            b"pmessage", f"{key}.*".encode(), f"{key}.a".encode(), b"one"
        )
        assert subscriber.get_message(timeout=2) == _resp.PubSubMessage(
            b"message", None, f"{key}-plain".encode(), b"two"
        )
        assert subscriber.get_message(timeout=0.05) is None
    finally:
        subscriber.close()
    with pytest.raises(_resp.RespConnectionError, match="not connected"):
        subscriber.get_message(timeout=0.01)


# -- the broker: native transport, redis-py fallback, errors -------------------------------


def _round_trip(broker: RedisBroker) -> None:
    """Enqueue (one and many), consume, ack, recover, flush: the broker's own calls."""
    broker.declare_queue("q")
    first = broker.enqueue(Message("q", "f", (1,), {}, {}))
    broker.enqueue_many([Message("q", "f", (n,), {}, {}) for n in range(2, 5)])
    assert broker.qsize("q") == 4
    consumer = broker.consume("q", prefetch=10, timeout=200)
    seen = []
    for message in consumer:
        seen.append(message.message.args[0])
        consumer.ack(message)
    consumer.close()
    assert sorted(seen) == [1, 2, 3, 4]
    assert first.options["redis_message_id"]
    assert broker.recover().requeued == 0
    broker.join("q", timeout=2000)
    broker.flush_all()
    broker.close()


def test_the_broker_uses_the_native_client_for_urls_and_plain_options(namespace: str) -> None:
    by_url = RedisBroker(url="redis://127.0.0.1:6379/0?socket_timeout=5", namespace=namespace)
    by_options = RedisBroker(host="127.0.0.1", port=6379, decode_responses=True)
    assert by_url._params == SHARED._replace(socket_timeout=5.0)
    assert by_options._params == SHARED
    _round_trip(by_url)
    by_options.close()
    assert keys_under(client(), namespace) == []


def test_options_only_redis_py_understands_fall_back_to_redis_py(namespace: str) -> None:
    retry = redis.retry.Retry(redis.backoff.NoBackoff(), 1)
    broker = RedisBroker(namespace=namespace, host="127.0.0.1", port=6379, retry=retry)
    assert broker._params is None  # redis-py throughout
    assert isinstance(broker._connection(), RedisPyConnection)
    assert isinstance(broker.client.connection_pool.connection_kwargs["retry"], redis.retry.Retry)
    _round_trip(broker)
    assert keys_under(client(), namespace) == []


def test_a_given_client_is_used_through_redis_py(namespace: str) -> None:
    given = redis.Redis(host="127.0.0.1", port=6379, decode_responses=True)
    broker = RedisBroker(client=given, namespace=namespace)
    assert broker._params is None and broker.client is given
    assert isinstance(broker._connection(), RedisPyConnection)
    _round_trip(broker)
    assert keys_under(client(), namespace) == []


def test_connection_errors_are_redis_py_errors_too_once_redis_py_is_imported() -> None:
    broker = RedisBroker(port=free_port(), socket_connect_timeout=0.2)
    with pytest.raises(RedisConnectionClosed) as caught:
        broker.enqueue(Message("q", "f", (), {}, {}))
    error = caught.value
    assert isinstance(error, ConnectionClosed)
    assert isinstance(error, redis.exceptions.ConnectionError)  # redis-py is imported here
    assert type(pickle.loads(pickle.dumps(error))) is type(error)


def _run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_worker_process_never_imports_redis_py(namespace: str) -> None:
    out = _run_python(
        f"""
        import sys
        import dq, dq.brokers.redis, dq.cli
        from dq.brokers.redis import RedisBroker
        from dq.worker import Worker

        broker = RedisBroker(url="redis://127.0.0.1:6379/0", namespace={namespace!r})
        dq.set_broker(broker)
        done = []

        @dq.actor(queue_name="q")
        def job(n):
            done.append(n)

        for n in range(20):
            job.send(n)
        job.send_with_options(args=(20,), delay=10)
        worker = Worker(broker, worker_threads=2, worker_timeout=50)
        worker.start()
        broker.join("q", timeout=10_000)
        worker.stop()
        broker.close()
        assert sorted(done) == list(range(21)), done
        print("redis-py imported:", "redis" in sys.modules)
        try:
            failing = RedisBroker(port=1, socket_connect_timeout=0.2)
            failing.enqueue(dq.Message("q", "f", (), {{}}, {{}}))
        except dq.ConnectionClosed as e:
            print("raised:", type(e).__name__)
        broker.client
        print("after broker.client:", "redis" in sys.modules)
        """
    )
    assert out.splitlines() == [
        "redis-py imported: False",
        "raised: RedisConnectionClosed",
        "after broker.client: True",
    ]
    assert keys_under(client(), namespace) == []


def test_the_listener_wakes_consumers_through_the_native_subscriber(namespace: str) -> None:
    broker = RedisBroker(namespace=namespace)
    try:
        broker.declare_queue("q")
        consumer = broker.consume("q", prefetch=1, timeout=10_000)
        assert broker._listener is not None and broker._listener.ready.is_set()
        generation = broker._waker.generation("q")
        broker.enqueue(Message("q", "f", (), {}, {}))
        deadline = time.monotonic() + 5
        while broker._waker.generation("q") == generation:
            assert time.monotonic() < deadline, "no notification reached the waker"
            time.sleep(0.01)
        message = next(consumer)
        consumer.ack(message)
        consumer.close()
    finally:
        broker.close()


def test_an_outage_is_logged_once_and_the_recovery_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with RedisServer(tmp_path) as server:
        broker = RedisBroker(url=server.url, heartbeat_timeout=200, requeue_interval=100)
        try:
            broker.declare_queue("q")
            consumer = broker.consume("q", timeout=10)  # starts the keeper thread
            with caplog.at_level(logging.INFO, logger=broker.logger.name):
                server.restart(downtime=0.5)
                wait_until(lambda: "Redis is reachable again." in caplog.messages, "recovery", 10)
            consumer.close()
        finally:
            broker.close()
    keeper = [r for r in caplog.records if "Heartbeat or recovery failed" in r.getMessage()]
    assert [r.levelno for r in keeper] == [logging.WARNING]  # once, and no traceback
    assert keeper[0].exc_info is None
