"""`backstop tasks`: list, show, retry, cancel, enqueue and stats from a terminal.

The commands work on the database directly (through `store/` and the task client), not over
HTTP, and answer as the API does: `--json` prints the API's own bodies, the API's schema checks
what `enqueue` is given, and every refusal is one line on stderr (`app.cli.commands.main`):
the API's `detail` where the API has one. They refuse a database that does not exist or is
not migrated (`app.cli.database`) rather than create or migrate it.
"""

from __future__ import annotations

import json
import shlex
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.text import Text

from app.api.schemas import AttemptOut, StatsOut, TaskIn, TaskOut, TaskPageOut
from app.cli import output
from app.cli.database import existing_service
from app.control import result_of
from store import attempts as store_attempts
from store import ratelimits
from store import stats as store_stats
from store import tasks as store_tasks
from store.models import TaskStatus

tasks_cli = typer.Typer(help="Inspect and steer tasks, as the HTTP API does.", no_args_is_help=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the HTTP API's JSON instead.")]
TaskId = Annotated[str, typer.Argument(metavar="ID", help="The task's id.", show_default=False)]


def _next_page_hint(
    status: TaskStatus | None, name: str | None, queue: str | None, limit: int, cursor: str
) -> str:
    words = ["backstop", "tasks", "list"]
    for option, value in (("--status", status), ("--name", name), ("--queue", queue)):
        if value is not None:
            words += [option, str(value)]
    words += ["--limit", str(limit), "--cursor", cursor]
    return shlex.join(words)


def _task_in(values: dict[str, Any]) -> TaskIn:
    """The body `POST /tasks` would get, checked by the API's own schema."""
    try:
        return TaskIn.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as error:
        first = error.errors()[0]
        hint = "'--" + str(first["loc"][0]).replace("_", "-") + "'" if first["loc"] else None
        raise typer.BadParameter(first["msg"], param_hint=hint) from None


def _json_option(text: str | None, option: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as error:  # not JSON, or a number of more digits than Python parses
        raise typer.BadParameter(f"not valid JSON: {error}", param_hint=f"'{option}'") from None
    except RecursionError:
        raise typer.BadParameter(
            "JSON nested too deep to parse", param_hint=f"'{option}'"
        ) from None


@tasks_cli.command("list")
def list_tasks(
    status: Annotated[
        TaskStatus | None, typer.Option(help="Only tasks in this state.", show_default=False)
    ] = None,
    name: Annotated[str | None, typer.Option(help="Only tasks of this name.")] = None,
    queue: Annotated[str | None, typer.Option(help="Only tasks on this queue.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Tasks per page.")] = 50,
    cursor: Annotated[
        str | None, typer.Option(help="Where to go on: the cursor a previous page gave.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List tasks newest first, filtered like GET /tasks, one page at a time."""
    with existing_service() as backstop, backstop.db.read() as conn:
        page = store_tasks.list_tasks(
            conn, status=status, name=name, queue=queue, limit=limit, cursor=cursor
        )
    out = TaskPageOut(items=[TaskOut.of(task) for task in page.items], next_cursor=page.next_cursor)
    if as_json:
        output.print_json(out)
        return
    console = output.console()
    if not out.items:
        console.print("no tasks" if cursor is None else "no more tasks")
        return
    console.print(output.tasks_table(out.items))
    if out.next_cursor is not None:
        hint = _next_page_hint(status, name, queue, limit, out.next_cursor)
        console.print(Text(f"next page: {hint}"))


@tasks_cli.command("show")
def show_task(
    task_id: TaskId,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='Print {"task": GET /tasks/ID, "attempts": GET /tasks/ID/attempts}.',
        ),
    ] = False,
    tracebacks: Annotated[
        bool, typer.Option("--tracebacks", help="Also print each failed attempt's traceback.")
    ] = False,
) -> None:
    """Show a task and its attempts."""
    with existing_service() as backstop, backstop.db.read() as conn:
        task = TaskOut.of(store_tasks.get_task(conn, task_id))
        attempts = [AttemptOut.of(a) for a in store_attempts.list_attempts(conn, task_id)]
    if as_json:
        output.print_json(
            {
                "task": task.model_dump(mode="json"),
                "attempts": [attempt.model_dump(mode="json") for attempt in attempts],
            }
        )
        return
    console = output.console()
    console.print(output.task_grid(task))
    console.print()
    if not attempts:
        console.print("no attempts yet")
        return
    console.print(Text("attempts", style="bold"))
    console.print(output.attempts_table(attempts))
    if tracebacks:
        for attempt in attempts:
            if attempt.traceback:
                console.print(Text(f"attempt {attempt.number}:", style="bold"))
                console.print(Text(attempt.traceback.rstrip()))


@tasks_cli.command("retry")
def retry_task(task_id: TaskId, as_json: JsonFlag = False) -> None:
    """Queue a failed or cancelled task again with a fresh attempt budget (history kept)."""
    with existing_service() as backstop:
        task = TaskOut.of(backstop.tasks.retry(task_id))
    if as_json:
        output.print_json(task)
        return
    output.console().print(
        Text(
            f"task {task.id} ({task.name}) is queued again, due now, its attempts reset to "
            f"0/{task.max_attempts}; the attempt history is kept"
        )
    )


@tasks_cli.command("cancel")
def cancel_task(task_id: TaskId, as_json: JsonFlag = False) -> None:
    """Cancel a task: queued or retrying at once; running when its runner next polls."""
    with existing_service() as backstop:
        task = TaskOut.of(backstop.tasks.cancel(task_id))
    if as_json:
        output.print_json(task)
        return
    if task.status == TaskStatus.RUNNING:
        message = (
            f"cancel requested: task {task.id} ({task.name}) is running; its runner picks the "
            "request up at its next poll, stops the function (async functions are cancelled, "
            "sync ones see ctx.cancelled) and records the task cancelled"
        )
    else:
        message = f"task {task.id} ({task.name}) is cancelled"
    output.console().print(Text(message))


@tasks_cli.command("wait")
def wait_task(
    task_id: TaskId,
    timeout: Annotated[
        float | None,
        typer.Option(min=0, help="Give up after this many seconds (default: no limit)."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Wait until a task ends, whichever process runs it, and print its result as JSON.

    A task that failed or was cancelled, or is still unfinished after --timeout, is a
    one-line message and exit status 1 (with --json, after the task's JSON)."""
    with existing_service() as backstop:
        task = backstop.tasks.finished(task_id, timeout)
    shown = TaskOut.of(task)
    if as_json:  # the task however it ended; the exit status says how
        output.print_json(shown)
    result_of(task, timeout)  # raises for a task that did not succeed in time
    if not as_json:
        output.print_json(shown.model_dump(mode="json")["result"])


@tasks_cli.command("enqueue")
def enqueue_task(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="The registered task name.", show_default=False)
    ],
    args: Annotated[
        str | None, typer.Option("--args", help="Positional arguments, a JSON list.")
    ] = None,
    kwargs: Annotated[
        str | None, typer.Option("--kwargs", help="Keyword arguments, a JSON object.")
    ] = None,
    queue: Annotated[str | None, typer.Option(help="Queue (default: the task's).")] = None,
    priority: Annotated[
        int | None, typer.Option(help="Higher runs sooner (default: the task's).")
    ] = None,
    delay: Annotated[float | None, typer.Option(help="Seconds to wait before it may run.")] = None,
    run_at: Annotated[
        str | None, typer.Option(help="When it may run: ISO 8601 with a zone.")
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option(help="Attempt budget (default: the task's).")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="Enqueue at most once per key, as the Idempotency-Key header."),
    ] = None,
    unique_key: Annotated[
        str | None,
        typer.Option(
            help="While a task with this key is queued, running or retrying, show it instead "
            "of enqueueing another."
        ),
    ] = None,
    after: Annotated[
        list[str] | None,
        typer.Option(
            "--after",
            metavar="ID",
            help="Run only once this task succeeded (repeat for several).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the task as POST /tasks answers it.")
    ] = False,
) -> None:
    """Enqueue a registered task, as POST /tasks does."""
    body = _task_in(
        {
            "name": name,
            "args": _json_option(args, "--args"),
            "kwargs": _json_option(kwargs, "--kwargs"),
            "queue": queue,
            "priority": priority,
            "delay": delay,
            "run_at": run_at,
            "max_attempts": max_attempts,
            "unique_key": unique_key,
            "after": after or None,
        }
    )
    with existing_service() as backstop:
        stored, created = backstop.tasks.submit(
            body.name,
            body.args,
            body.kwargs,
            delay=body.delay,
            run_at=body.run_at,
            queue=body.queue,
            priority=body.priority,
            max_attempts=body.max_attempts,
            idempotency_key=idempotency_key,
            unique_key=body.unique_key,
            after=body.after,
        )
    task = TaskOut.of(stored)
    if as_json:
        output.print_json(task)
        return
    console = output.console()
    if created:
        console.print(Text(f"enqueued task {task.id} ({task.name})"))
    elif idempotency_key is not None and task.idempotency_key == idempotency_key:
        console.print(
            Text(
                f"idempotency key {idempotency_key!r} was used before for the same request: "
                f"nothing new stored; the task is {task.id}"
            )
        )
    else:
        console.print(
            Text(
                f"unique key {unique_key!r} is held by task {task.id} ({task.name}), which is "
                f"{task.status}: nothing new stored"
            )
        )
    console.print(output.task_grid(task))


@tasks_cli.command("stats")
def task_stats(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON of GET /tasks/stats.")
    ] = False,
) -> None:
    """Counts per state and queue, and how long the oldest due task has waited."""
    with existing_service() as backstop, backstop.db.read() as conn:
        stats = store_stats.task_stats(conn)
        use = ratelimits.queue_use(conn, backstop.settings.rate_limits)
    out = StatsOut.of(stats, use)
    if as_json:
        output.print_json(out)
        return
    console = output.console()
    if not out.queues:
        console.print("no tasks")
    else:
        console.print(output.stats_table(out))
    if out.oldest_due_seconds is None:
        console.print("no task is waiting to run")
    else:
        console.print(f"oldest due task has waited {output.duration(out.oldest_due_seconds)}")
    for queue, rate in out.rate_limits.items():
        console.print(output.rate_line(queue, rate))
