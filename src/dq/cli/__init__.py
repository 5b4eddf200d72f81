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

The package's modules, one job each: `dq.cli.parser` (the arguments),
`dq.cli.importing` (the broker argument), `dq.cli.logs` (logging),
`dq.cli.processes` (the child processes' bodies), `dq.cli.supervisor` (the main
process), `dq.cli.pidfile` (``--pid-file``), `dq.cli.watch` (``--watch``),
`dq.cli.codes` (exit codes); this module runs the command (`main`).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence

from dq import __version__
from dq.cli.codes import (
    RET_CONNECT,
    RET_IMPORT,
    RET_KILLED,
    RET_OK,
    RET_PIDFILE,
    RET_RECYCLE,
)
from dq.cli.importing import BROKER_URL_ENV, DEFAULT_BROKER_URL, import_broker, import_object
from dq.cli.logs import LOG_FORMAT, setup_logging
from dq.cli.parser import CLI, make_argument_parser
from dq.cli.pidfile import remove_pid_file, write_pid_file
from dq.cli.processes import HANDLED
from dq.cli.supervisor import RESTART_BACKOFF_SECS, RESTART_RESET_SECS, Supervisor

__all__ = [
    "BROKER_URL_ENV",
    "DEFAULT_BROKER_URL",
    "LOG_FORMAT",
    "RESTART_BACKOFF_SECS",
    "RESTART_RESET_SECS",
    "RET_CONNECT",
    "RET_IMPORT",
    "RET_KILLED",
    "RET_OK",
    "RET_PIDFILE",
    "RET_RECYCLE",
    "import_broker",
    "import_object",
    "main",
    "make_argument_parser",
]


def _start_watcher(
    options: argparse.Namespace, logger: logging.Logger
) -> Callable[[], None] | None:
    """Start the ``--watch`` file watcher; return its stopper, or None if it cannot run."""
    try:
        from dq.cli import watch  # noqa: PLC0415 - it needs watchdog, an optional dependency
    except ImportError:
        logger.critical("--watch needs watchdog: pip install 'dq[watch]'.")
        return None
    return watch.start_watcher(options, logger)


def main(args: Sequence[str] | None = None) -> int:
    """Run the ``dq`` command with ``args`` (``sys.argv[1:]`` when None); return the
    exit code."""
    parser = make_argument_parser()
    try:
        options = parser.parse_args(args)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else RET_IMPORT
    setup_logging(options)
    logger = logging.getLogger(f"{CLI}.MainProcess")
    if options.pid_file and not write_pid_file(options.pid_file, logger):
        return RET_PIDFILE
    stop_watcher: Callable[[], None] | None = None
    try:
        if options.watch:
            stop_watcher = _start_watcher(options, logger)
            if stop_watcher is None:
                return RET_IMPORT
        context = multiprocessing.get_context("spawn" if options.use_spawn else "fork")
        supervisor = Supervisor(options, context)
        logger.info("dq %s: starting %d worker processes.", __version__, options.processes)
        for signum in HANDLED:
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
            logger.info("Reloading: re-executing %s.", CLI)
            _reexec()
        return result
    finally:
        if stop_watcher is not None:
            stop_watcher()
        if options.pid_file:
            remove_pid_file(options.pid_file)


def _reexec() -> None:
    """Replace this process with a fresh ``dq`` with the same arguments."""
    argv = sys.argv
    if argv and argv[0].endswith("__main__.py"):
        command = [sys.executable, "-m", "dq", *argv[1:]]
    else:
        command = [sys.executable, *(argv or [CLI])]
        if not os.path.exists(command[1]):
            command = [sys.executable, "-m", "dq", *argv[1:]]
    os.execv(command[0], command)
