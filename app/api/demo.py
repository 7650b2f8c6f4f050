"""The seed pattern made durable: an endpoint that hands work off and answers at once."""

from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from app.api.deps import DurableTasks
from app.tasks.builtins import append_line

router = APIRouter(tags=["examples"])


class MessageIn(BaseModel):
    message: str = Field(min_length=1, max_length=10_000)


class MessageAccepted(BaseModel):
    task_id: str


@router.post("/send-message", status_code=status.HTTP_202_ACCEPTED)
def send_message(body: MessageIn, tasks: DurableTasks) -> MessageAccepted:
    """Append the message to `log.txt` in the background, durably."""
    return MessageAccepted(task_id=tasks.add_task(append_line, body.message))
