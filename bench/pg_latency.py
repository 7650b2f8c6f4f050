"""Pickup latency on an idle PostgreSQL queue, from another process: enqueue to function start.

    .venv/bin/python -m bench.pg_latency [--samples 200] [--postgres URL] [--json out.json]

Two pickers, each in a new database of its own on the server (by default the local one),
sampled in turn in a rotated order with random idle gaps of 50-150 ms:

- Backstop: `backstop worker` (default settings: it LISTENs, and polls every 0.5 s as the
  fallback) runs the task; this process enqueues through a `TaskClient`, whose commit sends
  the NOTIFY. The function appends its start time to a file (perf_counter is
  CLOCK_MONOTONIC: one clock for every process of the machine).
- PgQueuer (when the `pgqueuer` package is installed: `pip install pgqueuer`): its consumer
  in its own process (`PgQueuer.run()` at its defaults: LISTEN/NOTIFY, batch size 10), on
  psycopg 3 as Backstop is; this process enqueues with `Queries.enqueue`. Its entrypoint
  appends its start time to a file in the same way.

The clock starts before the enqueue call, so the commit is included. Nothing is pinned.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from app.backstop import Backstop
from app.enqueue import TaskClient
from app.settings import Settings
from app.tasks.registry import registry
from bench import harness, tasks
from bench.drain import LOCAL_POSTGRES, postgres_server
from bench.latency import Sampler, in_file, sample_rounds, wait_for
from bench.report import Figure, Report, arguments, header, median, percentile
from store.engine import Database, temporary_database


def libpq(url: str) -> str:
    """A SQLAlchemy `postgresql+psycopg://` URL as the libpq URI psycopg takes."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def new_database(server: str, prefix: str) -> Iterator[str]:
    with temporary_database(server, prefix) as url:
        yield url


def backstop_sampler(client: TaskClient, stamps: Path) -> Sampler:
    async def sample() -> float:
        key = uuid.uuid4().hex

        def enqueue() -> float:
            start = time.perf_counter()
            client.add_task(tasks.stamp, key, path=str(stamps))
            return start

        start = await asyncio.to_thread(enqueue)
        return await wait_for(in_file(stamps, key)) - start

    return sample


def pgqueuer_available() -> bool:
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        return False
    return True


async def pgqueuer_producer(url: str) -> tuple[Any, Any]:
    """PgQueuer's tables installed in the database `url`, and a `Queries` to enqueue with."""
    import psycopg
    from pgqueuer import PsycopgDriver, Queries

    conn = await psycopg.AsyncConnection.connect(libpq(url), autocommit=True)
    queries = Queries(PsycopgDriver(conn))
    await queries.install()
    return conn, queries


def pgqueuer_sampler(queries: Any, stamps: Path) -> Sampler:
    async def sample() -> float:
        key = uuid.uuid4().hex
        start = time.perf_counter()
        await queries.enqueue("stamp", key.encode())
        return await wait_for(in_file(stamps, key)) - start

    return sample


def pgqueuer_consumer(url: str, stamps: str) -> None:
    """PgQueuer's consumer at its defaults, with an entrypoint that notes its start."""
    import psycopg
    from pgqueuer import PgQueuer, PsycopgDriver
    from pgqueuer.models import Job

    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(libpq(url), autocommit=True)
        pgq = PgQueuer(PsycopgDriver(conn))

        @pgq.entrypoint("stamp")
        async def stamp(job: Job) -> None:
            tasks.stamp((job.payload or b"").decode(), stamps)

        await pgq.run()

    asyncio.run(main())


async def measure(root: Path, server: str, samples: int) -> dict[str, list[float]]:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(new_database(server, "backstop_bench"))
        prepared = Backstop(Settings(data_dir=root, database_url=url))
        prepared.prepare()  # before the worker starts: one process migrates
        prepared.close()
        db = Database.from_url(url)
        stack.callback(db.dispose)
        client = TaskClient(db, registry)
        stack.callback(client.close)
        env = harness.backstop_env(root, DATABASE_URL=url)
        worker = [str(harness.BIN / "backstop"), "worker"]
        stack.enter_context(harness.process(worker, env=env, log=root / "worker.log"))
        pickers: dict[str, Sampler] = {
            "backstop": backstop_sampler(client, root / "backstop.stamps")
        }
        if pgqueuer_available():
            pgq_url = stack.enter_context(new_database(server, "pgqueuer_bench"))
            conn, queries = await pgqueuer_producer(pgq_url)
            consumer = [
                sys.executable,
                "-m",
                "bench.pg_latency",
                "--pgqueuer-consumer",
                pgq_url,
                str(root / "pgqueuer.stamps"),
            ]
            stack.enter_context(harness.process(consumer, log=root / "pgqueuer.log"))
            pickers["pgqueuer"] = pgqueuer_sampler(queries, root / "pgqueuer.stamps")
        else:
            conn = None
        try:
            return await sample_rounds(pickers, samples)
        finally:
            if conn is not None:
                await conn.close()


def main() -> None:
    parser = arguments(__doc__, runs=1)
    parser.add_argument("--samples", type=int, default=200, help="samples per picker")
    parser.add_argument("--postgres", default=LOCAL_POSTGRES, help="the server's URL")
    parser.add_argument("--pgqueuer-consumer", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.pgqueuer_consumer:
        return pgqueuer_consumer(*options.pgqueuer_consumer)
    server, why_not = postgres_server(options.postgres)
    settings: dict[str, Any] = {
        "samples": options.samples,
        "gap": "50-150 ms",
        "backstop": "backstop worker, default settings (LISTEN; polls every 0.5 s)",
        "pgqueuer": "PgQueuer.run() defaults" if pgqueuer_available() else "not installed",
    }
    header(
        "pg_latency: idle PostgreSQL queue, enqueue in one process to start in another", settings
    )
    report = Report("pg_latency", settings)
    if not server:
        report.note(why_not)
        report.save(options.json)
        return
    with tempfile.TemporaryDirectory() as folder:
        found = asyncio.run(measure(Path(folder), server, options.samples))
    ours = found["backstop"]
    peer = found.get("pgqueuer")
    p50 = median(ours)
    if peer:
        peer_p50 = median(peer)
        report.add(
            Figure(
                "backstop p50",
                p50,
                "ms",
                peer="pgqueuer",
                peer_value=peer_p50,
                ratio=p50 / peer_p50,
                target="8",
                goal="p50 <= 5 ms",
                met=p50 <= 5.0,
            )
        )
    else:
        report.add(Figure("backstop p50", p50, "ms", target="8", goal="p50 <= 5 ms", met=p50 <= 5))
        report.note("PgQueuer is not installed (pip install pgqueuer): Backstop's figure alone")
    report.add(Figure("backstop p90", percentile(ours, 90), "ms"))
    if peer:
        report.add(Figure("pgqueuer p50", median(peer), "ms"))
        report.add(Figure("pgqueuer p90", percentile(peer, 90), "ms"))
    report.save(options.json)


if __name__ == "__main__":
    main()
