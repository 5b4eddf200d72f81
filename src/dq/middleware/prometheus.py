"""`Prometheus`: export per-actor message metrics to Prometheus.

Not part of the default stack: add it by hand (``broker.add_middleware(Prometheus())``).
Every worker process writes its metrics to files in one shared directory (the
multiprocess mode of ``prometheus_client``), and a separate process, which the CLI forks
because of the ``forks`` property, serves the sum over all of them over HTTP.

The data-level names are Dramatiq's, so dashboards and alerts work for mixed fleets
(``spec/wire.md`` §9): the environment variables, the metric names, types, labels and
histogram buckets, and the multiprocess directory variables set at boot.

Environment, read when this module is imported (only Dramatiq's names; dq reads no
aliases, so one fleet has one set of settings):

``dramatiq_prom_db``
    The multiprocess directory (`DB_PATH`), default ``<tempdir>/dramatiq-prometheus``.
    Import creates it; nothing ever empties it, since other live processes may be using
    its files.
``dramatiq_prom_host``
    The exposition server's bind address (`HTTP_HOST`), default ``0.0.0.0``.
``dramatiq_prom_port``
    The exposition server's port (`HTTP_PORT`), default 9191.

The three constants are read again each time they are used, so a program (or a test)
may also assign them before booting or forking.

``prometheus_client`` is an optional dependency (the extra ``dq[prometheus]``). This
module imports without it; constructing `Prometheus` without it raises `ImportError`.
It is imported once, at process boot, after the multiprocess directory variable is
set: the library picks its storage (per-process files) from that variable when it is
first imported, and dq changes nothing of the library at run time.

Differences from Dramatiq, none visible on the wire or in the exported names:

* Hooks do nothing until ``after_process_boot`` has built the metrics (in Dramatiq a
  process that never booted, such as a web process re-enqueueing a retried message,
  gets an ``AttributeError`` from ``after_enqueue``).
* If ``prometheus_client`` was imported before boot without a multiprocess directory
  (so it chose in-memory storage, which the exposition process cannot see), boot logs
  an error saying so and how to fix it, instead of silently exporting nothing.
* Durations are read from dq's runtime clock (`dq.runtime.get_clock`), so a test clock
  controls them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType
from typing import TYPE_CHECKING, Any

import attrs

from dq import _sources as runtime
from dq.common import getenv_int
from dq.logging import get_logger
from dq.middleware.middleware import Middleware

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from dq.broker import Broker, MessageProxy
    from dq.message import Message

__all__ = ["DB_PATH", "HTTP_HOST", "HTTP_PORT", "Prometheus"]

#: The directory where every process stores its metrics (env ``dramatiq_prom_db``).
#: Created at import, never emptied.
DB_PATH: str = os.getenv(
    "dramatiq_prom_db",  # noqa: SIM112 - Dramatiq's (lowercase) names
    f"{tempfile.gettempdir()}/dramatiq-prometheus",
)
os.makedirs(DB_PATH, exist_ok=True)

#: The address the exposition server binds to (env ``dramatiq_prom_host``).
HTTP_HOST: str = os.getenv("dramatiq_prom_host", "0.0.0.0")  # noqa: SIM112

_port = getenv_int("dramatiq_prom_port")
#: The port the exposition server listens on (env ``dramatiq_prom_port``).
HTTP_PORT: int = 9191 if _port is None else _port
del _port

#: The labels of every metric.
_LABELS = ("queue_name", "actor_name")

#: The bucket bounds of ``dramatiq_message_duration_milliseconds``, in ms (Dramatiq's).
_DURATION_BUCKETS: tuple[float, ...] = (
    5,
    10,
    25,
    50,
    75,
    100,
    250,
    500,
    750,
    1000,
    2500,
    5000,
    7500,
    10000,
    30000,
    60000,
    600000,
    900000,
    float("inf"),
)

_MISSING = (
    "the Prometheus middleware needs prometheus-client; install it with "
    "pip install 'dq[prometheus]'"
)


def _check_installed() -> None:
    """Raise `ImportError` naming the extra when ``prometheus_client`` is missing,
    without importing it (importing it early would fix its storage mode)."""
    if importlib.util.find_spec("prometheus_client") is None:
        raise ImportError(_MISSING, name="prometheus_client")


def _point_client_at(path: str) -> None:
    """Make ``prometheus_client`` store this process's metrics in ``path`` (read when it
    is first imported, and when each metric opens its file)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    # The older name, which Dramatiq sets too.
    os.environ["prometheus_multiproc_dir"] = path  # noqa: SIM112


