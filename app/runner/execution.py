"""Calling one claimed task's function, and turning what came of it into an outcome to write.

Nothing here touches the database: the outcome (the result, or the error with the retry
policy's verdict and the traceback) is worked out where the function ran, so the write
transaction that records it holds SQLite's lock for the statements alone.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from datetime import datetime
from typing import Any

from pydantic_core import to_jsonable_python

from app.settings import Settings
from app.tasks.context import TaskContext
from app.tasks.registry import Registry, TaskSpec, finite
from app.tasks.retry import DEFAULT_POLICY, next_run_at
from store.models import Claim, TaskStatus
from store.outcomes import Outcome
from store.timeutil import utcnow

log = logging.getLogger(__name__)


class TaskTimeout(TimeoutError):
    """An attempt ran past its task's `timeout`."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"timed out after {timeout:g}s")


class ResultNotJSON(TypeError):
    """A task returned something JSON cannot hold."""


class Executor:
    """Calls task functions and says what came of each attempt."""

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings

    def context(self, claim: Claim) -> TaskContext:
        """The context a claimed task's function receives."""
        return TaskContext(task_id=claim.id, attempt=claim.attempts, settings=self.settings)

    def spec_of(self, claim: Claim) -> TaskSpec | None:
        """The claimed task's registration; None when this process does not know its name."""
        return self.registry.get(claim.name) if claim.name in self.registry else None

    def call_sync(self, claim: Claim, ctx: TaskContext, *, now: datetime | None = None) -> Outcome:
        """Run a sync function on this thread; its outcome. Never raises."""
        log.debug("task %s attempt %d: running %s", claim.id, claim.attempts, claim.name)
        spec: TaskSpec | None = None
        try:
            spec = self.registry.get(claim.name)
            args, kwargs = self._arguments(spec, claim, ctx)
            result = _json_result(spec.fn(*args, **kwargs))
        except Exception as error:
            return self.failed(claim, spec, error, now=now)
        return Outcome(claim.lease, claim.attempts, now or utcnow(), result=result)

    async def call_async(
        self, claim: Claim, ctx: TaskContext, *, now: datetime | None = None
    ) -> Outcome:
        """Run an async function (or, on the loop's thread, a sync one); its outcome.

        Raises CancelledError only when the runner itself is being stopped past its grace:
        the stop then releases the lease. A cancel request cancels the function alone, and
        the attempt is recorded (the store turns it into `cancelled`).
        """
        spec: TaskSpec | None = None
        log.debug("task %s attempt %d: running %s", claim.id, claim.attempts, claim.name)
        try:
            spec = self.registry.get(claim.name)
            if not spec.is_async:
                return self.call_sync(claim, ctx, now=now)
            args, kwargs = self._arguments(spec, claim, ctx)
            result = _json_result(await _awaited(spec, args, kwargs, ctx))
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return self.failed(claim, spec, asyncio.CancelledError("cancelled"), now=now)
        except Exception as error:
            return self.failed(claim, spec, error, now=now)
        return Outcome(claim.lease, claim.attempts, now or utcnow(), result=result)

    def failed(
        self,
        claim: Claim,
        spec: TaskSpec | None,
        error: BaseException,
        *,
        now: datetime | None = None,
    ) -> Outcome:
        """A failed attempt, with the retry policy's verdict: again at `run_at`, or never."""
        now = now or utcnow()
        message, trace = _describe(error)
        try:
            run_at = next_run_at(
                spec.policy if spec is not None else DEFAULT_POLICY,
                claim.attempts,
                error,
                max_attempts=claim.max_attempts,
                created_at=claim.created_at,
                now=now,
            )
        except Exception as policy_error:
            # A retry strategy that raises cannot decide: give up, and say why.
            run_at = None
            message += (
                f" (and the retry policy failed: {type(policy_error).__name__}: {policy_error})"
            )
            log.exception("task %s attempt %d: retry policy raised", claim.id, claim.attempts)
        return Outcome(
            claim.lease, claim.attempts, now, error=message, traceback=trace, run_at=run_at
        )

    @staticmethod
    def _arguments(
        spec: TaskSpec, claim: Claim, ctx: TaskContext
    ) -> tuple[list[Any], dict[str, Any]]:
        args, kwargs = spec.load(claim.args, claim.kwargs)
        if spec.context_param is not None:
            kwargs[spec.context_param] = ctx
        return args, kwargs


def _describe(error: BaseException) -> tuple[str, str | None]:
    """`Type: message` and the traceback; never raises, whatever the exception's `__str__`
    does (an outcome that cannot be described must still be written)."""
    try:
        message = f"{type(error).__name__}: {error}"
    except Exception:
        message = f"{type(error).__name__} (its message could not be rendered)"
    try:
        trace: str | None = "".join(traceback.format_exception(error))
    except Exception:
        trace = None
    return message, trace


def report(claim: Claim, outcome: Outcome, state: TaskStatus | None) -> None:
    """Log what was written for an attempt (`state` None: the lease was lost, nothing was)."""
    number = claim.attempts
    if state is None:
        what = "success" if outcome.error is None else "failure"
        log.warning("task %s attempt %d: lease lost; %s not recorded", claim.id, number, what)
    elif outcome.error is None or state is TaskStatus.CANCELLED:
        log.info("task %s attempt %d: %s", claim.id, number, state)
    elif state is TaskStatus.RETRYING:
        log.info(
            "task %s attempt %d: %s; retry at %s", claim.id, number, outcome.error, outcome.run_at
        )
    else:
        log.warning("task %s attempt %d: %s: %s", claim.id, number, state, outcome.error)


async def _awaited(
    spec: TaskSpec, args: list[Any], kwargs: dict[str, Any], ctx: TaskContext
) -> Any:
    """Await an async function in the current task, under its timeout; a stop request
    cancels it there, and only that cancellation is taken back once it has unwound (a
    cancel of the task from outside, a runner stopping past its grace, goes through)."""
    if ctx.cancelled:
        # Asked to stop between the claim and now: the function never starts.
        raise asyncio.CancelledError
    task = asyncio.current_task()
    assert task is not None, "an async task function runs in an asyncio task"
    asked = False

    def stop() -> None:
        nonlocal asked
        asked = True
        task.cancel()

    ctx.stop.add_callback(stop)
    deadline = asyncio.timeout(spec.timeout)
    try:
        async with deadline:
            result = await spec.fn(*args, **kwargs)
        if asked and task.cancelling():
            task.uncancel()  # the function swallowed the stop request's cancellation
        return result
    except TimeoutError:
        if spec.timeout is None or not deadline.expired():
            raise  # the function's own TimeoutError
        raise TaskTimeout(spec.timeout) from None
    except asyncio.CancelledError:
        if asked and task.cancelling() == 1:
            task.uncancel()  # the stop request's own: the attempt is recorded as cancelled
        raise
    finally:
        ctx.stop.remove_callback(stop)


def _json_result(value: Any) -> Any:
    """The function's return value as JSON the API can serve (no NaN or infinity)."""
    result = to_jsonable_python(value)
    if not finite(result):
        raise ResultNotJSON("the result holds a NaN or an infinity, which JSON cannot carry")
    return result
