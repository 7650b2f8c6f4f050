"""The pure retry decision: tenacity policies turned into a next run time, or giving up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from tenacity import (
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_fixed,
)

from app.tasks.retry import DEFAULT_POLICY, RetryPolicy, next_run_at

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def test_wait_fixed_gives_now_plus_the_wait() -> None:
    policy = RetryPolicy(max_attempts=5, wait=wait_fixed(7))
    for attempt in (1, 2, 4):
        assert next_run_at(policy, attempt, ValueError("x"), now=NOW) == NOW + timedelta(seconds=7)


@pytest.mark.parametrize(
    ("attempt", "seconds"),
    [(1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (6, 50.0)],
)
def test_wait_exponential_grows_with_the_attempt_and_is_capped(
    attempt: int, seconds: float
) -> None:
    policy = RetryPolicy(max_attempts=10, wait=wait_exponential(multiplier=2, max=50))
    assert next_run_at(policy, attempt, ValueError("x"), now=NOW) == NOW + timedelta(
        seconds=seconds
    )


def test_default_policy_waits_between_one_and_two_seconds_after_the_first_attempt() -> None:
    run_at = next_run_at(DEFAULT_POLICY, 1, ValueError("x"), now=NOW)
    assert run_at is not None
    assert NOW + timedelta(seconds=1) <= run_at <= NOW + timedelta(seconds=2)


def test_default_policy_doubles_the_wait_plus_up_to_a_second_of_jitter() -> None:
    for _ in range(20):
        run_at = next_run_at(DEFAULT_POLICY, 3, ValueError("x"), now=NOW)
        assert run_at is not None
        assert NOW + timedelta(seconds=4) <= run_at <= NOW + timedelta(seconds=5)


def test_gives_up_when_the_attempt_reaches_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, wait=wait_fixed(1))
    assert next_run_at(policy, 2, ValueError("x"), now=NOW) == NOW + timedelta(seconds=1)
    assert next_run_at(policy, 3, ValueError("x"), now=NOW) is None
    assert next_run_at(policy, 4, ValueError("x"), now=NOW) is None


def test_gives_up_when_the_retry_predicate_rejects_the_error() -> None:
    policy = RetryPolicy(retry=retry_if_exception_type(KeyError), wait=wait_fixed(1))
    assert next_run_at(policy, 1, ValueError("x"), now=NOW) is None
    assert next_run_at(policy, 1, KeyError("x"), now=NOW) == NOW + timedelta(seconds=1)


def test_predicate_sees_subclasses_of_the_retried_type() -> None:
    policy = RetryPolicy(retry=retry_if_exception_type(OSError), wait=wait_fixed(1))
    assert next_run_at(policy, 1, ConnectionResetError("x"), now=NOW) is not None


def test_stop_after_delay_counts_from_the_task_creation() -> None:
    policy = RetryPolicy(max_attempts=10, wait=wait_fixed(1), stop=stop_after_delay(60))
    young = NOW - timedelta(seconds=59)
    old = NOW - timedelta(seconds=60)
    assert next_run_at(policy, 1, ValueError("x"), created_at=young, now=NOW) == NOW + timedelta(
        seconds=1
    )
    assert next_run_at(policy, 1, ValueError("x"), created_at=old, now=NOW) is None


def test_stop_after_delay_without_created_at_sees_no_elapsed_time() -> None:
    policy = RetryPolicy(max_attempts=10, wait=wait_fixed(1), stop=stop_after_delay(60))
    assert next_run_at(policy, 1, ValueError("x"), now=NOW) is not None


def test_stop_after_attempt_gives_up_earlier_than_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=10, wait=wait_fixed(1), stop=stop_after_attempt(2))
    assert next_run_at(policy, 1, ValueError("x"), now=NOW) is not None
    assert next_run_at(policy, 2, ValueError("x"), now=NOW) is None


def test_row_max_attempts_overrides_the_policy() -> None:
    strict = RetryPolicy(max_attempts=5, wait=wait_fixed(1))
    assert next_run_at(strict, 2, ValueError("x"), max_attempts=2, now=NOW) is None
    lenient = RetryPolicy(max_attempts=2, wait=wait_fixed(1))
    assert next_run_at(lenient, 2, ValueError("x"), now=NOW) is None
    assert next_run_at(lenient, 2, ValueError("x"), max_attempts=5, now=NOW) == NOW + timedelta(
        seconds=1
    )