@attrs.frozen
class _Client:
    """What dq uses of ``prometheus_client``."""

    registry: type[CollectorRegistry]
    counter: type[Counter]
    gauge: type[Gauge]
    histogram: type[Histogram]
    content_type: str
    generate_latest: Callable[[CollectorRegistry], bytes]
    multiprocess: ModuleType
    values: ModuleType

    @property
    def stores_in_files(self) -> bool:
        """Whether the library chose its multiprocess storage when it was imported."""
        return self.values.ValueClass is not self.values.MutexValue


@functools.cache
def _client() -> _Client:
    """Import ``prometheus_client`` (once per process).

    Raises:
        ImportError: it is not installed; the error names the extra.
    """
    try:
        from prometheus_client import (  # noqa: PLC0415 - an optional dependency
            CONTENT_TYPE_LATEST,
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            generate_latest,
            multiprocess,
            values,
        )
    except ImportError as error:
        raise ImportError(_MISSING, name="prometheus_client") from error
    kinds = (CollectorRegistry, Counter, Gauge, Histogram)
    return _Client(*kinds, CONTENT_TYPE_LATEST, generate_latest, multiprocess, values)


class Prometheus(Middleware):
    """Export message metrics (counts, errors, retries, rejects, in-flight gauges and
    durations) for every queue and actor to Prometheus.

    Metrics are built by ``after_process_boot`` (which the CLI emits in each worker
    process; tests call ``broker.emit_after("process_boot")``); until then every hook
    does nothing. The exposition server runs in a process of its own, from `forks`.

    Raises:
        ImportError: ``prometheus_client`` is not installed (extra ``dq[prometheus]``).
    """

    # Built by after_process_boot; Dramatiq's attribute names.
    total_messages: Counter
    total_errored_messages: Counter
    total_retried_messages: Counter
    total_rejected_messages: Counter
    inprogress_messages: Gauge
    inprogress_delayed_messages: Gauge
    message_durations: Histogram

    def __init__(self) -> None:
        _check_installed()
        self.logger = get_logger(__name__, type(self))
        #: Ids of the delayed messages this process holds in memory.
        self.delayed_messages: set[str] = set()
        #: Start time (ms, runtime clock) of each message being processed, by id.
        self.message_start_times: dict[str, int] = {}
        self._booted = False

    @property
    def forks(self) -> list[Callable[[], int]]:
        """The exposition server, which the CLI runs in a process of its own."""
        return [_run_exposition_server]

    def after_process_boot(self, broker: Broker) -> None:
        """Point ``prometheus_client`` at `DB_PATH` and build the metrics on a fresh
        registry (so booting twice registers nothing twice)."""
        _point_client_at(DB_PATH)
        client = _client()
        if not client.stores_in_files:
            self.logger.error(
                "prometheus_client was imported before this process booted, without "
                "PROMETHEUS_MULTIPROC_DIR, so it keeps metrics in memory where the "
                "exposition server cannot see them. Import it after boot, or set "
                "PROMETHEUS_MULTIPROC_DIR=%s before importing it.",
                DB_PATH,
            )
        counter, gauge, histogram = client.counter, client.gauge, client.histogram
        self.logger.debug("Setting up metrics in %s...", DB_PATH)
        registry = client.registry()
        self.total_messages = counter(
            "dramatiq_messages_total",
            "The total number of messages processed.",
            _LABELS,
            registry=registry,
        )
        self.total_errored_messages = counter(
            "dramatiq_message_errors_total",
            "The total number of errored messages.",
            _LABELS,
            registry=registry,
        )
        self.total_retried_messages = counter(
            "dramatiq_message_retries_total",
            "The total number of retried messages.",
            _LABELS,
            registry=registry,
        )
        self.total_rejected_messages = counter(
            "dramatiq_message_rejects_total",
            "The total number of dead-lettered messages.",
            _LABELS,
            registry=registry,
        )
        self.inprogress_messages = gauge(
            "dramatiq_messages_inprogress",
            "The number of messages in progress.",
            _LABELS,
            registry=registry,
            multiprocess_mode="livesum",
        )
        # The default multiprocess mode ("all": one series per pid), as in Dramatiq.
        self.inprogress_delayed_messages = gauge(
            "dramatiq_delayed_messages_inprogress",
            "The number of delayed messages in memory.",
            _LABELS,
            registry=registry,
        )
        self.message_durations = histogram(
            "dramatiq_message_duration_milliseconds",
            "The time spent processing messages.",
            _LABELS,
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self._booted = True

    def after_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        """Mark this process dead, so its live gauges leave the aggregate."""
        if not self._booted:
            return
        self.logger.debug("Marking process dead...")
        _client().multiprocess.mark_process_dead(os.getpid(), DB_PATH)

    def after_nack(self, broker: Broker, message: MessageProxy) -> None:
        """Count a dead-lettered message."""
        if self._booted:
            self.total_rejected_messages.labels(message.queue_name, message.actor_name).inc()

    def after_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        """Count an enqueue of a message that carries a ``retries`` option."""
        if self._booted and "retries" in message.options:
            self.total_retried_messages.labels(message.queue_name, message.actor_name).inc()

    def before_delay_message(self, broker: Broker, message: MessageProxy) -> None:
        """Count a delayed message taken into memory (labelled with its delay queue)."""
        if not self._booted:
            return
        self.delayed_messages.add(message.message_id)
        self.inprogress_delayed_messages.labels(message.queue_name, message.actor_name).inc()

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        """Count the message in progress and note when it started.

        A message this process held as delayed leaves the delayed gauge here, under
        the labels it has now (its canonical queue), as in Dramatiq.
        """
        if not self._booted:
            return
        labels = (message.queue_name, message.actor_name)
        message_id = message.message_id
        if message_id in self.delayed_messages:
            self.delayed_messages.discard(message_id)
            self.inprogress_delayed_messages.labels(*labels).dec()
        self.inprogress_messages.labels(*labels).inc()
        self.message_start_times[message_id] = runtime.get_clock().now_ms()

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Record the duration, leave the in-progress gauge, count the message (and
        the error, if it raised)."""
        if not self._booted:
            return
        labels = (message.queue_name, message.actor_name)
        now = runtime.get_clock().now_ms()
        started = self.message_start_times.pop(message.message_id, now)
        self.message_durations.labels(*labels).observe(now - started)
        self.inprogress_messages.labels(*labels).dec()
        self.total_messages.labels(*labels).inc()
        if exception is not None:
            self.total_errored_messages.labels(*labels).inc()

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        """A skipped message counts like a processed one."""
        self.after_process_message(broker, message)


def _collect_all(path: str) -> CollectorRegistry:
    """A registry holding the aggregate of every process's metrics in ``path``."""
    client = _client()
    registry = client.registry()
    client.multiprocess.MultiProcessCollector(registry, path=path)
    return registry


class _MetricsHandler(BaseHTTPRequestHandler):
    """Answer any GET path with the aggregated metrics."""

    def do_GET(self) -> None:
        # The directory is read on every request, so new processes' files show up.
        client = _client()
        output = client.generate_latest(_collect_all(DB_PATH))
        self.send_response(200)
        self.send_header("Content-Type", client.content_type)
        self.send_header("Content-Length", str(len(output)))
        self.end_headers()
        self.wfile.write(output)

    def log_message(self, format: str, *args: Any) -> None:
        """Log requests at debug level instead of printing them to stderr."""
        get_logger(__name__, type(self)).debug(format, *args)


def _run_exposition_server() -> int:
    """Serve the aggregated metrics on `HTTP_HOST`:`HTTP_PORT` until interrupted.

    The CLI runs this in a process of its own (see `Prometheus.forks`), which its
    SIGTERM handler ends. Run by hand, it stops on ``KeyboardInterrupt`` (Ctrl-C) and
    returns; a ``SystemExit`` raised by a signal handler passes through. Either way
    the listening socket is closed.

    Returns:
        The process's exit code: 0.
    """
    logger = get_logger(__name__, "_run_exposition_server")
    _check_installed()
    os.makedirs(DB_PATH, exist_ok=True)
    logger.debug("Starting exposition server on %s:%d...", HTTP_HOST, HTTP_PORT)
    httpd = ThreadingHTTPServer((HTTP_HOST, HTTP_PORT), _MetricsHandler)
    httpd.daemon_threads = True
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        logger.debug("Stopping exposition server...")
    finally:
        httpd.server_close()
    return 0
