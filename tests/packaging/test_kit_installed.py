"""The test kit from the installed wheel: a team's suite uses it with warnings as errors,
and a suite that does not use it is left alone."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.packaging.conftest import Venv

pytestmark = [pytest.mark.wheel, pytest.mark.timeout(300)]

PYPROJECT = """\
[tool.pytest.ini_options]
addopts = "--strict-markers --strict-config -p no:cacheprovider"
filterwarnings = ["error"]
pythonpath = ["."]
"""


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(textwrap.dedent(text), encoding="utf-8")


def test_a_team_suite_uses_the_kit(testing_venv: Venv, outside: Path) -> None:
    _write(
        outside,
        {
            "pyproject.toml": PYPROJECT,
            "greetings/__init__.py": "",
            "greetings/tasks.py": """
                from __future__ import annotations

                from app import task


                @task(name="greetings.send")
                def send(name: str, greeting: str = "Hello") -> str:
                    return f"{greeting}, {name}!"
                """,
            "greetings/main.py": """
                from __future__ import annotations

                from fastapi import FastAPI

                from app import DurableTasks
                from app.main import create_app
                from app.settings import Settings
                from greetings.tasks import send


                def create_service(settings: Settings | None = None) -> FastAPI:
                    app = create_app(settings)

                    @app.post("/greet/{name}", status_code=202)
                    def greet(name: str, tasks: DurableTasks) -> dict[str, str]:
                        return {"task_id": tasks.add_task(send, name=name)}

                    return app
                """,
            "tests/conftest.py": """
                import pytest

                from greetings.main import create_service


                @pytest.fixture
                def backstop_app_factory():
                    return create_service
                """,
            "tests/test_greetings.py": """
                def test_the_endpoint_enqueues_and_the_drain_runs_it(
                    backstop_client, backstop_tasks, backstop_drain
                ):
                    response = backstop_client.post("/greet/ada")

                    assert response.status_code == 202
                    waiting = backstop_tasks.assert_enqueued("greetings.send", name="ada")
                    assert waiting.id == response.json()["task_id"]
                    [ran] = backstop_drain()
                    assert (ran.id, ran.status) == (waiting.id, "succeeded")
                    assert ran.result == "Hello, ada!"
                    assert backstop_tasks.enqueued() == []


                def test_the_app_is_the_installed_one():
                    import app

                    assert "site-packages" in app.__file__
                """,
        },
    )

    done = testing_venv.run("pytest", "-v", cwd=outside, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout, done.stdout
    assert "warning" not in done.stdout.lower(), done.stdout


def test_an_installed_but_unused_kit_leaves_a_strict_suite_alone(venv: Venv, outside: Path) -> None:
    _write(
        outside,
        {
            "pyproject.toml": PYPROJECT,
            "tests/test_plain.py": """
                import importlib.util
                import sys


                def test_backstop_is_there_but_not_httpx2(pytestconfig):
                    assert pytestconfig.pluginmanager.has_plugin("backstop")
                    assert importlib.util.find_spec("httpx2") is None
                    assert "starlette.testclient" not in sys.modules


                def test_something_of_the_team():
                    assert sorted([3, 1, 2]) == [1, 2, 3]
                """,
        },
    )

    done = venv.run("pytest", "-v", cwd=outside, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout, done.stdout


def test_without_the_testing_extra_the_client_fails_on_starlettes_warning(
    venv: Venv, outside: Path
) -> None:
    # Why the testing extra exists: without httpx2, Starlette's TestClient warns, and a suite
    # that turns warnings into errors sees that warning fail the fixture with its advice.
    _write(
        outside,
        {
            "pyproject.toml": PYPROJECT,
            "tests/test_client.py": """
                def test_healthz(backstop_client):
                    assert backstop_client.get("/healthz").status_code == 200
                """,
        },
    )

    done = venv.run("pytest", cwd=outside, timeout=120)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 error" in done.stdout, done.stdout
    assert "install `httpx2`" in done.stdout, done.stdout
