"""Calling one claimed task's function, and turning what came of it into an outcome to write.

Nothing here touches the database: the outcome (the result, or the error with the retry
policy's verdict and the traceback) is worked out where the function ran, so the write
transaction that records it holds SQLite's lock for the statements alone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import traceback
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic_core import to_jsonable_python

from app import logs
from app.enqueue import prepare_task
from app.errors import TaskSwitchedOff, UnreadableArguments
from app.observability.tracing import Tracing, attempt_span, ended
from app.settings import Settings
from app.tasks.context import Grant, TaskContext, TaskSettings
from app.tasks.registry import Registry, TaskSpec
from app.tasks.retry import DEFAULT_POLICY, next_run_at
from store import jsonvalues
from store.models import Claim, Task, TaskStatus
from store.outcomes import Outcome
from store.tasks import NewTask
from store.timeutil import utcnow

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider

# The attempt records (see `app.logs`): a logger of their own, so that starts and
# successes can stay off while the rest of the runner's lines show.
log = logging.getLogger("app.attempts")


class TaskTimeout(TimeoutError):
    """An attempt ran past its task's `timeout`."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"timed out after {timeout:g}s")


class ResultNotJSON(TypeError):
    """A task returned something JSON cannot hold."""


class Executor:
    """Calls task functions and says what came of each attempt."""

    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        *,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.tracing = Tracing(tracer_provider)
        logs.install_task_context()
        self._task_settings = TaskSettings.of(settings)
        self._grants: dict[type[Grant], Grant] = {}

    def context(
        self, claim: Claim, reporter: Callable[[dict[str, Any]], None] | None = None
    ) -> TaskContext:
        """The context a claimed task's function receives: the settings every task may
        read, the grants its own `@task` asked for (no other task sees those), and where
        its `ctx.progress` reports go."""
        spec = self.spec_of(claim)
        grants = {kind: self._grant(kind) for kind in spec.grants} if spec is not None else {}
        ctx = TaskContext(
            task_id=claim.id,
            attempt=claim.attempts,
            settings=self._task_settings,
            grants=grants,
            planner=functools.partial(self._follow_up, claim.id),
        )
        if reporter is not None:
            ctx.reporter = reporter
        return ctx

    def _follow_up(
        self,
        parent_id: str,
        fn: Callable[..., Any] | str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        delay: float | None,
        run_at: datetime | None,
        queue: str | None,
        priority: int | None,
        max_attempts: int | None,
        after: Sequence[str] | None,
    ) -> NewTask:
        """A follow-up of `parent_id` (`TaskContext.add_task`), checked as `add_task` checks."""
        new, _now = prepare_task(
            self.registry,
            fn,
            args,
            kwargs,
            delay,
            run_at,
            queue,
            priority,
            max_attempts,
            None,
            after=after,
            parent_id=parent_id,
        )
        return new

    def _grant(self, kind: type[Grant]) -> Grant:
        # Built once per process (a race builds it twice, harmlessly).
        granted = self._grants.get(kind)
        if granted is None:
            granted = self._grants[kind] = kind.from_settings(self.settings)
        return granted

    def spec_of(self, claim: Claim) -> TaskSpec | None:
        """The claimed task's registration; None when this process does not know its name."""
        return self.registry.get(claim.name) if claim.name in self.registry else None

    def call_sync(self, claim: Claim, ctx: TaskContext, *, now: datetime | None = None) -> Outcome:
        """Run a sync function on this thread; its outcome. Never raises."""
        tracer = self.tracing.tracer()
        if tracer is None:
            return self._call_sync(claim, ctx, now)
        with attempt_span(tracer, claim) as span:
            return ended(span, self._call_sync(claim, ctx, now))

    def _call_sync(self, claim: Claim, ctx: TaskContext, now: datetime | None) -> Outcome:
        _started(claim)
        spec: TaskSpec | None = None
        try:
            spec = self.registry.get(claim.name)
            args, kwargs = self._arguments(spec, claim, ctx)
            token = logs.attempt.set(claim)
            try:
                value = spec.fn(*args, **kwargs)
            finally:
                logs.attempt.reset(token)
            result = _json_result(value)
        except Exception as error:
            return self.failed(claim, spec, error, now=now)
        return Outcome(
            claim.lease, claim.attempts, now or utcnow(), result=result, follow_ups=ctx.follow_ups()
        )

    def call_async(
        self, claim: Claim, ctx: TaskContext, *, now: datetime | None = None
    ) -> Coroutine[Any, Any, Outcome]:
        """Run an async function (or, on the loop's thread, a sync one); its outcome.

        Raises CancelledError only when the runner itself is being stopped past its grace:
        the stop then releases the lease. A cancel request cancels the function alone, and
        the attempt is recorded (the store turns it into `cancelled`).
        """
        # A plain function that hands back the coroutine: untraced, no extra frame to await.
        tracer = self.tracing.tracer()
        if tracer is None:
            return self._call_async(claim, ctx, now)
        return self._traced_async(tracer, claim, ctx, now)

    async def _traced_async(
        self, tracer: Tracer, claim: Claim, ctx: TaskContext, now: datetime | None
    ) -> Outcome:
        with attempt_span(tracer, claim) as span:
            return ended(span, await self._call_async(claim, ctx, now))

    async def _call_async(self, claim: Claim, ctx: TaskContext, now: datetime | None) -> Outcome:
        spec: TaskSpec | None = None
        try:
            spec = self.registry.get(claim.name)
            if not spec.is_async:
                return self._call_sync(claim, ctx, now)
            _started(claim)
            args, kwargs = self._arguments(spec, claim, ctx)
            token = logs.attempt.set(claim)
            try:
                value = await _awaited(spec, args, kwargs, ctx)
            finally:
                logs.attempt.reset(token)
            result = _json_result(value)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return self.failed(claim, spec, asyncio.CancelledError("cancelled"), now=now)
        except Exception as error:
            return self.failed(claim, spec, error, now=now)
        return Outcome(
            claim.lease, claim.attempts, now or utcnow(), result=result, follow_ups=ctx.follow_ups()
        )

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
        run_at: datetime | None = None
        # A task switched off here, or whose stored arguments are of the wrong shape, is not
        # retried: another attempt would find the same.
        if not isinstance(error, TaskSwitchedOff | UnreadableArguments):
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


