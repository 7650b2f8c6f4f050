"""Periodic tasks: declaring them, their ticks, enqueueing each tick once, and showing them."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import app.backstop
import app.tasks.registry
from app import TaskContext, task
from app.backstop import Backstop
from app.errors import TaskDefinitionError
from app.main import create_app
from app.runner.periodic import enqueue_due, periodic_specs, read_schedules, tick_task
from app.settings import Settings
from app.tasks.recurrence import EPOCH, MAX_PERIODIC_NAME, Recurrence, crontab_weekdays, tick_key
from app.tasks.registry import Registry
from store import schedules as store_schedules
from store import tasks as store_tasks
from store.engine import Database
from store.models import Task, TaskStatus
from tests.support.client import service as service_of

NOW = datetime(2025, 3, 1, 12, 7, 30, tzinfo=UTC)  # a Saturday
REPO_ROOT = Path(__file__).resolve().parents[3]
BACKSTOP = str(Path(sys.executable).parent / "backstop")


def at(hour: int, minute: int, second: int = 0, *, day: int = 1) -> datetime:
    return datetime(2025, 3, day, hour, minute, second, tzinfo=UTC)


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    """An empty registry that `@task` fills and every Backstop of the test uses."""
    empty = Registry()
    monkeypatch.setattr(app.tasks.registry, "registry", empty)
    monkeypatch.setattr(app.backstop, "registry", empty)
    return empty


@pytest.fixture
def schedules(fresh_registry: Registry) -> Registry:
    """Two periodic tasks: a crontab every five minutes and an interval of two minutes."""

    @task(name="reports.cron", cron="*/5 * * * *", queue="reports", priority=3)
    def report() -> None:
        """Every five minutes."""

    @task(name="sync.every", every=timedelta(minutes=2))
    def sync(ctx: TaskContext) -> int:
        return ctx.attempt

    return fresh_registry


@pytest.fixture
def service(settings: Settings, schedules: Registry) -> Iterator[Backstop]:
    """A prepared Backstop on the two schedules; its runner is not started."""
    instance = Backstop(settings)
    instance.prepare()
    yield instance
    instance.close()


def tick(backstop: Backstop, now: datetime) -> list[Task]:
    return asyncio.run(backstop.periodic.tick(now))


def stored(backstop: Backstop, name: str) -> list[Task]:
    with backstop.db.read() as conn:
        return store_tasks.list_tasks(conn, name=name, limit=500).items


def last_ticks(backstop: Backstop) -> dict[str, datetime | None]:
    with backstop.db.read() as conn:
        return {name: s.last_tick for name, s in store_schedules.get_schedules(conn).items()}


# -- declaring ---------------------------------------------------------------------------------


def test_cron_and_every_make_a_task_periodic(schedules: Registry) -> None:
    cron = schedules.get("reports.cron").recurrence
    every = schedules.get("sync.every").recurrence

    assert cron is not None
    assert every is not None
    assert (cron.cron, cron.every) == ("*/5 * * * *", None)
    assert (every.cron, every.every) == (None, timedelta(minutes=2))
    assert [spec.name for spec in periodic_specs(schedules)] == ["reports.cron", "sync.every"]


@pytest.mark.parametrize("every", [300, 300.0, timedelta(minutes=5)], ids=["int", "float", "td"])
def test_every_takes_seconds_or_a_timedelta(fresh_registry: Registry, every: Any) -> None:
    @task(name="job", every=every)
    def job(optional: int = 1) -> None:
        """Optional parameters are fine: the periodic run leaves them at their defaults."""

    recurrence = fresh_registry.get("job").recurrence
    assert recurrence is not None
    assert recurrence.every == timedelta(minutes=5)


def test_plain_tasks_have_no_schedule(fresh_registry: Registry) -> None:
    @task(name="plain")
    def plain() -> None:
        """Not periodic."""

    assert fresh_registry.get("plain").recurrence is None
    assert periodic_specs(fresh_registry) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cron": "*/5 * * *"}, r"cron expression '\*/5 \* \* \*' needs 5 fields, has 4"),
        ({"cron": "61 * * * *"}, r"bad cron expression '61 \* \* \* \*'.*59"),
        ({"cron": "0 0 30 2 *"}, r"never fires"),
        ({"cron": "0 9 * * 8"}, r"bad day of week '8'"),
        ({"cron": "0 9 * * 5-1"}, r"runs backwards"),
        ({"cron": "* * * * *", "every": 60}, r"either cron or every, not both"),
        ({"every": 0}, r"every must be positive"),
        ({"every": -5}, r"every must be positive"),
        ({"every": timedelta(0)}, r"every must be positive"),
        ({"every": float("nan")}, r"finite"),
        ({"every": "60"}, r"seconds or a timedelta, not str"),
    ],
    ids=[
        "fields",
        "range",
        "never",
        "weekday",
        "backwards",
        "both",
        "zero",
        "negative",
        "zero-td",
        "nan",
        "str",
    ],
)
def test_bad_schedules_are_refused_at_decoration(
    fresh_registry: Registry, options: dict[str, Any], message: str
) -> None:
    def job() -> None:
        """Never registered."""

    with pytest.raises(TaskDefinitionError, match=rf"task 'bad': .*{message}"):
        task(name="bad", **options)(job)
    assert "bad" not in fresh_registry


def test_a_periodic_task_with_required_parameters_is_refused(fresh_registry: Registry) -> None:
    def job(report_id: int, ctx: TaskContext, *, fmt: str, extra: int = 0) -> None:
        """A tick has no arguments to give it."""

    with pytest.raises(
        TaskDefinitionError,
        match=r"task 'needs': a periodic task is called without arguments, "
        r"but it requires report_id, fmt",
    ):
        task(name="needs", every=60)(job)
    assert "needs" not in fresh_registry


def test_a_periodic_task_name_must_leave_room_for_the_tick_in_its_key(
    fresh_registry: Registry,
) -> None:
    def job() -> None:
        """Named at the limit, then past it."""

    task(name="n" * MAX_PERIODIC_NAME, every=60)(job)
    longest = tick_key("n" * MAX_PERIODIC_NAME, EPOCH + timedelta(microseconds=1))
    assert len(longest) == 200
    with pytest.raises(TaskDefinitionError, match="at most 158 characters"):
        task(name="m" * (MAX_PERIODIC_NAME + 1), every=60)(job)


# -- ticks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("*", "*"),
        ("1-5", "mon,tue,wed,thu,fri"),
        ("0", "sun"),
        ("7", "sun"),
        ("5-7", "sun,fri,sat"),
        ("*/2", "sun,tue,thu,sat"),
        ("mon,WED,5", "mon,wed,fri"),
        ("0-6", "*"),
    ],
)
def test_crontab_weekdays_read_as_cron_reads_them(field: str, expected: str) -> None:
    assert crontab_weekdays(field) == expected


def test_cron_weekdays_count_from_sunday_as_in_crontab() -> None:
    weekdays = Recurrence.from_cron("0 9 * * 1-5")

    # NOW is a Saturday: APScheduler 3's own numbering would run `1-5` on it.
    assert weekdays.next_after(NOW) == at(9, 0, day=3)
    assert weekdays.latest(NOW) == datetime(2025, 2, 28, 9, 0, tzinfo=UTC)


def test_interval_ticks_count_from_a_fixed_epoch() -> None:
    every = Recurrence.from_every(7)

    tick = every.next_after(NOW)
    assert tick is not None
    assert (tick - EPOCH).total_seconds() % 7 == 0
    assert NOW < tick <= NOW + timedelta(seconds=7)
    # Another process, another moment: the same ticks.
    assert every.next_after(NOW - timedelta(seconds=3)) in (tick, tick - timedelta(seconds=7))


@pytest.mark.parametrize(
    ("recurrence", "after", "expected"),
    [
        (Recurrence.from_cron("*/5 * * * *"), None, at(12, 5)),
        (Recurrence.from_cron("*/5 * * * *"), at(12, 5), None),
        (Recurrence.from_cron("*/5 * * * *"), at(12, 4, 59), at(12, 5)),
        (Recurrence.from_cron("*/5 * * * *"), at(9, 0), at(12, 5)),
        (Recurrence.from_every(120), None, at(12, 6)),
        (Recurrence.from_every(120), at(12, 6), None),
        (Recurrence.from_every(1), NOW - timedelta(days=400), NOW),
        (Recurrence.from_cron("0 0 29 2 *"), None, datetime(2024, 2, 29, tzinfo=UTC)),
    ],
)
def test_latest_is_the_last_tick_at_or_before_now_after_the_last_one(
    recurrence: Recurrence, after: datetime | None, expected: datetime | None
) -> None:
    assert recurrence.latest(NOW, after=after) == expected


@pytest.mark.parametrize(
    ("recurrence", "span"),
    [
        (Recurrence.from_cron("*/5 * * * *"), timedelta(days=2)),
        (Recurrence.from_cron("7,8 3 * * mon-fri"), timedelta(days=9)),
        (Recurrence.from_cron("0 */6 1,15 * *"), timedelta(days=40)),
        (Recurrence.from_every(1), timedelta(minutes=20)),
        (Recurrence.from_every(0.25), timedelta(minutes=5)),
        (Recurrence.from_every(timedelta(minutes=17)), timedelta(days=2)),
    ],
    ids=["5min", "weekday-3am", "twice-a-month", "1s", "quarter-s", "17min"],
)
def test_latest_agrees_with_stepping_through_every_tick(
    recurrence: Recurrence, span: timedelta
) -> None:
    chance = random.Random(20250301)
    for _ in range(25):
        now = NOW + chance.uniform(-1, 1) * span
        after = now - chance.uniform(0, 1) * span
        after = after.replace(microsecond=0) if chance.random() < 0.5 else after
        expected = None
        following = recurrence.next_after(after)
        while following is not None and following <= now:
            expected, following = following, recurrence.next_after(following)
        assert recurrence.latest(now, after=after) == expected, (now, after)


class CountingTrigger:
    """Wraps a trigger and counts how often it computes a time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def get_next_fire_time(self, previous: datetime | None, now: datetime) -> datetime | None:
        self.calls += 1
        fire: datetime | None = self.inner.get_next_fire_time(previous, now)
        return fire


