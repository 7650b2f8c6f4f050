"""The standalone service's token check, for every request before a route sees it.

The task API's routes check the token themselves (`app.api.router`), so that an app that
mounts Backstop keeps its own routes and `/docs` as they were; the standalone service also
locks its demo route and `/docs` with this."""

from __future__ import annotations

import hmac
import json

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.bodies import Body

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def _dashboard(path: str) -> bool:
    # The dashboard's routes check the token themselves, as a header or as the session
    # cookie of its login form: a browser sends no Authorization header.
    return path == "/dashboard" or path.startswith("/dashboard/")


async def _reject(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BearerToken:
    """When a token is set, every request but `/healthz`, `/readyz` and the dashboard's (which
    take it from a cookie too) must bear it."""

    def __init__(self, app: ASGIApp, token: SecretStr, discard: int) -> None:
        self.app = app
        self.expected = f"Bearer {token.get_secret_value()}".encode()
        # The body of a refused request is read and dropped up to this many bytes first,
        # as `app.api.router` does, so that a client still sending it sees the 401.
        self.discard = discard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or _dashboard(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            detail = "missing or wrong bearer token" if given else "missing bearer token"
            headers = [(b"www-authenticate", b"Bearer")]
            declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
            body = Body(receive, limit=0, declared=declared or None)
            if not await body.discard(self.discard):
                headers.append((b"connection", b"close"))
            await _reject(send, 401, detail, headers)
            return
        await self.app(scope, receive, send)
