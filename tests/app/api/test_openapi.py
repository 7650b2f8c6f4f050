"""The OpenAPI document against the service's answers.

Schemathesis draws requests from the document of the real standalone app (valid ones and
ones the schema forbids), sends them in-process, and checks each answer: no 5xx, a status the
document declares for that route, and a body that fits the schema declared for it. A fixed
seed (derandomized) and a bounded number of examples keep it repeatable and well under a
minute. The runner is off: an enqueued task is never run, so no fuzzed argument reaches a
built-in task (a webhook) on this machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import CheckFunction
from schemathesis.core.result import Ok
from schemathesis.python.asgi import shutdown_lifespans

from app.main import create_app
from app.settings import Settings

TOKEN = "openapi-secret"
EXAMPLES = 25

CHECKS: list[CheckFunction] = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


def fuzz(app: FastAPI, headers: dict[str, str], token: str = "") -> int:
    """Send every operation of `app`'s document (read with `token`) requests drawn in both
    generation modes, with `headers`, and check each answer; how many were sent."""
    sent = 0
    bearer = {"Authorization": f"Bearer {token}"} if token else {}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=bearer)
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        for mode in [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: schemathesis.Case[Any]) -> None:
                nonlocal sent
                sent += 1
                case.call_and_validate(headers=headers, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                # A route whose only parameter is any string (a task id), or that has none,
                # has no request its schema forbids.
                assert mode is GenerationMode.NEGATIVE, operation.label
    return sent


@pytest.fixture
def standalone(settings: Settings, request: pytest.FixtureRequest) -> Iterator[FastAPI]:
    """The standalone app on the test's temp database, with the token the test asks for."""
    token: str = request.param
    yield create_app(settings.model_copy(update={"api_token": SecretStr(token)}), run_worker=False)
    shutdown_lifespans()


@pytest.mark.parametrize("standalone", [""], indirect=True)
def test_every_answer_without_a_token_is_declared(standalone: FastAPI) -> None:
    assert fuzz(standalone, {}) > EXAMPLES * 11


@pytest.mark.parametrize("standalone", [TOKEN], indirect=True)
def test_every_answer_with_the_token_is_declared(standalone: FastAPI) -> None:
    assert fuzz(standalone, {"Authorization": f"Bearer {TOKEN}"}, TOKEN) > EXAMPLES * 11


@pytest.mark.parametrize("standalone", [TOKEN], indirect=True)
def test_every_refusal_of_a_request_without_the_token_is_declared(standalone: FastAPI) -> None:
    schema = standalone.openapi()
    assert schema["components"]["securitySchemes"]["BackstopBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The service's API token (`BACKSTOP_API_TOKEN`)",
    }
    assert fuzz(standalone, {"Authorization": "Bearer wrong"}, TOKEN) > EXAMPLES * 11


def test_the_refusals_fuzzing_cannot_reach_are_declared_with_their_bodies(
    settings: Settings,
) -> None:
    """A wrong Content-Length, a body over the limit, a conflict on an existing task: each
    answer has a status its route declares and a body that fits the declared schema."""
    settings = settings.model_copy(
        update={"api_token": SecretStr(TOKEN), "max_body_bytes": 1000, "run_worker": False}
    )
    app = create_app(settings)
    schema = schemathesis.openapi.from_dict(app.openapi())
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app) as client:
        task = client.post("/tasks", json={"name": "test.noop"}, headers=bearer).json()
        assert client.post(f"/tasks/{task['id']}/cancel", headers=bearer).status_code == 200
        answers = [
            ("GET", "/tasks", {"headers": {**bearer, "Content-Length": "many"}}, 400),
            ("POST", "/tasks", {"json": {"name": "test.noop"}}, 401),
            ("GET", "/schedules", {"headers": {"Authorization": "Bearer wrong"}}, 401),
            ("GET", "/tasks/{task_id}", {"headers": bearer}, 404),
            ("POST", "/tasks/{task_id}/cancel", {"headers": bearer, "id": task["id"]}, 409),
            ("POST", "/tasks/{task_id}/retry", {"headers": bearer, "id": "nope"}, 404),
            ("POST", "/tasks", {"headers": bearer, "content": b"[" * 2000}, 413),
            ("POST", "/tasks", {"headers": bearer, "json": {"name": "no.such"}}, 422),
            ("POST", "/tasks", {"headers": bearer, "json": {"args": []}}, 422),
            ("GET", "/tasks", {"headers": bearer, "params": {"cursor": "x"}}, 422),
        ]
        for method, route, options, expected in answers:
            url = route.replace("{task_id}", str(options.pop("id", "nope")))
            response = client.request(method, url, **options)
            assert response.status_code == expected, (route, response.text)
            declared = app.openapi()["paths"][route][method.lower()]["responses"]
            assert str(expected) in declared, (method, route, expected)
            schema[route][method].validate_response(response)
