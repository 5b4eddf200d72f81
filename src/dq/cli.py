"""The ``dq`` command (and ``python -m dq``): run worker processes.

It takes Dramatiq 2.2.1's arguments, with the same names, defaults and exit codes::

    dq [options] broker [module ...]

``broker`` is ``module`` (the module sets the global broker), ``module:attribute``
(a `Broker`, or a callable that sets the global broker) or ``module:a.b``. The main
process starts ``--processes`` worker processes, each running a `Worker` with
``--threads`` threads, and supervises them:

* **SIGTERM / SIGINT** stop gracefully: workers stop fetching, finish what they run
  within ``--worker-shutdown-timeout`` and return what they have not started; a second
  signal stops at once (exit code 1).
* **SIGHUP** stops every worker gracefully, then the main process re-executes itself
  with the same arguments (fresh code); ``--watch DIR`` sends it when a file changes.
* **A worker process that dies** (killed, out of memory, a crash) is restarted alone,
  after a backoff, with a log line naming its exit status; the others keep working, and
  what the dead one held comes back through the broker (on Redis, once its heartbeat
  expires). Dramatiq instead stops every process.
* ``--max-tasks-per-child N`` and ``--max-memory-per-child MB`` recycle a worker
  process cleanly: it stops fetching, finishes or returns its work, exits, and is
  replaced.

Exit codes: 0 stopped gracefully; 1 killed (a second signal), or a worker died and
could not be restarted; 2 an import or argument error; 3 the broker could not be
reached at start-up; 4 a pid-file problem.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from dq import __version__
from dq.broker import Broker, get_broker, set_broker
from dq.errors import BrokerConnectionError
from dq.middleware import Middleware

__all__ = [
    "RET_CONNECT",
    "RET_IMPORT",
    "RET_KILLED",
    "RET_OK",
    "RET_PIDFILE",
    "import_broker",
    "import_object",
    "main",
    "make_argument_parser",
]

RET_OK = 0
RET_KILLED = 1
RET_IMPORT = 2
RET_CONNECT = 3
RET_PIDFILE = 4
#: dq only: a worker process that exits to be replaced (max tasks or memory reached).
RET_RECYCLE = 5

LOG_FORMAT = (
    "[%(asctime)s] [PID %(process)d] [%(threadName)s] [%(name)s] [%(levelname)s] %(message)s"
)

#: Backoff before restarting a worker process that died (s): doubles up to the cap,
#: and starts again from the first once a process lived for RESTART_RESET_SECS.
RESTART_BACKOFF_SECS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
RESTART_RESET_SECS = 60.0

_CLI = "dq"
#: The signals the main process handles (blocked while it starts a child, so the
#: child never runs the main process's handlers).
_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return number


def _fork_timeout(value: str) -> float:
    number = float(value)
    if not 10 <= number <= 1_800_000:
        raise argparse.ArgumentTypeError(f"must be between 10 and 1800000 (ms), got {value!r}")
    return number


def make_argument_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``dq`` command (Dramatiq's arguments, plus dq's
    ``--max-tasks-per-child`` and ``--max-memory-per-child``)."""
    parser = argparse.ArgumentParser(
        prog=_CLI,
        description="Run dq workers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  dq tasks                      # tasks.py sets the broker\n"
            "  dq app.tasks:broker -p 4 -t 8  # a Broker attribute, 4 processes\n"
            "  dq app:setup_broker --watch .  # a callable that sets the broker; reload\n"
        ),
    )
    parser.add_argument(
        "broker",
        help="the broker: 'module', 'module:attribute' (a Broker, or a callable that sets "
        "the global broker) or 'module:a.b'",
    )
    parser.add_argument("modules", nargs="*", help="more modules to import (actors)")
    parser.add_argument(
        "--processes",
        "-p",
        type=_positive,
        default=os.cpu_count() or 1,
        help="worker processes (default: the number of CPUs)",
    )
    parser.add_argument(
        "--threads", "-t", type=_positive, default=8, help="worker threads per process"
    )
    parser.add_argument(
        "--path", "-P", nargs="*", default=["."], help="entries to prepend to sys.path"
    )
    parser.add_argument("--queues", "-Q", nargs="*", help="only consume these queues")
    parser.add_argument("--pid-file", help="write the main process's pid to this file")
    parser.add_argument("--log-file", help="append all logs to this file (default: stderr)")
    parser.add_argument("--skip-logging", action="store_true", help="do not configure logging")
    parser.add_argument(
        "--use-spawn", action="store_true", help="start processes with 'spawn', not 'fork'"
    )
    parser.add_argument(
        "--fork-function",
        "-f",
        action="append",
        default=[],
        dest="forks",
        help="a 'module:function' to run in its own process (repeatable)",
    )
    parser.add_argument(
        "--worker-fork-timeout",
        type=_fork_timeout,
        default=30000.0,
        help="ms to wait for the workers to boot before starting forks (10..1800000)",
    )
    parser.add_argument(
        "--worker-shutdown-timeout",
        type=int,
        default=600000,
        help="ms a stopping worker waits for running actors",
    )
    parser.add_argument(
        "--watch", metavar="DIR", help="reload the workers when files under DIR change"
    )
    parser.add_argument("--watch-use-polling", action="store_true", help="poll for file changes")
    parser.add_argument(
        "--watch-include",
        "-i",
        action="append",
        # watchdog >= 5 matches patterns against whole paths, where Dramatiq's "**.py"
        # no longer matches: dq adds "**/*.py" so the default works.
        default=["**.py", "**/*.py"],
        help="glob patterns to watch (repeatable; Python files always)",
    )
    parser.add_argument(
        "--watch-exclude", "-x", action="append", default=[], help="glob patterns to ignore"
    )
    parser.add_argument(
        "--max-tasks-per-child",
        type=_positive,
        help="recycle a worker process after it processed this many messages",
    )
    parser.add_argument(
        "--max-memory-per-child",
        type=_positive,
        metavar="MB",
        help="recycle a worker process once its peak resident memory exceeds MB",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--verbose", "-v", action="count", default=0, help="log more")
    return parser


# -- importing -------------------------------------------------------------------------------


def import_object(value: str) -> tuple[Any, Any]:
    """Import ``module`` or ``module:a.b``; return (module, attribute or None).

    Raises:
        ImportError: the module cannot be imported, or lacks the attribute.
    """
    module_name, _, path = value.partition(":")
    module = importlib.import_module(module_name)
    if not path:
        return module, None
    target: Any = module
    for name in path.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise ImportError(
                f"Module {module_name!r} does not define a {path!r} variable."
            ) from None
    return module, target


def import_broker(value: str) -> tuple[Any, Broker]:
    """Resolve the ``broker`` argument; return (module, broker).

    Raises:
        ImportError: it cannot be imported, names no broker, or the module set none.
    """
    module, target = import_object(value)
    if target is None:
        try:
            return module, get_broker()
        except RuntimeError:
            return module, _default_broker(value)
    if isinstance(target, Broker):
        return module, target
    if callable(target):
        target()
        try:
            return module, get_broker()
        except RuntimeError:
            raise ImportError(f"{value!r} was called but set no broker.") from None
    raise ImportError(f"{value!r} is not a Broker.")


#: The environment variable naming the broker when the module sets none.
BROKER_URL_ENV = "DQ_BROKER_URL"
#: The broker when neither the module nor DQ_BROKER_URL names one: SQLite, here.
DEFAULT_BROKER_URL = "sqlite:///dq.sqlite3"


def _default_broker(value: str) -> Broker:
    """The broker for a module that set none: ``$DQ_BROKER_URL``, else SQLite in the
    working directory (logged)."""
    from dq.brokers import from_url  # noqa: PLC0415 - only when the module set none

    logger = logging.getLogger(f"{_CLI}.MainProcess")
    url = os.environ.get(BROKER_URL_ENV)
    if url:
        logger.info("Module %r sets no broker: using %s=%s.", value, BROKER_URL_ENV, url)
    else:
        url = DEFAULT_BROKER_URL
        logger.info(
            "Module %r sets no broker and %s is not set: using SQLite in %s (%s).",
            value,
            BROKER_URL_ENV,
            os.path.join(os.getcwd(), "dq.sqlite3"),
            url,
        )
    try:
        broker = from_url(url)
    except (ValueError, ImportError) as e:
        raise ImportError(f"Cannot make the broker {url!r}: {e}") from e
    set_broker(broker)
    return broker


# -- logging ---------------------------------------------------------------------------------


def _setup_logging(args: argparse.Namespace) -> None:
    if args.skip_logging:
        return
    level = logging.DEBUG if args.verbose else logging.INFO
    handler: logging.Handler
    if args.log_file:
        handler = logging.FileHandler(args.log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pika").setLevel(logging.CRITICAL)


# -- worker processes --------------------------------------------------------------------------


class _Counter(Middleware):
    """Counts processed messages (for ``--max-tasks-per-child``)."""

    def __init__(self) -> None:
        self.count = 0

    def after_process_message(
        self, broker: Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        self.count += 1  # one writer per message; an approximate count is enough

    def after_skip_message(self, broker: Broker, message: Any) -> None:
        self.count += 1


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker_process(args: argparse.Namespace, index: int, events: Any) -> None:
    """The body of one worker process."""
    from dq.worker import Worker  # noqa: PLC0415 - after the broker module, in the child

    logger = logging.getLogger(f"{_CLI}.WorkerProcess({index})")
    _setup_logging(args)
    stop = threading.Event()
    signals = {"count": 0}

    def on_stop(signum: int, frame: FrameType | None) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            logger.warning("Stopping at once (second signal).")
            os._exit(RET_KILLED)
        stop.set()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGHUP, on_stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)  # blocked while it was started
    for path in reversed(args.path):
        sys.path.insert(0, path)
    try:
        _, broker = import_broker(args.broker)
        broker._run_after(broker._hooks.after_process_boot)
        for module in args.modules:
            importlib.import_module(module)
    except Exception as e:
        logger.critical(
            "Could not import the broker %r%s: %s. Check the module path (the current "
            "directory, or --path/-P, must contain it), that it imports without errors, "
            "and that it sets a broker (dq.set_broker) or names one ('module:attribute').%s",
            args.broker,
            f" or the modules {args.modules!r}" if args.modules else "",
            _describe(e),
            "" if args.verbose else " Run with -v for the traceback.",
            exc_info=bool(args.verbose),
        )
        events.put(("failed", index, RET_IMPORT))
        sys.exit(RET_IMPORT)
    counter = _Counter()
    broker.add_middleware(counter)
    worker = Worker(broker, queues=args.queues or None, worker_threads=args.threads)
    try:
        worker.start()
    except BrokerConnectionError as e:
        logger.critical("Could not connect to the broker: %s", e, exc_info=True)
        events.put(("failed", index, RET_CONNECT))
        sys.exit(RET_CONNECT)
    forks = [f"{f.__module__}:{f.__qualname__}" for m in broker.middleware for f in m.forks]
    events.put(("ready", index, forks))
    logger.info("Worker process is ready for action.")
    code = _serve(args, stop, counter, logger)
    logger.info("Stopping worker process...")
    worker.stop(timeout=args.worker_shutdown_timeout)
    broker.close()
    logger.info("Worker process stopped.")
    sys.exit(code)


def _serve(
    args: argparse.Namespace, stop: threading.Event, counter: _Counter, logger: logging.Logger
) -> int:
    """Wait until asked to stop, or until this process should be recycled; return its
    exit code."""
    while not stop.wait(0.2):
        if args.max_tasks_per_child and counter.count >= args.max_tasks_per_child:
            logger.info(
                "Processed %d messages (--max-tasks-per-child %d): recycling this process.",
                counter.count,
                args.max_tasks_per_child,
            )
            return RET_RECYCLE
        if args.max_memory_per_child and _peak_rss_mb() > args.max_memory_per_child:
            logger.info(
                "Peak memory %.0f MB exceeds --max-memory-per-child %d: recycling this process.",
                _peak_rss_mb(),
                args.max_memory_per_child,
            )
            return RET_RECYCLE
    return RET_OK


def _fork_process(args: argparse.Namespace, index: int, path: str) -> None:
    """The body of one ``--fork-function`` process: its return value is the exit code."""
    logger = logging.getLogger(f"{_CLI}.ForkProcess({index})")
    _setup_logging(args)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(RET_OK))
    signal.signal(signal.SIGHUP, lambda signum, frame: os._exit(RET_OK))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
    for entry in reversed(args.path):
        sys.path.insert(0, entry)
    try:
        _, function = import_object(path)
    except ImportError as e:
        logger.critical("Could not import fork function %r: %s", path, e)
        sys.exit(RET_IMPORT)
    result = function()
    sys.exit(result if isinstance(result, int) else RET_OK)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# -- the main process ------------------------------------------------------------------------------


class _Supervisor:
    """Starts, watches and restarts the worker processes."""

    def __init__(self, args: argparse.Namespace, context: BaseContext) -> None:
        self.args = args
        self.context = context
        self.logger = logging.getLogger(f"{_CLI}.MainProcess")
        # A SimpleQueue: a pipe, no feeder thread in every worker process.
        self.events: Any = context.SimpleQueue()
        self.workers: list[BaseProcess | None] = [None] * args.processes
        self.started_at = [0.0] * args.processes
        self.restarts = [0] * args.processes
        self.restart_due: dict[int, float] = {}
        self.forks: list[BaseProcess] = []
        self.signals = 0
        self.stopping = False
        self.reloading = False
        self.result = RET_OK

    def start_worker(self, index: int) -> None:
        process = self.context.Process(  # type: ignore[attr-defined]  # every context has it
            target=_worker_process,
            args=(self.args, index, self.events),
            name=f"{_CLI}-worker-{index}",
        )
        _start_blocked(process)
        self.workers[index] = process
        self.started_at[index] = time.monotonic()

    def start_fork(self, path: str) -> None:
        index = len(self.forks)
        process = self.context.Process(  # type: ignore[attr-defined]  # every context has it
            target=_fork_process,
            args=(self.args, index, path),
            name=f"{_CLI}-fork-{index}",
            daemon=True,
        )
        _start_blocked(process)
        self.forks.append(process)

    def signal_children(self, signum: int) -> None:
        for process in [*self.workers, *self.forks]:
            if process is not None and process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            if self.stopping:
                # A second change (an editor saves twice) or a reload while stopping:
                # the workers are already stopping gracefully; a second SIGHUP would
                # make them stop at once.
                self.logger.info(
                    "Already %s; ignoring SIGHUP.", "reloading" if self.reloading else "stopping"
                )
                return
            self.logger.info("Reloading: stopping the workers gracefully, then restarting.")
            self.reloading = True
            self.stopping = True
            self.signal_children(signal.SIGHUP)
            return
        self.signals += 1
        self.stopping = True
        if self.signals == 1:
            self.logger.info("Stopping gracefully (send the signal again to stop at once).")
        else:
            self.logger.warning("Stopping at once.")
            self.result = RET_KILLED
        self.signal_children(signal.SIGTERM)

    def boot(self) -> int | None:
        """Start the workers, wait for them to boot, start the forks; return an exit
        code if booting failed."""
        for index in range(self.args.processes):
            self.start_worker(index)
        deadline = time.monotonic() + self.args.worker_fork_timeout / 1000
        ready: set[int] = set()
        forks: list[str] = []
        while len(ready) < self.args.processes and not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.logger.warning(
                    "Not every worker booted within %d ms; starting the forks anyway.",
                    self.args.worker_fork_timeout,
                )
                break
            if self.events.empty():
                time.sleep(min(remaining, 0.02))
                for index, process in enumerate(self.workers):
                    if process is not None and not process.is_alive() and index not in ready:
                        code = process.exitcode
                        return RET_IMPORT if code is None else _exit_code(code)
                continue
            kind, index, payload = self.events.get()
            if kind == "failed":
                return int(payload)
            ready.add(index)
            if not forks:
                forks = list(payload)
        for path in [*self.args.forks, *forks]:
            self.start_fork(path)
        return None

    def supervise(self) -> int:
        """Watch the processes until every worker stopped; return the exit code."""
        while True:
            self._drain_events()
            alive = False
            now = time.monotonic()
            for index, process in enumerate(self.workers):
                if process is None:
                    if not self.stopping and self.restart_due.get(index, 0) <= now:
                        self.restart_due.pop(index, None)
                        self.start_worker(index)
                        alive = True
                    elif not self.stopping:
                        alive = True
                    continue
                if process.is_alive():
                    alive = True
                    continue
                process.join()
                code = process.exitcode
                self.workers[index] = None
                if self.stopping:
                    if code not in (RET_OK, RET_RECYCLE, None) and self.result == RET_OK:
                        self.result = _exit_code(code)
                    continue
                alive = True
                self._restart_later(index, code)
            if not alive:
                for fork in self.forks:
                    fork.join(5)
                return self.result
            time.sleep(0.1)

    def _drain_events(self) -> None:
        while not self.events.empty():
            self.events.get()

    def _restart_later(self, index: int, code: int | None) -> None:
        if code == RET_RECYCLE:
            self.logger.info("Worker process %d recycled itself; starting its replacement.", index)
            self.restart_due[index] = 0.0
            self.restarts[index] = 0
            return
        if code in (RET_IMPORT, RET_CONNECT):
            # It cannot boot: restarting would fail the same way.
            self.logger.critical("Worker process %d exited with code %d; stopping.", index, code)
            self.result = code
            self.stopping = True
            self.signal_children(signal.SIGTERM)
            return
        lived = time.monotonic() - self.started_at[index]
        if lived >= RESTART_RESET_SECS:
            self.restarts[index] = 0
        delay = RESTART_BACKOFF_SECS[min(self.restarts[index], len(RESTART_BACKOFF_SECS) - 1)]
        self.restarts[index] += 1
        self.logger.error(
            "Worker process %d died unexpectedly (%s) after %.1f s; restarting it in %.1f s. "
            "The other processes keep working; what it held comes back through the broker.",
            index,
            _status(code),
            lived,
            delay,
        )
        self.restart_due[index] = time.monotonic() + delay


def _start_blocked(process: BaseProcess) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)


