"""Drain on PostgreSQL: no-op tasks per second from a full queue, Backstop against the queues
built for PostgreSQL alone (PgQueuer, Procrastinate), all in the same run.

    .venv/bin/python -m bench.pg_drain [--runs 3] [--tasks 10000] [--concurrency 8,64]
                                       [--postgres URL] [--json out.json]

Each configuration drains `--tasks` no-op jobs queued beforehand in a new database of its
own on the server (by default the local one), by worker processes that import everything,
say they are ready, and only then are told to go. Each is done when its queue holds nothing
to run or running, polled every 5 ms from this process; the rate is the tasks over the time
from the go to then.

- Backstop: `backstop worker`'s runner at each `--concurrency` (8 is its default; a cycle
  claims at most as many tasks as there are free slots, so the concurrency is its batch
  size): one process with sync no-ops (`bench.noop`, on threads), one with async ones
  (`bench.async_noop`, on the loop); and two processes with sync ones at the first
  concurrency. Every task is checked to have succeeded.
- PgQueuer: `PgQueuer.run()` with an async no-op entrypoint, at batch size 10 (its default)
  and 100. Done when its queue table is empty (it deletes a job once done, logging it).
- Procrastinate: its worker (`run_worker_async`) with an async no-op task, at its default
  concurrency (1) and at the first `--concurrency`. Done when no job is `todo` or `doing`.

One worker process is pinned to CPU 0 (two: CPU 0 and 1); the server is not pinned and
shares the machine's cores. The configurations run in a rotated order, `--runs` times;
figures are medians, ratios the median of each run's own ratio, each against the peer's
best configuration of that run. Backstop does more per task than either peer: a claim under
a lease, an attempt row and the outcome, kept; PgQueuer moves a finished job to its log
table, Procrastinate marks it `succeeded` and records events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench import harness
from bench.drain import LOCAL_POSTGRES, Config, drain_backstop, postgres_server
from bench.pg_latency import libpq
from bench.report import Figure, Report, arguments, header, integers, median, rotated
from store.engine import create_database, drop_database

PROCRASTINATE_DEFAULT = 1  # Procrastinate's worker runs one job at a time unless told
PGQUEUER_BATCHES = (10, 100)  # its default, and the size at which it went fastest


@dataclass(frozen=True)
class Drain:
    """One configuration: `system` with `processes` workers; `level` is Backstop's and
    Procrastinate's concurrency, PgQueuer's batch size."""

    system: str  # "backstop", "pgqueuer" or "procrastinate"
    level: int
    kind: str = "sync"
    processes: int = 1

    @property
    def label(self) -> str:
        if self.system == "pgqueuer":
            return f"pgqueuer batch={self.level}"
        if self.system == "procrastinate":
            return f"procrastinate concurrency={self.level}"
        procs = f" x{self.processes} procs" if self.processes > 1 else ""
        return f"backstop {self.kind} c={self.level}{procs}"


def plan(concurrency: list[int]) -> list[Drain]:
    first = concurrency[0]
    return [
        *(Drain("backstop", level, kind) for level in concurrency for kind in ("sync", "async")),
        Drain("backstop", first, "sync", processes=2),
        *(Drain("pgqueuer", batch) for batch in PGQUEUER_BATCHES),
        *(Drain("procrastinate", level) for level in sorted({PROCRASTINATE_DEFAULT, first})),
    ]


# -- the parent ---------------------------------------------------------------------------


def measure(drain: Drain, tasks: int, server: str) -> float:
    """Tasks per second for one fresh run of `drain`."""
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        if drain.system == "backstop":
            config = Config(
                "backstop",
                "NORMAL",
                drain.kind,
                drain.level,
                processes=drain.processes,
                postgres=True,
            )
            return drain_backstop(config, data, tasks, server)
        with new_database(server, drain.system) as url:
            if drain.system == "pgqueuer":
                asyncio.run(pgqueuer_backlog(url, tasks))
                left = "SELECT count(*) FROM pgqueuer"
            else:
                procrastinate_backlog(url, tasks)
                left = "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
            command = [sys.executable, "-m", "bench.pg_drain", "--child", drain.system, url]
            command += ["--level", str(drain.level)]
            start, end = go_and_wait(command, data, counter(url, left))
    return tasks / (end - start)


@contextlib.contextmanager
def new_database(server: str, prefix: str) -> Iterator[str]:
    name = f"{prefix}_bench_{uuid.uuid4().hex[:12]}"
    url = create_database(server, name)
    try:
        yield url
    finally:
        drop_database(server, name)


def counter(url: str, query: str) -> Callable[[], bool]:
    """Whether `query` counts nothing left (a connection kept open for the polls)."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.StaticPool)

    def finished() -> bool:
        with engine.connect() as conn:
            left: int = conn.exec_driver_sql(query).scalar_one()
            return left == 0

    return finished


def go_and_wait(
    command: list[str], data: Path, finished: Callable[[], bool]
) -> tuple[float, float]:
    """Start the worker process on CPU 0, tell it to go once ready, and wait until
    `finished()`; the monotonic times of the go and of the end."""
    with harness.process(command, cpu=0, pipes=True, log=data / "worker.log") as proc:
        harness.read_line(proc, timeout=60)
        assert proc.stdin is not None
        start = time.monotonic()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        end = harness.wait_until(finished, timeout=600)
    return start, end