@pytest.mark.parametrize("outage_days", [1, 365, 5 * 365])
def test_catching_up_after_a_long_outage_takes_few_steps(outage_days: int) -> None:
    every_second = Recurrence.from_every(1)
    counting = CountingTrigger(every_second.trigger)
    bounded = Recurrence(
        cron=None, every=every_second.every, trigger=counting, hint=every_second.hint
    )

    now = NOW + timedelta(microseconds=250_000)
    assert bounded.latest(now, after=NOW - timedelta(days=outage_days)) == NOW
    # Millions of ticks were missed; a bisection needs two computations per halving.
    assert counting.calls < 120


# -- enqueueing --------------------------------------------------------------------------------


def test_a_schedule_seen_first_starts_from_now_without_running(service: Backstop) -> None:
    assert tick(service, NOW) == []

    assert last_ticks(service) == {"reports.cron": at(12, 5), "sync.every": at(12, 6)}
    assert stored(service, "reports.cron") == stored(service, "sync.every") == []


def test_each_tick_enqueues_one_task_keyed_by_schedule_and_tick(service: Backstop) -> None:
    tick(service, NOW)

    first = tick(service, at(12, 8, 0))
    second = tick(service, at(12, 10) + timedelta(milliseconds=300))

    assert [(t.name, t.scheduled_at) for t in first] == [("sync.every", at(12, 8))]
    assert sorted((t.name, t.scheduled_at) for t in second) == [
        ("reports.cron", at(12, 10)),
        ("sync.every", at(12, 10)),
    ]
    [report] = stored(service, "reports.cron")
    assert report.idempotency_key == "schedule:reports.cron:2025-03-01T12:10:00+00:00"
    assert (report.status, report.queue, report.priority) == (TaskStatus.QUEUED, "reports", 3)
    assert (report.args, report.kwargs) == ([], {})
    assert last_ticks(service) == {"reports.cron": at(12, 10), "sync.every": at(12, 10)}