def _status(code: int | None) -> str:
    if code is None:
        return "unknown exit status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _exit_code(code: int) -> int:
    return RET_KILLED if code < 0 else code


# -- pid file -----------------------------------------------------------------------------------


def _write_pid_file(path: str, logger: logging.Logger) -> bool:
    pid = os.getpid()
    try:
        with open(path, encoding="ascii") as f:
            content = f.read().strip()
    except FileNotFoundError:
        content = None
    except OSError as e:
        logger.critical("Cannot read the pid file %r: %s", path, e)
        return False
    if content is not None:
        try:
            old = int(content)
        except ValueError:
            logger.critical("The pid file %r holds %r, not a pid.", path, content[:40])
            return False
        if old != pid:
            try:
                os.kill(old, 0)
            except ProcessLookupError:
                logger.info("Removing the stale pid file %r (pid %d is gone).", path, old)
            except PermissionError:
                logger.critical("The pid file %r names a live process (%d).", path, old)
                return False
            else:
                logger.critical("The pid file %r names a live process (%d).", path, old)
                return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(str(pid))
    except OSError as e:
        logger.critical("Cannot write the pid file %r: %s", path, e)
        return False
    return True


def _remove_pid_file(path: str) -> None:
    with contextlib.suppress(OSError):
        with open(path, encoding="ascii") as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.remove(path)


