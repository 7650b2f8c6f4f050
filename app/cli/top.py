"""`backstop top`: the dashboard's overview in a terminal, for hosts without a browser.

It reads the database directly (through `store.stats.overview`, the dashboard's own query)
and redraws every `--interval` seconds until Ctrl-C; `--once` prints one frame and exits.
Piped into a file or another command, it prints a frame per interval one after the other.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from app.cli.database import describe, existing_service
from app.cli.output import console, duration, status_text, utc_time
from store import stats as store_stats
from store.engine import Database
from store.models import TaskStatus
from store.stats import Minute, Overview

SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(minutes: list[Minute]) -> str:
    """One character per minute, its height the tasks that finished then (blank: none)."""
    totals = [m.succeeded + m.failed for m in minutes]
    peak = max(totals, default=0)
    if not peak:
        return " " * len(totals)
    top = len(SPARKS) - 1
    return "".join(" " if n == 0 else SPARKS[max(1, round(n / peak * top))] for n in totals)


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else duration(seconds)


def _queues(seen: Overview) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold", title_justify="left")
    table.add_column("queue", overflow="fold")
    for state in TaskStatus:
        table.add_column(status_text(state), justify="right", no_wrap=True)
    table.add_column("oldest due", justify="right", no_wrap=True)
    for queue in seen.queues:
        cells = [str(queue.counts[state]) for state in TaskStatus]
        table.add_row(Text(queue.name), *cells, _age(queue.oldest_due_seconds))
    if not seen.queues:
        table.add_row(Text("(no tasks)", style="dim"), *[""] * (len(TaskStatus) + 1))
    return table


def _runners(seen: Overview) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    table.add_column("runner", overflow="fold")
    table.add_column("busy slots", justify="right", no_wrap=True)
    table.add_column("last attempt", justify="right", no_wrap=True)
    for runner in seen.runners:
        last = (
            "-"
            if runner.last_seen is None
            else duration(max((seen.now - runner.last_seen).total_seconds(), 0.0)) + " ago"
        )
        table.add_row(Text(runner.worker), str(runner.busy), last)
    if not seen.runners:
        table.add_row(Text("(none seen lately)", style="dim"), "", "")
    return table


def frame(seen: Overview, where: str) -> Group:
    """One screen of `backstop top`: totals, queues, throughput and runners."""
    counts = seen.stats.counts
    totals = Text.assemble(
        *[part for state in TaskStatus for part in (status_text(state), f" {counts[state]}   ")],
        f"oldest due {_age(seen.stats.oldest_due_seconds)}",
    )
    succeeded = sum(m.succeeded for m in seen.throughput)
    failed = sum(m.failed for m in seen.throughput)
    throughput = Text.assemble(
        (f"finished per minute, last {len(seen.throughput)} min ", "bold"),
        (f"[{sparkline(seen.throughput)}]", "green"),
        f"  {succeeded} succeeded, ",
        (f"{failed} failed", "red" if failed else ""),
    )
    return Group(
        Text.assemble(("Backstop", "bold"), f"  {where}  {utc_time(seen.now)} UTC"),
        totals,
        Text(""),
        _queues(seen),
        throughput,
        Text(""),
        _runners(seen),
    )


def _read(db: Database) -> Overview:
    with db.read() as conn:
        return store_stats.overview(conn)


def top(
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between redraws.")] = 2.0,
) -> None:
    """Watch the queues, throughput and runners live, as the dashboard's overview shows them."""
    with existing_service() as backstop:
        where = describe(backstop.settings.url)
        out = console()
        if once:
            out.print(frame(_read(backstop.db), where))
            return
        try:
            if out.is_terminal:
                _live(out, backstop.db, where, interval)
            else:
                while True:
                    out.print(frame(_read(backstop.db), where))
                    out.file.flush()
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass  # Ctrl-C is how one leaves `top`: not an error


def _live(out: Console, db: Database, where: str, interval: float) -> None:
    with Live(frame(_read(db), where), console=out, auto_refresh=False, screen=True) as live:
        while True:
            time.sleep(interval)
            live.update(frame(_read(db), where), refresh=True)
