"""The bodies of the ``dq`` command's child processes: a worker process (import the
broker, run a `Worker` until signalled or recycled) and a ``--fork-function`` process.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import resource
import signal
import sys
import threading
from types import FrameType
from typing import Any

from dq.broker import Broker
from dq.cli.codes import RET_CONNECT, RET_IMPORT, RET_KILLED, RET_OK, RET_RECYCLE
from dq.cli.importing import import_broker, import_object
from dq.cli.logs import setup_logging
from dq.cli.parser import CLI
from dq.errors import BrokerConnectionError
from dq.middleware import Middleware
from dq.worker import Worker

__all__ = ["HANDLED", "fork_process", "worker_process"]

#: The signals the main process handles (blocked while it starts a child, so the
#: child never runs the main process's handlers).
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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


def worker_process(args: argparse.Namespace, index: int, events: Any) -> None:
    """The body of one worker process."""
    logger = logging.getLogger(f"{CLI}.WorkerProcess({index})")
    setup_logging(args)
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
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)  # blocked while it was started
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


def fork_process(args: argparse.Namespace, index: int, path: str) -> None:
    """The body of one ``--fork-function`` process: its return value is the exit code."""
    logger = logging.getLogger(f"{CLI}.ForkProcess({index})")
    setup_logging(args)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(RET_OK))
    signal.signal(signal.SIGHUP, lambda signum, frame: os._exit(RET_OK))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
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
