"""``get_logger``: dq's logger naming (Dramatiq's)."""

from __future__ import annotations

import logging

__all__ = ["get_logger"]


def get_logger(module: str, name: str | type | None = None) -> logging.Logger:
    """Return the logger ``module`` or ``module.<name>`` (a class gives its name)."""
    logger_name = module
    if name is not None:
        logger_name = f"{module}.{name.__name__ if isinstance(name, type) else name}"
    return logging.getLogger(logger_name)
