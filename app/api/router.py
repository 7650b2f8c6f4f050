"""The task API as one router: what `Backstop.router` is, and what the standalone app mounts.

A team includes it in its own app under the prefix it chooses. Everything Backstop adds to a
request happens here, on Backstop's routes alone: the bearer token, the body limit, and the
error answers. The team's routes, handlers, middleware and `/docs` see none of it.

Each route is a `BackstopRoute` bound to one `Backstop` (two instances can serve one process,
or one app under two prefixes): its handler puts that instance on `request.state` for the
dependencies in `app.api.deps`, then guards the request before FastAPI reads the body.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar

from fastapi import APIRouter, Request, Response, Security
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from app.api import health, metrics, schedules, tasks
from app.api.bodies import Body
from app.api.handlers import error_response
from app.api.schemas import answers

if TYPE_CHECKING:
    from app.backstop import Backstop

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class BackstopRoute(APIRoute):
    """A route of one Backstop instance's API (see `route_class`)."""

    backstop: ClassVar[Backstop]
    # Routes a load balancer must reach without the token.
    open_endpoints: ClassVar[frozenset[Callable[..., Any]]] = frozenset({health.readyz})

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        backstop = self.backstop
        settings = backstop.settings
        token = settings.api_token.get_secret_value()
        expected = f"Bearer {token}".encode() if token else None
        if self.endpoint in self.open_endpoints:
            expected = None
        limit = settings.max_body_bytes
        discard = settings.max_discard_bytes

        async def refuse(answer: Response, body: Body) -> Response:
            # A client still sending its body reads no answer before it has sent it all: the
            # body is read and dropped, up to a bound, so that it sees this answer and not a
            # connection reset. Past the bound the connection closes after the answer.
            if not await body.discard(discard):
                answer.headers["Connection"] = "close"
            return answer

        def too_large() -> JSONResponse:
            detail = f"request body is over the limit of {limit} bytes"
            return JSONResponse({"detail": detail}, status_code=413)

        async def guarded(request: Request) -> Response:
            request.state.backstop = backstop
            declared = request.headers.get("content-length")
            body = Body(request.receive, limit, declared)
            if expected is not None and (refused := self.refusal(request, expected)):
                return await refuse(refused, body)
            if declared is not None:
                try:
                    if int(declared) > limit:
                        return await refuse(too_large(), body)
                except ValueError:
                    return JSONResponse({"detail": "invalid Content-Length header"}, 400)
            try:
                return await handler(Request(request.scope, body.receive))
            except Exception as exc:
                # FastAPI turns a failure to read the body into a 400 of its own: the cause
                # tells a body over the limit apart.
                if body.seen > limit:
                    return await refuse(too_large(), body)
                answer = error_response(exc)
                if answer is None:
                    raise
                return answer

        return guarded

    def refusal(self, request: Request, expected: bytes) -> Response | None:
        """The answer to a request that does not bear the token (`expected`, the whole
        `Authorization` header), or None when it does."""
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return None
        detail = "missing or wrong bearer token" if given else "missing bearer token"
        return JSONResponse(
            {"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )


def route_class(backstop: Backstop) -> type[BackstopRoute]:
    """The route class of `backstop`'s routes."""
    return type("BackstopRoute", (BackstopRoute,), {"backstop": backstop})


# How the OpenAPI document shows the token; `BackstopRoute` checks it before this is called,
# so this never refuses anything itself.
BEARER = HTTPBearer(
    scheme_name="BackstopBearer",
    description="The service's API token (`BACKSTOP_API_TOKEN`)",
    auto_error=False,
)


def guarded_router(backstop: Backstop) -> APIRouter:
    """A router of `backstop`'s routes that need its token when one is set: its routes
    declare the answers of `BackstopRoute` (400, 413, 503 while the database cannot be
    reached, and 401 with the bearer scheme)."""
    token = backstop.settings.api_token.get_secret_value()
    return APIRouter(
        route_class=route_class(backstop),
        responses=answers(400, 401, 413, 503) if token else answers(400, 413, 503),
        dependencies=[Security(BEARER)] if token else [],
    )


def build_router(backstop: Backstop) -> APIRouter:
    """The task API of `backstop`: `/tasks...`, `/schedules`, `/metrics`, `/readyz`, and the
    dashboard
    at `/dashboard`, relative to the prefix the app includes it under."""
    from app.dashboard.routes import dashboard_router  # the dashboard builds on this module

    guarded = guarded_router(backstop)
    tasks.add_routes(guarded)
    schedules.add_routes(guarded)
    metrics.add_routes(guarded)
    # `/readyz` is open to a load balancer: no 401, no bearer scheme.
    router = APIRouter(route_class=route_class(backstop), responses=answers(400, 413))
    router.include_router(guarded)
    # The dashboard checks the token itself, in a header or a cookie (browsers send no header).
    router.include_router(dashboard_router(backstop))
    health.add_routes(router)
    return router
