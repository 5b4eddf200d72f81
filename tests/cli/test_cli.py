"""End-to-end tests of the ``dq`` command line (``python -m dq``) on the real Redis.

Each test writes an app module (``tasks.py``, generated from `APP_TEMPLATE`) into its
own directory, runs ``python -m dq tasks ...`` there as a subprocess in a new session
(so teardown can SIGKILL the main process and every worker process it forked, even
when the test fails), and drives it with signals. The app's `RedisBroker` uses a
private namespace (``dq-cli-<uuid hex>``, passed in ``DQ_CLI_TEST_NAMESPACE``), with
``heartbeat_timeout=1000`` and ``requeue_interval=200`` so what a killed worker process
held is back in its queue within ~1.5 s; teardown deletes every key under it.

The ``record(key, sleep_ms)`` actor writes durably in Redis, under the namespace, so
the counts survive killed processes:

* ``ns:__test__.runs``: key -> times it finished;
* ``ns:__test__.started``: key -> times it started (before its sleep);
* ``ns:__test__.pids``: worker process pid -> messages it finished;
* ``ns:__test__.versions``: key -> the app's ``VERSION`` that ran it (reload tests).

Duplicates (a message run more than once, allowed only when a process is killed) are
printed: run with ``-s`` to see them and the timings.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

import dq
from dq.brokers.redis import RedisBroker
from tests.support.redis_helpers import REDIS_URL, client, delete_namespace, new_namespace
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.redis]

NAMESPACE_ENV = "DQ_CLI_TEST_NAMESPACE"
QUEUE = "default"
READY = "Worker process is ready for action."

#: The app the CLI imports (``tasks.py``); ``{version}`` is a Python literal.
APP_TEMPLATE = '''\
"""The app of tests/cli/test_cli.py (generated)."""

import os
import time

import redis

import dq
from dq.brokers.redis import RedisBroker

NAMESPACE = os.environ["{namespace_env}"]
VERSION = {version!r}

broker = RedisBroker(
    url="{url}", namespace=NAMESPACE, heartbeat_timeout=1000, requeue_interval=200
)
dq.set_broker(broker)
_client = redis.Redis.from_url("{url}")


@dq.actor(actor_name="record", queue_name="{queue}", max_retries=0)
def record(key: int, sleep_ms: int = 0) -> None:
    _client.hincrby(NAMESPACE + ":__test__.started", str(key), 1)
    if sleep_ms:
        time.sleep(sleep_ms / 1000)
    with _client.pipeline(transaction=True) as pipe:
        pipe.hincrby(NAMESPACE + ":__test__.runs", str(key), 1)
        pipe.hincrby(NAMESPACE + ":__test__.pids", str(os.getpid()), 1)
        pipe.hset(NAMESPACE + ":__test__.versions", str(key), VERSION)
        pipe.execute()
'''


# -- helpers ----------------------------------------------------------------------------


def child_pids(pid: int) -> set[int]:
    """The live children of ``pid`` (from /proc; zombies excluded)."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry))
    return found


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    return text[text.rindex(")") + 2 :].split()[0] != "Z"


@dataclass
class Cli:
    """One ``python -m dq`` process (the main process, in its own session)."""

    proc: subprocess.Popen[bytes]
    log: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 60) -> str:
        return "--- dq output (tail) ---\n" + "\n".join(self.output().splitlines()[-lines:])

    def count(self, text: str) -> int:
        return self.output().count(text)

    def children(self) -> set[int]:
        return child_pids(self.pid)

    def wait_output(self, text: str, *, count: int = 1, timeout: float = 20) -> float:
        return wait_until(
            lambda: self.count(text) >= count,
            f"{count}x {text!r} in the output",
            timeout,
            details=self.tail,
        )

    def wait_ready(self, processes: int, *, total: int | None = None, timeout: float = 20) -> None:
        """Wait until ``total`` (default: ``processes``) worker processes reported
        ready and ``processes`` children are alive."""
        self.wait_output(READY, count=total or processes, timeout=timeout)
        wait_until(
            lambda: len(self.children()) == processes,
            f"{processes} worker processes",
            timeout,
            details=self.tail,
        )

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dq did not exit within {timeout} s\n{self.tail()}") from None

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM; return the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL the main process and every process of its session's group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


