"""A thread that keeps the SQLite WAL short, so that no commit has to copy it.

Each process that serves (the app, `backstop worker`) runs one. Every `CHECKPOINT_INTERVAL`
seconds after commits it copies the WAL into the database file, and the process's next
write copies the rest (see `store.checkpoints`); the WAL then starts over and never reaches
the length at which SQLite makes a commit checkpoint (`store.engine.WAL_CHECKPOINT_PAGES`).
That is left as it was, as a floor: a process that does not serve, or a WAL a long reader
holds on to, is still checkpointed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from app.runner.backoff import CAP, Backoff
from store.checkpoints import WalCheckpoints
from store.engine import Database

log = logging.getLogger(__name__)

# Under load a commit writes about ten pages: a WAL of 10,000 pages takes a few seconds to
# fill, half a second about a thousand pages, whose copy runs in a few milliseconds.
CHECKPOINT_INTERVAL = 0.5


class Checkpointer:
    """Checkpoints the WAL of `db` from a daemon thread while `running()`; on PostgreSQL,
    nothing."""

    def __init__(self, db: Database, interval: float = CHECKPOINT_INTERVAL) -> None:
        self.db = db
        self.interval = interval
        self._stop = threading.Event()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Checkpoint until the block ends."""
        if self.db.dialect != "sqlite":
            yield
            return
        self._stop.clear()
        thread = threading.Thread(target=self._run, name="backstop-checkpoint", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()

    def _run(self) -> None:
        checkpoints: WalCheckpoints | None = None
        backoff = Backoff("WAL checkpoint", first=self.interval, cap=max(self.interval, CAP))
        pause = self.interval
        while not self._stop.wait(pause):
            try:
                checkpoints = checkpoints or WalCheckpoints(self.db)
                checkpoints.run()
                backoff.succeeded()
                pause = self.interval
            except Exception as error:  # a full disk, say: commits still checkpoint meanwhile
                pause = backoff.failed(error)
                if checkpoints is not None:  # on a new connection next time
                    with contextlib.suppress(Exception):
                        checkpoints.close()
                    checkpoints = None
        if checkpoints is not None:
            checkpoints.close()
