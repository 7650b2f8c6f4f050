"""The task functions the benchmarks run, registered under `bench.*` names.

Worker processes import them with `BACKSTOP_TASK_MODULES=bench.tasks`.
"""

from __future__ import annotations

import time

from app import task

# When each `bench.stamp` call started (time.perf_counter), by key, for callers in-process.
STAMPS: dict[str, float] = {}


@task(name="bench.noop")
def noop() -> None:
    """Nothing, on a thread: what is measured is the handing over."""


@task(name="bench.async_noop")
async def async_noop() -> None:
    """Nothing, on the event loop."""


@task(name="bench.stamp")
def stamp(key: str, path: str = "") -> None:
    """Note when it started: appended to `path` (another process reads it) or in STAMPS.

    perf_counter is CLOCK_MONOTONIC on Linux, one clock for every process of the machine.
    """
    now = time.perf_counter()
    if path:
        with open(path, "a") as out:
            out.write(f"{key} {now!r}\n")
    else:
        STAMPS[key] = now


@task(name="bench.async_stamp")
async def async_stamp(key: str) -> None:
    """`stamp`, on the event loop, in-process only."""
    STAMPS[key] = time.perf_counter()
