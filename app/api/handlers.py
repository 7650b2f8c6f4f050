"""Turning typed errors into HTTP answers, in one place.

The task API's routes answer through `error_response` (see `app.api.router`), so that an app
that mounts Backstop keeps its own handlers; the standalone service also `install`s them on
the whole app, for the routes a team adds to it.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.errors import BackstopError
from store.errors import IdempotencyConflict, InvalidCursor, InvalidTransition, TaskNotFound

STATUS_OF: tuple[tuple[type[Exception], int], ...] = (
    (BackstopError, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (InvalidCursor, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (IdempotencyConflict, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (TaskNotFound, status.HTTP_404_NOT_FOUND),
    (InvalidTransition, status.HTTP_409_CONFLICT),
)


def error_response(exc: Exception) -> JSONResponse | None:
    """The answer for `exc`, or None when it is not one of the errors Backstop answers."""
    if isinstance(exc, RequestValidationError):
        # FastAPI's own format, whatever handler the host app installed for its routes.
        return JSONResponse(
            {"detail": jsonable_encoder(exc.errors())},
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        )
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return JSONResponse({"detail": str(exc)}, status_code=code)
    return None


def install(app: FastAPI) -> None:
    """Answer Backstop's errors this way on every route of `app` (the standalone service)."""

    async def handler(_request: Request, exc: Exception) -> JSONResponse:
        answer = error_response(exc)
        assert answer is not None  # registered for these kinds only
        return answer

    for kind, _code in STATUS_OF:
        app.add_exception_handler(kind, handler)
