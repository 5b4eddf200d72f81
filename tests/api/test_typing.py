"""The public API's types, checked by running mypy on ``typings/``.

``typings/check_*.py`` pin types with ``assert_type`` and must be clean.
``typings/fail_*.py`` hold misuses: every line ending with ``# E: <code>[, <code>...]``
must get exactly those mypy error codes, and no other line may get any. mypy.ini
excludes ``fail_*.py`` from directory runs; files named on the command line are checked
all the same.

Both runs use the repository's mypy.ini from the repository root (its paths and its
``exclude`` pattern are relative to it) and share a cache directory made for this
session, so nothing depends on a stale ``.mypy_cache``.
"""

from __future__ import annotations

import contextlib
import re
import tokenize
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parents[2]
TYPINGS = ROOT / "typings"
CONFIG = ROOT / "mypy.ini"
FAIL_FILES = sorted(TYPINGS.glob("fail_*.py"))

#: ``# E: arg-type`` or ``# E: call-arg, arg-type``, ending a comment.
_MARKER = re.compile(r"#\s*E:\s*(?P<codes>[a-z][a-z0-9-]*(?:\s*,\s*[a-z][a-z0-9-]*)*)\s*$")
_MARKER_START = re.compile(r"#\s*E:")
#: One line of mypy's output (``--no-pretty --show-absolute-path --show-error-codes``).
_REPORT = re.compile(
    r"^(?P<path>.+?):(?P<line>\d+): (?P<severity>error|note|warning): "
    r"(?P<message>.*?)(?:  \[(?P<code>[a-z][a-z0-9-]*)\])?$"
)

Found = set[tuple[int, str]]
RunMypy = Callable[[Sequence[str]], tuple[dict[Path, Found], str]]


def expected_errors(path: Path) -> Found:
    """Return the (line, code) pairs the ``# E:`` comments of ``path`` announce."""
    expected: Found = set()
    with path.open("rb") as source:
        for token in tokenize.tokenize(source.readline):
            if token.type != tokenize.COMMENT:
                continue
            marker = _MARKER.search(token.string)
            if marker is None:
                assert not _MARKER_START.search(token.string), (
                    f"{path.name}:{token.start[0]}: malformed marker {token.string!r}"
                )
                continue
            for code in marker["codes"].split(","):
                expected.add((token.start[0], code.strip()))
    return expected


@pytest.fixture(scope="session")
def run_mypy(tmp_path_factory: pytest.TempPathFactory) -> RunMypy:
    """Return a function running mypy (repository config, fresh session cache) on
    paths relative to the repository root; it returns the errors by file, and the
    whole report for assertion messages."""
    cache_dir = tmp_path_factory.mktemp("mypy_cache")

    def run(targets: Sequence[str]) -> tuple[dict[Path, Found], str]:
        args = [
            "--config-file",
            str(CONFIG),
            "--cache-dir",
            str(cache_dir),
            "--show-error-codes",
            "--show-absolute-path",
            "--no-pretty",
            "--no-error-summary",
            "--hide-error-context",
            "--no-color-output",
            *targets,
        ]
        with contextlib.chdir(ROOT):
            stdout, stderr, status = api.run(args)
        report = f"$ mypy {' '.join(args)}\n{stdout}{stderr}"
        assert status in (0, 1), f"mypy did not run to completion (exit {status}):\n{report}"
        assert not stderr, f"mypy wrote to stderr:\n{report}"
        errors: dict[Path, Found] = {}
        for line in stdout.splitlines():
            match = _REPORT.match(line)
            if match is None:
                assert ": error:" not in line, f"unparsed mypy error {line!r}:\n{report}"
                continue
            if match["severity"] != "error":
                continue
            path = Path(match["path"]).resolve()
            code = match["code"] or "<no code>"
            errors.setdefault(path, set()).add((int(match["line"]), code))
        assert (status == 0) == (not errors), report
        return errors, report

    return run


def test_fail_files_fail_exactly_where_marked(run_mypy: RunMypy) -> None:
    assert FAIL_FILES, f"no typings/fail_*.py in {TYPINGS}"
    expected = {path: expected_errors(path) for path in FAIL_FILES}
    for path, marks in expected.items():
        assert marks, f"{path.name} has no `# E: <code>` marker"

    # Named explicitly: mypy.ini's `exclude` only applies to directory discovery.
    errors, report = run_mypy([str(path.relative_to(ROOT)) for path in FAIL_FILES])

    problems: list[str] = []
    for path in FAIL_FILES:
        found = errors.get(path, set())
        problems += [
            f"{path.name}:{line}: expected [{code}], mypy did not report it"
            for line, code in sorted(expected[path] - found)
        ]
        problems += [
            f"{path.name}:{line}: unexpected [{code}] (mark the line or fix it)"
            for line, code in sorted(found - expected[path])
        ]
    assert not problems, "\n".join(problems) + "\n\n" + report


def test_typings_are_clean(run_mypy: RunMypy) -> None:
    checks = sorted(p for p in TYPINGS.glob("*.py") if not p.name.startswith("fail_"))
    assert checks, f"no typings/*.py to check in {TYPINGS}"
    for path in checks:
        assert not expected_errors(path), f"{path.name}: `# E:` markers belong in fail_*.py"

    # The directory, as the normal run sees it: mypy.ini excludes fail_*.py.
    errors, report = run_mypy(["typings"])

    in_typings = {path: found for path, found in errors.items() if path.parent == TYPINGS}
    # Errors elsewhere (src/, tests/) belong to the full `mypy` run; here they only
    # matter if they hide a problem in typings/, which shows up above.
    assert not in_typings, "\n".join(
        f"{path.name}:{line}: [{code}]"
        for path, found in sorted(in_typings.items())
        for line, code in sorted(found)
    ) + ("\n\n" + report)
