"""The event stream's generator on its own: a quiet task gets heartbeats, and the stream ends
with the task's terminal state (the stream over HTTP, across processes, is in
tests/e2e/test_watching.py)."""

from __future__ import annotations

import asyncio

import pytest

from app.api import events
from app.backstop import Backstop


def test_a_quiet_task_gets_heartbeats_and_its_cancel_ends_the_stream(
    backstop: Backstop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "HEARTBEAT", 0.05)
    task_id = backstop.tasks.add_task("test.echo", 1, delay=3600)  # stays queued

    async def follow() -> list[str]:
        said: list[str] = []
        async for chunk in events._stream(backstop.tasks, task_id):
            said.append(chunk)
            if chunk.startswith(": heartbeat") and len(said) == 3:  # two heartbeats in a row
                await asyncio.to_thread(backstop.tasks.cancel, task_id)
        return said

    said = asyncio.run(asyncio.wait_for(follow(), 30))
    assert said[0].startswith("id: 1\nevent: state\n")
    assert '"status":"queued"' in said[0]
    assert said[1:3] == [": heartbeat\n\n", ": heartbeat\n\n"]
    # Heartbeats may go on until the watcher reads the cancel; the last event ends it.
    assert all(chunk == ": heartbeat\n\n" for chunk in said[3:-1])
    assert "event: state" in said[-1]
    assert '"status":"cancelled"' in said[-1]