# -- watching ----------------------------------------------------------------------------------


def _start_watcher(args: argparse.Namespace, logger: logging.Logger) -> Callable[[], None] | None:
    """Start the file watcher; return its stopper, or None if it cannot run."""
    try:
        from watchdog.events import (  # noqa: PLC0415 - an optional dependency
            FileSystemEvent,
            PatternMatchingEventHandler,
        )
        from watchdog.observers import Observer  # noqa: PLC0415
        from watchdog.observers.polling import PollingObserver  # noqa: PLC0415
    except ImportError:
        logger.critical("--watch needs watchdog: pip install 'dq[watch]'.")
        return None
    if not os.path.isdir(args.watch):
        logger.critical("--watch %r is not a directory.", args.watch)
        return None
    main_pid = os.getpid()

    class Reloader(PatternMatchingEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type in ("opened", "closed_no_write"):
                return
            logger.info("Detected a change in %r: reloading.", event.src_path)
            os.kill(main_pid, signal.SIGHUP)

    observer = PollingObserver() if args.watch_use_polling else Observer()
    handler = Reloader(
        patterns=args.watch_include, ignore_patterns=args.watch_exclude or None, case_sensitive=True
    )
    observer.schedule(handler, args.watch, recursive=True)
    observer.start()

    def stop() -> None:
        observer.stop()
        observer.join(5)

    return stop


def main(args: Sequence[str] | None = None) -> int:
    """Run the ``dq`` command with ``args`` (``sys.argv[1:]`` when None); return the
    exit code."""
    parser = make_argument_parser()
    try:
        options = parser.parse_args(args)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else RET_IMPORT
    _setup_logging(options)
    logger = logging.getLogger(f"{_CLI}.MainProcess")
    if options.pid_file and not _write_pid_file(options.pid_file, logger):
        return RET_PIDFILE
    stop_watcher: Callable[[], None] | None = None
    try:
        if options.watch:
            stop_watcher = _start_watcher(options, logger)
            if stop_watcher is None:
                return RET_IMPORT
        context = multiprocessing.get_context("spawn" if options.use_spawn else "fork")
        supervisor = _Supervisor(options, context)
        logger.info("dq %s: starting %d worker processes.", __version__, options.processes)
        for signum in _HANDLED:
            signal.signal(signum, supervisor.on_signal)
        failed = supervisor.boot()
        if failed is not None:
            supervisor.stopping = True
            supervisor.signal_children(signal.SIGTERM)
            supervisor.result = failed
        result = supervisor.supervise()
        if supervisor.reloading and not supervisor.signals:
            if stop_watcher is not None:
                stop_watcher()
                stop_watcher = None
            logger.info("Reloading: re-executing %s.", _CLI)
            _reexec()
        return result
    finally:
        if stop_watcher is not None:
            stop_watcher()
        if options.pid_file:
            _remove_pid_file(options.pid_file)


def _reexec() -> None:
    """Replace this process with a fresh ``dq`` with the same arguments."""
    argv = sys.argv
    if argv and argv[0].endswith("__main__.py"):
        command = [sys.executable, "-m", "dq", *argv[1:]]
    else:
        command = [sys.executable, *(argv or [_CLI])]
        if not os.path.exists(command[1]):
            command = [sys.executable, "-m", "dq", *argv[1:]]
    os.execv(command[0], command)
