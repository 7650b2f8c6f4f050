"""A team's own app factory, named in the ini file or given by overriding the fixture."""

from __future__ import annotations

import pytest

from tests.kit.conftest import INI, RunKit

SERVICE = """
from __future__ import annotations

from fastapi import APIRouter, FastAPI

from app import DurableTasks, task
from app.main import create_app
from app.settings import Settings

router = APIRouter()


@task(name="team.greet")
def greet(name: str) -> str:
    return f"hello {name}"


@router.post("/greet/{name}", status_code=202)
def ask_for_greeting(name: str, tasks: DurableTasks) -> dict[str, str]:
    return {"task_id": tasks.add_task(greet, name)}


def create_service(settings: Settings | None = None) -> FastAPI:
    app = create_app(settings)
    app.include_router(router)
    app.state.built_by = "create_service"
    return app


def not_on_create_app(settings: Settings) -> FastAPI:
    return FastAPI()
"""

USES_THE_TEAM_APP = """
def test_the_fixtures_use_the_team_app(
    backstop_app, backstop_client, backstop_drain, backstop_tasks
):
    assert backstop_app.state.built_by == "create_service"
    response = backstop_client.post("/greet/ada")
    assert response.status_code == 202
    backstop_tasks.assert_enqueued("team.greet", "ada")
    [done] = backstop_drain()
    assert (done.id, done.result) == (response.json()["task_id"], "hello ada")
"""


def test_the_ini_option_names_the_factory(pytester: pytest.Pytester, run_kit: RunKit) -> None:
    pytester.makeini(INI + "backstop_app_factory = service:create_service\n")
    pytester.makepyfile(service=SERVICE, test_team=USES_THE_TEAM_APP)

    result = run_kit()

    result.assert_outcomes(passed=1)


def test_overriding_the_factory_fixture(pytester: pytest.Pytester, run_kit: RunKit) -> None:
    pytester.makeconftest(
        """
        import pytest

        import service


        @pytest.fixture
        def backstop_app_factory():
            return service.create_service
        """
    )
    pytester.makepyfile(service=SERVICE, test_team=USES_THE_TEAM_APP)

    result = run_kit()

    result.assert_outcomes(passed=1)


def test_without_either_the_app_is_backstops_own(
    pytester: pytest.Pytester, run_kit: RunKit
) -> None:
    pytester.makepyfile(
        test_default="""
        def test_default_app(backstop_app, backstop_client):
            assert not hasattr(backstop_app.state, "built_by")
            assert backstop_client.post("/send-message", json={"message": "hi"}).status_code == 202
        """
    )

    result = run_kit()

    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("service", "*backstop_app_factory must look like 'module:function', not 'service'*"),
        (
            "service:not_on_create_app",
            "*the app factory must build one Backstop on the settings it is given*",
        ),
    ],
)
def test_a_factory_that_cannot_work_is_reported(
    pytester: pytest.Pytester, run_kit: RunKit, factory: str, message: str
) -> None:
    pytester.makeini(INI + f"backstop_app_factory = {factory}\n")
    pytester.makepyfile(
        service=SERVICE,
        test_team="""
        def test_app(backstop_app):
            pass
        """,
    )

    result = run_kit()

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message])
