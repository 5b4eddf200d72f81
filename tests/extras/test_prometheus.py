"""The Prometheus middleware: Dramatiq's metric names, types, labels and buckets, written
to a multiprocess directory and served by the exposition process (``spec/wire.md`` §9).

Each test points the middleware at its own ``tmp_path`` and reads the metrics back with
``prometheus_client``'s `MultiProcessCollector`, as the exposition server does.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, values
from prometheus_client.multiprocess import MultiProcessCollector

import dq
import dq.broker
import dq.middleware
from dq import Message, MessageProxy, Worker, _sources
from dq.brokers.stub import StubBroker
from dq.middleware import prometheus
from dq.middleware.prometheus import Prometheus
from tests.support.global_broker import installed

LABELS = ("queue_name", "actor_name")
BUCKETS = [
    "5.0",
    "10.0",
    "25.0",
    "50.0",
    "75.0",
    "100.0",
    "250.0",
    "500.0",
    "750.0",
    "1000.0",
    "2500.0",
    "5000.0",
    "7500.0",
    "10000.0",
    "30000.0",
    "60000.0",
    "600000.0",
    "900000.0",
    "+Inf",
]
#: Metric family name (as collected: counters without ``_total``) -> type.
FAMILIES = {
    "dramatiq_messages": "counter",
    "dramatiq_message_errors": "counter",
    "dramatiq_message_retries": "counter",
    "dramatiq_message_rejects": "counter",
    "dramatiq_messages_inprogress": "gauge",
    "dramatiq_delayed_messages_inprogress": "gauge",
    "dramatiq_message_duration_milliseconds": "histogram",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def prom_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh multiprocess directory for the middleware (restored afterwards).

    ``prometheus_client`` is already imported here, so its storage is set as if it had
    been imported with the multiprocess directory variable set (as it is in a worker,
    where the middleware sets it at boot): a fresh per-process storage, whose files
    each test's boot opens in its own directory.
    """
    monkeypatch.setattr(prometheus, "DB_PATH", str(tmp_path))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv("prometheus_multiproc_dir", str(tmp_path))
    storage = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    monkeypatch.setattr(values, "ValueClass", storage)
    yield tmp_path
    storage.close_all_files()


@pytest.fixture
def broker() -> Iterator[StubBroker]:
    """A StubBroker with the default stack, installed as the global broker."""
    yield from installed(StubBroker())


