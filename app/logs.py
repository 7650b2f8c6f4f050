"""Backstop's log lines made visible in a process that configured no logging.

Under plain `uvicorn` nothing configures Python's logging: uvicorn sets up its own loggers
only, so a warning from Backstop would reach no handler but the interpreter's last resort,
and an error would be its bare message. `configure` gives Backstop's loggers (`app` and
`store`, its two packages) the level of `BACKSTOP_LOG_LEVEL` and one handler that writes to
stderr while the process has no logging of its own. Once the host configures logging (a
handler on the root logger, before or after this), that handler stands aside and the lines
go through the host's handlers alone: never twice.

`BACKSTOP_LOG_FORMAT=json` makes that handler (and the root handler the `backstop` commands
set up) write one JSON object a line (`JsonFormatter`). Every record logged by a task's own
function, on its thread or in its asyncio task, carries the task's id, name, queue and
attempt (`install_task_context`); the attempt records add the outcome, duration and error.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from app.settings import Settings
from store.models import Claim

LOGGERS = ("app", "store")
# The attempt records' own logger: one line for each outcome of each attempt.
ATTEMPTS = "app.attempts"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# The fields a record about a task may carry, in the order JSON lines give them: a task's own
# lines the first four, the attempt records all of them. On the record each is an attribute
# `backstop_<field>`: a task's own `extra={"queue": ...}` must not collide with them (logging
# refuses an `extra` key the record already has).
TASK_FIELDS = ("task_id", "task_name", "queue", "attempt", "outcome", "duration", "error")
PREFIX = "backstop_"

attempt: ContextVar[Claim | None] = ContextVar("backstop_attempt", default=None)
"""The attempt whose function runs in this context (thread or asyncio task), if any."""


def install_task_context() -> None:
    """Make every record logged while a task's function runs carry its `backstop_task_id`,
    `backstop_task_name`, `backstop_queue` and `backstop_attempt`, whichever logger and
    handler it goes to. Wraps the process's record factory once (keeping whatever factory
    was there)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "backstop", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        claim = attempt.get()
        if claim is not None:
            record.backstop_task_id = claim.id
            record.backstop_task_name = claim.name
            record.backstop_queue = claim.queue
            record.backstop_attempt = claim.attempts
        return record

    factory.backstop = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: `time` (UTC, ISO 8601), `level`, `logger`, `message`, the
    task fields the record carries, and `exception` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in TASK_FIELDS:
            value = getattr(record, PREFIX + name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


def formatter(settings: Settings, text_format: str = FORMAT) -> logging.Formatter:
    """The formatter `settings.log_format` asks for."""
    if settings.log_format == "json":
        return JsonFormatter()
    return logging.Formatter(text_format)


class Fallback(logging.StreamHandler[TextIO]):
    """Writes to the current stderr, unless the root logger has handlers of its own (the
    record reaches them by propagation)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))

    @property
    def stream(self) -> TextIO:
        # Looked up at each line, as Python's last-resort handler does: stderr may have
        # been replaced since (a test runner's capture, a daemon's redirection).
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        super().emit(record)


def configure(settings: Settings) -> None:
    """Set Backstop's log level from the settings, and see that its lines reach stderr
    when nothing else would show them. Safe to call any number of times."""
    install_task_context()
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(settings.log_level)
        fallbacks = [handler for handler in logger.handlers if isinstance(handler, Fallback)]
        if not fallbacks:
            fallbacks = [Fallback()]
            logger.addHandler(fallbacks[0])
        for handler in fallbacks:
            handler.setFormatter(formatter(settings))
    # Attempts that start and succeed are the bulk of a busy queue's lines: off unless asked.
    level = logging.getLevelName(settings.log_level)
    logging.getLogger(ATTEMPTS).setLevel(
        level if settings.log_attempts else max(level, logging.WARNING)
    )
