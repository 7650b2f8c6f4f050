"""Tasks the tests run; servers started by the tests import this module through
`BACKSTOP_TASK_MODULES=tests.support.tasks`.

Their side effects go to files under the data folder, so a test can see what ran, and how
often, across process boundaries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tenacity import retry_if_exception, retry_if_exception_type, wait_fixed

from app import TaskContext, task


class Flaky(Exception):
    """Raised on purpose by the tasks below."""


class Fatal(Exception):
    """An error the test tasks' policies do not retry."""


def _mark(ctx: TaskContext, folder: str, line: str) -> None:
    target = Path(ctx.settings.data_dir) / folder
    target.mkdir(parents=True, exist_ok=True)
    with (target / f"{ctx.task_id}.txt").open("a", encoding="utf-8") as out:
        out.write(line + "\n")


@task(name="test.noop")
def noop() -> None:
    """Does nothing."""


@task(name="test.echo")
def echo(value: int, ctx: TaskContext) -> dict[str, int]:
    """Returns its argument and the attempt number."""
    return {"value": value, "attempt": ctx.attempt}


@task(name="test.async_echo")
async def async_echo(value: int, ctx: TaskContext) -> dict[str, int]:
    """The async twin of `test.echo`."""
    await asyncio.sleep(0)
    return {"value": value, "attempt": ctx.attempt}


@task(name="test.whoami")
def whoami(ctx: TaskContext) -> dict[str, Any]:
    """Returns what its context says about the task."""
    return {"task_id": ctx.task_id, "attempt": ctx.attempt}


@task(name="test.async_whoami")
async def async_whoami(ctx: TaskContext) -> dict[str, Any]:
    """The async twin of `test.whoami`."""
    await asyncio.sleep(0)
    return {"task_id": ctx.task_id, "attempt": ctx.attempt}


@task(name="test.when")
def when(at: datetime) -> dict[str, str]:
    """Reports the type and value of the datetime it received."""
    return {"type": type(at).__name__, "iso": at.isoformat()}


@task(name="test.rich")
def rich() -> dict[str, Any]:
    """Returns values JSON has no type for: a datetime, a tuple, a set."""
    return {"at": datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC), "pair": (1, 2), "one": {"x"}}


@task(name="test.anything")
def anything(value: Any = None, *rest: int, **extra: str) -> Any:
    """Returns its argument unchanged; accepts any JSON value."""
    return value


@task(
    name="test.flaky",
    max_attempts=5,
    retry=retry_if_exception_type(Flaky),
    wait=wait_fixed(2),
)
def flaky(failures: int, ctx: TaskContext) -> int:
    """Fails `failures` times, then succeeds; records each attempt."""
    _mark(ctx, "attempts", str(ctx.attempt))
    if ctx.attempt <= failures:
        raise Flaky(f"attempt {ctx.attempt} of {failures} planned failures")
    return ctx.attempt


@task(name="test.fatal", max_attempts=5, retry=retry_if_exception_type(Flaky))
def fatal() -> None:
    """Fails with an error its policy does not retry."""
    raise Fatal("not worth retrying")


@task(name="test.sleep", timeout=30)
def sleep(seconds: float, ctx: TaskContext) -> float:
    """Sleeps (in slices, so a cancel or timeout is seen), recording start and finish."""
    _mark(ctx, "runs", f"start {ctx.attempt}")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not ctx.cancelled:
        time.sleep(min(0.02, seconds))
    _mark(ctx, "runs", f"done {ctx.attempt}")
    return seconds


@task(name="test.gate", timeout=60)
def gate(path: str, ctx: TaskContext) -> str:
    """Waits until the file `path` exists (or a cancel), recording start and finish."""
    _mark(ctx, "runs", f"start {ctx.attempt}")
    while not os.path.exists(path) and not ctx.cancelled:
        time.sleep(0.02)
    _mark(ctx, "runs", f"done {ctx.attempt}")
    return path


@task(name="test.async_sleep", timeout=30)
async def async_sleep(seconds: float, ctx: TaskContext) -> float:
    """The async twin of `test.sleep`."""
    _mark(ctx, "runs", f"start {ctx.attempt}")
    await asyncio.sleep(seconds)
    _mark(ctx, "runs", f"done {ctx.attempt}")
    return seconds


@task(name="test.slow_timeout", timeout=0.2, max_attempts=2, wait=wait_fixed(0))
def slow_timeout(ctx: TaskContext) -> None:
    """Runs past its 0.2 s timeout, stopping once it sees the cancel."""
    while not ctx.cancelled:
        time.sleep(0.01)


@task(name="test.async_slow_timeout", timeout=0.2, max_attempts=2, wait=wait_fixed(0))
async def async_slow_timeout() -> None:
    """Runs past its 0.2 s timeout (and is cancelled by it)."""
    await asyncio.sleep(30)


@task(name="test.crash", max_attempts=5, wait=wait_fixed(0))
def crash(ctx: TaskContext) -> None:
    """Kills the process running it at once, as a segfaulting extension would; records each
    try. Only for tests that run it in a subprocess."""
    _mark(ctx, "crashes", str(ctx.attempt))
    os._exit(1)