def collect(path: Path) -> tuple[dict[str, str], Samples]:
    """Read ``path`` as the exposition server does: (family -> type, samples)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    families: dict[str, str] = {}
    samples: Samples = {}
    for family in registry.collect():
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families, samples


def value(samples: Samples, name: str, queue_name: str, actor_name: str, **extra: str) -> float:
    """The sample ``name`` with these labels (0 when absent, as Prometheus reads it)."""
    labels = {"queue_name": queue_name, "actor_name": actor_name, **extra}
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class SteppingClock:
    """A clock that tests move by hand."""

    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now


def test_the_metrics_directory_starts_empty(prom_dir: Path) -> None:
    assert collect(prom_dir) == ({}, {})


# -- a worker, end to end -----------------------------------------------------------------


def run_worker(broker: StubBroker, prom_dir: Path) -> tuple[dict[str, str], Samples, Samples]:
    """Run a worker until the default queue is done: (families, samples) while it still
    runs, and the samples once it stopped (``after_worker_shutdown``)."""
    livesum = prom_dir / f"gauge_livesum_{os.getpid()}.db"
    worker = Worker(broker, worker_timeout=20)
    worker.start()
    try:
        broker.join("default", timeout=10_000, fail_fast=False)
        worker.join()
        families, running = collect(prom_dir)
        assert livesum.exists()
    finally:
        worker.stop()
    # The process is marked dead: its live gauge's file is gone, the rest stays.
    assert not livesum.exists()
    return families, running, collect(prom_dir)[1]


def test_a_worker_counts_successes_failures_retries_and_dead_letters(
    prom_dir: Path, broker: StubBroker
) -> None:
    middleware = Prometheus()
    broker.add_middleware(middleware)

    @dq.actor
    def succeeds() -> None:
        pass

    @dq.actor(max_retries=2, min_backoff=10, max_backoff=20)
    def fails() -> None:
        raise ValueError("always")

    broker.emit_after("process_boot")
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(prom_dir)
    assert os.environ["prometheus_multiproc_dir"] == str(prom_dir)  # noqa: SIM112

    for _ in range(3):
        succeeds.send()
    fails.send()  # runs 3 times (2 retries), then is dead-lettered
    families, samples, stopped = run_worker(broker, prom_dir)

    assert families == FAMILIES
    # The processed-message counter and the histogram count every attempt.
    assert value(samples, "dramatiq_messages_total", "default", "succeeds") == 3
    assert value(samples, "dramatiq_messages_total", "default", "fails") == 3
    assert value(samples, "dramatiq_message_errors_total", "default", "succeeds") == 0
    assert value(samples, "dramatiq_message_errors_total", "default", "fails") == 3
    count = "dramatiq_message_duration_milliseconds_count"
    assert value(samples, count, "default", "succeeds") == 3
    assert value(samples, count, "default", "fails") == 3
    bucket = "dramatiq_message_duration_milliseconds_bucket"
    assert value(samples, bucket, "default", "fails", le="+Inf") == 3
    # Each retry is enqueued on the delay queue carrying ``retries``. dq promotes a due
    # message in one step (no second enqueue), so each counts once; Dramatiq also
    # counts the promotion's enqueue (twice per retry, wire.md §9).
    retries = "dramatiq_message_retries_total"
    assert value(samples, retries, "default.DQ", "fails") == 2
    assert value(samples, retries, "default", "fails") == 0
    assert value(samples, retries, "default", "succeeds") == 0
    # Exhausting the retries dead-letters (nacks) the message once.
    rejects = "dramatiq_message_rejects_total"
    assert value(samples, rejects, "default", "fails") == 1
    assert value(samples, rejects, "default", "succeeds") == 0
    assert len(broker.dead_letters) == 1
    # Nothing is in progress any more (mode livesum: no pid label).
    inprogress = "dramatiq_messages_inprogress"
    assert (inprogress, (("actor_name", "fails"), ("queue_name", "default"))) in samples
    assert value(samples, inprogress, "default", "fails") == 0
    assert value(samples, inprogress, "default", "succeeds") == 0
    # The delayed gauge (mode "all": one series per pid) goes up under the delay queue
    # and down under the canonical queue, as in Dramatiq.
    delayed = "dramatiq_delayed_messages_inprogress"
    pid = str(os.getpid())
    assert value(samples, delayed, "default.DQ", "fails", pid=pid) == 2
    assert value(samples, delayed, "default", "fails", pid=pid) == -2
    assert middleware.delayed_messages == set()
    assert middleware.message_start_times == {}

    # Once the worker stopped, the live gauge is gone and the counters stay.
    assert not any(name == inprogress for name, _ in stopped)
    assert value(stopped, "dramatiq_messages_total", "default", "succeeds") == 3


def test_a_skipped_message_counts_as_processed(prom_dir: Path, broker: StubBroker) -> None:
    broker.add_middleware(Prometheus())

    @dq.actor
    def too_old() -> None:
        raise AssertionError("a skipped message never runs")

    broker.emit_after("process_boot")
    too_old.send_with_options(max_age=1)
    time.sleep(0.01)
    _, samples, _ = run_worker(broker, prom_dir)
    assert value(samples, "dramatiq_messages_total", "default", "too_old") == 1
    assert value(samples, "dramatiq_message_errors_total", "default", "too_old") == 0
    assert value(samples, "dramatiq_message_rejects_total", "default", "too_old") == 1
    count = "dramatiq_message_duration_milliseconds_count"
    assert value(samples, count, "default", "too_old") == 1


# -- hook by hook -------------------------------------------------------------------------


def test_durations_fall_in_dramatiqs_buckets(
    prom_dir: Path, broker: StubBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SteppingClock(1_700_000_000_000)
    monkeypatch.setattr(_sources, "_clock", clock)  # the clock dq.runtime re-exports
    middleware = Prometheus()
    middleware.after_process_boot(broker)
    message = MessageProxy(Message("q", "work", options={}))

    middleware.before_process_message(broker, message)
    _, samples = collect(prom_dir)
    assert value(samples, "dramatiq_messages_inprogress", "q", "work") == 1
    clock.now += 30
    middleware.after_process_message(broker, message, exception=RuntimeError("x"))

    _, samples = collect(prom_dir)
    bucket = "dramatiq_message_duration_milliseconds_bucket"
    observed = {
        dict(labels)["le"]: count
        for (name, labels), count in samples.items()
        if name == bucket and dict(labels)["actor_name"] == "work"
    }
    assert list(observed) == BUCKETS
    assert observed["25.0"] == 0
    assert observed["50.0"] == observed["+Inf"] == 1
    assert value(samples, "dramatiq_message_duration_milliseconds_sum", "q", "work") == 30
    assert value(samples, "dramatiq_messages_inprogress", "q", "work") == 0
    assert value(samples, "dramatiq_message_errors_total", "q", "work") == 1
    for (name, labels), _count in samples.items():
        assert {"queue_name", "actor_name"} <= dict(labels).keys(), name


def test_only_enqueues_carrying_retries_count_as_retries(
    prom_dir: Path, broker: StubBroker
) -> None:
    middleware = Prometheus()
    middleware.after_process_boot(broker)
    middleware.after_enqueue(broker, Message("q", "a", options={}), None)
    middleware.after_enqueue(broker, Message("q", "a", options={"retries": 1}), None)
    middleware.after_enqueue(broker, Message("q.DQ", "a", options={"retries": 0}), 100)
    _, samples = collect(prom_dir)
    assert value(samples, "dramatiq_message_retries_total", "q", "a") == 1
    assert value(samples, "dramatiq_message_retries_total", "q.DQ", "a") == 1


def test_hooks_do_nothing_before_process_boot(prom_dir: Path, broker: StubBroker) -> None:
    # A producer that never boots (Dramatiq raises AttributeError here).
    middleware = Prometheus()
    message = MessageProxy(Message("q", "a", options={"retries": 1}))
    middleware.after_enqueue(broker, message.message, None)
    middleware.before_delay_message(broker, message)
    middleware.before_process_message(broker, message)
    middleware.after_process_message(broker, message)
    middleware.after_skip_message(broker, message)
    middleware.after_nack(broker, message)
    middleware.after_worker_shutdown(broker, None)
    assert list(prom_dir.iterdir()) == []


def test_booting_twice_keeps_the_counts(prom_dir: Path, broker: StubBroker) -> None:
    middleware = Prometheus()
    message = MessageProxy(Message("q", "a", options={}))
    middleware.after_process_boot(broker)
    middleware.after_nack(broker, message)
    middleware.after_process_boot(broker)  # a fresh registry: nothing registered twice
    middleware.after_nack(broker, message)
    _, samples = collect(prom_dir)
    assert value(samples, "dramatiq_message_rejects_total", "q", "a") == 2


# -- module surface -----------------------------------------------------------------------


def test_forks_runs_the_exposition_server_by_an_importable_path() -> None:
    (fork,) = Prometheus().forks
    # The CLI passes "module:name" to the fork process, which imports it.
    assert getattr(importlib.import_module(fork.__module__), fork.__name__) is fork
    assert fork.__module__ == "dq.middleware.prometheus"


def test_prometheus_is_not_in_the_default_stack() -> None:
    assert Prometheus not in dq.middleware.default_middleware
    assert "Prometheus" not in dq.middleware.__all__
    assert not any(isinstance(m, Prometheus) for m in StubBroker().middleware)
    assert dq.middleware.Prometheus is Prometheus  # resolved lazily
    assert prometheus.__all__ == ["DB_PATH", "HTTP_HOST", "HTTP_PORT", "Prometheus"]


def test_a_missing_prometheus_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"dq\[prometheus\]"):
        Prometheus()


_SURFACE = """
import json, os, sys, tempfile
sys.modules["prometheus_client"] = None  # as if it were not installed
import dq.middleware
assert "dq.middleware.prometheus" not in sys.modules
from dq.middleware import prometheus
try:
    prometheus.Prometheus()
