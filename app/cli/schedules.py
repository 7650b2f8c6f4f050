"""`backstop schedules`: the periodic tasks and when they next run, as `GET /schedules`.

It reads the database directly (through `store/`), not over HTTP: the schedules of the task
modules that `BACKSTOP_TASK_MODULES` names, and the last tick each one recorded.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from app.api.schemas import ScheduleOut
from app.cli.database import existing_service
from app.cli.output import console, print_json, utc_time
from app.runner.periodic import read_schedules


def _interval(seconds: float | None) -> str:
    """`90s` as `1m 30s`, `86400` as `1d`; fractions of a second as they are."""
    if seconds is None:
        return "-"
    if seconds != int(seconds) or seconds < 60:
        return f"{seconds:g}s"
    parts: list[str] = []
    rest = int(seconds)
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts)


def _table(items: list[ScheduleOut]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    table.add_column("name", overflow="fold", min_width=12)
    table.add_column("cron", overflow="fold", min_width=11)
    table.add_column("every", no_wrap=True, justify="right", min_width=5)
    table.add_column("next run (UTC)", no_wrap=True, min_width=19)
    table.add_column("last tick (UTC)", no_wrap=True, min_width=19)
    for item in items:
        table.add_row(
            Text(item.name),
            Text(item.cron or "-"),
            _interval(item.every),
            utc_time(item.next_run_at),
            utc_time(item.last_tick),
        )
    return table


def schedules(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON of GET /schedules.")
    ] = False,
) -> None:
    """List the periodic tasks, each with its next run and the last tick recorded."""
    with existing_service() as backstop, backstop.db.read() as conn:
        infos = read_schedules(conn, backstop.registry)
    items = [ScheduleOut.model_validate(info, from_attributes=True) for info in infos]
    if as_json:
        print_json([item.model_dump(mode="json") for item in items])
        return
    out = console()
    if not items:
        out.print("no periodic tasks (declare one with @task(cron=...) or @task(every=...))")
        return
    out.print(_table(items))
