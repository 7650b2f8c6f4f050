"""The retry decision, as a pure function of the policy, the attempt, the error and the clock.

Tenacity's `retry`, `wait` and `stop` strategies are evaluated on a synthetic call state;
nothing sleeps in-process: the answer is a time that the runner writes to the task's row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, cast

from tenacity import RetryCallState, retry_always, retry_if_exception_type, wait_exponential_jitter
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base


@dataclass(frozen=True)
class RetryPolicy:
    """How a task is retried: at most `max_attempts` attempts, when `retry` says so, after
    `wait` seconds, unless `stop` says to give up earlier."""

    max_attempts: int = 5
    retry: retry_base = field(default_factory=lambda: retry_if_exception_type(Exception))
    wait: wait_base = field(default_factory=lambda: wait_exponential_jitter(initial=1, max=600))
    stop: stop_base | None = None


DEFAULT_POLICY = RetryPolicy()


def _call_state(attempt: int, error: BaseException, elapsed: float) -> RetryCallState:
    state = RetryCallState(cast(Any, None), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    # Elapsed time is measured from the task's creation, across restarts, not in-process.
    state.start_time = 0.0
    state.set_exception((type(error), error, error.__traceback__))
    state.outcome_timestamp = max(elapsed, 0.0)
    return state


def next_run_at(
    policy: RetryPolicy,
    attempt: int,
    error: BaseException,
    *,
    max_attempts: int | None = None,
    created_at: datetime | None = None,
    now: datetime,
) -> datetime | None:
    """When to try again after attempt number `attempt` failed with `error`; None to give up.

    `max_attempts` (the task row's own limit) overrides the policy's when given.
    """
    if attempt >= (max_attempts if max_attempts is not None else policy.max_attempts):
        return None
    elapsed = (now - created_at).total_seconds() if created_at is not None else 0.0
    state = _call_state(attempt, error, elapsed)
    if not policy.retry(state):
        return None
    if policy.stop is not None and policy.stop(state):
        return None
    return now + timedelta(seconds=max(float(policy.wait(state)), 0.0))


class LeaseExpired(Exception):
    """The runner holding a task stopped renewing its lease (it died, or lost the database)."""


def after_lapsed_lease(
    policy: RetryPolicy,
    attempt: int,
    max_attempts: int,
    created_at: datetime,
    now: datetime,
) -> datetime | None:
    """When to try again after attempt `attempt` lost its runner; None to give up.

    A lapsed lease is never the function's verdict: the runner died, so it is always worth
    another attempt, within the policy's attempts, stop and wait.
    """
    return next_run_at(
        replace(policy, retry=retry_always),
        attempt,
        LeaseExpired("lease expired"),
        max_attempts=max_attempts,
        created_at=created_at,
        now=now,
    )
