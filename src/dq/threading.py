"""Interrupting threads from the outside: the primitive behind time limits and
shutdown notifications.

On CPython an exception can be scheduled in another thread with the C API call
``PyThreadState_SetAsyncExc``; the target thread raises it the next time it runs
Python bytecode. A thread blocked in a system call (``time.sleep``, a socket read)
is therefore interrupted only once that call returns.
"""

from __future__ import annotations

import ctypes
import platform

from dq.logging import get_logger

__all__ = [
    "Interrupt",
    "current_platform",
    "is_gevent_active",
    "raise_thread_exception",
    "supported_platforms",
]

logger = get_logger(__name__)

#: The running interpreter (``platform.python_implementation()``).
current_platform: str = platform.python_implementation()

#: Interpreters on which `raise_thread_exception` works.
supported_platforms: set[str] = {"CPython"}


class Interrupt(BaseException):
    """Base class of the exceptions raised asynchronously inside worker threads.

    It derives from ``BaseException`` (not ``Exception``, nor ``DramatiqError``) so
    that a broad ``except Exception`` in an actor does not swallow it by accident;
    an actor may still catch it explicitly to clean up.
    """


def is_gevent_active() -> bool:
    """Return whether gevent is installed and has monkey-patched this process."""
    try:
        from gevent import monkey  # type: ignore[import-not-found, import-untyped, unused-ignore]  # noqa: PLC0415 - optional dependency
    except ImportError:
        return False
    return bool(monkey.saved)


def raise_thread_exception(thread_id: int, exception: type[BaseException]) -> None:
    """Schedule ``exception`` to be raised inside the thread ``thread_id``.

    The thread raises it the next time it executes Python code. Only CPython
    supports this: elsewhere, and when no thread has that id, the problem is logged
    at CRITICAL level and nothing else happens.

    Args:
        thread_id: the target's ``threading.get_ident()``.
        exception: the exception class to raise there.
    """
    name = exception.__name__
    if current_platform not in supported_platforms:
        logger.critical(
            "Cannot raise %s in thread %r: setting exceptions in other threads is not "
            "supported on %s.",
            name,
            thread_id,
            current_platform,
        )
        return
    set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    count = set_async_exc(ctypes.c_ulong(thread_id), ctypes.py_object(exception))
    if count == 0:
        logger.critical("Cannot raise %s in thread %r: no such thread.", name, thread_id)
    elif count > 1:  # pragma: no cover - would mean the interpreter is confused
        logger.critical("%s was scheduled in %d threads; undoing it.", name, count)
        set_async_exc(ctypes.c_ulong(thread_id), None)


def interrupt_problem() -> str | None:
    """Return why this process cannot interrupt threads (TimeLimit and
    ShutdownNotifications need it), or None when it can."""
    if current_platform not in supported_platforms:
        return f"cannot interrupt threads on {current_platform!r}"
    if is_gevent_active():
        return "does not support gevent yet"
    return None