@task(name="test.stubborn_timeout", timeout=0.2, max_attempts=2, wait=wait_fixed(0))
def stubborn_timeout(ctx: TaskContext) -> None:
    """Runs past its 0.2 s timeout and ignores the cancel for a while (0.5 s in all)."""
    _mark(ctx, "runs", f"start {ctx.attempt}")
    time.sleep(0.5)
    _mark(ctx, "runs", f"done {ctx.attempt}")


def _raising_predicate(_error: BaseException) -> bool:
    raise KeyError("the predicate looked for a field that is not there")


@task(name="test.bad_policy", max_attempts=3, retry=retry_if_exception(_raising_predicate))
def bad_policy() -> None:
    """Fails, and its retry predicate raises while deciding what to do."""
    raise Flaky("fails")


class Escape(BaseException):
    """Not an Exception: what a careless library might raise (the way SystemExit is)."""


@task(name="test.async_escape", max_attempts=1)
async def async_escape() -> None:
    raise Escape("out of band")


@task(name="test.escape", max_attempts=1)
def escape() -> None:
    raise Escape("out of band")


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


@task(name="test.unprintable", max_attempts=1)
def unprintable() -> None:
    raise Unprintable()


# Set by a test before it runs `test.async_swallow`: the function sets it once it waits.
SWALLOW_STARTED: list[asyncio.Event] = []


@task(name="test.async_swallow", max_attempts=1)
async def async_swallow() -> str:
    """Swallows its cancellation and returns normally (as some libraries' cleanup does)."""
    try:
        SWALLOW_STARTED[0].set()
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        return "swallowed"
    return "slept"


@task(name="test.nap")
def nap(seconds: float) -> None:
    """Sleeps `seconds`: work that takes a while and leaves nothing behind but its outcome."""
    time.sleep(seconds)


@task(name="test.progress_storm")
def progress_storm(count: int, ctx: TaskContext) -> int:
    """Reports its progress `count` times, as fast as it can."""
    for done in range(1, count + 1):
        ctx.progress(done, count, "storming")
    return count


@task(
    name="test.gated_retry",
    max_attempts=3,
    retry=retry_if_exception_type(Flaky),
    wait=wait_fixed(0.2),
)
def gated_retry(gates: str, ctx: TaskContext) -> int:
    """Reports progress, then waits for the file `gates`/<attempt> (the test opens each gate
    once it has seen the attempt run); the first attempt then fails, the second succeeds."""
    ctx.progress(1, 2, f"attempt {ctx.attempt} at its gate")
    gate = Path(gates) / str(ctx.attempt)
    deadline = time.monotonic() + 30
    while not gate.exists() and not ctx.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    if ctx.attempt == 1:
        raise Flaky("the first attempt fails")
    return ctx.attempt


chatter = logging.getLogger("tests.support.chatter")


@task(name="test.chatty")
def chatty(word: str) -> str:
    """Logs a line of its own (which carries its task id and attempt), on a worker thread;
    its own `extra` names a field of Backstop's too, which must not clash."""
    chatter.info("saying %s", word, extra={"queue": "its own"})
    return word


@task(name="test.async_chatty")
async def async_chatty(word: str) -> str:
    """`test.chatty` on the event loop, from a child asyncio task as well."""
    chatter.info("saying %s", word)
    await asyncio.create_task(_echo_later(word))
    return word


async def _echo_later(word: str) -> None:
    chatter.info("still saying %s", word)


@task(name="test.fan_out")
def fan_out(count: int, ctx: TaskContext) -> list[str]:
    """Adds `count` follow-ups (`test.noop`) and one `test.noop` after all of them, then
    marks under `returned/` that its function returned (the test then knows that whatever
    follows is the runner's, not the function's); returns the follow-ups' ids."""
    ids = [ctx.add_task(noop) for _ in range(count)]
    ids.append(ctx.add_task("test.noop", after=ids))
    _mark(ctx, "returned", f"attempt {ctx.attempt}")
    return ids


@task(name="test.add_then_fail", max_attempts=1)
def add_then_fail(ctx: TaskContext) -> None:
    """Adds a follow-up, then fails for good: the follow-up must never exist."""
    ctx.add_task(noop)
    raise Fatal("after adding a follow-up")


@task(name="test.add_unknown", max_attempts=1)
def add_unknown(ctx: TaskContext) -> None:
    """Adds a follow-up of a task nobody registered: the attempt fails at that call."""
    ctx.add_task("test.nobody_registered_this")


@task(name="test.fan_out_gated")
def fan_out_gated(count: int, gate: str, ctx: TaskContext) -> list[str]:
    """`test.fan_out` once the file `gate` exists (a test holds it shut until it is ready
    for the function to return), marking under `started/` that it waits."""
    _mark(ctx, "started", f"attempt {ctx.attempt}")
    deadline = time.monotonic() + 30
    while not Path(gate).exists():
        if time.monotonic() > deadline:
            raise Flaky(f"the gate {gate} never opened")
        time.sleep(0.01)
    return fan_out(count, ctx)
