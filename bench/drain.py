"""Drain: no-op tasks per second from a full queue, Backstop's runner against Huey's consumer.

    .venv/bin/python -m bench.drain [--runs 3] [--tasks 8000] [--concurrency 8,64]
                                    [--synchronous NORMAL,FULL] [--json out.json]

Each configuration is a fresh database with `--tasks` no-op tasks already queued and fresh
processes that import everything, say they are ready, and only then are told to go:

- Backstop: one runner process (Backstop's service, as `backstop worker` runs it) pinned to
  CPU 0, sync (`bench.noop`, on threads) and async (`bench.async_noop`, on the loop), at
  each `--concurrency`; and two runner processes on the same file, pinned to CPU 0 and 1.
  Done when no task is queued or running any more (polled every 5 ms with reads of the
  partial indexes); every task is then checked to have succeeded.
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
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import harness
from bench.report import Figure, Report, arguments, header, integers, median, rotated

HUEY_WORKERS = 4


@dataclass(frozen=True)
class Config:
    system: str  # "backstop" or "huey"
    synchronous: str
    kind: str = "sync"
    concurrency: int = HUEY_WORKERS
    processes: int = 1

    @property
    def label(self) -> str:
        if self.system == "huey":
            return f"huey {HUEY_WORKERS} threads {self.synchronous}"
        procs = f" x{self.processes} procs" if self.processes > 1 else ""
        return f"backstop {self.kind} c={self.concurrency}{procs} {self.synchronous}"


def configs(concurrency: list[int], modes: list[str]) -> list[Config]:
    # Huey at FULL always: it is Huey's default (it leaves SQLite's), the reference.
    found = [Config("huey", mode) for mode in sorted({*modes, "FULL"})]
    for mode in modes:
        kinds = ("sync", "async") if mode == "NORMAL" else ("sync",)
        levels = concurrency
        found += [Config("backstop", mode, kind, level) for kind in kinds for level in levels]
        if mode == "NORMAL":
            found.append(Config("backstop", mode, "sync", concurrency[0], processes=2))
    return found


# -- the parent ---------------------------------------------------------------------------


def measure(config: Config, tasks: int) -> float:
    """Tasks per second for one fresh run of `config`."""
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        if config.system == "huey":
            return drain_huey(config, data, tasks)
        return drain_backstop(config, data, tasks)


def drain_backstop(config: Config, data: Path, tasks: int) -> float:
    from app.service import open_database
    from app.settings import Settings
    from store import migrate

    name = "bench.noop" if config.kind == "sync" else "bench.async_noop"
    db = open_database(Settings(data_dir=data, sqlite_synchronous=config.synchronous))
    migrate.upgrade(db)
    with db.write() as conn:
        harness.backlog(conn, name, tasks)
    db.dispose()
    env = harness.backstop_env(
        data,
        concurrency=str(config.concurrency),
        sqlite_synchronous=config.synchronous,
    )
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
        end = harness.wait_finished(data, timeout=600)
    done = harness.succeeded(data)
    if done != tasks:
        raise RuntimeError(f"{config.label}: {done} of {tasks} tasks succeeded")
    return tasks / (end - start)


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
    header("drain: no-op tasks per second, Backstop runner vs Huey consumer", settings)
    report = Report("drain", settings)
    plan = configs(options.concurrency, modes)
    rates: dict[Config, list[float]] = defaultdict(list)
    for run in range(options.runs):
        for config in rotated(plan, run):
            rates[config].append(measure(config, options.tasks))
            print(f"  run {run + 1}: {config.label:<34} {rates[config][-1]:8,.0f}/s", flush=True)
    for config in plan:
        if config.system == "huey":
            report.add(Figure(config.label, median(rates[config]), "tasks/s"))
        elif config.processes > 1:
            one = Config("backstop", config.synchronous, config.kind, config.concurrency)
            compare(report, config, rates, one, "one process", target="3", goal=1.6)
        else:
            # Target 3 as the issue sets it: against Huey as it comes (FULL); then like for
            # like, both at the same `synchronous` (target 7 at FULL, where the two agree).
            target = "3" if config.synchronous == "NORMAL" else "7"
            compare(report, config, rates, Config("huey", "FULL"), "huey FULL", target, 3.0)
            if config.synchronous != "FULL":
                like = Config("huey", config.synchronous)
                compare(report, config, rates, like, f"huey {like.synchronous}", "", 3.0)
    report.save(options.json)


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
    from app.service import Backstop
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
