"""Errors raised when fetching results (Dramatiq's ``dramatiq.results.errors``)."""

from __future__ import annotations

from dq.errors import DramatiqError

__all__ = ["ResultError", "ResultFailure", "ResultMissing", "ResultTimeout"]


class ResultError(DramatiqError):
    """Base class of the results errors."""


class ResultTimeout(ResultError):
    """No result arrived within the time a blocking read waited.

    Attributes:
        message: the message whose result was awaited.
    """


class ResultMissing(ResultError):
    """The result is not stored (not yet, never, or expired).

    Attributes:
        message: the message whose result was asked for.
    """


class ResultFailure(ResultError):
    """The actor failed for good: its exception was stored instead of a result.

    Args:
        message: the error text (``"actor raised <type>: <msg>"`` when read back).
        orig_exc_type: the name of the original exception's class.
        orig_exc_msg: ``str()`` of the original exception.

    Attributes:
        orig_exc_type: the name of the original exception's class.
        orig_exc_msg: ``str()`` of the original exception.
    """

    def __init__(self, message: str = "", orig_exc_type: str = "", orig_exc_msg: str = "") -> None:
        super().__init__(message)
        self.orig_exc_type = orig_exc_type
        self.orig_exc_msg = orig_exc_msg
