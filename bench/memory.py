"""Memory: a runner's RSS at start, after a warm-up, and after many no-op tasks.

    .venv/bin/python -m bench.memory [--tasks 400000] [--warmup 100000] [--kind sync]
                                     [--json out.json]

500,000 tasks in all by default, the issue's figure (a couple of minutes). The warm-up is the
first fifth: the SQLite page caches of the runner's connections (2 MiB each) fill over the
first tens of thousands of tasks (at 50,000 RSS was still 3-5 MiB short of where it stays
from about 90,000 on, in every run), then RSS stays flat. This process is the runner's (default
settings, a fresh database), and it keeps the runner fed: whenever fewer than 2,000 tasks
wait it enqueues 2,000 more in one transaction. RSS is VmRSS from /proc/self/status: at
start (service built, schema migrated, runner not started), after `--warmup` tasks, then
every 10% of the way; the peak is VmHWM. Growth is the final RSS against the warmed-up one:
the figure the target is about. The count of Python's allocated memory blocks is printed
alongside: flat means no Python object leaks, whatever SQLite's caches and the allocator
do to RSS.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from app.backstop import Backstop
from app.settings import Settings
from bench import harness
from bench.report import Figure, Report, arguments, header

BATCH = 2_000


def status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS: resident now, VmHWM: the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def mib(kib: int) -> float:
    return kib / 1024


async def feed(backstop: Backstop, data: Path, name: str, count: int) -> None:
    """Enqueue `count` tasks, 2,000 at a time, and return when every one has finished."""

    def enqueue(size: int) -> None:
        with backstop.db.write() as conn:
            harness.backlog(conn, name, size)
        backstop.runner.notify()

    sent = 0
    while True:
        waiting = await asyncio.to_thread(harness.unfinished, data)
        if sent >= count and waiting == 0:
            return
        if sent < count and waiting < BATCH:
            size = min(BATCH, count - sent)
            await asyncio.to_thread(enqueue, size)
            sent += size
        await asyncio.sleep(0.01)


async def measure(data: Path, tasks: int, warmup: int, kind: str, report: Report) -> None:
    backstop = Backstop(Settings(data_dir=data, task_modules=["bench.tasks"]))
    backstop.prepare()
    name = "bench.noop" if kind == "sync" else "bench.async_noop"
    start = status_kib("VmRSS")
    report.add(Figure("RSS at start", mib(start), "MiB"))
    await backstop.runner.start()
    try:
        await feed(backstop, data, name, warmup)
        warm = status_kib("VmRSS")
        warm_blocks = sys.getallocatedblocks()
        report.add(Figure(f"RSS after {warmup:,} tasks (warm)", mib(warm), "MiB"))
        step = max(tasks // 10, 1)
        done = 0
        while done < tasks:
            await feed(backstop, data, name, min(step, tasks - done))
            done += min(step, tasks - done)
            rss = mib(status_kib("VmRSS"))
            blocks = sys.getallocatedblocks()
            print(f"  {done:>9,} tasks  RSS {rss:6.1f} MiB  Python blocks {blocks:,}", flush=True)
        # A leak of Python objects shows here whatever the allocator does with RSS.
        blocks = sys.getallocatedblocks()
    finally:
        await backstop.runner.stop()
        backstop.close()
    report.add(
        Figure(
            "Python memory blocks after the run",
            blocks,
            "blocks",
            peer="warm",
            peer_value=warm_blocks,
            ratio=blocks / warm_blocks,
        )
    )
    final = status_kib("VmRSS")
    growth = final / warm - 1
    report.add(
        Figure(
            f"RSS after {warmup + tasks:,} tasks",
            mib(final),
            "MiB",
            peer="warm",
            peer_value=mib(warm),
            ratio=final / warm,
            target="6",
            goal="growth <= 5%",
            met=growth <= 0.05,
        )
    )
    report.add(Figure("RSS growth after warm-up", growth * 100, "%"))
    report.add(Figure("RSS peak (VmHWM)", mib(status_kib("VmHWM")), "MiB"))


def main() -> None:
    parser = arguments(__doc__, runs=1)
    parser.add_argument("--tasks", type=int, default=400_000, help="tasks after the warm-up")
    parser.add_argument("--warmup", type=int, default=100_000)
    parser.add_argument("--kind", choices=("sync", "async"), default="sync")
    options = parser.parse_args()
    settings = {"tasks": options.tasks, "warmup": options.warmup, "kind": options.kind}
    header("memory: runner RSS over many no-op tasks", settings)
    report = Report("memory", settings)
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(measure(Path(folder), options.tasks, options.warmup, options.kind, report))
    report.save(options.json)


if __name__ == "__main__":
    main()
