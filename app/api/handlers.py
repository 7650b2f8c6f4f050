"""Turning typed errors into HTTP answers, in one place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse

from app.errors import BackstopError
from store.errors import IdempotencyConflict, InvalidCursor, InvalidTransition, TaskNotFound


def _answer(code: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handler(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=code)

    return handler


def install(app: FastAPI) -> None:
    """Register the handlers on `app`."""
    app.add_exception_handler(BackstopError, _answer(status.HTTP_422_UNPROCESSABLE_CONTENT))
    app.add_exception_handler(InvalidCursor, _answer(status.HTTP_422_UNPROCESSABLE_CONTENT))
    app.add_exception_handler(TaskNotFound, _answer(status.HTTP_404_NOT_FOUND))
    app.add_exception_handler(InvalidTransition, _answer(status.HTTP_409_CONFLICT))
    app.add_exception_handler(IdempotencyConflict, _answer(status.HTTP_422_UNPROCESSABLE_CONTENT))
