"""Prometheus metrics: what this process did with tasks, and what the database holds.

The runner counts its events in plain dictionaries under one lock (a few hundred
nanoseconds a task, on the threads that already handle the task); nothing is turned into
Prometheus samples until a scrape asks, when `BackstopCollector` renders the counts and
reads the queues' state from the database. Each Backstop has a registry of its own, so two
instances in one process (or one test run) never share or clash over a metric.

Several processes: each one counts what it did and serves its own registry (the API's
`/metrics`, `backstop worker --metrics-port`); Prometheus scrapes each as a target of its
own and sums over them. The gauges read from the database say the same in every process.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from store import ratelimits
from store import stats as store_stats
from store.engine import Database
from store.models import Claim, Task, TaskStatus
from store.outcomes import Outcome
from store.ratelimits import QueueUse, RateLimit

log = logging.getLogger(__name__)

# (event, task name, queue) -> count. The events, each a counter `backstop_tasks_<event>_total`.
EVENTS = {
    "enqueued": "Tasks this process enqueued.",
    "started": "Attempts this process started.",
    "succeeded": "Attempts this process ran that succeeded.",
    "failed": "Tasks whose failed attempt ended them (no retry left or allowed).",
    "retried": "Failed attempts after which the task was scheduled to run again.",
    "cancelled": "Tasks this process cancelled (queued ones at once, running ones as they stop).",
    "lease_expired": "Attempts whose runner died, found by this process's reclaim.",
}
UNFINISHED = (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.RETRYING)
# Seconds. Attempts: from no-ops to a long report; start delays: from an idle runner's
# pickup to a backlog of hours.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
OUTCOME_EVENTS = {
    TaskStatus.SUCCEEDED: "succeeded",
    TaskStatus.RETRYING: "retried",
    TaskStatus.FAILED: "failed",
    TaskStatus.CANCELLED: "cancelled",
}


@dataclass(slots=True)
class Histogram:
    """Observations counted per bucket (not yet cumulative), and their sum."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Prometheus's cumulative buckets, `+Inf` last."""
        running = 0
        found: list[tuple[str, float]] = []
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            found.append((bound, running))
        return found


