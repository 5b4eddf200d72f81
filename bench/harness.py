"""What the benchmarks share: the two libraries, options, statistics and output.

``enqueue.py``, ``drain.py`` and ``latency.py`` import this module as a sibling
(``python bench/NAME.py`` puts ``bench/`` first on ``sys.path``). It holds no timing
code: each benchmark times its own loop, with each library in turn through a `Library`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dramatiq
import dramatiq.errors
from dramatiq.brokers.stub import StubBroker as DramatiqStubBroker

import dq
import dq.errors
from dq.brokers.stub import StubBroker as DqStubBroker

#: Where a benchmark's per-run lines go (`report` drops them under ``--json``).
Progress = Callable[[str], None]
#: The figures of one benchmark: what ``--json`` prints and ``format_table`` renders.
Figures = dict[str, Any]


@dataclass(frozen=True)
class Library:
    """What a benchmark uses of dq or Dramatiq: the same names, one library's objects.

    The objects are typed loosely (dq and Dramatiq share no base classes); each is the
    library's own, called exactly as the library's user would call it.
    """

    name: str
    #: ``StubBroker``: ``stub_broker()`` has the default middleware.
    stub_broker: Callable[..., Any]
    set_broker: Callable[[Any], None]
    actor: Callable[[Callable[..., Any]], Any]
    worker: Callable[..., Any]
    #: What ``broker.join(queue, timeout=...)`` raises when the timeout passes.
    join_timeout: type[Exception]
    #: Messages a stub queue still holds after a drain (Dramatiq's queues are
    #: `queue.Queue` objects: taken but unfinished messages count too).
    left_on: Callable[[Any], int]

    def default_middleware(self) -> list[str]:
        """The class names of a ``StubBroker()``'s middleware, in order."""
        return [type(m).__name__ for m in self.stub_broker().middleware]


def _dq_left_on(queue: Any) -> int:
    return int(queue.qsize())


def _dramatiq_left_on(queue: Any) -> int:
    return int(queue.unfinished_tasks)


DQ = Library(
    name="dq",
    stub_broker=DqStubBroker,
    set_broker=dq.set_broker,
    actor=dq.actor,
    worker=dq.Worker,
    join_timeout=dq.errors.QueueJoinTimeout,
    left_on=_dq_left_on,
)
DRAMATIQ = Library(
    name="dramatiq",
    stub_broker=DramatiqStubBroker,
    set_broker=dramatiq.set_broker,
    actor=dramatiq.actor,
    worker=dramatiq.Worker,
    join_timeout=dramatiq.errors.QueueJoinTimeout,
    left_on=_dramatiq_left_on,
)
#: In the order each run measures them.
LIBRARIES = (DQ, DRAMATIQ)


# Options ---------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def make_parser(
    doc: str | None, size: str, size_default: int, size_help: str, runs_default: int
) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``size`` (``--n``, ``--samples``), ``--runs``
    and ``--json``; the description is the first line of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument(
        size, type=positive_int, default=size_default, help=f"{size_help} (default {size_default})"
    )
    parser.add_argument(
        "--runs",
        type=positive_int,
        default=runs_default,
        help=f"interleaved runs (default {runs_default})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )
    return parser


def note(text: str) -> None:
    """Warn on stderr (so that ``--json`` output stays one JSON object)."""
    print(f"note: {text}", file=sys.stderr)


# Figures ---------------------------------------------------------------------------


def environment() -> Figures:
    """The ``python``, ``dq_version`` and ``dramatiq_version`` figures."""
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "dq_version": dq.__version__,
        "dramatiq_version": dramatiq.__version__,
    }


def default_middleware() -> Figures:
    """The ``dq_middleware`` and ``dramatiq_middleware`` figures: what "default
    middleware" means for each library (``StubBroker()`` with no arguments)."""
    return {
        "dq_middleware": DQ.default_middleware(),
        "dramatiq_middleware": DRAMATIQ.default_middleware(),
    }