def test_ticking_twice_at_the_same_moment_enqueues_once(service: Backstop) -> None:
    tick(service, NOW)
    later = at(12, 10, 1)

    assert len(tick(service, later)) == 2
    assert tick(service, later) == []
    assert tick(service, later + timedelta(seconds=30)) == []

    assert len(stored(service, "reports.cron")) == 1
    assert len(stored(service, "sync.every")) == 1


def test_between_ticks_nothing_is_due(service: Backstop) -> None:
    tick(service, NOW)

    assert tick(service, at(12, 7, 59)) == []
    assert last_ticks(service) == {"reports.cron": at(12, 5), "sync.every": at(12, 6)}


def test_ticks_missed_during_an_outage_are_coalesced_into_one_run(service: Backstop) -> None:
    tick(service, NOW)
    back = at(9, 31, 12, day=4)  # three days later: 800-odd five-minute ticks went by

    created = tick(service, back)

    assert sorted((t.name, t.scheduled_at) for t in created) == [
        ("reports.cron", at(9, 30, day=4)),
        ("sync.every", at(9, 30, day=4)),
    ]
    assert len(stored(service, "reports.cron")) == 1
    assert last_ticks(service)["reports.cron"] == at(9, 30, day=4)
    assert tick(service, back + timedelta(seconds=30)) == []


