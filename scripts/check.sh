#!/usr/bin/env bash
# The whole test suite: what CI runs (.ci/run calls exactly this), and what you run.
#
#   bash scripts/check.sh            # everything: lint, format, types, tests
#   bash scripts/check.sh -k stub    # extra arguments go to pytest
#   bash scripts/check.sh -m "not redis and not rabbitmq and not memcached"
#                                     # the tests that need no server, on a machine with none
#
# It installs dq and its pinned development tools into .venv (created if missing),
# starts Redis, RabbitMQ and Memcached if they are down (not those that the
# arguments deselect with "not redis" and so on), then fails on any ruff, mypy or pytest
# failure, and when pytest collects no test.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c constraints.txt -e '.[dev,redis,rabbitmq,memcached]'

# The servers the selected tests need: a -m expression saying "not redis" needs no Redis.
services=()
for name in redis rabbitmq memcached; do
    if [[ " $* " != *"not $name"* ]]; then
        services+=("$name")
    fi
done
if [ ${#services[@]} -gt 0 ]; then
    bash scripts/services.sh "${services[@]}"
fi

echo "== ruff check"
.venv/bin/ruff check src tests typings bench examples
echo "== ruff format --check"
.venv/bin/ruff format --check src tests typings bench examples
echo "== mypy (strict, mypy.ini)"
.venv/bin/mypy
echo "== pytest"
# Exit status 5 (no tests collected) is a failure here, like any other non-zero one.
.venv/bin/pytest "$@"
