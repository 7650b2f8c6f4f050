"""Scale: claim throughput with a small and a large history of finished tasks.

    .venv/bin/python -m bench.scale [--runs 5] [--history 10000,1000000] [--tasks 5000]
                                    [--json out.json]

Two database files get `--history` succeeded tasks (each with its attempt) written straight
into the tables with sqlite3's executemany (the schema is the migrations'). Then, in turn on
each file (alternating, `--runs` times), `--tasks` tasks are queued (`harness.backlog`: each
with its own creation time, as the service creates them) and this process claims
and completes them through the store as the runner's pipeline does: each transaction records
the outcomes of the last batch (`outcomes.record`) and claims the next 100
(`leases.claim_due`). Only that loop is timed for target 5; the run's tasks are deleted
afterwards so the history stays the size it says. The WAL is checkpointed after the enqueue
and after the delete, so that neither's pages are written back inside the timed loop. The
enqueue (one transaction, its checkpoint included) is timed too and printed without a
target: task ids are random, so at a million tasks each new one lands on a random page of
the id index.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.harness import backlog, database_file
from bench.report import Figure, Report, arguments, header, integers, median
from store import leases, migrate, outcomes
from store.engine import Database, default_url
from store.models import Claim
from store.outcomes import Outcome
from store.timeutil import utcnow

BATCH = 100
STAMP = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy stores a (naive UTC) datetime on SQLite


def build(data: Path, history: int) -> Database:
    """A migrated database with `history` succeeded tasks, a second apart, oldest first."""
    db = Database.from_url(default_url(data))
    migrate.upgrade(db)
    start = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=history)
    # Random ids as Backstop makes them, inserted in order: the index is built much faster.
    ids = sorted(str(uuid.uuid4()) for _ in range(history))

    def rows() -> Iterator[tuple[str, str]]:
        for i, task_id in enumerate(ids):
            yield task_id, (start + timedelta(seconds=i)).strftime(STAMP)

    with closing(sqlite3.connect(database_file(data), isolation_level=None)) as conn:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-1000000")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO task (id, name, status, queue, priority, args, kwargs, attempts,"
            " max_attempts, created_at, scheduled_at, started_at, finished_at, lease_token,"
            " expirations) VALUES (?1, 'bench.noop', 'succeeded', 'default', 0, '[]', '{}',"
            " 1, 5, ?2, ?2, ?2, ?2, 1, 0)",
            rows(),
        )
        conn.execute(
            "INSERT INTO attempt (task_id, task_created_at, number, started_at, finished_at,"
            " outcome, worker) SELECT id, created_at, 1, started_at, finished_at, 'succeeded',"
            " 'history' FROM task"
        )
        conn.execute("COMMIT")
        # No ANALYZE: a Backstop database never gets one, and statistics change the plans.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


def rates(db: Database, data: Path, tasks: int) -> tuple[float, float]:
    """Tasks per second enqueued (one transaction, then a checkpoint), and claimed and
    completed in batches of 100, straight through the store."""
    first = utcnow().replace(tzinfo=None).strftime(STAMP)  # after the whole history
    start = time.perf_counter()
    with db.write() as conn:
        backlog(conn, "bench.noop", tasks)
    # The enqueue's pages (random ones in the index of task ids) go to the database file
    # now, not in a checkpoint that would fall inside the timed claims.
    checkpoint(data)
    enqueued = tasks / (time.perf_counter() - start)
    start = time.perf_counter()
    done = 0
    claimed: list[Claim] = []
    while True:
        with db.write() as conn:
            now = utcnow()
            outcomes.record(conn, [Outcome(c.lease, c.attempts, now) for c in claimed])
            done += len(claimed)
            claimed = leases.claim_due(conn, "bench", BATCH, lease_seconds=60)
        if not claimed:
            break
    elapsed = time.perf_counter() - start
    if done != tasks:
        raise RuntimeError(f"claimed {done} of {tasks} tasks")
    with closing(sqlite3.connect(database_file(data))) as raw, raw:
        raw.execute("PRAGMA foreign_keys=ON")  # the attempts go with their tasks
        raw.execute("DELETE FROM task WHERE created_at >= ?", (first,))
    checkpoint(data)
    return enqueued, tasks / elapsed


def checkpoint(data: Path) -> None:
    """Copy the WAL into the database file and empty it."""
    with closing(sqlite3.connect(database_file(data))) as raw:
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def main() -> None:
    parser = arguments(__doc__, runs=5)
    parser.add_argument("--history", type=integers, default=[10_000, 1_000_000])
    parser.add_argument("--tasks", type=int, default=5_000, help="tasks claimed per run")
    options = parser.parse_args()
    small, large = options.history
    settings = {"runs": options.runs, "history": options.history, "tasks": options.tasks}
    header("scale: claim and complete (store calls, batches of 100) vs history size", settings)
    report = Report("scale", settings)
    with tempfile.TemporaryDirectory() as folder:
        dbs: dict[int, tuple[Database, Path]] = {}
        for size in (small, large):
            data = Path(folder) / str(size)
            data.mkdir()
            started = time.perf_counter()
            dbs[size] = (build(data, size), data)
            print(f"  built {size:,} finished tasks in {time.perf_counter() - started:.1f}s")
        enqueues: dict[int, list[float]] = defaultdict(list)
        claims: dict[int, list[float]] = defaultdict(list)
        for run in range(options.runs):
            for size in (small, large) if run % 2 == 0 else (large, small):
                db, data = dbs[size]
                enqueued, claimed = rates(db, data, options.tasks)
                enqueues[size].append(enqueued)
                claims[size].append(claimed)
        for db, _ in dbs.values():
            db.dispose()
    for what, found, target in (("claim+complete", claims, "5"), ("enqueue", enqueues, "")):
        ratio = median(a / b for a, b in zip(found[large], found[small], strict=True))
        report.add(Figure(f"{what}, {small:,} history", median(found[small]), "tasks/s"))
        report.add(
            Figure(
                f"{what}, {large:,} history",
                median(found[large]),
                "tasks/s",
                peer=f"{small:,}",
                peer_value=median(found[small]),
                ratio=ratio,
                target=target,
                goal=">= 0.9x" if target else "",
                met=ratio >= 0.9 if target else None,
            )
        )
    report.save(options.json)


if __name__ == "__main__":
    main()
