"""The README's first command runs the example app: it must keep working."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_hello_example_processes_everything() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hello.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "processed 1008, retried 10, dead-lettered 1" in done.stdout
    assert "words counted: 7003, pipeline (20 + 1) * 2 = 42" in done.stdout
    assert "divide(1, 0) -> ZeroDivisionError: division by zero" in done.stdout