class TaskMetrics:
    """The task events of one process, counted by task name and queue. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, str], int] = {}
        self._durations: dict[tuple[str, str], Histogram] = {}
        self._delays: dict[tuple[str, str], Histogram] = {}

    def _add(self, event: str, name: str, queue: str) -> None:
        # Under the caller's hold of the lock.
        key = (event, name, queue)
        self._counts[key] = self._counts.get(key, 0) + 1

    def enqueued(self, name: str, queue: str) -> None:
        """A task was stored (committed)."""
        with self._lock:
            self._add("enqueued", name, queue)

    def started(self, claims: Iterable[Claim]) -> None:
        """Attempts began: counted, with how long each task had been due."""
        with self._lock:
            for claim in claims:
                self._add("started", claim.name, claim.queue)
                key = (claim.name, claim.queue)
                delays = self._delays.get(key)
                if delays is None:
                    delays = self._delays[key] = Histogram(DELAY_BUCKETS)
                delays.observe(max((claim.started_at - claim.scheduled_at).total_seconds(), 0.0))

    def finished(self, written: Iterable[tuple[Claim, Outcome, TaskStatus | None]]) -> None:
        """Attempts' outcomes were written (a state None: that lease was lost, and nothing
        was written)."""
        with self._lock:
            for claim, outcome, state in written:
                event = OUTCOME_EVENTS.get(state) if state is not None else None
                if event is not None:
                    self._add(event, claim.name, claim.queue)
                key = (claim.name, claim.queue)
                durations = self._durations.get(key)
                if durations is None:
                    durations = self._durations[key] = Histogram(DURATION_BUCKETS)
                durations.observe(max((outcome.now - claim.started_at).total_seconds(), 0.0))

    def expired(self, task: Task) -> None:
        """A lapsed lease was taken back: the task is retrying or failed now."""
        event = OUTCOME_EVENTS.get(task.status)
        with self._lock:
            self._add("lease_expired", task.name, task.queue)
            if event is not None:
                self._add(event, task.name, task.queue)

    def cancelled(self, name: str, queue: str) -> None:
        """A task that was not running was cancelled."""
        with self._lock:
            self._add("cancelled", name, queue)

    def snapshot(
        self,
    ) -> tuple[
        dict[tuple[str, str, str], int],
        dict[tuple[str, str], Histogram],
        dict[tuple[str, str], Histogram],
    ]:
        """Copies of the counts, the attempt durations and the start delays."""
        with self._lock:
            return dict(self._counts), _copied(self._durations), _copied(self._delays)


def _copied(histograms: dict[tuple[str, str], Histogram]) -> dict[tuple[str, str], Histogram]:
    return {key: Histogram(h.bounds, list(h.counts), h.total) for key, h in histograms.items()}


class BackstopCollector(Collector):
    """Renders one Backstop's metrics at each scrape: this process's counts and busy slots,
    and the queues' state as the database has it."""

    def __init__(
        self,
        metrics: TaskMetrics,
        db: Database,
        *,
        busy: Callable[[], int],
        capacity: Callable[[], int],
        now: Callable[[], datetime | None] = lambda: None,
        rate_limits: Mapping[str, RateLimit] | None = None,
    ) -> None:
        self.metrics = metrics
        self.db = db
        self.rate_limits = dict(rate_limits or {})
        self.busy = busy
        self.capacity = capacity
        self.now = now

    def collect(self) -> Iterator[Metric]:
        counts, durations, delays = self.metrics.snapshot()
        for event, text in EVENTS.items():
            counter = CounterMetricFamily(f"backstop_tasks_{event}", text, labels=["task", "queue"])
            for (kind, name, queue), count in sorted(counts.items()):
                if kind == event:
                    counter.add_metric([name, queue], count)
            yield counter
        yield _histogram(
            "backstop_attempt_duration_seconds",
            "How long attempts ran, from their claim to their outcome.",
            durations,
        )
        yield _histogram(
            "backstop_task_start_delay_seconds",
            "How long a task waited from when it was due (enqueued, or its delay or retry"
            " time) to the start of its attempt.",
            delays,
        )
        busy = GaugeMetricFamily(
            "backstop_runner_busy_slots", "Tasks this process's runner is running now."
        )
        busy.add_metric([], self.busy())
        yield busy
        slots = GaugeMetricFamily(
            "backstop_runner_slots", "Tasks this process's runner may run at once."
        )
        slots.add_metric([], self.capacity())
        yield slots
        yield from self._from_database()

    def _from_database(self) -> Iterator[Metric]:
        try:
            with self.db.read() as conn:
                overview = store_stats.queue_overview(conn, self.now(), finished=False)
                use = ratelimits.queue_use(conn, self.rate_limits, self.now())
        except Exception:
            # A scrape still answers with what this process knows; the gauges go missing.
            log.exception("metrics: reading the queues failed")
            return
        tasks = GaugeMetricFamily(
            "backstop_tasks",
            "Unfinished tasks in the database by queue and state (the same in every process).",
            labels=["queue", "state"],
        )
        oldest = GaugeMetricFamily(
            "backstop_queue_oldest_due_age_seconds",
            "How long the oldest due task of the queue has waited (0: none is due).",
            labels=["queue"],
        )
        for queue, seen in overview.items():
            for state in UNFINISHED:
                tasks.add_metric([queue, state.value], seen.counts[state])
            oldest.add_metric([queue], seen.oldest_due_seconds or 0.0)
        yield tasks
        yield oldest
        if use:
            yield from _rate_gauges(use)


def _rate_gauges(use: Mapping[str, QueueUse]) -> Iterator[Metric]:
    """Each limited queue's limit and its starts in the current window."""
    limit = GaugeMetricFamily(
        "backstop_queue_rate_limit_starts",
        "The starts a rate-limited queue allows in any period (BACKSTOP_RATE_LIMITS).",
        labels=["queue"],
    )
    period = GaugeMetricFamily(
        "backstop_queue_rate_limit_period_seconds",
        "The period of a rate-limited queue's limit.",
        labels=["queue"],
    )
    started = GaugeMetricFamily(
        "backstop_queue_rate_started",
        "The starts of a rate-limited queue in the last period, by every process.",
        labels=["queue"],
    )
    for queue, used in use.items():
        limit.add_metric([queue], used.limit.starts)
        period.add_metric([queue], used.limit.period.total_seconds())
        started.add_metric([queue], used.started)
    yield limit
    yield period
    yield started


def _histogram(
    name: str, text: str, histograms: dict[tuple[str, str], Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, text, labels=["task", "queue"])
    for (task, queue), histogram in sorted(histograms.items()):
        family.add_metric([task, queue], histogram.buckets(), histogram.total)
    return family


def registry_of(collector: BackstopCollector) -> CollectorRegistry:
    """A registry of its own holding `collector` (never the process-wide default)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry's samples in Prometheus's text format."""
    return generate_latest(registry)
