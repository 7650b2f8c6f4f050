"""Turning typed errors into HTTP answers, in one place.

The task API's routes answer through `error_response` (see `app.api.router`), so that an app
that mounts Backstop keeps its own handlers; the standalone service also `install`s them on
the whole app, for the routes a team adds to it.
"""

from __future__ import annotations

import math
import sys

import sqlalchemy as sa
from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.errors import BackstopError
from store.errors import (
    DatabaseUnavailable,
    IdempotencyConflict,
    InvalidCursor,
    InvalidTransition,
    ParentNotSucceeded,
    TaskNotFound,
    UniqueKeyTaken,
    UnknownParents,
)
from store.health import as_unavailable
from store.jsonvalues import MAX_DEPTH, escaped, escaped_text

STATUS_OF: tuple[tuple[type[Exception], int], ...] = (
    (BackstopError, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (InvalidCursor, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (IdempotencyConflict, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (TaskNotFound, status.HTTP_404_NOT_FOUND),
    (InvalidTransition, status.HTTP_409_CONFLICT),
    (UniqueKeyTaken, status.HTTP_409_CONFLICT),
    (ParentNotSucceeded, status.HTTP_409_CONFLICT),
    (UnknownParents, status.HTTP_422_UNPROCESSABLE_CONTENT),
)

# What the database raises when it cannot take a write: answered 503 (see `unavailable`).
# A driver error of another kind (a broken constraint: a bug) stays a server error.
UNAVAILABLE: tuple[type[Exception], ...] = (
    DatabaseUnavailable,
    sa.exc.DBAPIError,
    sa.exc.TimeoutError,
)


def error_response(exc: Exception) -> JSONResponse | None:
    """The answer for `exc`, or None when it is not one of the errors Backstop answers."""
    if isinstance(exc, RequestValidationError):
        # FastAPI's own format, whatever handler the host app installed for its routes; the
        # input it echoes is the client's, and may hold what JSON in UTF-8 cannot carry.
        return JSONResponse(
            {"detail": escaped(jsonable_encoder(exc.errors()))},
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        )
    if isinstance(exc, HTTPException) and (detail := _unparsed(exc.__cause__)) is not None:
        return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return JSONResponse({"detail": escaped_text(str(exc))}, status_code=code)
    return unavailable(exc)


def unavailable(exc: BaseException) -> JSONResponse | None:
    """503 with `Retry-After` when `exc` says the database cannot take the write now (a
    write that timed out was withdrawn: the client may send it again); else None."""
    problem = as_unavailable(exc)
    if problem is None:
        return None
    return JSONResponse(
        {"detail": escaped_text(problem.reason)},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(max(1, math.ceil(problem.retry_after)))},
    )


def _unparsed(cause: BaseException | None) -> str | None:
    """What is wrong with well-formed JSON that the parser still gave up on (FastAPI answers
    400 for any body it cannot parse), or None for another cause."""
    if isinstance(cause, RecursionError):
        return (
            "the body's JSON is nested too deep to parse (an argument may nest arrays and"
            f" objects at most {MAX_DEPTH} levels deep)"
        )
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"a number in the body has more than {sys.get_int_max_str_digits()} digits"
    return None


def install(app: FastAPI) -> None:
    """Answer Backstop's errors this way on every route of `app` (the standalone service)."""

    async def handler(_request: Request, exc: Exception) -> JSONResponse:
        answer = error_response(exc)
        if answer is None:  # a driver error that is not about the database's health
            raise exc
        return answer

    for kind in (*(kind for kind, _code in STATUS_OF), *UNAVAILABLE):
        app.add_exception_handler(kind, handler)
