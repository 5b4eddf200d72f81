"""``python -m dq``: the `dq` command (see `dq.cli`)."""

from __future__ import annotations

import sys

from dq.cli import main

if __name__ == "__main__":
    sys.exit(main())