except ImportError as error:
    message = str(error)
print(json.dumps([prometheus.DB_PATH, prometheus.HTTP_HOST, prometheus.HTTP_PORT,
                  os.path.isdir(prometheus.DB_PATH), tempfile.gettempdir(), message]))
"""


def test_settings_come_from_dramatiqs_variables_and_need_no_client(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("dramatiq_prom_")}
    env["TMPDIR"] = str(tmp_path)
    defaults = _run_surface(env)
    assert defaults[:4] == [f"{tmp_path}/dramatiq-prometheus", "0.0.0.0", 9191, True]
    assert defaults[4] == str(tmp_path)
    assert "dq[prometheus]" in defaults[5]

    env.update(
        dramatiq_prom_db=str(tmp_path / "db"),
        dramatiq_prom_host="127.0.0.1",
        dramatiq_prom_port="9999",
    )
    assert _run_surface(env)[:4] == [str(tmp_path / "db"), "127.0.0.1", 9999, True]


def _run_surface(env: dict[str, str]) -> list[Any]:
    import json

    out = subprocess.run(
        [sys.executable, "-c", _SURFACE], env=env, capture_output=True, text=True, check=True
    ).stdout
    result: list[Any] = json.loads(out)
    return result


_NATURAL_BOOT = """
import os, sys
from dq.brokers.stub import StubBroker
from dq.middleware.prometheus import Prometheus
middleware = Prometheus()
assert "prometheus_client" not in sys.modules  # not imported before boot
broker = StubBroker(middleware=[middleware])
broker.emit_after("process_boot")
from prometheus_client import values
storage = values.ValueClass
assert storage._multiprocess  # chosen by the library's own first import
broker.emit_after("process_boot")
assert values.ValueClass is storage  # kept: a second storage would reopen the files
middleware.total_messages.labels("q", "a").inc()
print(sorted(os.listdir(os.environ["dramatiq_prom_db"])))
"""


_EARLY_IMPORT = """
import os, sys
import prometheus_client  # before boot, without a multiprocess directory
from dq.brokers.stub import StubBroker
from dq.middleware.prometheus import Prometheus
middleware = Prometheus()
broker = StubBroker(middleware=[middleware])
broker.emit_after("process_boot")
from prometheus_client import values
assert values.ValueClass is values.MutexValue  # dq changes nothing of the library
middleware.total_messages.labels("q", "a").inc()
print(sorted(os.listdir(os.environ["dramatiq_prom_db"])))
"""


def _boot_in_a_process(code: str, db: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter, with no multiprocess directory variable and
    ``db`` as the middleware's directory."""
    env = {k: v for k, v in os.environ.items() if "multiproc_dir" not in k.lower()}
    env["dramatiq_prom_db"] = str(db)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return out