@dataclass
class App:
    """A test's app directory, namespace and CLI processes."""

    root: Path
    namespace: str
    conn: redis.Redis
    producer: RedisBroker
    clis: list[Cli] = field(default_factory=list)
    logs: int = 0

    @property
    def directory(self) -> Path:
        return self.root / "app"

    def write(self, version: str) -> None:
        """(Re)write ``tasks.py`` with ``VERSION = version``."""
        self.directory.mkdir(exist_ok=True)
        (self.directory / "tasks.py").write_text(
            APP_TEMPLATE.format(
                namespace_env=NAMESPACE_ENV, version=version, url=REDIS_URL, queue=QUEUE
            ),
            encoding="utf-8",
        )

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[NAMESPACE_ENV] = self.namespace
        # A rewrite of tasks.py within the same second and of the same size would
        # otherwise load the stale bytecode after a reload.
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, *args: str) -> Cli:
        """Start ``python -m dq *args`` in the app directory."""
        self.logs += 1
        log = self.root / f"dq-{self.logs}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dq", *args],
                cwd=self.directory,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        cli = Cli(proc, log)
        self.clis.append(cli)
        return cli

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run ``python -m dq *args`` to completion."""
        return subprocess.run(
            [sys.executable, "-m", "dq", *args],
            cwd=self.directory,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    # -- messages and what ran -------------------------------------------------------

    def enqueue(self, keys: range, *, sleep_ms: int = 0) -> None:
        self.producer.enqueue_many(
            dq.Message(QUEUE, "record", (key, sleep_ms), {}, {}) for key in keys
        )

    def _hash(self, name: str) -> dict[str, str]:
        raw: dict[Any, Any] = self.conn.hgetall(f"{self.namespace}:__test__.{name}")
        return {_text(k): _text(v) for k, v in raw.items()}

    def runs(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self._hash("runs").items()}

    def started(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self._hash("started").items()}

    def pids(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self._hash("pids").items()}

    def versions(self) -> dict[int, str]:
        return {int(k): v for k, v in self._hash("versions").items()}

    def done(self, keys: range) -> bool:
        runs = self.runs()
        return all(key in runs for key in keys)

    def waiting(self) -> int:
        """Messages still in the queue (its list)."""
        return int(self.conn.llen(f"{self.namespace}:{QUEUE}"))

    def leftovers(self) -> list[str]:
        """Broker keys that should be gone once every message was processed: the
        queue, its messages, ack sets, dead letters, delayed messages, suspects."""
        keys = sorted(_text(k) for k in self.conn.scan_iter(match=f"{self.namespace}:*"))
        return [
            k
            for k in keys
            if not k.startswith(f"{self.namespace}:__test__.")
            and k != f"{self.namespace}:__heartbeats__"
        ]

    def wait_done(self, keys: range, *, timeout: float, cli: Cli | None = None) -> float:
        return wait_until(
            lambda: self.done(keys),
            f"messages {keys.start}..{keys.stop - 1} to run",
            timeout,
            details=lambda: (
                f"ran {len(self.runs())} of {len(keys)}, {self.waiting()} waiting\n"
                + (cli.tail() if cli else "")
            ),
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def duplicates(runs: dict[int, int]) -> dict[int, int]:
    return {key: count for key, count in runs.items() if count > 1}


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    namespace = new_namespace("dq-cli")
    conn = client()
    producer = RedisBroker(url=REDIS_URL, namespace=namespace, middleware=[])
    state = App(tmp_path, namespace, conn, producer)
    state.write("one")
    try:
        yield state
    finally:
        for cli in state.clis:
            cli.kill()
        producer.close()
        delete_namespace(conn, namespace)
        conn.close()


# -- 1. a batch, then SIGTERM ---------------------------------------------------------


def test_processes_a_batch_and_stops_on_sigterm(app: App) -> None:
    cli = app.start("tasks", "-p", "2", "-t", "4")
    cli.wait_ready(2)
    keys = range(300)
    app.enqueue(keys)
    took = app.wait_done(keys, timeout=30, cli=cli)
    code = cli.stop()
    print(f"\n[cli batch] 300 messages in {took:.2f} s; per process {app.pids()}")
    assert code == 0, cli.tail()
    runs = app.runs()
    assert sorted(runs) == list(keys)
    assert duplicates(runs) == {}, "a message ran twice without any crash"
    assert len(app.pids()) == 2, "both worker processes should have worked"
    assert app.waiting() == 0
    assert app.leftovers() == []
    assert cli.count("Worker process stopped.") == 2, cli.tail()
    assert child_pids(cli.pid) == set()


# -- 2. SIGTERM with work in flight -----------------------------------------------------


def test_sigterm_with_work_in_flight_loses_nothing(app: App) -> None:
    keys = range(24)
    app.enqueue(keys, sleep_ms=300)
    cli = app.start("tasks", "-p", "2", "-t", "2", "--worker-shutdown-timeout", "20000")
    cli.wait_ready(2)
    wait_until(lambda: len(app.started()) >= 2, "actors to start", 10, details=cli.tail)
    in_flight = set(app.started()) - set(app.runs())
    assert in_flight, "nothing was in flight at SIGTERM"
    began = time.monotonic()
    code = cli.stop()
    stopped_in = time.monotonic() - began
    assert code == 0, cli.tail()
    runs = app.runs()
    # The running actors finished before their processes exited...
    assert all(runs.get(key) == 1 for key in in_flight), (in_flight, runs)
    # ... and whatever did not run is back in the queue (prefetched messages returned).
    assert len(runs) < len(keys), "the whole batch ran before the stop took effect"
    assert app.waiting() + len(runs) >= len(keys), (
        f"lost: {len(keys) - len(runs) - app.waiting()} messages neither ran nor wait"
    )
    first = len(runs)

    second = app.start("tasks", "-p", "2", "-t", "2")
    second.wait_ready(2)
    app.wait_done(keys, timeout=20, cli=second)
    assert second.stop() == 0, second.tail()
    runs = app.runs()
    assert sorted(runs) == list(keys)
    extra = duplicates(runs)
    print(
        f"\n[cli in-flight] {len(in_flight)} in flight at SIGTERM, stop took "
        f"{stopped_in:.2f} s; {first} ran in the first run; duplicates: {extra}"
    )
    assert extra == {}, "a graceful stop ran a message twice"
    assert app.waiting() == 0
    assert app.leftovers() == []


# -- 3. SIGHUP reloads the code -----------------------------------------------------------


def test_sighup_reloads_the_code_in_the_same_main_process(app: App) -> None:
    cli = app.start("tasks", "-p", "2", "-t", "2")
    cli.wait_ready(2)
    first = range(20)
    app.enqueue(first)
    app.wait_done(first, timeout=20, cli=cli)
    assert set(app.versions().values()) == {"one"}
    old_children = cli.children()
    cmdline = Path(f"/proc/{cli.pid}/cmdline").read_bytes()

    app.write("two, reloaded")
    began = time.monotonic()
    cli.signal(signal.SIGHUP)
    cli.wait_output("Reloading: re-executing")
    cli.wait_ready(2, total=4)
    reload_took = time.monotonic() - began
    assert cli.proc.poll() is None, "the main process exited instead of re-executing"
    assert Path(f"/proc/{cli.pid}/cmdline").read_bytes() == cmdline
    assert cli.children().isdisjoint(old_children), "the worker processes were not replaced"

    second = range(20, 40)
    app.enqueue(second)
    app.wait_done(second, timeout=20, cli=cli)
    versions = app.versions()
    assert {versions[key] for key in second} == {"two, reloaded"}
    assert {versions[key] for key in first} == {"one"}
    print(f"\n[cli sighup] reload took {reload_took:.2f} s")
    assert cli.stop() == 0, cli.tail()
    runs = app.runs()
    assert sorted(runs) == list(range(40))
    assert duplicates(runs) == {}
    assert app.leftovers() == []
    assert "Stopping at once" not in cli.output(), cli.tail()


# -- 4. SIGKILL of one worker process -----------------------------------------------------


def test_sigkill_of_one_worker_process_restarts_it_alone(app: App) -> None:
    cli = app.start("tasks", "-p", "2", "-t", "4")
    cli.wait_ready(2)
    output = cli.output()
    by_index = {
        int(m.group(2)): int(m.group(1))
        for m in re.finditer(r"\[PID (\d+)\] .*\[dq\.WorkerProcess\((\d+)\)\] .*" + READY, output)
    }
    assert set(by_index) == {0, 1}, output
    assert set(by_index.values()) == cli.children()

    keys = range(2000)
    began = time.monotonic()
    app.enqueue(keys, sleep_ms=10)
    wait_until(lambda: len(app.runs()) >= 300, "300 messages to run", 20, details=cli.tail)
    victim, survivor = by_index[0], by_index[1]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    at_kill = app.pids().get(survivor, 0)
    ran_at_kill = len(app.runs())

    # While worker 0 is down (until its replacement appears), worker 1 keeps working.
    replacement: set[int] = set()

    def replaced() -> bool:
        replacement.update(cli.children() - {victim, survivor})
        return bool(replacement)

    down_for = wait_until(replaced, "a replacement worker process", 20, details=cli.tail)
    at_restart = app.pids().get(survivor, 0)
    assert at_restart > at_kill, (
        f"worker 1 did no work while worker 0 was down ({at_kill} -> {at_restart})"
    )
    cli.wait_output("Worker process 0 died unexpectedly (killed by SIGKILL)")
    assert survivor in cli.children(), "the surviving worker process was stopped"

    drained = app.wait_done(keys, timeout=40, cli=cli)
    total = time.monotonic() - began
    assert cli.stop() == 0, cli.tail()
    runs = app.runs()
    assert sorted(runs) == list(keys), "a message was lost"
    extra = duplicates(runs)
    pids = app.pids()
    rerun = sum(1 for count in app.started().values() if count > 1)
    print(
        f"\n[cli sigkill] killed worker 0 (pid {victim}) after {ran_at_kill} messages ran; "
        f"worker 1 ran {at_restart - at_kill} during the {down_for:.2f} s before the "
        f"replacement started; all 2000 ran {total:.2f} s after the enqueue "
        f"({drained:.2f} s after the restart check, {time.monotonic() - killed_at:.2f} s "
        f"after the kill); per process {pids}; {rerun} started again (abandoned "
        f"mid-run by the kill); duplicates (ran to the end twice): {len(extra)} {extra}"
    )
    assert len(extra) <= 4 * 2, "more duplicates than one process's threads + prefetch"
    assert app.waiting() == 0
    assert app.leftovers() == []


# -- 5. --max-tasks-per-child --------------------------------------------------------------


def test_max_tasks_per_child_recycles_without_loss_or_duplicates(app: App) -> None:
    cli = app.start("tasks", "-p", "1", "-t", "2", "--max-tasks-per-child", "50")
    cli.wait_ready(1)
    keys = range(300)
    app.enqueue(keys, sleep_ms=10)
    took = app.wait_done(keys, timeout=40, cli=cli)
    assert cli.stop() == 0, cli.tail()
    output = cli.output()
    recycled = output.count("recycling this process")
    replaced = output.count("recycled itself; starting its replacement")
    pids = app.pids()
    print(
        f"\n[cli max-tasks] 300 messages in {took:.2f} s; {recycled} recycles; "
        f"per process {sorted(pids.values())}"
    )
    assert recycled >= 3, cli.tail()
    assert replaced == recycled, cli.tail()
    assert "died unexpectedly" not in output, cli.tail()
    runs = app.runs()
    assert sorted(runs) == list(keys), "a message was lost"
    assert duplicates(runs) == {}, "a recycled process ran a message twice"
    assert len(pids) >= recycled
    # Every recycled process reached the limit; only the last one may be short of it.
    assert sum(1 for count in pids.values() if count < 50) <= 1, pids
    assert app.leftovers() == []


# -- 6. --pid-file ---------------------------------------------------------------------------


def test_pid_file(app: App, tmp_path: Path) -> None:
    pid_file = tmp_path / "dq.pid"
    # A stale pid file (a process that is gone) is replaced.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pid_file.write_text(str(gone.pid), encoding="ascii")

    cli = app.start("tasks", "-p", "1", "-t", "2", "--pid-file", str(pid_file))
    cli.wait_ready(1)
    assert pid_file.read_text(encoding="ascii").strip() == str(cli.pid)
    assert stat.S_IMODE(pid_file.stat().st_mode) == 0o644

    # A pid file naming a live process (that one): exit code 4, the file untouched.
    other = app.run("tasks", "-p", "1", "--pid-file", str(pid_file))
    assert other.returncode == 4, other.stderr
    assert "names a live process" in other.stderr
    assert pid_file.read_text(encoding="ascii").strip() == str(cli.pid)

    assert cli.stop() == 0, cli.tail()
    assert not pid_file.exists(), "the pid file was not removed at exit"

    pid_file.write_text("not a pid\n", encoding="ascii")
    garbage = app.run("tasks", "-p", "1", "--pid-file", str(pid_file))
    assert garbage.returncode == 4, garbage.stderr
    assert "not a pid" in garbage.stderr
    assert pid_file.read_text(encoding="ascii") == "not a pid\n"


# -- 7. --watch ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "include",
    [
        pytest.param([], id="default-patterns"),
        # The same with an explicit pattern that matches absolute paths (watchdog >= 5
        # matches the whole path): isolates the reload machinery from the default pattern.
        pytest.param(["-i", "**/*.py"], id="include-**/*.py"),
    ],
)
def test_watch_reloads_when_a_source_file_changes(app: App, include: list[str]) -> None:
    cli = app.start("tasks", "-p", "1", "-t", "2", "--watch", str(app.directory), *include)
    cli.wait_ready(1)
    first = range(10)
    app.enqueue(first)
    app.wait_done(first, timeout=20, cli=cli)
    old_children = cli.children()

    began = time.monotonic()
    app.write("two, watched")
    cli.wait_output("Detected a change", timeout=10)
    cli.wait_output("Reloading")
    cli.wait_ready(1, total=2)
    reload_took = time.monotonic() - began
    assert cli.proc.poll() is None
    assert cli.children().isdisjoint(old_children)

    second = range(10, 20)
    app.enqueue(second)
    app.wait_done(second, timeout=20, cli=cli)
    versions = app.versions()
    assert {versions[key] for key in second} == {"two, watched"}
    print(f"\n[cli watch {include}] change to new code running in {reload_took:.2f} s")
    assert cli.stop() == 0, cli.tail()
    assert duplicates(app.runs()) == {}


def test_a_second_sighup_during_a_reload_keeps_it_graceful(app: App) -> None:
    """A reload already under way absorbs another SIGHUP (``--watch`` sends one per file
    event, and an editor's save, or two saves in a row, gives several): the running
    actors still finish, none is abandoned to the broker's recovery.

    Beyond Dramatiq, whose main process forwards every SIGHUP and whose workers treat a
    second one as "stop at once"; dq promises that SIGHUP stops every worker gracefully.
    """
    cli = app.start("tasks", "-p", "1", "-t", "2", "--worker-shutdown-timeout", "20000")
    cli.wait_ready(1)
    keys = range(2)
    app.enqueue(keys, sleep_ms=1500)
    wait_until(lambda: len(app.started()) == 2, "both actors to start", 10, details=cli.tail)
    cli.signal(signal.SIGHUP)
    cli.wait_output("Stopping worker process...")  # the worker handled the first SIGHUP
    cli.signal(signal.SIGHUP)
    cli.wait_output("Reloading: re-executing")
    cli.wait_ready(1, total=2)
    app.wait_done(keys, timeout=20, cli=cli)
    assert cli.stop() == 0, cli.tail()
    output = cli.output()
    started, runs = app.started(), app.runs()
    print(f"\n[cli double sighup] started {started}, finished {runs}")
    assert "Stopping at once" not in output, cli.tail()
    assert started == {0: 1, 1: 1}, "a running actor was abandoned and ran again"
    assert runs == {0: 1, 1: 1}


# -- 8. import errors ------------------------------------------------------------------------


def test_a_bad_module_path_exits_2_with_one_error(app: App) -> None:
    done = app.run("nosuch.module", "-p", "1", "-t", "1")
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "[CRITICAL]" in line]
    assert len(errors) == 1, done.stderr
    assert "nosuch" in errors[0]
    assert "ModuleNotFoundError" in errors[0]
    assert "Traceback" not in done.stderr

    done = app.run("tasks:missing_attr", "-p", "1", "-t", "1")
    assert done.returncode == 2, done.stderr
    assert "does not define" in done.stderr
    assert "missing_attr" in done.stderr


# -- 9. --version and argument errors ------------------------------------------------------


def test_version_and_invalid_arguments(app: App) -> None:
    done = app.run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == dq.__version__

    script = Path(sys.executable).with_name("dq")
    if script.exists():
        via_script = subprocess.run(
            [str(script), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        assert via_script.returncode == 0, via_script.stderr
        assert via_script.stdout.strip() == dq.__version__

    done = app.run("tasks", "-p", "0")
    assert done.returncode == 2
    assert "must be a positive integer" in done.stderr
    assert app.leftovers() == []


# -- 10. the Prometheus endpoint ------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_prometheus_endpoint_serves_every_worker_process(
    app: App, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same app, with the Prometheus middleware added to its broker.
    source = (app.directory / "tasks.py").read_text(encoding="utf-8")
    source = source.replace(
        "dq.set_broker(broker)",
        "from dq.middleware.prometheus import Prometheus\n"
        "broker.add_middleware(Prometheus())\n"
        "dq.set_broker(broker)",
    )
    (app.directory / "prom_tasks.py").write_text(source, encoding="utf-8")
    port = _free_port()
    monkeypatch.setenv("dramatiq_prom_port", str(port))
    monkeypatch.setenv("dramatiq_prom_host", "127.0.0.1")
    monkeypatch.setenv("dramatiq_prom_db", str(tmp_path / "prom"))
    cli = app.start("prom_tasks", "-p", "2", "-t", "2")
    # Two worker processes and the exposition server's fork.
    cli.wait_ready(3, total=2, timeout=30)
    keys = range(40)
    app.enqueue(keys)
    app.wait_done(keys, timeout=30, cli=cli)

    import urllib.request

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain")
            text: str = reply.read().decode()
            return text

    def counted() -> bool:
        with contextlib.suppress(OSError):
            return 'dramatiq_messages_total{actor_name="record",queue_name="default"} 40.0' in (
                scrape()
            )
        return False

    wait_until(counted, "the endpoint to count 40 messages", 20, details=cli.tail)
    text = scrape()
    # The multiprocess collector shows the metrics that have samples (no errors,
    # retries, rejects or delays happened here; tests/extras/test_prometheus.py covers them).
    for name, kind in (
        ("dramatiq_messages_total", "counter"),
        ("dramatiq_messages_inprogress", "gauge"),
        ("dramatiq_message_duration_milliseconds", "histogram"),
    ):
        assert f"# TYPE {name} {kind}" in text, name
    assert 'dramatiq_message_duration_milliseconds_count{actor_name="record"' in text
    assert cli.stop() == 0


# -- 11. a module that sets no broker -------------------------------------------------


def test_a_module_that_sets_no_broker_uses_dq_broker_url(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same actor, in a module that never calls set_broker.
    (app.directory / "bare.py").write_text(
        "import os\n"
        "import redis\n"
        "import dq\n"
        f"_client = redis.Redis.from_url({REDIS_URL!r})\n"
        f"NAMESPACE = os.environ[{NAMESPACE_ENV!r}]\n\n\n"
        f"@dq.actor(actor_name='record', queue_name={QUEUE!r})\n"
        "def record(key: int, sleep_ms: int = 0) -> None:\n"
        "    _client.hincrby(NAMESPACE + ':__test__.runs', str(key), 1)\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("DQ_BROKER_URL", REDIS_URL)
    # (Processing is not checked here: a broker made from a URL uses the default
    # namespace, which this test must not touch.)
    cli = app.start("bare", "-p", "1", "-t", "2")
    cli.wait_output("sets no broker: using DQ_BROKER_URL=" + REDIS_URL)
    cli.wait_ready(1)
    assert cli.stop() == 0


# -- 12. importing the command ------------------------------------------------------------


def test_importing_the_command_leaves_the_broker_to_the_users_module(tmp_path: Path) -> None:
    # The command imports the worker and `from_url` at module level: that must load no
    # broker module and set no global broker, so that the broker a worker process uses
    # is the one the user's module (imported after) sets.
    (tmp_path / "stubapp.py").write_text(
        "import dq\nfrom dq.brokers.stub import StubBroker\n\nBROKER = StubBroker()\n"
        "dq.set_broker(BROKER)\n",
        encoding="utf-8",
    )
    code = (
        "import sys\n"
        "import dq\n"
        "import dq.cli\n"
        "from dq.cli import import_broker\n"
        "assert [m for m in sys.modules if m.startswith('dq.brokers.')] == [], sys.modules\n"
        "try:\n"
        "    dq.get_broker()\n"
        "except RuntimeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('importing the command set a broker')\n"
        "module, broker = import_broker('stubapp')\n"
        "assert broker is module.BROKER is dq.get_broker(), broker\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
