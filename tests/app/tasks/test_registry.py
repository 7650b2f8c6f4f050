"""The `@task` registry and the argument checks `add_task` makes at enqueue time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from tenacity import retry_if_exception_type, wait_fixed

import app.tasks.registry
from app import TaskContext, task
from app.backstop import Backstop
from app.errors import InvalidArguments, NotATask, TaskDefinitionError, UnknownTask
from app.tasks.registry import Registry
from store import tasks as store_tasks
from store.models import TaskStatus
from tests.support.tasks import echo


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    """An empty process-wide registry for this test, so `@task` here leaves no trace."""
    empty = Registry()
    monkeypatch.setattr(app.tasks.registry, "registry", empty)
    return empty


def _stored_count(backstop: Backstop) -> int:
    with backstop.db.read() as conn:
        return sum(store_tasks.count_by_status(conn).values())


# -- @task -----------------------------------------------------------------------------------


def test_task_registers_under_its_name_with_its_options(fresh_registry: Registry) -> None:
    @task(
        name="reports.build",
        max_attempts=3,
        timeout=12,
        queue="reports",
        priority=7,
        retry=retry_if_exception_type(KeyError),
        wait=wait_fixed(4),
    )
    def build(report_id: int, ctx: TaskContext) -> int:
        return report_id

    spec = fresh_registry.get("reports.build")
    assert spec.fn is build
    assert fresh_registry.resolve(build) is spec
    assert fresh_registry.resolve("reports.build") is spec
    assert (spec.max_attempts, spec.timeout, spec.queue, spec.priority) == (3, 12, "reports", 7)
    assert spec.context_param == "ctx"
    assert not spec.is_async
    assert fresh_registry.names() == ["reports.build"]


def test_decorated_function_stays_callable_as_before(fresh_registry: Registry) -> None:
    @task(name="math.double")
    def double(value: int) -> int:
        return value * 2

    assert double(21) == 42


def test_async_functions_are_marked_async(fresh_registry: Registry) -> None:
    @task(name="async.thing")
    async def thing() -> None:
        await asyncio.sleep(0)

    assert fresh_registry.get("async.thing").is_async


def test_default_name_is_module_and_qualname(fresh_registry: Registry) -> None:
    @task()
    def build_report() -> None:
        """A task without an explicit name."""

    test = "tests.app.tasks.test_registry.test_default_name_is_module_and_qualname"
    expected = f"{test}.<locals>.build_report"
    assert fresh_registry.names() == [expected]
    assert fresh_registry.resolve(build_report).name == expected


def test_duplicate_name_for_another_function_is_refused(fresh_registry: Registry) -> None:
    @task(name="shared.name")
    def first() -> None:
        """Registered first."""

    def second() -> None:
        """Wants the same name."""

    with pytest.raises(TaskDefinitionError, match=r"'shared\.name' is taken by .*first"):
        task(name="shared.name")(second)
    assert fresh_registry.get("shared.name").fn is first


def test_same_function_registered_again_is_accepted(fresh_registry: Registry) -> None:
    def job() -> None:
        """Decorated twice, as a module imported twice would be."""

    task(name="twice")(job)
    task(name="twice")(job)
    assert fresh_registry.get("twice").fn is job


def test_positional_only_context_parameter_is_refused(fresh_registry: Registry) -> None:
    def job(ctx: TaskContext, /) -> None:
        """Its context could not be passed by keyword."""

    with pytest.raises(TaskDefinitionError, match="ctx must be passable by keyword"):
        task(name="bad.ctx")(job)
    assert "bad.ctx" not in fresh_registry


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be at least 1"),
        ({"timeout": 0}, "timeout must be positive"),
    ],
)
def test_impossible_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(TaskDefinitionError, match=message):
        task(name="bad.options", **options)


# -- resolving names -------------------------------------------------------------------------


def test_unknown_name_lists_the_known_ones(backstop: Backstop) -> None:
    with pytest.raises(UnknownTask) as raised:
        backstop.tasks.add_task("no.such.task")
    assert raised.value.name == "no.such.task"
    assert "test.echo" in raised.value.known
    assert "'no.such.task'" in str(raised.value)
    assert "test.echo" in str(raised.value)
    assert _stored_count(backstop) == 0


def test_undecorated_function_is_not_a_task(backstop: Backstop) -> None:
    def plain(value: int) -> int:
        return value

    with pytest.raises(NotATask, match=r"plain is not a registered task.*@task"):
        backstop.tasks.add_task(plain, 1)
    assert _stored_count(backstop) == 0


def test_function_and_its_name_enqueue_the_same_task(backstop: Backstop) -> None:
    by_function = backstop.tasks.add_task(echo, 1)
    by_name = backstop.tasks.add_task("test.echo", 1)
    with backstop.db.read() as conn:
        rows = [store_tasks.get_task(conn, task_id) for task_id in (by_function, by_name)]
    assert [(row.name, row.args) for row in rows] == [("test.echo", [1])] * 2


# -- argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "message"),
    [
        ("test.echo", [], {}, "missing a required argument: 'value'"),
        ("test.echo", ["many"], {}, r"argument 'value': Input should be a valid integer"),
        ("test.echo", [], {"value": [1]}, r"argument 'value': Input should be a valid integer"),
        ("test.echo", [1], {"other": 2}, "unexpected keyword argument 'other'"),
        ("test.echo", [1, 2], {}, "too many positional arguments"),
        ("test.echo", [1], {"ctx": None}, "'ctx' is the task's context, filled in by the runner"),
        ("test.anything", [object()], {}, r"argument 'value' is not JSON-serialisable \(object\)"),
        ("test.anything", [float("nan")], {}, r"argument 'value' holds NaN$"),
        (
            "test.anything",
            [{"deep": [float("inf")]}],
            {},
            r"'value' holds Infinity at \['deep'\]\[0\]",
        ),
        ("test.anything", [None, 1, "two"], {}, r"argument 'rest': Input should be a valid int"),
        ("test.anything", [], {"flag": 3}, r"argument 'flag': Input should be a valid string"),
        ("test.when", ["not a time"], {}, r"argument 'at': Input should be a valid datetime"),
    ],
)
def test_arguments_that_do_not_fit_are_refused_at_enqueue(
    backstop: Backstop, name: str, args: list[Any], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArguments, match=message) as raised:
        backstop.tasks.add_task(name, *args, **kwargs)
    assert raised.value.task == name
    assert str(raised.value).startswith(f"bad arguments for task {name!r}: ")
    assert _stored_count(backstop) == 0


def test_arguments_are_stored_as_json(backstop: Backstop) -> None:
    task_id = backstop.tasks.add_task(
        "test.anything", {"nested": [1, 2.5, None, "x"]}, 3, 4, flag="on"
    )
    with backstop.db.read() as conn:
        row = store_tasks.get_task(conn, task_id)
    assert row.args == [{"nested": [1, 2.5, None, "x"]}, 3, 4]
    assert row.kwargs == {"flag": "on"}


@pytest.mark.parametrize(
    ("at", "stored"),
    [
        (datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC), "2030-01-02T03:04:05Z"),
        (
            datetime(2030, 1, 2, 3, 4, 5, 600, tzinfo=timezone(timedelta(hours=2))),
            "2030-01-02T03:04:05.000600+02:00",
        ),
    ],
)
def test_datetime_arguments_round_trip(backstop: Backstop, at: datetime, stored: str) -> None:
    positional = backstop.tasks.add_task("test.when", at)
    keyword = backstop.tasks.add_task("test.when", at=at)
    with backstop.db.read() as conn:
        assert store_tasks.get_task(conn, positional).args == [stored]
        assert store_tasks.get_task(conn, keyword).kwargs == {"at": stored}

    done = asyncio.run(backstop.runner.drain())

    assert len(done) == 2
    for finished in done:
        assert finished.status == TaskStatus.SUCCEEDED
        assert finished.result["type"] == "datetime"
        assert datetime.fromisoformat(finished.result["iso"]) == at
        assert datetime.fromisoformat(finished.result["iso"]).utcoffset() == at.utcoffset()
