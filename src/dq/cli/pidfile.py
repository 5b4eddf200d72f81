"""The ``--pid-file`` of the ``dq`` command: write the main process's pid unless a
live process holds the file; remove it on exit if it is still ours."""

from __future__ import annotations

import contextlib
import logging
import os

__all__ = ["remove_pid_file", "write_pid_file"]


def write_pid_file(path: str, logger: logging.Logger) -> bool:
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


def remove_pid_file(path: str) -> None:
    with contextlib.suppress(OSError):
        with open(path, encoding="ascii") as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.remove(path)
