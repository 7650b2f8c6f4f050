"""`/metrics` after a known run, read back with Prometheus's own parser: counts exact, the
gauges from the database, a registry per Backstop, and the route under the team's prefix and
token. (Several worker processes: tests/e2e/test_observability.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from app.backstop import Backstop
from app.settings import Settings
from store import leases
from store.models import TaskStatus
from store.timeutil import utcnow
from tests.support.client import drain, service

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: TestClient, path: str = "/metrics", **headers: str) -> Samples:
    """Every sample of the answer, by name and labels, parsed as Prometheus would."""
    answer = client.get(path, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_counts_of_a_known_run_are_exact(client: TestClient) -> None:
    for _ in range(3):
        assert client.post("/tasks", json={"name": "test.noop"}).status_code == 202
    # Fails twice (retried each time), then succeeds on its third attempt.
    client.post("/tasks", json={"name": "test.flaky", "args": [2], "queue": "slow"})
    client.post("/tasks", json={"name": "test.fatal"})  # fails at once, not retried
    queued = client.post("/tasks", json={"name": "test.noop", "delay": 3600}).json()
    assert client.post(f"/tasks/{queued['id']}/cancel").status_code == 200
    client.post("/tasks", json={"name": "test.noop", "queue": "later", "delay": 3600})

    now = utcnow()
    for step in range(3):  # the flaky task's retries come due 2 s apart
        drain(client, now + timedelta(seconds=10 * step))

    samples = scrape(client)
    noop, flaky, fatal = (
        {"task": "test.noop", "queue": "default"},
        {"task": "test.flaky", "queue": "slow"},
        {"task": "test.fatal", "queue": "default"},
    )
    assert value(samples, "backstop_tasks_enqueued_total", **noop) == 4
    assert value(samples, "backstop_tasks_enqueued_total", task="test.noop", queue="later") == 1
    assert value(samples, "backstop_tasks_enqueued_total", **flaky) == 1
    assert value(samples, "backstop_tasks_started_total", **noop) == 3
    assert value(samples, "backstop_tasks_started_total", **flaky) == 3
    assert value(samples, "backstop_tasks_started_total", **fatal) == 1
    assert value(samples, "backstop_tasks_succeeded_total", **noop) == 3
    assert value(samples, "backstop_tasks_succeeded_total", **flaky) == 1
    assert value(samples, "backstop_tasks_retried_total", **flaky) == 2
    assert value(samples, "backstop_tasks_failed_total", **fatal) == 1
    assert value(samples, "backstop_tasks_failed_total", **flaky) is None
    assert value(samples, "backstop_tasks_cancelled_total", **noop) == 1
    assert value(samples, "backstop_attempt_duration_seconds_count", **flaky) == 3
    assert value(samples, "backstop_attempt_duration_seconds_bucket", **flaky, le="+Inf") == 3
    assert value(samples, "backstop_task_start_delay_seconds_count", **noop) == 3
    assert value(samples, "backstop_task_start_delay_seconds_count", **flaky) == 3
    # The database's view: only the delayed task is left, not yet due.
    assert value(samples, "backstop_tasks", queue="later", state="queued") == 1
    assert value(samples, "backstop_tasks", queue="later", state="running") == 0
    assert value(samples, "backstop_queue_oldest_due_age_seconds", queue="later") == 0
    assert value(samples, "backstop_runner_busy_slots") == 0
    assert value(samples, "backstop_runner_slots") == service(client).settings.concurrency


def test_the_gauges_read_the_database_at_each_scrape(client: TestClient) -> None:
    backstop = service(client)
    for queue in ("a", "a", "b"):
        client.post("/tasks", json={"name": "test.noop", "queue": queue})
    with backstop.db.write() as conn:
        leases.claim_due(conn, "elsewhere", 1, lease_seconds=60, queue="b")

    samples = scrape(client)

    assert value(samples, "backstop_tasks", queue="a", state="queued") == 2
    assert value(samples, "backstop_tasks", queue="b", state="queued") == 0
    assert value(samples, "backstop_tasks", queue="b", state="running") == 1
    assert value(samples, "backstop_queue_oldest_due_age_seconds", queue="a") is not None
    assert value(samples, "backstop_queue_oldest_due_age_seconds", queue="b") == 0
    # Counted by whoever enqueued: this process; the claim was another runner's.
    assert value(samples, "backstop_tasks_started_total", task="test.noop", queue="b") is None


def test_lease_expiries_are_counted_by_the_process_that_reclaims(client: TestClient) -> None:
    backstop = service(client)
    client.post("/tasks", json={"name": "test.noop"})
    with backstop.db.write() as conn:  # a runner that dies holding it
        leases.claim_due(conn, "dead", 1, lease_seconds=1)

    reclaimed = asyncio.run(backstop.runner.reclaim(now=utcnow() + timedelta(seconds=5)))

    assert [task.status for task in reclaimed] == [TaskStatus.RETRYING]
    samples = scrape(client)
    labels = {"task": "test.noop", "queue": "default"}
    assert value(samples, "backstop_tasks_lease_expired_total", **labels) == 1
    assert value(samples, "backstop_tasks_retried_total", **labels) == 1


def test_each_backstop_has_a_registry_of_its_own(settings: Settings, tmp_path: object) -> None:
    first = Backstop(settings)
    second = Backstop(settings.model_copy(update={"concurrency": 3}))
    try:
        first.metrics.enqueued("test.noop", "default")
        assert first.metrics_registry is not second.metrics_registry
        assert (
            first.metrics_registry.get_sample_value(
                "backstop_tasks_enqueued_total", {"task": "test.noop", "queue": "default"}
            )
            == 1
        )
        assert (
            second.metrics_registry.get_sample_value(
                "backstop_tasks_enqueued_total", {"task": "test.noop", "queue": "default"}
            )
            is None
        )
        assert second.metrics_registry.get_sample_value("backstop_runner_slots") == 3
    finally:
        first.close()
        second.close()


@pytest.fixture
def team_client(settings: Settings) -> Iterator[TestClient]:
    """A team's app with Backstop under /jobs, behind the team's own check and a token."""
    backstop = Backstop(
        settings.model_copy(update={"run_worker": False, "api_token": SecretStr("s3cret")})
    )

    def team_auth(request: Request) -> None:
        if request.headers.get("x-team") != "yes":
            raise HTTPException(403, "team only")

    app = FastAPI(lifespan=backstop.lifespan)
    app.include_router(backstop.router, prefix="/jobs", dependencies=[Depends(team_auth)])
    with TestClient(app) as test_client:
        yield test_client


def test_metrics_sit_under_the_teams_prefix_and_auth(team_client: TestClient) -> None:
    assert team_client.get("/metrics").status_code == 404
    assert team_client.get("/jobs/metrics", headers={"x-team": "yes"}).status_code == 401
    token = {"authorization": "Bearer s3cret"}
    assert team_client.get("/jobs/metrics", headers=token).status_code == 403
    samples = scrape(team_client, "/jobs/metrics", **token, **{"x-team": "yes"})
    assert value(samples, "backstop_runner_busy_slots") == 0
