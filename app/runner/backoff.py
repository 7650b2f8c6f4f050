"""Capped exponential back-off for the runner's loops that touch the database.

When the database cannot be reached (a server restarting, a link down, a backend ended by an
administrator) every loop that writes or reads (the claims, the heartbeat, the reclaim, the
cancel checks, periodic tasks, retention) fails the same way. Each keeps a `Backoff`: the
first failure is logged in one line, the next tries wait longer and longer (up to `CAP`
seconds apart) and are not logged, and the first success says so. A loop neither spins nor
stops, and a log holds two lines for an outage, not a traceback per poll.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.exc import DBAPIError

from store.errors import DatabaseFileGone
from store.health import as_unavailable

log = logging.getLogger(__name__)

# The first pause after a failure, and the longest (seconds); each failure doubles it.
FIRST = 0.1
CAP = 5.0


def describe(error: BaseException) -> str:
    """One line for `error`: the driver's message, without SQLAlchemy's statement dump."""
    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


class Backoff:
    """The failures in a row of one loop, and when it may try again."""

    def __init__(self, what: str, *, first: float = FIRST, cap: float = CAP) -> None:
        self.what = what
        self.first = first
        self.cap = cap
        self.failures = 0
        self._next_try = 0.0

    def ready(self, now: float | None = None) -> bool:
        """Whether the loop may try now (always, unless it failed last time)."""
        return (time.monotonic() if now is None else now) >= self._next_try

    def failed(self, error: BaseException, now: float | None = None) -> float:
        """Count a failure; the pause before the next try. Logs the first of a row, with a
        traceback only when the error is not the database's (a bug must be seen); not a
        database file gone, which the store logged once for good."""
        pause: float = min(self.first * 2.0**self.failures, self.cap)
        self.failures += 1
        self._next_try = (time.monotonic() if now is None else now) + pause
        if self.failures == 1 and not isinstance(error, DatabaseFileGone):  # the store said so
            log.warning(
                "%s failed (%s); trying again with back-off, at most %gs apart",
                self.what,
                describe(error),
                self.cap,
                exc_info=None if as_unavailable(error) is not None else error,
            )
        return pause

    def succeeded(self) -> None:
        """Count a success: the next failure starts a new row (and is logged)."""
        if self.failures:
            tries = "try" if self.failures == 1 else "tries"
            log.info("%s works again after %d failed %s", self.what, self.failures, tries)
        self.failures = 0
        self._next_try = 0.0
