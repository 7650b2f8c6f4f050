"""The dashboard's pages through a TestClient: what they show, that task data stays inert
text, the forms' protection against other sites, and how a browser logs in with the token."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.testclient import TestClient
from httpx2 import Response
from pydantic import SecretStr

from app import Backstop
from app.dashboard import routes
from app.main import create_app
from app.settings import Settings
from tests.support.client import drain

TOKEN = "dashboard-secret"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def enqueue(client: TestClient, name: str, prefix: str = "", **body: object) -> str:
    response = client.post(f"{prefix}/tasks", json={"name": name, **body})
    assert response.status_code == 202, response.text
    task_id: str = response.json()["id"]
    return task_id


def csrf(client: TestClient) -> str:
    """The form token the browser holds after loading a page."""
    token = client.cookies.get("backstop_csrf")
    assert token, "no page set the form token yet"
    return token


def post_form(client: TestClient, path: str, **headers: str) -> Response:
    return client.post(path, data={"csrf": csrf(client)}, headers=headers, follow_redirects=False)


def status(client: TestClient, task_id: str, prefix: str = "") -> str:
    answer: str = client.get(f"{prefix}/tasks/{task_id}").json()["status"]
    return answer


def test_every_page_renders_whole_and_as_a_live_fragment(client: TestClient) -> None:
    task_id = enqueue(client, "test.noop", queue="mail")
    pages = [
        "/dashboard",
        "/dashboard/failing",
        f"/dashboard/tasks/{task_id}",
        "/dashboard/schedules",
    ]
    for page in pages:
        whole = client.get(page)
        assert whole.status_code == 200, page
        assert whole.headers["content-type"].startswith("text/html")
        assert "<!doctype html>" in whole.text
        fragment = client.get(page, params={"fragment": "1"})
        assert fragment.status_code == 200
        assert "<!doctype html>" not in fragment.text
        heading = fragment.text.strip().splitlines()[0]
        assert heading.startswith("<h1>")
        assert '<main id="main"' in whole.text
        assert heading in whole.text


def test_the_overview_counts_each_queue_by_state_with_its_oldest_due_task(
    client: TestClient,
) -> None:
    for queue in ("mail", "mail", "reports"):
        enqueue(client, "test.noop", queue=queue)
    enqueue(client, "test.fatal", queue="reports")
    drain(client)
    enqueue(client, "test.noop", queue="reports")

    page = client.get("/dashboard").text

    def row(queue: str) -> dict[str, str]:
        found = re.search(rf'<tr data-queue="{queue}">(.*?)</tr>', page, re.S)
        assert found is not None, page
        return dict(re.findall(r'data-state="(\w+)">(\d+)<', found.group(1)))

    assert row("mail") == {
        "queued": "0", "running": "0", "retrying": "0",
        "succeeded": "2", "failed": "0", "cancelled": "0",
    }  # fmt: skip
    assert row("reports")["failed"] == "1"
    assert row("reports")["queued"] == "1"
    # The throughput chart is inline SVG with a bar per minute, nothing fetched from elsewhere.
    assert page.count("<g><title>") == 15
    assert "4 finished; busiest minute 4" in page


def test_task_data_is_shown_as_text_never_as_markup(client: TestClient) -> None:
    task_id = enqueue(client, "test.anything", args=[HOSTILE], queue=HOSTILE[:90])
    drain(client)

    for page in ("/dashboard", f"/dashboard/tasks/{task_id}"):
        answer = client.get(page)
        assert "<script>alert" not in answer.text
        assert "onerror=alert" not in answer.text.replace("onerror=alert(1)&gt;", "")
        assert "&lt;script&gt;" in answer.text
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy


def test_failing_work_lists_failed_and_retrying_tasks_filtered_and_paged(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(routes, "PAGE_SIZE", 2)
    failed = [enqueue(client, "test.fatal", queue=q) for q in ("a", "a", "a", "b")]
    retrying = enqueue(client, "test.flaky", args=[3], queue="b")
    enqueue(client, "test.noop", queue="a")
    drain(client)

    def listed(query: str) -> tuple[list[str], str | None]:
        page = client.get(f"/dashboard/failing?{query}").text
        ids = re.findall(r'<tr data-task="([0-9a-f-]+)">', page)
        older = re.search(r'rel="next" href="[^"?]*\?([^"]+)"', page)
        return ids, None if older is None else older.group(1).replace("&amp;", "&")

    first, more = listed("")
    assert first == [retrying, failed[3]]  # newest first
    assert more is not None
    second, more = listed(more)
    assert second == [failed[2], failed[1]]
    assert more is not None
    assert listed(more) == ([failed[0]], None)

    assert listed("queue=b")[0] == [retrying, failed[3]]
    assert listed("queue=a&state=failed")[0] == [failed[2], failed[1]]
    assert listed("state=retrying")[0] == [retrying]
    assert listed("name=test.flaky")[0] == [retrying]
    page = client.get("/dashboard/failing?queue=b").text
    assert "Fatal: not worth retrying" in page
    assert "Flaky: attempt 1 of 3 planned failures" in page
    assert "stale" in client.get("/dashboard/failing?cursor=nonsense").text
    # The page stays live with its filters: its fragment is fetched with the same query.
    assert (
        'data-live="?queue=b&amp;state=failed&amp;fragment=1"'
        in client.get("/dashboard/failing?queue=b&state=failed").text
    )


def test_the_task_page_shows_every_attempt_with_its_error_and_traceback(
    client: TestClient,
) -> None:
    task_id = enqueue(client, "test.fatal", kwargs={})
    drain(client)

    page = client.get(f"/dashboard/tasks/{task_id}").text

    assert 'id="status">failed<' in page
    assert "Fatal: not worth retrying" in page
    assert "Traceback (most recent call last)" in page
    assert 'id="retry"' in page
    assert 'id="cancel"' not in page
    assert client.get("/dashboard/tasks/no-such-task").status_code == 404


def test_the_retry_and_cancel_buttons_change_the_task(client: TestClient) -> None:
    failed = enqueue(client, "test.fatal")
    waiting = enqueue(client, "test.noop", delay=3600)
    drain(client)
    client.get("/dashboard")

    answer = post_form(client, f"/dashboard/tasks/{failed}/retry")
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/dashboard/tasks/{failed}"
    assert status(client, failed) == "queued"

    assert post_form(client, f"/dashboard/tasks/{waiting}/cancel").status_code == 303
    assert status(client, waiting) == "cancelled"
    assert 'id="status">cancelled<' in client.get(f"/dashboard/tasks/{waiting}").text

    again = post_form(client, f"/dashboard/tasks/{failed}/cancel")
    refused = post_form(client, f"/dashboard/tasks/{waiting}/cancel")
    assert again.status_code == 303
    assert refused.status_code == 409
    assert "only queued, retrying or running tasks can be cancelled" in refused.text


def test_a_form_post_from_another_site_changes_nothing(client: TestClient) -> None:
    task_id = enqueue(client, "test.noop", delay=3600)
    client.get("/dashboard")
    path = f"/dashboard/tasks/{task_id}/cancel"

    refusals = [
        client.post(path, data={}, follow_redirects=False),
        client.post(path, data={"csrf": "forged" * 8}, follow_redirects=False),
        post_form(client, path, **{"Sec-Fetch-Site": "cross-site"}),
        post_form(client, path, Origin="https://evil.example"),
        client.post(path, json={"csrf": csrf(client)}, follow_redirects=False),
    ]

    assert [answer.status_code for answer in refusals] == [403] * 5
    assert status(client, task_id) == "queued"


def test_the_assets_are_served_from_the_package(client: TestClient) -> None:
    page = client.get("/dashboard").text
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:css|js|svg))"', page)
    assert sorted(assets) == [
        "/dashboard/static/dashboard.css",
        "/dashboard/static/dashboard.js",
        "/dashboard/static/favicon.svg",
    ]
    for asset in assets:
        assert client.get(asset).status_code == 200
    assert "//" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert client.get("/dashboard/static/../routes.py").status_code == 404
    assert not any(
        path.startswith("/dashboard") for path in client.get("/openapi.json").json()["paths"]
    )


# -- the token, in a browser -----------------------------------------------------------------


@pytest.fixture
def locked(settings: Settings) -> Iterator[TestClient]:
    """The standalone service with an API token."""
    app = create_app(settings.model_copy(update={"api_token": SecretStr(TOKEN)}), run_worker=False)
    with TestClient(app) as client:
        yield client


def test_a_browser_logs_in_once_with_the_token_and_keeps_a_session_cookie(
    locked: TestClient,
) -> None:
    first = locked.get("/dashboard/failing?queue=a", follow_redirects=False)
    assert first.status_code == 303
    assert first.headers["location"] == "/dashboard/login?next=/dashboard/failing%3Fqueue%3Da"
    form = locked.get(first.headers["location"])
    assert form.status_code == 200
    assert 'name="token"' in form.text
    assert locked.get("/dashboard/static/dashboard.css").status_code == 200

    wrong = locked.post(
        "/dashboard/login",
        data={"csrf": csrf(locked), "token": "guess", "next": "/dashboard/failing?queue=a"},
        follow_redirects=False,
    )
    assert wrong.status_code == 401
    assert "backstop_session" not in locked.cookies

    right = locked.post(
        "/dashboard/login",
        data={"csrf": csrf(locked), "token": TOKEN, "next": "/dashboard/failing?queue=a"},
        follow_redirects=False,
    )
    assert right.status_code == 303
    assert right.headers["location"] == "/dashboard/failing?queue=a"
    cookie = right.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/dashboard" in cookie
    assert TOKEN not in cookie

    assert locked.get("/dashboard").status_code == 200
    # The cookie opens the dashboard alone: the JSON API still wants the header.
    assert locked.get("/tasks").status_code == 401
    assert locked.get("/docs").status_code == 401

    out = locked.post("/dashboard/logout", data={"csrf": csrf(locked)}, follow_redirects=False)
    assert out.status_code == 303
    assert locked.get("/dashboard", follow_redirects=False).status_code == 303


def test_the_bearer_header_opens_the_dashboard_and_a_forged_cookie_does_not(
    locked: TestClient,
) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert locked.get("/dashboard", headers=bearer).status_code == 200
    locked.cookies.set("backstop_session", "99999999999.deadbeef", path="/dashboard")
    assert locked.get("/dashboard", follow_redirects=False).status_code == 303
    locked.cookies.clear()
    # A form post without the session is refused before its form is read.
    assert locked.post("/dashboard/tasks/x/cancel", data={}).status_code == 401


def test_login_never_sends_the_browser_to_another_site(locked: TestClient) -> None:
    locked.get("/dashboard/login")
    for target in ("https://evil.example/", "//evil.example/dashboard", "/elsewhere"):
        answer = locked.post(
            "/dashboard/login",
            data={"csrf": csrf(locked), "token": TOKEN, "next": target},
            follow_redirects=False,
        )
        assert answer.headers["location"] == "/dashboard"


# -- in a team's app ---------------------------------------------------------------------------


def team_auth(x_team: Annotated[str | None, Header()] = None) -> None:
    if x_team != "yes":
        raise HTTPException(status_code=403, detail="team auth")


@pytest.fixture
def team(settings: Settings) -> Iterator[TestClient]:
    """A team's app with Backstop under /jobs behind the team's own dependency."""
    backstop = Backstop(settings.model_copy(update={"run_worker": False}))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with backstop.lifespan(app):
            yield

    app = FastAPI(lifespan=lifespan)
    app.include_router(backstop.router, prefix="/jobs", dependencies=[Depends(team_auth)])
    with TestClient(app) as client:
        yield client


def test_in_a_team_app_the_dashboard_sits_under_its_prefix_behind_its_auth(
    team: TestClient,
) -> None:
    assert team.get("/jobs/dashboard").status_code == 403
    assert team.get("/dashboard").status_code == 404
    team.headers["X-Team"] = "yes"
    task_id = enqueue(team, "test.noop", prefix="/jobs", delay=3600)

    first = team.get("/jobs/dashboard")
    assert "Path=/jobs/dashboard;" in first.headers["set-cookie"]
    page = first.text
    assert 'href="/jobs/dashboard/failing"' in page
    assert 'href="/jobs/dashboard/static/dashboard.css"' in page
    task_page = team.get(f"/jobs/dashboard/tasks/{task_id}")
    assert f'action="/jobs/dashboard/tasks/{task_id}/cancel"' in task_page.text

    answer = post_form(team, f"/jobs/dashboard/tasks/{task_id}/cancel")
    assert answer.headers["location"] == f"/jobs/dashboard/tasks/{task_id}"
    assert status(team, task_id, prefix="/jobs") == "cancelled"


def test_the_task_page_shows_progress_and_the_links_between_tasks(client: TestClient) -> None:
    reported = enqueue(client, "test.progress_storm", args=[10])
    fan = enqueue(client, "test.fan_out", args=[1])
    drain(client)
    follow_ups = client.get(f"/tasks/{fan}").json()["result"]
    gated = enqueue(client, "test.noop", after=[reported, follow_ups[0]], delay=3600)
    waiting = enqueue(client, "test.noop", after=[enqueue(client, "test.noop", delay=3600)])

    assert (
        '<dd id="progress">10/10 (100%) storming</dd>'
        in client.get(f"/dashboard/tasks/{reported}").text
    )
    child = client.get(f"/dashboard/tasks/{follow_ups[-1]}").text
    assert f'<dd id="follows"><a class="mono" href="/dashboard/tasks/{fan}">' in child
    page = client.get(f"/dashboard/tasks/{gated}").text
    assert page.count('<a class="mono" href="/dashboard/tasks/') == 2
    assert "(waiting on" not in page
    assert "(waiting on 1)" in client.get(f"/dashboard/tasks/{waiting}").text


def test_a_retry_the_task_api_refuses_answers_409_with_the_reason(client: TestClient) -> None:
    parent = enqueue(client, "test.fatal")
    child = enqueue(client, "test.noop", after=[parent])
    drain(client)
    assert status(client, child) == "cancelled"
    client.get("/dashboard")

    refused = post_form(client, f"/dashboard/tasks/{child}/retry")

    assert refused.status_code == 409
    assert parent in refused.text
    assert status(client, child) == "cancelled"
