"""The exit codes of the ``dq`` command (Dramatiq's, plus dq's ``RET_RECYCLE``), and
how the main process reads a child's exit status."""

from __future__ import annotations

import signal

RET_OK = 0
RET_KILLED = 1
RET_IMPORT = 2
RET_CONNECT = 3
RET_PIDFILE = 4
#: dq only: a worker process that exits to be replaced (max tasks or memory reached).
RET_RECYCLE = 5


def describe_status(code: int | None) -> str:
    if code is None:
        return "unknown exit status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def exit_code(code: int) -> int:
    return RET_KILLED if code < 0 else code
