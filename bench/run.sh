#!/usr/bin/env bash
# Run the dq-vs-Dramatiq benchmarks in their own venv (<repo>/.bench-venv).
#
#   bash bench/run.sh [options]               enqueue.py, e.g. bash bench/run.sh --runs 5
#   bash bench/run.sh enqueue [options]       the same
#   bash bench/run.sh drain [options]         drain.py,   e.g. bash bench/run.sh drain --n 100000
#   bash bench/run.sh latency [options]       latency.py, e.g. bash bench/run.sh latency --samples 500
#   bash bench/run.sh redis [options]         redis_bench.py (RedisBroker, needs Redis on
#                                             127.0.0.1:6379 or --url), e.g. --runs 5
#   bash bench/run.sh rabbitmq [options]      rabbitmq_bench.py (RabbitmqBroker, needs RabbitMQ
#                                             on 127.0.0.1:5672 or --url), e.g. --runs 5
#   bash bench/run.sh rabbitmq-confirm-mode   rabbitmq_confirm_mode.py: what confirm mode
#                                             costs an idle queue's latency (dq only)
#   bash bench/run.sh cli [options]           cli_bench.py: drain through `dq` vs `dramatiq`
#                                             on Redis (2 processes x 8 threads), worker RSS
#
# A first argument that is not a benchmark name (an option such as --runs) runs
# enqueue.py with all the arguments, as run.sh always did.
# Works from any directory. The venv is created once and reused; dq is installed
# editable (source changes are picked up without reinstalling), and the install step
# is re-run only when pyproject.toml, constraints.txt or bench/requirements.txt change.
# dq's own dependencies are pinned by <repo>/constraints.txt (what CI installs) when
# that file exists.
# PYTHON=/path/to/python picks the interpreter the venv is created from.
set -euo pipefail

bench_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd -- "$bench_dir/.." && pwd)"
venv="$root/.bench-venv"
py="$venv/bin/python"

if [[ ! -x "$py" ]]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi

constraints=()
if [[ -f "$root/constraints.txt" ]]; then
    constraints=(-c "$root/constraints.txt")
fi

stamp="$venv/.dq-bench-installed"
want="$(cat "$root/pyproject.toml" "$bench_dir/requirements.txt" \
    "${constraints[@]:1}" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$want" ]]; then
    log="$(mktemp)"
    if ! "$py" -m pip install --quiet --disable-pip-version-check \
        "${constraints[@]}" -e "$root" -r "$bench_dir/requirements.txt" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "run.sh: installing the benchmark environment failed (see above)" >&2
        exit 1
    fi
    rm -f "$log"
    printf '%s\n' "$want" >"$stamp"
fi

script=enqueue
case "${1:-}" in
    enqueue | drain | latency)
        script="$1"
        shift
        ;;
    redis)
        # Not bench/redis.py: that name would shadow the redis package (python puts
        # bench/ first on sys.path).
        script=redis_bench
        shift
        ;;
    rabbitmq)
        script=rabbitmq_bench
        shift
        ;;
    rabbitmq-confirm-mode)
        script=rabbitmq_confirm_mode
        shift
        ;;
    cli)
        script=cli_bench
        shift
        ;;
esac

exec "$py" "$bench_dir/$script.py" "$@"
