"""The `backstop` command: serve, worker, db upgrade."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType
from typing import Annotated

import typer
import uvicorn
from pydantic import ValidationError
from typer._click.exceptions import NoArgsIsHelpError

from app.backstop import Backstop, import_task_modules
from app.cli.schedules import schedules
from app.cli.tasks import tasks_cli
from app.errors import BackstopError
from app.settings import Settings, parse_queues
from store.errors import StoreError

cli = typer.Typer(
    name="backstop",
    help="Durable background tasks for FastAPI services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_cli = typer.Typer(help="Manage the database schema.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(tasks_cli, name="tasks")
cli.command("schedules")(schedules)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _settings() -> Settings:
    return Settings()


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # APScheduler logs every run of every job at INFO: several lines a second when idle.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to bind.")] = 8000,
) -> None:
    """Run the HTTP API (and the runner, unless BACKSTOP_RUN_WORKER=false)."""
    # Refuse bad settings and task modules with one line, before uvicorn starts.
    import_task_modules(_settings().task_modules)
    _configure_logging()
    # Once it has shut down, uvicorn raises the SIGTERM it caught again under the handler
    # in place before it: a graceful stop then exits 0, as `backstop worker` does, rather
    # than dying of the signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        "app.main:app",
        host=host,
        port=port,
        log_config=None,
        # Long-polling `?wait=` requests must not hold a stop beyond a few seconds.
        timeout_graceful_shutdown=5,
    )


def _exit_cleanly(_signum: int, _frame: FrameType | None) -> None:
    sys.exit(0)


@cli.command()
def worker(
    queues: Annotated[
        str | None,
        typer.Option(
            help="Queues to serve, as name=concurrency[,...] (default: BACKSTOP_QUEUES, or all).",
        ),
    ] = None,
) -> None:
    """Run only the runner: claim and run tasks until SIGTERM or SIGINT."""
    settings = _settings()
    if queues is not None:
        try:
            served = parse_queues(queues)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--queues") from None
        if not served:
            raise typer.BadParameter("name at least one queue", param_hint="--queues")
        settings = settings.model_copy(update={"queues": served})
    _configure_logging()
    asyncio.run(_work(settings))


async def _work(settings: Settings) -> None:
    backstop = Backstop(settings)
    await asyncio.to_thread(backstop.prepare)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await backstop.runner.start()
    try:
        with backstop.serving():
            await stopping.wait()
    finally:
        await backstop.runner.stop()
        backstop.close()


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration (the service also does this at start)."""
    settings = _settings()
    backstop = Backstop(settings)
    try:
        backstop.prepare()
    finally:
        backstop.close()
    typer.echo(f"database at {settings.url} is up to date")


def _one_line(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = "BACKSTOP_" + "_".join(str(part) for part in first["loc"]).upper()
        return f"invalid setting {where}: {first['msg']}"
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure is one line on stderr and a non-zero exit."""
    command = typer.main.get_command(cli)
    try:
        command.main(args=argv, prog_name="backstop", standalone_mode=False)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        sys.exit(130)
    except NoArgsIsHelpError:
        print("backstop: missing command; see 'backstop --help'", file=sys.stderr)
        sys.exit(2)
    except typer.TyperException as error:
        print(f"backstop: {_one_line(Exception(error.format_message()))}", file=sys.stderr)
        sys.exit(error.exit_code)
    except (BackstopError, StoreError, ValidationError, ValueError, OSError) as error:
        print(f"backstop: {_one_line(error)}", file=sys.stderr)
        sys.exit(1)
