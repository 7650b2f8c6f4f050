"""The standalone service's demo route: the `BackgroundTasks` pattern made durable. Only
`app.main.create_app` adds it; an app that mounts `Backstop.router` never has it."""

from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from app.api.deps import DurableTasks
from app.api.schemas import answers
from app.tasks.builtins import append_line


class MessageIn(BaseModel):
    message: str = Field(min_length=1, max_length=10_000)


class MessageAccepted(BaseModel):
    task_id: str


def send_message(body: MessageIn, tasks: DurableTasks) -> MessageAccepted:
    """Append the message to `log.txt` in the background, durably."""
    return MessageAccepted(task_id=tasks.add_task(append_line, body.message))


def add_routes(router: APIRouter) -> None:
    """Add `POST /send-message` to `router`."""
    router.add_api_route(
        "/send-message",
        send_message,
        methods=["POST"],
        status_code=status.HTTP_202_ACCEPTED,
        responses=answers(422, 503),
        tags=["examples"],
    )