def attempt_of(claim: Claim | Task) -> str:
    """How every line about an attempt begins: `task <id> (<name>) attempt 2/5`."""
    return f"task {claim.id} ({claim.name}) attempt {claim.attempts}/{claim.max_attempts}"


def _started(claim: Claim) -> None:
    # Checked first: the line is off by default, and its text would cost more than the check.
    if log.isEnabledFor(logging.INFO):
        log.info("%s started", attempt_of(claim), extra=_fields(claim, "started"))


def _fields(
    task: Claim | Task,
    outcome: str,
    duration: float | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """An attempt record's fields, as `extra` (see `app.logs`)."""
    return {
        "backstop_task_id": task.id,
        "backstop_task_name": task.name,
        "backstop_queue": task.queue,
        "backstop_attempt": task.attempts,
        "backstop_outcome": outcome,
        "backstop_duration": duration,
        "backstop_error": error,
    }


def _when(run_at: datetime | None, now: datetime) -> str:
    if run_at is None:
        return "soon"
    seconds = max((run_at - now).total_seconds(), 0.0)
    return f"in {seconds:.1f}s (at {run_at.astimezone(UTC):%Y-%m-%dT%H:%M:%S}Z)"


def report(claim: Claim, outcome: Outcome, state: TaskStatus | None) -> None:
    """Log the one line of an attempt once its outcome is written (`state` None: the lease
    was lost, and nothing was): INFO for a success or a cancel, WARNING for a failure that
    will be retried, ERROR for one that ends the task."""
    if outcome.error is None and state is TaskStatus.SUCCEEDED:
        if log.isEnabledFor(logging.INFO):  # as in `_started`
            log.info(
                "%s succeeded", attempt_of(claim), extra=_outcome_fields(claim, outcome, state)
            )
        return
    attempt = attempt_of(claim)
    extra = _outcome_fields(claim, outcome, state)
    if state is None:
        what = "success" if outcome.error is None else f"failure ({outcome.error})"
        log.warning("%s lost its lease; its %s was not recorded", attempt, what, extra=extra)
    elif state is TaskStatus.CANCELLED:
        log.info("%s cancelled", attempt, extra=extra)
    elif state is TaskStatus.RETRYING:
        when = _when(outcome.run_at, outcome.now)
        log.warning("%s failed, retry %s: %s", attempt, when, outcome.error, extra=extra)
    elif claim.attempts >= claim.max_attempts:
        log.error("%s failed, no attempts left: %s", attempt, outcome.error, extra=extra)
    else:
        log.error("%s failed, not retried: %s", attempt, outcome.error, extra=extra)


def _outcome_fields(claim: Claim, outcome: Outcome, state: TaskStatus | None) -> dict[str, Any]:
    duration = round(max((outcome.now - claim.started_at).total_seconds(), 0.0), 6)
    return _fields(claim, "lost" if state is None else state.value, duration, outcome.error)


def report_expired(task: Task, now: datetime) -> None:
    """Log the one line of an attempt whose lease lapsed (its runner died): WARNING when the
    task is retried, ERROR when it fails."""
    attempt = attempt_of(task)
    extra = _fields(task, "lease_expired", error=task.last_error)
    if task.status is TaskStatus.RETRYING:
        when = _when(task.scheduled_at, now)
        log.warning("%s lost its runner, retry %s: %s", attempt, when, task.last_error, extra=extra)
    elif task.attempts >= task.max_attempts:
        log.error("%s lost its runner, no attempts left: %s", attempt, task.last_error, extra=extra)
    else:
        log.error("%s lost its runner, given up: %s", attempt, task.last_error, extra=extra)


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
    """The function's return value as JSON the API can serve (no NaN or infinity, no lone
    surrogate, no deeper than `jsonvalues.MAX_DEPTH`)."""
    found = jsonvalues.problem(value)
    result = to_jsonable_python(value) if found is None else None
    found = found or jsonvalues.problem(result)
    if found is not None:
        raise ResultNotJSON(f"the result holds {found}, which JSON cannot carry")
    return result
