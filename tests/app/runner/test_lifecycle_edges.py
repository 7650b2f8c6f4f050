"""Edge cases of the runner's lifecycle and of task declarations, each once a real bug."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.backstop import Backstop
from app.errors import TaskDefinitionError
from app.main import create_app
from app.settings import Settings
from app.tasks.context import TaskContext
from app.tasks.registry import task
from store import tasks as store_tasks
from store.models import TaskStatus


def test_a_context_parameter_before_positional_ones_is_refused_at_declaration() -> None:
    with pytest.raises(TaskDefinitionError, match="put the TaskContext parameter 'ctx' after"):

        @task(name="test.context_in_the_middle")
        def middle(a: int, ctx: TaskContext, b: int = 1) -> None:
            """Never registered."""


def test_log_append_takes_its_file_by_position(backstop: Backstop) -> None:
    backstop.tasks.add_task("log.append", "by position", "positional.txt")

    [done] = asyncio.run(backstop.runner.drain())

    assert done.status == TaskStatus.SUCCEEDED, done.last_error
    written = (backstop.settings.logs_dir / "positional.txt").read_text()
    assert written == "by position\n"


def test_a_retry_policy_that_raises_fails_the_task_instead_of_leaving_it_running(
    backstop: Backstop,
) -> None:
    backstop.tasks.add_task("test.bad_policy")

    [done] = asyncio.run(backstop.runner.drain())

    assert done.status == TaskStatus.FAILED
    assert done.last_error is not None
    assert done.last_error.startswith("Flaky: fails (and the retry policy failed: KeyError")


def test_a_timed_out_sync_task_is_not_retried_while_its_thread_still_runs(
    backstop: Backstop,
) -> None:
    task_id = backstop.tasks.add_task("test.stubborn_timeout")

    asyncio.run(backstop.runner.drain())

    runs = (backstop.settings.data_dir / "runs" / f"{task_id}.txt").read_text().splitlines()
    assert runs == ["start 1", "done 1", "start 2", "done 2"]
    with backstop.db.read() as conn:
        assert store_tasks.get_task(conn, task_id).status == TaskStatus.FAILED


def test_the_app_serves_and_runs_tasks_again_after_a_restart(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"run_worker": True}))
    for round_ in range(2):
        with TestClient(app) as client:
            response = client.post("/tasks", json={"name": "test.echo", "args": [round_]})
            assert response.status_code == 202
            done = client.get(f"/tasks/{response.json()['id']}?wait=10").json()
            assert (done["status"], done["result"]) == (
                "succeeded",
                {"value": round_, "attempt": 1},
            )


def test_a_task_module_that_cannot_be_imported_is_one_line(tmp_path: Path) -> None:
    backstop = Path(sys.executable).parent / "backstop"
    env = {
        "BACKSTOP_DATA_DIR": str(tmp_path),
        "BACKSTOP_TASK_MODULES": "no_such_module",
        "PATH": "",
    }
    for command in (["db", "upgrade"], ["serve", "--port", "1"]):
        done = subprocess.run(
            [str(backstop), *command], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(
            "backstop: BACKSTOP_TASK_MODULES: cannot import 'no_such_module'"
        )
