"""Option values at the boundary: refuse what dq cannot honour, before it is stored.

The rules live in `dq.core.policy`; this module raises them as `ValueError` for the
actor decorator and the middleware settings (`dq.message` re-exports its names).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dq.core import policy

__all__ = ["CHECKED_OPTIONS", "check_options", "option_problem", "options_problem"]

#: The options whose values dq checks (`dq.core.policy.option_problem`).
CHECKED_OPTIONS = policy.CHECKED_OPTIONS
option_problem = policy.option_problem
options_problem = policy.options_problem


def check_options(options: Mapping[str, Any], *, what: str = "options") -> None:
    """Refuse option values dq cannot honour (see `option_problem`).

    Args:
        options: message or actor options.
        what: what they are, for the error (``"actor 'f' options"``...).

    Raises:
        ValueError: an option has a bad value; the error names the option, the value
            and what was expected.
    """
    problem = options_problem(options)
    if problem is not None:
        raise ValueError(f"Invalid {what}: {problem}")
