"""Two `backstop worker` processes on one database, each serving its own `/metrics`
(`--metrics-port`) and writing JSON lines (`BACKSTOP_LOG_FORMAT=json`): summed over the two,
the counters match a known run exactly, the database gauges agree, and every line of their
stderr is one JSON object."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.backstop import Backstop
from app.settings import Settings
from store import tasks as store_tasks
from tests.support.projects import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
BACKSTOP = Path(sys.executable).parent / "backstop"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Worker:
    """One `backstop worker --metrics-port` process; its stderr goes to a file."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
        env.update(
            BACKSTOP_DATA_DIR=str(data_dir),
            BACKSTOP_TASK_MODULES="tests.support.tasks",
            BACKSTOP_POLL_INTERVAL="0.05",
            BACKSTOP_CONCURRENCY="2",
            BACKSTOP_LOG_FORMAT="json",
            BACKSTOP_LOG_ATTEMPTS="true",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        )
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(BACKSTOP), "worker", "--metrics-port", str(self.port)],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def scrape(self) -> Samples | None:
        """The samples of the worker's `/metrics`; None while it does not answer."""
        assert self.process.poll() is None, self.log_path.read_text()
        try:
            answer = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5)
        except httpx.TransportError:
            return None
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[list[Worker]]:
    started = [Worker(settings.data_dir, tmp_path / f"worker-{n}.log") for n in (1, 2)]
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


# What the run below must add up to, over both workers: (counter, task) -> count.
EXPECTED = {
    ("started", "test.noop"): 6,
    ("succeeded", "test.noop"): 6,
    ("started", "test.flaky"): 4,
    ("retried", "test.flaky"): 2,
    ("succeeded", "test.flaky"): 2,
    ("started", "test.fatal"): 1,
    ("failed", "test.fatal"): 1,
    ("started", "test.chatty"): 2,
    ("succeeded", "test.chatty"): 2,
}
EVENTS = ("enqueued", "started", "succeeded", "failed", "retried", "cancelled", "lease_expired")


def totals(scrapes: list[Samples]) -> dict[tuple[str, str], float]:
    """The counters summed over the workers, by event and task (every queue is `default`)."""
    summed: Counter[tuple[str, str]] = Counter()
    for samples in scrapes:
        for (name, labels), count in samples.items():
            for event in EVENTS:
                if name == f"backstop_tasks_{event}_total":
                    summed[(event, dict(labels)["task"])] += int(count)
    return dict(summed)


def test_two_workers_metrics_add_up_to_the_run_and_their_logs_are_json(
    backstop: Backstop, workers: list[Worker]
) -> None:
    ids = [backstop.tasks.add_task("test.noop") for _ in range(6)]
    ids += [backstop.tasks.add_task("test.flaky", 1) for _ in range(2)]  # one retry each
    ids += [backstop.tasks.add_task("test.fatal")]
    ids += [backstop.tasks.add_task("test.chatty", word) for word in ("hello", "there")]

    def finished() -> bool:
        with backstop.db.read() as conn:
            return all(task.status.terminal for task in store_tasks.get_tasks(conn, ids))

    wait_until(finished, timeout=60, what="every task to finish")
    scrapes: list[Samples] = []

    def counted() -> bool:
        # A counter moves just after its outcome commits: read until both have caught up.
        found = [worker.scrape() for worker in workers]
        scrapes[:] = [samples for samples in found if samples is not None]
        return len(scrapes) == 2 and totals(scrapes) == EXPECTED

    wait_until(counted, timeout=30, what="the counters to add up")
    assert totals(scrapes) == EXPECTED
    for samples in scrapes:  # the database's gauges: the same truth in each process
        labels = frozenset({"queue": "default", "state": "queued"}.items())
        assert samples[("backstop_tasks", labels)] == 0
        assert samples[("backstop_runner_slots", frozenset())] == 2
        durations = [
            count
            for (name, labels), count in samples.items()
            if name == "backstop_attempt_duration_seconds_count"
        ]
        starts = [
            count
            for (name, labels), count in samples.items()
            if name == "backstop_tasks_started_total"
        ]
        assert sum(durations) == sum(starts)

    for worker in workers:
        worker.stop()
    lines: list[dict[str, Any]] = []
    for worker in workers:
        for text in worker.log_path.read_text(encoding="utf-8").splitlines():
            lines.append(json.loads(text))  # every line: one JSON object
    records = Counter(
        (line["task_name"], line["outcome"])
        for line in lines
        if line["logger"] == "app.attempts" and line["outcome"] != "started"
    )
    assert records == {
        ("test.noop", "succeeded"): 6,
        ("test.flaky", "retrying"): 2,
        ("test.flaky", "succeeded"): 2,
        ("test.fatal", "failed"): 1,
        ("test.chatty", "succeeded"): 2,
    }
    said = [line for line in lines if line["logger"] == "tests.support.chatter"]
    assert sorted(line["message"] for line in said) == ["saying hello", "saying there"]
    for own in said:
        assert own["task_id"] in ids
        assert own["attempt"] == 1