def test_the_tasks_a_tick_enqueues_run(service: Backstop) -> None:
    tick(service, NOW)
    tick(service, at(12, 8))

    [done] = asyncio.run(service.runner.drain(now=at(12, 8)))

    assert (done.name, done.status, done.result) == ("sync.every", TaskStatus.SUCCEEDED, 1)


def test_a_tick_enqueued_again_never_stores_a_second_task(service: Backstop) -> None:
    # As if a process had enqueued the tick without recording it on the schedule: the key's
    # unique constraint still keeps one task.
    tick(service, NOW)
    spec = service.registry.get("reports.cron")
    [first] = [t for t in tick(service, at(12, 10, 5)) if t.name == spec.name]

    with service.db.write() as conn:
        again, created = store_tasks.enqueue_once(conn, tick_task(spec, at(12, 10)))

    assert not created
    assert again.id == first.id
    assert [t.id for t in stored(service, "reports.cron")] == [first.id]


def test_a_tick_whose_key_another_request_took_is_skipped_not_retried(
    service: Backstop,
) -> None:
    tick(service, NOW)
    key = tick_key("reports.cron", at(12, 10))
    with service.db.write() as conn:
        squatter = store_tasks.enqueue(
            conn, store_tasks.NewTask(name="reports.cron", idempotency_key=key, request_hash="x")
        )

    created = tick(service, at(12, 10, 5))

    assert [t.name for t in created] == ["sync.every"]
    assert [t.id for t in stored(service, "reports.cron")] == [squatter.id]
    assert last_ticks(service)["reports.cron"] == at(12, 10)


def test_racing_processes_enqueue_each_tick_once(service: Backstop, settings: Settings) -> None:
    tick(service, NOW)
    specs = periodic_specs(service.registry)
    # Eight minutes in steps of 15 s, each contender on its own connection.
    moments = [at(12, 10) + timedelta(seconds=n) for n in range(0, 480, 15)]
    contenders = 6
    barrier = threading.Barrier(contenders)
    databases = [Database.from_url(settings.url) for _ in range(contenders)]

    def contend(db: Database) -> list[Task]:
        barrier.wait(timeout=10)
        created: list[Task] = []
        for moment in moments:
            with db.write() as conn:
                created += enqueue_due(conn, specs, moment)
        return created

    try:
        with ThreadPoolExecutor(max_workers=contenders) as pool:
            created = [task for batch in pool.map(contend, databases) for task in batch]
    finally:
        for db in databases:
            db.dispose()

    tasks = stored(service, "reports.cron") + stored(service, "sync.every")
    assert sorted(t.id for t in created) == sorted(t.id for t in tasks)
    assert len({t.idempotency_key for t in tasks}) == len(tasks)
    # A contender running ahead may coalesce a tick the others had not reached yet; the
    # latest ticks are always there.
    ticks = {(t.name, t.scheduled_at) for t in tasks}
    assert {("reports.cron", at(12, 15)), ("sync.every", at(12, 16))} <= ticks
    assert ticks <= {
        ("reports.cron", at(12, 10)),
        ("reports.cron", at(12, 15)),
        *(("sync.every", at(12, minute)) for minute in (10, 12, 14, 16)),
    }


