"""Pickup latency on an idle queue: from enqueueing one task to its function starting.

    .venv/bin/python -m bench.latency [--samples 80] [--huey-delay SECONDS] [--json out.json]

Four pickers, each idle between samples (random gaps of 50-150 ms), sampled in turn in a
rotated order so they share the machine's moments:

- in-process, sync and async: a Backstop runner in this process (default settings); a
  thread calls `tasks.add_task` (which commits) as an endpoint would, and the function
  notes time.perf_counter as it starts.
- another process: `backstop worker` (default settings) runs the task; this process
  enqueues through a `TaskClient` on the same file. The function appends its start time to
  a file (perf_counter is CLOCK_MONOTONIC: one clock for every process of the machine).
- Huey: SqliteHuey's consumer in its own process with Huey's defaults (1 worker thread,
  polling the queue every 0.1 s, backing off by 1.15x to 10 s while idle; `--huey-delay`
  polls every that many seconds instead, without backoff); this process enqueues.

The clock starts before the enqueue call, so the commit is included. Nothing is pinned.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from app.backstop import Backstop, open_database
from app.enqueue import TaskClient
from app.settings import Settings
from app.tasks.registry import registry
from bench import harness, tasks
from bench.huey_app import Bench
from bench.report import Figure, Report, arguments, header, median, percentile, rotated

WARMUP = 3
Sampler = Callable[[], Awaitable[float]]


async def sample_rounds(pickers: dict[str, Sampler], samples: int) -> dict[str, list[float]]:
    """Each sampler's latencies in ms, `samples` each after `WARMUP` rounds: the samplers
    take turns in a rotated order, an idle pause of 50-150 ms before each sample."""
    found: dict[str, list[float]] = {name: [] for name in pickers}
    for round_ in range(WARMUP + samples):
        for name in rotated(list(pickers), round_):
            await asyncio.sleep(random.uniform(0.05, 0.15))
            latency = await pickers[name]()
            if round_ >= WARMUP:
                found[name].append(latency * 1000)
    return found


TIMEOUT = 15.0


async def wait_for(found: Callable[[], float | None]) -> float:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        stamp = found()
        if stamp is not None:
            return stamp
        await asyncio.sleep(0.0005)
    raise RuntimeError(f"task not started after {TIMEOUT}s")


def in_file(path: Path, key: str) -> Callable[[], float | None]:
    def found() -> float | None:
        if not path.exists():
            return None
        for line in path.read_text().splitlines():
            name, _, stamp = line.partition(" ")
            if name == key:
                return float(stamp)
        return None

    return found


def timed(enqueue: Callable[[], object]) -> Callable[[], float]:
    """`enqueue` called from a thread (as in a sync endpoint); the time it was called."""

    def call() -> float:
        start = time.perf_counter()
        enqueue()
        return start

    return call


def local_sampler(backstop: Backstop, kind: str) -> Sampler:
    async def sample() -> float:
        key = uuid.uuid4().hex
        if kind == "sync":
            enqueue = timed(lambda: backstop.tasks.add_task(tasks.stamp, key))
        else:
            enqueue = timed(lambda: backstop.tasks.add_task(tasks.async_stamp, key))
        start = await asyncio.to_thread(enqueue)
        return await wait_for(lambda: tasks.STAMPS.get(key)) - start

    return sample


def remote_sampler(client: TaskClient, stamps: Path) -> Sampler:
    async def sample() -> float:
        key = uuid.uuid4().hex
        start = await asyncio.to_thread(
            timed(lambda: client.add_task(tasks.stamp, key, path=str(stamps)))
        )
        return await wait_for(in_file(stamps, key)) - start

    return sample


def huey_sampler(bench: Bench, stamps: Path) -> Sampler:
    async def sample() -> float:
        key = uuid.uuid4().hex
        start = await asyncio.to_thread(timed(lambda: bench.stamp(str(stamps), key)))
        return await wait_for(in_file(stamps, key)) - start

    return sample


async def measure(root: Path, samples: int, huey_delay: float | None) -> dict[str, list[float]]:
    local = Backstop(Settings(data_dir=root / "local", task_modules=["bench.tasks"]))
    local.prepare()
    remote_dir = root / "remote"
    remote_db = open_database(Settings(data_dir=remote_dir))
    remote = Backstop(Settings(data_dir=remote_dir))
    remote.prepare()  # before the worker starts: one process migrates, not two at once
    remote.close()
    client = TaskClient(remote_db, registry)
    huey_file = root / "huey.db"
    bench = Bench(str(huey_file))
    consumer = [sys.executable, "-m", "bench.latency", "--huey-consumer", str(huey_file)]
    if huey_delay is not None:
        consumer += ["--huey-delay", str(huey_delay)]
    worker = [str(harness.BIN / "backstop"), "worker"]
    env = harness.backstop_env(remote_dir)
    await local.runner.start()
    try:
        with (
            harness.process(worker, env=env, log=root / "worker.log"),
            harness.process(consumer, log=root / "huey.log"),
        ):
            pickers: dict[str, Sampler] = {
                "in-process sync": local_sampler(local, "sync"),
                "in-process async": local_sampler(local, "async"),
                "another process": remote_sampler(client, root / "remote.stamps"),
                "huey": huey_sampler(bench, root / "huey.stamps"),
            }
            return await sample_rounds(pickers, samples)
    finally:
        await local.runner.stop()
        local.close()
        remote_db.dispose()


def huey_consumer(filename: str, delay: float | None) -> None:
    bench = Bench(filename)
    polling = {} if delay is None else {"initial_delay": delay, "max_delay": delay, "backoff": 1}
    bench.huey.create_consumer(**polling).run()


def main() -> None:
    parser = arguments(__doc__, runs=1)
    parser.add_argument("--samples", type=int, default=80, help="samples per picker")
    parser.add_argument("--huey-delay", type=float, help="Huey polling interval (no backoff)")
    parser.add_argument("--huey-consumer", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.huey_consumer:
        return huey_consumer(options.huey_consumer, options.huey_delay)
    huey = "defaults (0.1 s, backoff 1.15x to 10 s)"
    if options.huey_delay is not None:
        huey = f"every {options.huey_delay:g} s, no backoff"
    settings = {
        "samples": options.samples,
        "gap": "50-150 ms",
        "backstop": "default settings",
        "huey polling": huey,
    }
    header("latency: idle-queue pickup, enqueue to function start", settings)
    report = Report("latency", settings)
    with tempfile.TemporaryDirectory() as folder:
        found = asyncio.run(measure(Path(folder), options.samples, options.huey_delay))
    huey_p50 = median(found["huey"])
    limits = {"in-process sync": 5.0, "in-process async": 5.0, "another process": 20.0}
    for name, values in found.items():
        p50, p95 = median(values), percentile(values, 95)
        if name == "huey":
            report.add(Figure(f"{name} p50", p50, "ms"))
        else:
            report.add(
                Figure(
                    f"{name} p50",
                    p50,
                    "ms",
                    peer="huey",
                    peer_value=huey_p50,
                    ratio=p50 / huey_p50,
                    target="4",
                    goal=f"p50 <= {limits[name]:g} ms",
                    met=p50 <= limits[name],
                )
            )
        report.add(Figure(f"{name} p95", p95, "ms"))
    report.save(options.json)


if __name__ == "__main__":
    main()
