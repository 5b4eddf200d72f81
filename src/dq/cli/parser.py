"""The argument parser of the ``dq`` command (Dramatiq's arguments, plus dq's)."""

from __future__ import annotations

import argparse
import os

from dq import __version__

__all__ = ["CLI", "make_argument_parser"]

#: The command's name: the parser's program name, and the prefix of its loggers and
#: process names.
CLI = "dq"


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
        prog=CLI,
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
