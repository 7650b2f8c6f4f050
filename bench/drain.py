"""Drain: no-op tasks per second from a full queue, Backstop's runner against Huey's consumer.

    .venv/bin/python -m bench.drain [--runs 3] [--tasks 8000] [--concurrency 8,64]
                                    [--synchronous NORMAL,FULL] [--postgres URL]
                                    [--json out.json]

Each configuration is a fresh database with `--tasks` no-op tasks already queued and fresh
processes that import everything, say they are ready, and only then are told to go:

- Backstop: one runner process (Backstop's service, as `backstop worker` runs it) pinned to
  CPU 0, sync (`bench.noop`, on threads) and async (`bench.async_noop`, on the loop), at
  each `--concurrency`; and two runner processes on the same file, pinned to CPU 0 and 1.
  Done when no task is queued or running any more (polled every 5 ms with reads of the
  partial indexes); every task is then checked to have succeeded.
- Backstop on PostgreSQL (the server `--postgres` names; by default the local one, and the
  configurations are left out with a note when nothing answers there): one runner process
  and two, sync, at the first concurrency, each run in a database of its own. The server
  shares the machine's two cores with the runners (unpinned): the figures say how a second
  process scales on a store with more than one writer, not how fast PostgreSQL can go.
- Huey: SqliteHuey's consumer with 4 worker threads (`-k thread -w 4`), pinned to CPU 0,
  with SQLite's `synchronous` set like Backstop's (Huey's own default is FULL). A no-op
  returns None, so Huey stores no result: done when the consumer's process has seen the
  last SIGNAL_COMPLETE, timed there (CLOCK_MONOTONIC is shared by all processes).

The configurations run one after the other in a rotated order, `--runs` times; figures are
medians, ratios the median of each run's own ratio. With FULL only sync (at each
concurrency) and Huey run. Note the two do different work: Backstop records every attempt and
outcome (a claim, a lease, an attempt row, the result); Huey deletes the message as it
dequeues it and keeps nothing for a task that returns None.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import harness
from bench.report import Figure, Report, arguments, header, integers, median, rotated
from store.models import CLAIMABLE_WHERE, RUNNING_WHERE

HUEY_WORKERS = 4
# The development machines' and CI's local server (as the test suite's), for `--postgres`.
LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True)
class Config:
    system: str  # "backstop" or "huey"
    synchronous: str
    kind: str = "sync"
    concurrency: int = HUEY_WORKERS
    processes: int = 1
    postgres: bool = False

    @property
    def label(self) -> str:
        if self.system == "huey":
            return f"huey {HUEY_WORKERS} threads {self.synchronous}"
        procs = f" x{self.processes} procs" if self.processes > 1 else ""
        store = "postgres" if self.postgres else self.synchronous
        return f"backstop {self.kind} c={self.concurrency}{procs} {store}"


def configs(concurrency: list[int], modes: list[str], postgres: bool = False) -> list[Config]:
    # Huey at FULL always: it is Huey's default (it leaves SQLite's), the reference.
    found = [Config("huey", mode) for mode in sorted({*modes, "FULL"})]
    for mode in modes:
        kinds = ("sync", "async") if mode == "NORMAL" else ("sync",)
        levels = concurrency
        found += [Config("backstop", mode, kind, level) for kind in kinds for level in levels]
        if mode == "NORMAL":
            found.append(Config("backstop", mode, "sync", concurrency[0], processes=2))
    if postgres:
        found += [
            Config("backstop", "NORMAL", "sync", concurrency[0], processes=n, postgres=True)
            for n in (1, 2)
        ]
    return found


# -- the parent ---------------------------------------------------------------------------


def measure(config: Config, tasks: int, server: str) -> float:
    """Tasks per second for one fresh run of `config`."""
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        if config.system == "huey":
            return drain_huey(config, data, tasks)
        return drain_backstop(config, data, tasks, server)


def drain_backstop(config: Config, data: Path, tasks: int, server: str) -> float:
    """One run of Backstop's runner processes, on a SQLite file under `data` or, with
    `config.postgres`, in a new database on the PostgreSQL server `server`."""
    from sqlalchemy import text

    from app.backstop import open_database
    from app.settings import Settings
    from store import migrate
    from store.engine import create_database, drop_database

    name = "bench.noop" if config.kind == "sync" else "bench.async_noop"
    with contextlib.ExitStack() as stack:
        url = ""
        if config.postgres:
            database = f"backstop_bench_{uuid.uuid4().hex[:12]}"
            url = create_database(server, database)
            stack.callback(drop_database, server, database)
        db = open_database(
            Settings(data_dir=data, database_url=url, sqlite_synchronous=config.synchronous)
        )
        stack.callback(db.dispose)
        migrate.upgrade(db)
        with db.write() as conn:
            harness.backlog(conn, name, tasks)

        def count(where: str) -> int:
            with db.read() as conn:
                query = text(f"SELECT count(*) FROM task WHERE {where}")
                return int(conn.execute(query).scalar_one())

        env = harness.backstop_env(
            data,
            concurrency=str(config.concurrency),
            sqlite_synchronous=config.synchronous,
            database_url=url,
        )
        # The partial indexes' own predicates: they read the backlog, not the history.
        unfinished = f"({CLAIMABLE_WHERE}) OR {RUNNING_WHERE}"
        start, end = run_runners(config, env, data, lambda: count(unfinished) == 0)
        done = count("status = 'succeeded'")
    if done != tasks:
        raise RuntimeError(f"{config.label}: {done} of {tasks} tasks succeeded")
    return tasks / (end - start)


def run_runners(
    config: Config, env: dict[str, str], data: Path, finished: Callable[[], bool]
) -> tuple[float, float]:
    """Start `config.processes` runner processes (pinned to CPU 0, 1, ...; logs under
    `data`), tell them to go once all are ready, and wait until `finished()`; the monotonic
    times of the go and of the end."""
    command = [sys.executable, "-m", "bench.drain", "--child", "backstop"]
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                harness.process(command, env=env, cpu=cpu, pipes=True, log=data / f"{cpu}.log")
            )
            for cpu in range(config.processes)
        ]
        for proc in procs:
            harness.read_line(proc, timeout=60)
        start = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        end = harness.wait_until(finished, timeout=600)
    return start, end


def drain_huey(config: Config, data: Path, tasks: int) -> float:
    command = [
        *(sys.executable, "-m", "bench.drain", "--child", "huey"),
        *("--file", str(data / "huey.db"), "--tasks", str(tasks)),
        *("--synchronous", config.synchronous),
    ]
    with harness.process(command, cpu=0, pipes=True, log=data / "huey.log") as proc:
        harness.read_line(proc, timeout=60)
        assert proc.stdin is not None
        start = time.monotonic()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        end = float(harness.read_line(proc, timeout=600).split()[1])
    return tasks / (end - start)


def main() -> None:
    parser = arguments(__doc__, runs=3)
    parser.add_argument("--tasks", type=int, default=8_000, help="tasks queued per run")
    parser.add_argument("--concurrency", type=integers, default=[8, 64])
    parser.add_argument("--synchronous", default="NORMAL,FULL", help="SQLite synchronous modes")
    parser.add_argument(
        "--postgres",
        default=LOCAL_POSTGRES,
        help="PostgreSQL server for the one- and two-process runs ('' leaves them out)",
    )
    parser.add_argument("--child", choices=("backstop", "huey"), help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child == "backstop":
        return backstop_child()
    if options.child == "huey":
        return huey_child(options.file, options.tasks, options.synchronous)
    modes = [mode.strip().upper() for mode in options.synchronous.split(",") if mode.strip()]
    settings = {
        "runs": options.runs,
        "tasks": options.tasks,
        "concurrency": options.concurrency,
        "synchronous": modes,
        "pinning": "one process on CPU 0; two processes on CPU 0 and CPU 1",
        "huey": f"SqliteHuey consumer, {HUEY_WORKERS} threads, no result stored",
    }
    server, why_not = postgres_server(options.postgres)
    settings["postgres"] = why_not or "a new database per run, server unpinned"
    header("drain: no-op tasks per second, Backstop runner vs Huey consumer", settings)
    report = Report("drain", settings)
    if why_not and options.postgres:
        report.note(f"PostgreSQL runs left out: {why_not}")
    plan = configs(options.concurrency, modes, postgres=bool(server))
    rates: dict[Config, list[float]] = defaultdict(list)
    for run in range(options.runs):
        for config in rotated(plan, run):
            rates[config].append(measure(config, options.tasks, server))
            print(f"  run {run + 1}: {config.label:<34} {rates[config][-1]:8,.0f}/s", flush=True)
    for config in plan:
        if config.system == "huey":
            report.add(Figure(config.label, median(rates[config]), "tasks/s"))
        elif config.processes > 1:
            one = dataclasses.replace(config, processes=1)
            compare(report, config, rates, one, "one process", target="3", goal=1.6)
        elif config.postgres:
            report.add(Figure(config.label, median(rates[config]), "tasks/s"))
        else:
            # Target 3 as the issue sets it: against Huey as it comes (FULL); then like for
            # like, both at the same `synchronous` (target 7 at FULL, where the two agree).
            target = "3" if config.synchronous == "NORMAL" else "7"
            compare(report, config, rates, Config("huey", "FULL"), "huey FULL", target, 3.0)
            if config.synchronous != "FULL":
                like = Config("huey", config.synchronous)
                compare(report, config, rates, like, f"huey {like.synchronous}", "", 3.0)
    report.save(options.json)


def postgres_server(url: str) -> tuple[str, str]:
    """(`url`, "") when a PostgreSQL server answers there; ("", why not) otherwise."""
    if not url:
        return "", "left out (--postgres '')"
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        finally:
            engine.dispose()
    except Exception as exc:  # no driver, a bad URL, nothing listening: say which
        return "", f"no PostgreSQL server at {url}: {str(exc).splitlines()[0]}"
    return url, ""


# -- the children -------------------------------------------------------------------------


def compare(
    report: Report,
    config: Config,
    rates: dict[Config, list[float]],
    peer: Config,
    name: str,
    target: str,
    goal: float,
) -> None:
    ratio = median(a / b for a, b in zip(rates[config], rates[peer], strict=True))
    report.add(
        Figure(
            f"{config.label} vs {name}",
            median(rates[config]),
            "tasks/s",
            peer=name,
            peer_value=median(rates[peer]),
            ratio=ratio,
            target=target,
            goal=f">= {goal:.1f}x",
            met=ratio >= goal if target else None,
        )
    )


def backstop_child() -> None:
    """A runner process as `backstop worker` builds it, started on "go", stopped by SIGTERM."""
    from app.backstop import Backstop
    from app.settings import Settings

    backstop = Backstop(Settings())
    backstop.prepare()

    async def work() -> None:
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        await backstop.runner.start()
        await stopping.wait()
        await backstop.runner.stop()

    # As `backstop worker` does; here before "go", so that its one full collection is not
    # timed.
    try:
        with backstop.serving():
            print("ready", flush=True)
            sys.stdin.readline()
            asyncio.run(work())
    finally:
        backstop.close()


def huey_child(filename: str, tasks: int, synchronous: str) -> None:
    """Huey's consumer on `tasks` queued no-ops; prints when the last one completed."""
    from huey.signals import SIGNAL_COMPLETE  # type: ignore[import-untyped]

    from bench.huey_app import Bench

    bench = Bench(filename, synchronous)
    bench.enqueue_noops(tasks)
    lock = threading.Lock()
    completed = 0

    @bench.huey.signal(SIGNAL_COMPLETE)  # type: ignore[untyped-decorator]
    def count(_signal: str, _task: Any, *_args: Any) -> None:
        nonlocal completed
        with lock:
            completed += 1
            if completed == tasks:
                print(f"done {time.monotonic()!r}", flush=True)

    consumer = bench.huey.create_consumer(workers=HUEY_WORKERS, worker_type="thread")
    print("ready", flush=True)
    sys.stdin.readline()
    consumer.run()


if __name__ == "__main__":
    main()