async def pgqueuer_backlog(url: str, tasks: int) -> None:
    """PgQueuer's tables in the database `url`, with `tasks` no-op jobs queued."""
    import psycopg
    from pgqueuer import PsycopgDriver, Queries

    async with await psycopg.AsyncConnection.connect(libpq(url), autocommit=True) as conn:
        queries = Queries(PsycopgDriver(conn))
        await queries.install()
        for start in range(0, tasks, 1000):
            size = min(1000, tasks - start)
            await queries.enqueue(["noop"] * size, [None] * size, [0] * size)


def procrastinate_app(url: str) -> Any:
    """A Procrastinate app on the database `url`, with the no-op task `noop`."""
    import procrastinate

    # It warns of an app made in `__main__` (tasks found by their module's name): these
    # tasks have names of their own.
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=libpq(url)))

    async def noop() -> None:
        """Nothing."""

    app.task(name="noop")(noop)
    return app


def procrastinate_backlog(url: str, tasks: int) -> None:
    """Procrastinate's schema in the database `url`, with `tasks` no-op jobs queued."""
    app = procrastinate_app(url)
    with app.open():
        app.schema_manager.apply_schema()
        noop = app.tasks["noop"]
        for start in range(0, tasks, 1000):
            noop.batch_defer(*({} for _ in range(min(1000, tasks - start))))


# -- the children -------------------------------------------------------------------------


def pgqueuer_child(url: str, batch: int) -> None:
    """PgQueuer's consumer with a no-op entrypoint, started on "go"."""
    import psycopg
    from pgqueuer import PgQueuer, PsycopgDriver
    from pgqueuer.models import Job

    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(libpq(url), autocommit=True)
        pgq = PgQueuer(PsycopgDriver(conn))

        @pgq.entrypoint("noop")
        async def noop(job: Job) -> None:
            """Nothing."""

        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        await pgq.run(batch_size=batch)

    asyncio.run(main())


def procrastinate_child(url: str, concurrency: int) -> None:
    """Procrastinate's worker at `concurrency`, started on "go"."""
    app = procrastinate_app(url)

    async def main() -> None:
        async with app.open_async():
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            await app.run_worker_async(concurrency=concurrency, wait=True)

    asyncio.run(main())


# -- figures ------------------------------------------------------------------------------


def best(rates: dict[Drain, list[float]], system: str, run: int) -> float:
    """The best rate of `system`'s configurations in run `run`."""
    return max(found[run] for drain, found in rates.items() if drain.system == system)


def main() -> None:
    parser = arguments(__doc__, runs=3)
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks queued per run")
    parser.add_argument("--concurrency", type=integers, default=[8, 64])
    parser.add_argument("--postgres", default=LOCAL_POSTGRES, help="the server's URL")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--level", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        system, url = options.child
        child = pgqueuer_child if system == "pgqueuer" else procrastinate_child
        return child(url, options.level)
    server, why_not = postgres_server(options.postgres)
    concurrency = options.concurrency
    levels = "|".join(map(str, concurrency))
    settings: dict[str, Any] = {
        "runs": options.runs,
        "tasks": options.tasks,
        "backstop": f"backstop worker's runner, concurrency {levels}",
        "pgqueuer": f"PgQueuer.run(batch_size={'|'.join(map(str, PGQUEUER_BATCHES))})",
        "procrastinate": f"run_worker_async(concurrency={PROCRASTINATE_DEFAULT}|{concurrency[0]})",
        "pinning": "a worker process on CPU 0 (two: CPU 0 and 1); the server unpinned",
    }
    header(
        "pg_drain: no-op tasks per second on PostgreSQL, Backstop vs PgQueuer, Procrastinate",
        settings,
    )
    report = Report("pg_drain", settings)
    if not server:
        report.note(why_not)
        report.save(options.json)
        return
    drains = plan(concurrency)
    rates: dict[Drain, list[float]] = defaultdict(list)
    for run in range(options.runs):
        for drain in rotated(drains, run):
            rates[drain].append(measure(drain, options.tasks, server))
            print(f"  run {run + 1}: {drain.label:<34} {rates[drain][-1]:8,.0f}/s", flush=True)
    for drain in drains:
        if drain.system != "backstop":
            report.add(Figure(drain.label, median(rates[drain]), "tasks/s"))
    runs = range(options.runs)
    for drain in drains:
        if drain.system != "backstop":
            continue
        ours = rates[drain]
        if drain.processes > 1:
            one = rates[dataclasses.replace(drain, processes=1)]
            add(report, drain, ours, one, "one process", "11", 1.6)
            continue
        procrastinate = [best(rates, "procrastinate", run) for run in runs]
        pgqueuer = [best(rates, "pgqueuer", run) for run in runs]
        add(report, drain, ours, procrastinate, "procrastinate's best", "9", 3.0)
        add(report, drain, ours, pgqueuer, "pgqueuer's best", "10", 1.0)
    report.save(options.json)


def add(
    report: Report,
    drain: Drain,
    ours: list[float],
    theirs: list[float],
    name: str,
    target: str,
    goal: float,
) -> None:
    ratio = median(a / b for a, b in zip(ours, theirs, strict=True))
    report.add(
        Figure(
            f"{drain.label} vs {name}",
            median(ours),
            "tasks/s",
            peer=name,
            peer_value=median(theirs),
            ratio=ratio,
            target=target,
            goal=f">= {goal:.1f}x",
            met=ratio >= goal,
        )
    )


if __name__ == "__main__":
    main()
