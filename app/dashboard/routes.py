"""The dashboard's pages: overview, failing work, a task, schedules, and the login form.

Every page is whole HTML that works without JavaScript. With `?fragment=1` a page answers
only its main part, which the shipped script fetches every few seconds to keep the page live.
Templates autoescape everything: task arguments, results and errors are anyone's input.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from datetime import datetime
from importlib import resources
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, StrictUndefined

from app.api.deps import Service
from app.api.schemas import TaskOut
from app.backstop import Backstop
from app.cli.output import duration, progress_text
from app.dashboard.auth import (
    CSRF_COOKIE,
    CSRF_FIELD,
    SESSION_COOKIE,
    SESSION_SECONDS,
    DashboardRoute,
    Refused,
    base_path,
    csrf_token,
    read_form,
    remember_csrf,
    session_value,
    set_cookie,
)
from app.dashboard.chart import throughput_chart
from app.runner.periodic import read_schedules
from store import attempts as store_attempts
from store import stats as store_stats
from store import tasks as store_tasks
from store.errors import (
    InvalidCursor,
    InvalidTransition,
    ParentNotSucceeded,
    TaskNotFound,
    UniqueKeyTaken,
)
from store.jsonvalues import escaped_text
from store.models import TaskStatus
from store.timeutil import UnreadableTime, stored_text, utcnow

PAGE_SIZE = 25
FAILING = (TaskStatus.FAILED, TaskStatus.RETRYING)
# How often a live page refreshes its main part, in milliseconds: each refresh of the
# overview counts the whole task table.
LIVE_EVERY = 3000
# The browser runs only the dashboard's own script and styles, whatever a task's data holds.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}


def _unreadable(value: Any) -> str:
    """A value a row written by hand holds that is not of its type, as stored."""
    stored = value.stored if isinstance(value, UnreadableTime) else value
    return f"unreadable: {escaped_text(stored_text(stored))!r}"


def _utc(value: datetime | None) -> str:
    if isinstance(value, UnreadableTime):
        return _unreadable(value)
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S} UTC"


def _ago(then: datetime | None, now: datetime) -> str:
    if isinstance(then, UnreadableTime):
        return _unreadable(then)
    return "-" if then is None else f"{duration(max((now - then).total_seconds(), 0.0))} ago"


def _until(then: datetime | None, now: datetime) -> str:
    if isinstance(then, UnreadableTime):
        return _unreadable(then)
    if then is None:
        return "-"
    seconds = (then - now).total_seconds()
    return f"in {duration(seconds)}" if seconds >= 0 else f"{duration(-seconds)} ago"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("app.dashboard", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ago=_ago,
        until=_until,
        pretty=_pretty,
        seconds=duration,
        utc=_utc,
    )
    return env


templates = Jinja2Templates(env=_environment())


def _static_files() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("app.dashboard").joinpath("static")
    return {
        entry.name: (entry.read_bytes(), STATIC_TYPES[ext])
        for entry in folder.iterdir()
        if (ext := "." + entry.name.rpartition(".")[2]) in STATIC_TYPES
    }


STATIC = _static_files()


def render(
    request: Request,
    service: Backstop,
    template: str,
    *,
    title: str,
    status_code: int = 200,
    live: bool = False,
    **context: Any,
) -> HTMLResponse:
    """A page (or, with `?fragment=1`, its main part alone) with the dashboard's headers."""
    base = base_path(request)
    fragment = request.query_params.get("fragment") == "1"
    values = {
        "base": base,
        "title": title,
        "csrf_field": CSRF_FIELD,
        "csrf": csrf_token(request),
        "now": utcnow(),
        "logged_in": bool(service.settings.api_token.get_secret_value())
        and SESSION_COOKIE in request.cookies,
        "content": template,
        "live": live,
        # The page's own query (its filters, its page) with the fragment asked for.
        "live_query": urlencode(
            [
                *((k, v) for k, v in request.query_params.multi_items() if k != "fragment"),
                ("fragment", "1"),
            ]
        ),
        "live_every": LIVE_EVERY,
        "states": list(TaskStatus),
        **context,
    }
    name = template if fragment else "page.html"
    response = templates.TemplateResponse(request, name, values, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    remember_csrf(request, response)
    return response


def _refused(request: Request, service: Backstop, error: Refused) -> HTMLResponse:
    return render(request, service, "error.html", title="Refused", status_code=403, error=error)


def _not_found(request: Request, service: Backstop, task_id: str) -> HTMLResponse:
    error = f"no task with id {task_id!r}"
    return render(request, service, "error.html", title="Not found", status_code=404, error=error)


def overview(request: Request, service: Service) -> HTMLResponse:
    """The overview: queues, throughput, runners."""
    with service.db.read() as conn:
        seen = store_stats.overview(conn)
    return render(
        request,
        service,
        "overview.html",
        title="Overview",
        live=True,
        overview=seen,
        chart=throughput_chart(seen.throughput),
    )


def failing(
    request: Request,
    service: Service,
    name: Annotated[str, Query(max_length=200)] = "",
    queue: Annotated[str, Query(max_length=100)] = "",
    state: Annotated[str, Query(max_length=20)] = "",
    cursor: Annotated[str, Query(max_length=500)] = "",
) -> HTMLResponse:
    """The latest failed and retrying tasks, filtered by name, queue and state."""
    states = [s for s in FAILING if s.value == state] or list(FAILING)
    error = None
    try:
        with service.db.read() as conn:
            page = store_tasks.list_tasks(
                conn,
                status=states,
                name=name or None,
                queue=queue or None,
                limit=PAGE_SIZE,
                cursor=cursor or None,
            )
            queues = sorted(store_stats.task_stats(conn).queues)
    except InvalidCursor:
        page, queues, error = store_tasks.TaskPage([], None), [], "that page link is stale"
    filters = {"name": name, "queue": queue, "state": state}
    return render(
        request,
        service,
        "failing.html",
        title="Failing",
        live=True,
        page=page,
        queues=queues,
        filters=filters,
        error=error,
        failing_states=FAILING,
    )


def _task_page(
    request: Request, service: Backstop, task_id: str, *, status_code: int = 200, error: str = ""
) -> HTMLResponse:
    try:
        with service.db.read() as conn:
            task = store_tasks.get_task(conn, task_id)
            attempts = store_attempts.list_attempts(conn, task_id)
    except TaskNotFound:
        return _not_found(request, service, task_id)
    known = isinstance(task.status, TaskStatus)
    # As the JSON API shows them: a progress or links written by hand in another shape
    # are left out there, not raised on.
    shown = TaskOut.of(task)
    return render(
        request,
        service,
        "task.html",
        title=f"Task {task.name}",
        status_code=status_code,
        live=True,
        task=task,
        attempts=attempts,
        error=error,
        progress=None if shown.progress is None else progress_text(shown.progress),
        after=shown.after,
        waiting_on=shown.waiting_on,
        parent_id=shown.parent_id,
        # A state written by hand that is not one is shown as stored, and offers no action.
        state=task.status.value if known else _unreadable(task.status),
        terminal=known and task.status.terminal,
        retryable=task.status in (TaskStatus.FAILED, TaskStatus.CANCELLED),
        cancellable=known and not task.status.terminal,
    )


def task_page(request: Request, service: Service, task_id: str) -> HTMLResponse:
    """One task: arguments, result, every attempt; cancel and retry."""
    return _task_page(request, service, task_id)


async def _act(
    request: Request, service: Backstop, task_id: str, act: Callable[[str], object]
) -> Response:
    """Do `act` (the task client's cancel or retry, as the task API does), then show the
    task again; a task whose state does not allow it shows why (409)."""
    try:
        await read_form(request)
    except Refused as error:
        return _refused(request, service, error)
    try:
        await run_in_threadpool(act, task_id)
    except TaskNotFound:
        return _not_found(request, service, task_id)
    except (InvalidTransition, UniqueKeyTaken, ParentNotSucceeded) as error:
        return await run_in_threadpool(
            _task_page, request, service, task_id, status_code=409, error=str(error)
        )
    return RedirectResponse(f"{base_path(request)}/tasks/{task_id}", status_code=303)


async def cancel(request: Request, service: Service, task_id: str) -> Response:
    """Cancel the task, then show it again."""
    return await _act(request, service, task_id, service.tasks.cancel)


async def retry(request: Request, service: Service, task_id: str) -> Response:
    """Queue the failed or cancelled task again, then show it again."""
    return await _act(request, service, task_id, service.tasks.retry)


def schedules(request: Request, service: Service) -> HTMLResponse:
    """The periodic tasks with their next run."""
    with service.db.read() as conn:
        infos = read_schedules(conn, service.registry)
    return render(request, service, "schedules.html", title="Schedules", live=True, schedules=infos)


def _safe_next(request: Request, target: str) -> str:
    """`target` if it is a page of this dashboard, else the overview: never another site."""
    base = base_path(request)
    if target == base or (target.startswith(base + "/") and "//" not in target):
        return target
    return base


def login_form(
    request: Request, service: Service, next: Annotated[str, Query(max_length=2000)] = ""
) -> Response:
    """The form that takes the API token once and keeps a session cookie."""
    if not service.settings.api_token.get_secret_value():
        return RedirectResponse(base_path(request), status_code=303)
    target = _safe_next(request, next)
    return render(request, service, "login.html", title="Log in", next=target, error="")


async def login(request: Request, service: Service) -> Response:
    """Check the token; on success set the session cookie and go where the user was going."""
    try:
        fields = await read_form(request)
    except Refused as error:
        return _refused(request, service, error)
    token = service.settings.api_token.get_secret_value()
    target = _safe_next(request, fields.get("next", ""))
    if not token:
        return RedirectResponse(target, status_code=303)
    if not hmac.compare_digest(fields.get("token", "").encode(), token.encode()):
        return render(
            request,
            service,
            "login.html",
            title="Log in",
            status_code=401,
            next=target,
            error="That is not the service's token.",
        )
    response = RedirectResponse(target, status_code=303)
    set_cookie(response, request, SESSION_COOKIE, session_value(token), SESSION_SECONDS)
    return response


async def logout(request: Request, service: Service) -> Response:
    """End the session."""
    try:
        await read_form(request)
    except Refused as error:
        return _refused(request, service, error)
    response = RedirectResponse(f"{base_path(request)}/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=base_path(request))
    response.delete_cookie(CSRF_COOKIE, path=base_path(request))
    return response


def static(name: str) -> Response:
    """The dashboard's stylesheet and script, shipped in the package."""
    found = STATIC.get(name)
    if found is None:
        return Response("not found", status_code=404, media_type="text/plain")
    body, media_type = found
    headers = {"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"}
    return Response(body, media_type=media_type, headers=headers)


def dashboard_router(backstop: Backstop) -> APIRouter:
    """The dashboard's routes for `backstop`, under `/dashboard`; none is in the OpenAPI
    document."""
    route = type(
        "DashboardRoute",
        (DashboardRoute,),
        {"backstop": backstop, "open_endpoints": frozenset({login_form, login, static})},
    )
    router = APIRouter(prefix="/dashboard", route_class=route, include_in_schema=False)
    router.add_api_route("", overview, methods=["GET"], response_class=HTMLResponse)
    router.add_api_route("/failing", failing, methods=["GET"], response_class=HTMLResponse)
    router.add_api_route(
        "/tasks/{task_id}", task_page, methods=["GET"], response_class=HTMLResponse
    )
    router.add_api_route("/tasks/{task_id}/cancel", cancel, methods=["POST"])
    router.add_api_route("/tasks/{task_id}/retry", retry, methods=["POST"])
    router.add_api_route("/schedules", schedules, methods=["GET"], response_class=HTMLResponse)
    router.add_api_route("/login", login_form, methods=["GET"])
    router.add_api_route("/login", login, methods=["POST"])
    router.add_api_route("/logout", logout, methods=["POST"])
    router.add_api_route("/static/{name}", static, methods=["GET"])
    return router
