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
    assert "processed 2000, dead-lettered 1" in done.stdout
    assert "words counted: 7000, sum: 500500" in done.stdout
    assert "divide(1, 0) -> ZeroDivisionError" in done.stdout
