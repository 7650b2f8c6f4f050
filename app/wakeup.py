"""Waking the runner when another process enqueues (SQLite has no NOTIFY).

A daemon thread looks at the store's change feed every `WATCH_INTERVAL` seconds and, when
another connection committed, asks the runner to claim now instead of at its next poll. It
looks only while the runner waits for work: a busy runner claims again anyway, and the
looks cost it a share of the core it runs on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from store.changes import ChangeFeed
from store.engine import Database

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.002


class Doorbell:
    """Rings `ring` (from its own thread) whenever the database changes while `waiting()`.

    Changes made while the runner is busy are not lost: the feed compares with its last
    look, so the first look once the runner waits again rings for them.
    """

    def __init__(
        self,
        db: Database,
        ring: Callable[[], None],
        waiting: Callable[[], bool] = lambda: True,
        interval: float = WATCH_INTERVAL,
    ):
        self._feed = ChangeFeed(db)
        self._ring = ring
        self._waiting = waiting
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="backstop-doorbell", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and close the feed."""
        self._stop.set()
        self._thread.join(timeout=1)
        self._feed.close()

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if self._waiting() and self._feed.changed():
                    self._ring()
            except Exception:
                log.exception("doorbell: could not read the change feed; polling only")
                return
