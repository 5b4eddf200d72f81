"""The Python code blocks of the guides run as written (each block on its own, in a
fresh namespace, as a reader would paste it)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
#: Guides whose every ``python`` block is self-contained and runs without a server.
RUNNABLE = ("embedding.md",)

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[str, int, str]]:
    found = []
    for name in RUNNABLE:
        text = (DOCS / name).read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 2
            found.append((name, line, match.group(1)))
    return found


@pytest.mark.parametrize(("doc", "line", "code"), _blocks(), ids=lambda v: str(v)[:40])
def test_a_guide_block_runs(doc: str, line: int, code: str) -> None:
    compiled = compile(code, f"docs/{doc}:{line}", "exec")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compiled, {"__name__": f"docs_{doc}_{line}"})


def test_the_guides_have_blocks_to_run() -> None:
    assert len(_blocks()) >= 5
