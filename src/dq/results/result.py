"""How results and failures are stored (Dramatiq's ``dramatiq.results.result``).

A result is stored as it is (no wrapper). A failure is stored as a dict carrying a
marker that Dramatiq readers recognise::

    {"__t": "dramatiq.results.Result", "exn": {"type": "ValueError", "msg": "bad"}}

Any stored dict whose ``__t`` is the marker reads back as a failure, so an actor that
returns such a dict looks like a failed one (as in Dramatiq).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from dq.results.errors import ResultFailure

__all__ = ["EXCEPTION_MARKER", "unwrap_result", "wrap_exception", "wrap_result"]

#: The ``__t`` value that marks a stored failure (Dramatiq's; part of the wire format).
EXCEPTION_MARKER: Final = "dramatiq.results.Result"


def wrap_result(res: Any) -> Any:
    """Return what to store for the result ``res``: ``res`` itself."""
    return res


def wrap_exception(e: BaseException) -> dict[str, Any]:
    """Return what to store for a failure with exception ``e``: the marker dict with
    the exception's class name and ``str()``."""
    return {"__t": EXCEPTION_MARKER, "exn": {"type": type(e).__name__, "msg": str(e)}}


def unwrap_result(res: Any) -> Any:
    """Return the result stored as ``res``.

    Raises:
        ResultFailure: ``res`` is a stored failure; the error carries the original
            exception's type name and message.
    """
    if isinstance(res, Mapping) and res.get("__t") == EXCEPTION_MARKER:
        exn = res.get("exn")
        if isinstance(exn, Mapping):
            exc_type, exc_msg = str(exn.get("type", "")), str(exn.get("msg", ""))
        else:  # not written by Dramatiq or dq: say what is there rather than crash
            exc_type, exc_msg = "Exception", repr(exn)
        raise ResultFailure(f"actor raised {exc_type}: {exc_msg}", exc_type, exc_msg)
    return res
