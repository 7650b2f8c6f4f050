"""Who may see the dashboard, and which form posts it takes.

A browser cannot put `BACKSTOP_API_TOKEN` in an `Authorization` header of a link or a form,
so the dashboard also takes it from a cookie: the login form checks the token once and sets
`backstop_session`, HttpOnly and SameSite=Strict, holding an expiry and an HMAC of it keyed
by the token (never the token itself; changing the token ends every session). A request with
the bearer header is let in as on the task API.

Form posts (cancel, retry, login, logout) must come from the dashboard's own pages: each
carries a random value from the `backstop_csrf` cookie in a hidden field (another site can
neither read that cookie nor set it in the browser), and a request that the browser marks as
cross-site (`Sec-Fetch-Site`) or whose `Origin` names another host is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from html import escape
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from app.api.router import BackstopRoute

SESSION_COOKIE = "backstop_session"
CSRF_COOKIE = "backstop_csrf"
CSRF_FIELD = "csrf"
SESSION_SECONDS = 12 * 3600
SAME_SITE = frozenset({"same-origin", "none"})


def base_path(request: Request) -> str:
    """The dashboard's root path as the browser sees it, under whatever prefix the app
    included the router at: the request's path less as many segments as the route's own
    path has after `/dashboard`."""
    route: str = request.scope["route"].path_format
    depth = route[route.rfind("/dashboard") + len("/dashboard") :].count("/")
    parts = request.url.path.split("/")
    return "/".join(parts[: len(parts) - depth])


def _mac(token: str, expires: int) -> str:
    message = f"backstop-dashboard-session:{expires}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def session_value(token: str, *, now: float | None = None) -> str:
    """A session cookie's value for `token`, good for `SESSION_SECONDS` from `now`."""
    expires = int((time.time() if now is None else now) + SESSION_SECONDS)
    return f"{expires}.{_mac(token, expires)}"


def valid_session(token: str, value: str, *, now: float | None = None) -> bool:
    """Whether a session cookie's `value` was made with `token` and has not expired."""
    expires_text, _, mac = value.partition(".")
    if not expires_text.isdigit():
        return False
    expires = int(expires_text)
    if expires < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(mac, _mac(token, expires))


def set_cookie(response: Response, request: Request, name: str, value: str, age: int) -> None:
    """Set one of the dashboard's cookies: HttpOnly, SameSite=Strict, on its path alone."""
    response.set_cookie(
        name,
        value,
        max_age=age,
        path=base_path(request),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def csrf_token(request: Request) -> str:
    """The form token of this browser: its `backstop_csrf` cookie, or a new one, which the
    page's answer then sets (`remember_csrf`)."""
    token = request.cookies.get(CSRF_COOKIE, "")
    if len(token) < 32:
        token = request.state.new_csrf = secrets.token_urlsafe(32)
    return token


def remember_csrf(request: Request, response: Response) -> None:
    """Set the cookie of a form token `csrf_token` made for this request."""
    new = getattr(request.state, "new_csrf", None)
    if new is not None:
        set_cookie(response, request, CSRF_COOKIE, new, SESSION_SECONDS)


class Refused(Exception):
    """A form post the dashboard does not take (403)."""


async def read_form(request: Request) -> dict[str, str]:
    """The fields of a form post from the dashboard's own pages; `Refused` otherwise."""
    if request.headers.get("sec-fetch-site", "same-origin") not in SAME_SITE:
        raise Refused("a form on another site posted this")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise Refused("a page of another origin posted this")
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise Refused("expected a form post")
    body = (await request.body()).decode("utf-8", errors="replace")
    fields = {key: values[0] for key, values in parse_qs(body, keep_blank_values=True).items()}
    cookie = request.cookies.get(CSRF_COOKIE, "")
    given = fields.get(CSRF_FIELD, "")
    if not cookie or not hmac.compare_digest(given.encode(), cookie.encode()):
        raise Refused("the form's token is missing or stale: reload the page and try again")
    return fields


class DashboardRoute(BackstopRoute):
    """A dashboard route: takes the token as a bearer header or a login's session cookie.

    Without either, a page sends the browser to the login form. Its `open_endpoints` (the
    login form, the stylesheet and the script) are set by `app.dashboard.routes`."""

    def refusal(self, request: Request, expected: bytes) -> Response | None:
        if hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return None
        token = expected.decode().removeprefix("Bearer ")
        if valid_session(token, request.cookies.get(SESSION_COOKIE, "")):
            return None
        login = base_path(request) + "/login"
        if request.method == "GET":
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"{login}?next={quote(target, safe='/')}", 303)
        link = escape(login)
        return HTMLResponse(f'<p>Log in first: <a href="{link}">{link}</a></p>', status_code=401)
