"""How the `backstop` commands show things: rich tables for people, the API's JSON for scripts."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import typer
from pydantic import BaseModel
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from app.api.schemas import AttemptOut, ProgressOut, RateLimitOut, StatsOut, TaskOut
from store.models import TaskStatus

ERROR_WIDTH = 40
STATUS_STYLES = {
    TaskStatus.QUEUED: "cyan",
    TaskStatus.RUNNING: "blue",
    TaskStatus.RETRYING: "yellow",
    TaskStatus.SUCCEEDED: "green",
    TaskStatus.FAILED: "red",
    TaskStatus.CANCELLED: "dim",
}


def console() -> Console:
    """A console on stdout; piped or redirected, it never wraps a row."""
    out = Console(highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        # One line per row, whatever the width, so grep and less work on the output.
        out.width = 100_000
    return out


def print_json(model: BaseModel | dict[str, Any] | list[Any]) -> None:
    """Print `model` as the HTTP API encodes its bodies, on one line."""
    data = model.model_dump(mode="json") if isinstance(model, BaseModel) else model
    # Starlette's JSONResponse encoding: the bytes `curl` would print for the same request.
    typer.echo(json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")))


def utc_time(value: datetime | None) -> str:
    """`2030-01-01 09:00:00` (the times are UTC), or `-`."""
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def status_text(state: TaskStatus | None) -> Text:
    """The state's name in its colour; `?` for a state written by hand that is not one."""
    if state is None:
        return Text("?", style="bold red")
    return Text(state.value, style=STATUS_STYLES[state])


def number(value: int | None) -> str:
    """An integer, or `?` for a value written by hand that is not one."""
    return "?" if value is None else str(value)


def short(text: str | None, width: int = ERROR_WIDTH) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def duration(seconds: float) -> str:
    """`4.2s`, `3m 20s`, `2h 05m`, `3d 4h`."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def task_grid(task: TaskOut) -> Table:
    """Every field of a task, one per line."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    rows: list[tuple[str, str | Text]] = [
        ("id", task.id),
        ("name", task.name),
        ("status", status_text(task.status)),
        ("queue", task.queue),
        ("priority", number(task.priority)),
        ("attempts", f"{number(task.attempts)}/{number(task.max_attempts)}"),
        ("created", _utc_or_dash(task.created_at)),
        ("scheduled", _utc_or_dash(task.scheduled_at)),
        ("started", _utc_or_dash(task.started_at)),
        ("finished", _utc_or_dash(task.finished_at)),
        ("idempotency key", task.idempotency_key or "-"),
        ("unique key", task.unique_key or "-"),
        ("args", json.dumps(task.args, ensure_ascii=False)),
        ("kwargs", json.dumps(task.kwargs, ensure_ascii=False)),
        ("result", json.dumps(task.result, ensure_ascii=False)),
        ("progress", progress_text(task.progress)),
        ("last error", task.last_error or "-"),
        ("after", after_text(task)),
        ("follows", task.parent_id or "-"),
    ]
    # Values the row holds that are not of their type (written by hand), shown as stored.
    rows += [
        (f"unreadable {name}", repr(stored)) for name, stored in (task.unreadable or {}).items()
    ]
    for label, value in rows:
        grid.add_row(label, value if isinstance(value, Text) else Text(value))
    return grid


def after_text(task: TaskOut) -> str:
    """The tasks it runs after, and how many it still waits on: `-` when none."""
    if not task.after:
        return "-"
    waiting = f" (waiting on {task.waiting_on})" if task.waiting_on else ""
    return " ".join(task.after) + waiting


def progress_text(progress: ProgressOut | None) -> str:
    """`3/10 (30%) copying rows`, `3`, or `-` when the task never reported."""
    if progress is None:
        return "-"
    text = f"{progress.done:g}"
    if progress.total is not None:
        text += f"/{progress.total:g}"
        if progress.total > 0:
            text += f" ({100 * progress.done / progress.total:.0f}%)"
    if progress.message:
        text += f" {progress.message}"
    return text


def _utc_or_dash(value: datetime | None) -> str:
    return "-" if value is None else f"{utc_time(value)} UTC"


def tasks_table(items: list[TaskOut]) -> Table:
    """A page of tasks, one per row."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("name", overflow="fold")
    table.add_column("status", no_wrap=True, min_width=9)
    table.add_column("queue", overflow="fold")
    table.add_column("priority", no_wrap=True, justify="right")
    table.add_column("attempts", no_wrap=True, justify="right")
    table.add_column("created (UTC)", no_wrap=True, min_width=19)
    table.add_column("scheduled (UTC)", no_wrap=True, min_width=19)
    table.add_column("last error", no_wrap=True, overflow="ellipsis")
    for task in items:
        table.add_row(
            Text(task.id),
            Text(task.name),
            status_text(task.status),
            Text(task.queue),
            number(task.priority),
            f"{number(task.attempts)}/{number(task.max_attempts)}",
            utc_time(task.created_at),
            utc_time(task.scheduled_at),
            Text(short(task.last_error)),
        )
    return table


def attempts_table(attempts: list[AttemptOut]) -> Table:
    """A task's attempts, oldest first."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("started (UTC)", no_wrap=True, min_width=19)
    table.add_column("finished (UTC)", no_wrap=True, min_width=19)
    table.add_column("outcome", no_wrap=True)
    table.add_column("worker", overflow="fold")
    table.add_column("error", overflow="fold")
    for attempt in attempts:
        table.add_row(
            number(attempt.number),
            utc_time(attempt.started_at),
            utc_time(attempt.finished_at),
            _outcome(attempt),
            Text(attempt.worker),
            Text(attempt.error or ""),
        )
    return table


def _outcome(attempt: AttemptOut) -> str:
    if attempt.unreadable and "outcome" in attempt.unreadable:
        return "?"
    return "(running)" if attempt.outcome is None else attempt.outcome.value


def stats_table(stats: StatsOut) -> Table:
    """Counts per queue and state, with the totals as the footer."""
    table = Table(
        box=box.SIMPLE, show_edge=False, show_footer=True, header_style="bold", footer_style="bold"
    )
    table.add_column("queue", footer="all", overflow="fold")
    for state in TaskStatus:
        table.add_column(
            state.value, footer=str(stats.counts.get(state, 0)), justify="right", no_wrap=True
        )
    table.add_column("total", footer=str(sum(stats.counts.values())), justify="right", no_wrap=True)
    for queue, counts in stats.queues.items():
        cells = [str(counts.get(state, 0)) for state in TaskStatus]
        table.add_row(Text(queue), *cells, str(sum(counts.values())))
    return table


def rate_line(queue: str, rate: RateLimitOut) -> Text:
    """`queue email: at most 4/10s, 4 started in the last 10s; next start at ...`."""
    line = (
        f"queue {queue}: at most {rate.limit},"
        f" {rate.started} started in the last {duration(rate.period_seconds)}"
    )
    if rate.reopens_at is not None:
        line += f"; next start at {rate.reopens_at.isoformat(timespec='milliseconds')}"
    return Text(line)
