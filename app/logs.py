"""Backstop's log lines made visible in a process that configured no logging.

Under plain `uvicorn` nothing configures Python's logging: uvicorn sets up its own loggers
only, so a warning from Backstop would reach no handler but the interpreter's last resort,
and an error would be its bare message. `configure` gives Backstop's loggers (`app` and
`store`, its two packages) the level of `BACKSTOP_LOG_LEVEL` and one handler that writes to
stderr while the process has no logging of its own. Once the host configures logging (a
handler on the root logger, before or after this), that handler stands aside and the lines
go through the host's handlers alone: never twice.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from app.settings import Settings

LOGGERS = ("app", "store")
# The attempt records' own logger: one line for each outcome of each attempt.
ATTEMPTS = "app.attempts"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(settings.log_level)
        if not any(isinstance(handler, Fallback) for handler in logger.handlers):
            logger.addHandler(Fallback())
    # Attempts that start and succeed are the bulk of a busy queue's lines: off unless asked.
    level = logging.getLevelName(settings.log_level)
    logging.getLogger(ATTEMPTS).setLevel(
        level if settings.log_attempts else max(level, logging.WARNING)
    )