def spread(values: Sequence[float], key: str = "rates") -> Figures:
    """Median, min and max of one library's per-run values, and the values (as ``key``)."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        key: list(values),
    }


def ratios(dq_values: Sequence[float], dramatiq_values: Sequence[float]) -> Figures:
    """dq/dramatiq: the ratio of the medians and the per-run ratios, with their min/max."""
    run_ratios = [a / b for a, b in zip(dq_values, dramatiq_values, strict=True)]
    return {
        "ratio_of_medians": statistics.median(dq_values) / statistics.median(dramatiq_values),
        "run_ratios": run_ratios,
        "run_ratio_min": min(run_ratios),
        "run_ratio_max": max(run_ratios),
    }


def compare(dq_rates: Sequence[float], dramatiq_rates: Sequence[float]) -> Figures:
    """``dq`` and ``dramatiq`` (`spread` of the rates), then their `ratios`."""
    return {
        "dq": spread(dq_rates),
        "dramatiq": spread(dramatiq_rates),
        **ratios(dq_rates, dramatiq_rates),
    }


# Text ------------------------------------------------------------------------------


def rates_line(prefix: str, dq_rate: float, dramatiq_rate: float, width: int) -> str:
    """One run's line: both rates (msgs/s) and their ratio."""
    return (
        f"{prefix} dq {dq_rate:>{width},.0f} msgs/s   "
        f"dramatiq {dramatiq_rate:>{width},.0f} msgs/s   "
        f"dq/dramatiq {dq_rate / dramatiq_rate:.3f}"
    )


def versions_line(figures: Figures, size: str) -> str:
    """``python ...   dq ...   dramatiq ...   <size>   runs=R``."""
    return (
        f"python {figures['python']}   dq {figures['dq_version']}   "
        f"dramatiq {figures['dramatiq_version']}   {size}   runs={figures['runs']}"
    )


def middleware_lines(figures: Figures, *, one_line: bool = False) -> list[str]:
    """``default middleware: dq [...]`` and ``dramatiq [...]``, on one line or two."""
    head = "default middleware: "
    dq_names = f"dq [{', '.join(figures['dq_middleware'])}]"
    dramatiq_names = f"dramatiq [{', '.join(figures['dramatiq_middleware'])}]"
    if one_line:
        return [f"{head}{dq_names}   {dramatiq_names}"]
    return [head + dq_names, " " * len(head) + dramatiq_names]


def rates_header(span_width: int) -> str:
    return f"{'library':<10} {'median msgs/s':>14}   {'min – max msgs/s':>{span_width}}"


def rates_row(name: str, summary: Figures, span_width: int) -> str:
    """One library's row under `rates_header`, from its `spread`."""
    span = f"{summary['min']:,.0f} – {summary['max']:,.0f}"
    return f"{name:<10} {summary['median']:>14,.0f}   {span:>{span_width}}"


def ratio_span(figures: Figures) -> str:
    """``min – max`` of the per-run ratios in `ratios` figures."""
    return f"{figures['run_ratio_min']:.3f} – {figures['run_ratio_max']:.3f}"


def report(
    measure: Callable[[Progress], Figures],
    format_table: Callable[[Figures], str],
    *,
    as_json: bool,
) -> int:
    """Run ``measure``; print its per-run lines and then the table, or (``as_json``) only
    the figures as one JSON object. Return the exit status."""

    def progress(line: str) -> None:
        if not as_json:
            print(line, flush=True)

    figures = measure(progress)
    if as_json:
        print(json.dumps(figures, indent=2))
    else:
        print()
        print(format_table(figures))
    return 0


def throughput_main(
    doc: str | None,
    argv: Sequence[str] | None,
    *,
    default_n: int,
    default_runs: int,
    representative_n: int,
    run: Callable[[int, int, Progress], Figures],
    format_table: Callable[[Figures], str],
) -> int:
    """``main`` of a benchmark of N messages per timing (``--n``, ``--runs``, ``--json``):
    ``run(n, runs, progress)``, then `report`; a note on stderr when N is small."""
    parser = make_parser(doc, "--n", default_n, "messages per timing", default_runs)
    args = parser.parse_args(argv)
    n: int = args.n
    runs: int = args.runs
    if n < representative_n:
        note(f"N={n:,} is below {representative_n:,}; figures are not representative")
    return report(lambda progress: run(n, runs, progress), format_table, as_json=args.json)
