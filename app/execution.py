"""Running one claimed task and writing its outcome under its lease."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar

from pydantic_core import to_jsonable_python

from app.context import TaskContext
from app.registry import Registry, TaskSpec, finite
from app.retry import DEFAULT_POLICY, next_run_at
from app.settings import Settings
from app.threads import DaemonPool
from store import outcomes
from store.models import Lease, Task, lease_of
from store.timeutil import utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")


class Write(Protocol):
    """Runs `fn(conn, *args, **kwargs)` in a write transaction, off the event loop."""

    def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Awaitable[T]: ...


# Pauses between tries to record an outcome; after the last one the error propagates (the
# runner logs it, the lease lapses, and the task is reclaimed like after a crash).
RECORD_RETRIES: tuple[float | None, ...] = (0.1, 0.5, 2.0, 5.0, 10.0, None)


class TaskTimeout(TimeoutError):
    """An attempt ran past its task's `timeout`."""

    def __init__(self, timeout: float, straggler: asyncio.Future[Any] | None = None) -> None:
        super().__init__(f"timed out after {timeout:g}s")
        # A sync function's thread, still running: it cannot be killed, only asked to stop.
        self.straggler = straggler


class ResultNotJSON(TypeError):
    """A task returned something JSON cannot hold."""


class Executor:
    """Calls task functions and records what came of each attempt."""

    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        write: Write,
        on_finished: Callable[[Task], None],
        threads: DaemonPool,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self._write = write
        self._on_finished = on_finished
        self._threads = threads

    def context(self, task: Task) -> TaskContext:
        """The context a claimed task's function receives."""
        return TaskContext(task_id=task.id, attempt=task.attempts, settings=self.settings)

    async def execute(
        self,
        task: Task,
        ctx: TaskContext,
        *,
        inline: bool = False,
        now: datetime | None = None,
    ) -> None:
        """Run one attempt of a claimed task and record its outcome.

        `inline` calls a sync function on the caller's thread (tests: deterministic, but no
        timeout). `now` pins the clock of the outcome and of the retry decision.
        """
        lease = lease_of(task)
        spec: TaskSpec | None = None
        log.debug("task %s attempt %d: running %s", task.id, ctx.attempt, task.name)
        try:
            spec = self.registry.get(task.name)
            args, kwargs = spec.load(task.args, task.kwargs)
            if spec.context_param is not None:
                kwargs[spec.context_param] = ctx
            result = _json_result(await self._call(spec, args, kwargs, ctx, inline=inline))
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the runner is stopping past its grace: the stop releases the lease
            # Only the function was cancelled (by a cancel request): record the attempt;
            # the store turns it into `cancelled` since the request is on the row.
            await self._failed(task, lease, spec, asyncio.CancelledError("cancelled"), now=now)
            return
        except Exception as exc:
            if isinstance(exc, TaskTimeout) and exc.straggler is not None:
                # A thread cannot be killed. Until it returns the attempt is not over: the
                # task keeps its lease (the heartbeat renews it), so no retry runs beside
                # it, and its runner slot stays taken, so stuck threads cannot pile up.
                log.warning(
                    "task %s attempt %d: timed out; waiting for its thread to return",
                    task.id,
                    ctx.attempt,
                )
                await asyncio.wait([exc.straggler])
            await self._failed(task, lease, spec, exc, now=now)
            return
        finished = await self._record(outcomes.mark_succeeded, task, lease, result, now=now)
        if finished is None:
            log.warning(
                "task %s attempt %d: lease lost; success not recorded", task.id, ctx.attempt
            )
            return
        log.info("task %s attempt %d: %s", task.id, ctx.attempt, finished.status)
        self._on_finished(finished)

    async def _call(
        self,
        spec: TaskSpec,
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: TaskContext,
        *,
        inline: bool,
    ) -> Any:
        if spec.is_async:
            work = asyncio.ensure_future(spec.fn(*args, **kwargs))
            ctx._on_stop.append(work.cancel)
            if ctx.cancelled:
                # Asked to stop between the claim and now: `_request_stop` ran before this
                # hook was in place, so cancel here or the function would run to its end.
                work.cancel()
            deadline = asyncio.timeout(spec.timeout)
            try:
                async with deadline:
                    return await work
            except TimeoutError:
                if spec.timeout is None or not deadline.expired():
                    raise  # the function's own TimeoutError
                raise TaskTimeout(spec.timeout) from None
        if inline:
            return spec.fn(*args, **kwargs)
        thread = self._threads.run(spec.fn, *args, **kwargs)
        done, _ = await asyncio.wait([thread], timeout=spec.timeout)
        if done:
            return thread.result()
        assert spec.timeout is not None
        ctx._request_stop()
        thread.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise TaskTimeout(spec.timeout, straggler=thread)

    async def _failed(
        self,
        task: Task,
        lease: Lease,
        spec: TaskSpec | None,
        error: BaseException,
        *,
        now: datetime | None = None,
    ) -> None:
        now = now or utcnow()
        message = f"{type(error).__name__}: {error}"
        trace = "".join(traceback.format_exception(error))
        try:
            run_at = next_run_at(
                spec.policy if spec is not None else DEFAULT_POLICY,
                task.attempts,
                error,
                max_attempts=task.max_attempts,
                created_at=task.created_at,
                now=now,
            )
        except Exception as policy_error:
            # A retry strategy that raises cannot decide: give up, and say why.
            run_at = None
            message += (
                f" (and the retry policy failed: {type(policy_error).__name__}: {policy_error})"
            )
            log.exception("task %s attempt %d: retry policy raised", task.id, task.attempts)
        finished = await self._record(
            outcomes.fail_attempt, task, lease, message, trace, run_at, now=now
        )
        if finished is None:
            log.warning(
                "task %s attempt %d: lease lost; failure not recorded", task.id, task.attempts
            )
            return
        number = task.attempts
        if finished.status == "retrying":
            log.info("task %s attempt %d: %s; retry at %s", task.id, number, message, run_at)
        else:
            log.warning("task %s attempt %d: %s: %s", task.id, number, finished.status, message)
        self._on_finished(finished)

    async def _record(
        self, fn: Callable[..., Task | None], task: Task, /, *args: Any, **kwargs: Any
    ) -> Task | None:
        """Write an outcome, trying again while the database refuses (locked, gone for a
        moment): the task stays this runner's, its lease renewed, until it is written."""
        for delay in RECORD_RETRIES:
            try:
                return await self._write(fn, *args, **kwargs)
            except Exception:
                if delay is None:
                    raise
                log.warning(
                    "task %s attempt %d: could not record the outcome; again in %gs",
                    task.id,
                    task.attempts,
                    delay,
                    exc_info=True,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


def _json_result(value: Any) -> Any:
    """The function's return value as JSON the API can serve (no NaN or infinity)."""
    result = to_jsonable_python(value)
    if not finite(result):
        raise ResultNotJSON("the result holds a NaN or an infinity, which JSON cannot carry")
    return result
