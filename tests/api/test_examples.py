"""The README's first command runs the example app: it must keep working."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


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


def test_the_main_job_runs_the_example_app_through_the_cli_on_sqlite() -> None:
    # The README's first command, on the SQLite default (no server involved).
    env = {k: v for k, v in os.environ.items() if k != "DQ_BROKER_URL"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "shop.py"), "--words", "200"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dq example app on SqliteBroker (sqlite:///dq.sqlite3)" in done.stdout
    assert "processed   221/221  retried 10  dead-lettered 1" in done.stdout
    assert "summary: processed 221, retried 10, dead-lettered 1" in done.stdout
    assert "(dq exited with 0)" in done.stdout