# -- showing -----------------------------------------------------------------------------------


def test_schedules_show_their_next_run(service: Backstop) -> None:
    with service.db.read() as conn:
        unseen = read_schedules(conn, service.registry, NOW)
    tick(service, NOW)
    with service.db.read() as conn:
        seen = read_schedules(conn, service.registry, NOW)
        # Everything stopped for an hour: the coalesced tick is what runs next, at once.
        overdue = read_schedules(conn, service.registry, at(13, 7, 30))

    assert [(s.name, s.cron, s.every, s.next_run_at, s.last_tick) for s in unseen] == [
        ("reports.cron", "*/5 * * * *", None, at(12, 10), None),
        ("sync.every", None, 120.0, at(12, 8), None),
    ]
    assert [(s.next_run_at, s.last_tick) for s in seen] == [
        (at(12, 10), at(12, 5)),
        (at(12, 8), at(12, 6)),
    ]
    assert [s.next_run_at for s in overdue] == [at(13, 5), at(13, 6)]


@pytest.fixture
def api(settings: Settings, schedules: Registry) -> Iterator[TestClient]:
    """The API on the two schedules, runner not started."""
    with TestClient(create_app(settings, run_worker=False)) as test_client:
        yield test_client


def test_get_schedules_lists_them(api: TestClient) -> None:
    before = datetime.now(UTC)
    asyncio.run(service_of(api).periodic.tick())

    response = api.get("/schedules")

    assert response.status_code == 200
    body = response.json()
    assert [(s["name"], s["cron"], s["every"]) for s in body] == [
        ("reports.cron", "*/5 * * * *", None),
        ("sync.every", None, 120.0),
    ]
    for item in body:
        # The first sight recorded the latest tick before it; the next run comes after it.
        assert datetime.fromisoformat(item["last_tick"]) <= before + timedelta(seconds=30)
        assert datetime.fromisoformat(item["next_run_at"]) > before
    assert set(body[0]) == {"name", "cron", "every", "next_run_at", "last_tick"}


def test_get_schedules_without_periodic_tasks_is_an_empty_list(
    settings: Settings, fresh_registry: Registry
) -> None:
    with TestClient(create_app(settings, run_worker=False)) as client:
        response = client.get("/schedules")

    assert response.status_code == 200
    assert response.json() == []


# -- the command -------------------------------------------------------------------------------


def run_cli(data_dir: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
    env.update(
        BACKSTOP_DATA_DIR=str(data_dir),
        BACKSTOP_TASK_MODULES="tests.support.periodic",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        **extra,
    )
    return subprocess.run(
        [BACKSTOP, *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_backstop_schedules_prints_a_table(tmp_path: Path) -> None:
    assert run_cli(tmp_path / "data", "db", "upgrade").returncode == 0
    done = run_cli(tmp_path / "data", "schedules")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert (lines[0].split()) == [
        "name",
        "cron",
        "every",
        "next",
        "run",
        "(UTC)",
        "last",
        "tick",
        "(UTC)",
    ]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["test.every_second"][1:3] == ["-", "1s"]
    assert rows["test.every_five_minutes"][1:7] == ["*/5", "*", "*", "*", "*", "-"]
    assert rows["test.every_second"][-1] == "-"  # no runner has seen it yet


def test_backstop_schedules_json_is_what_the_api_answers(tmp_path: Path) -> None:
    assert run_cli(tmp_path / "data", "db", "upgrade").returncode == 0
    done = run_cli(tmp_path / "data", "schedules", "--json")

    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert [(s["name"], s["cron"], s["every"], s["last_tick"]) for s in body] == [
        ("test.every_five_minutes", "*/5 * * * *", None, None),
        ("test.every_second", None, 1.0, None),
    ]
    for item in body:
        assert datetime.fromisoformat(item["next_run_at"]) > datetime.now(UTC) - timedelta(
            seconds=30
        )


def test_backstop_schedules_fails_in_one_line(tmp_path: Path) -> None:
    done = run_cli(tmp_path / "data", "schedules", BACKSTOP_POLL_INTERVAL="-1")

    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        "backstop: invalid setting BACKSTOP_POLL_INTERVAL: Input should be greater than 0"
    ]