def test_a_client_imported_before_boot_is_left_alone_and_named(tmp_path: Path) -> None:
    out = _boot_in_a_process(_EARLY_IMPORT, tmp_path)
    assert out.stdout.strip() == "[]"  # in memory: nothing the exposition server sees
    assert "imported before this process booted" in out.stderr
    assert f"PROMETHEUS_MULTIPROC_DIR={tmp_path}" in out.stderr


def test_the_first_import_of_the_client_happens_at_boot(tmp_path: Path) -> None:
    out = _boot_in_a_process(_NATURAL_BOOT, tmp_path)
    # Its files are in the directory, under its pid.
    assert re.fullmatch(r"\['counter_\d+\.db'\]", out.stdout.strip()), out.stdout


# -- the exposition server ----------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _serve() -> None:
    """The exposition process (spawned, so it reads its settings from the environment)."""
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(prometheus._run_exposition_server())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str, deadline: float) -> tuple[str, str]:
    """GET ``url``, retrying until the server listens: (content type, body)."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.headers["Content-Type"], response.read().decode()
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_the_exposition_server_serves_every_process_on_any_path(
    prom_dir: Path, broker: StubBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    middleware = Prometheus()
    middleware.after_process_boot(broker)
    message = MessageProxy(Message("default", "succeeds", options={}))
    middleware.before_process_message(broker, message)
    middleware.after_process_message(broker, message)
    # Another (dead) process's counters in the same directory: the server adds them up.
    shutil.copy(prom_dir / f"counter_{os.getpid()}.db", prom_dir / "counter_999999.db")
    port = _free_port()
    monkeypatch.setenv("dramatiq_prom_db", str(prom_dir))
    monkeypatch.setenv("dramatiq_prom_host", "127.0.0.1")
    monkeypatch.setenv("dramatiq_prom_port", str(port))

    process = multiprocessing.get_context("spawn").Process(target=_serve, daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + 15
        for path in ("/metrics", "/anything/else?x=1"):
            content_type, body = _get(f"http://127.0.0.1:{port}{path}", deadline)
            assert content_type == CONTENT_TYPE_LATEST
            assert "# TYPE dramatiq_messages_total counter" in body
            assert 'dramatiq_messages_total{actor_name="succeeds",queue_name="default"} 2.0' in body
            assert "dramatiq_message_duration_milliseconds_bucket" in body
    finally:
        process.terminate()  # SIGTERM
        process.join(10)
    assert process.exitcode == 0
    # The port was released.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        sock.bind(("127.0.0.1", port))
        sock.listen()
