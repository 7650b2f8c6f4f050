"""The `backstop` command: serve, worker, db upgrade, db copy (and tasks, schedules, top).

It runs from the team's own folder as `uvicorn` does: the current directory is importable, so
`--app myservice.main:app` and `BACKSTOP_TASK_MODULES=myservice.tasks` need no PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
from types import FrameType
from typing import Annotated
from wsgiref.simple_server import WSGIServer

import sqlalchemy as sa
import typer
from alembic.util.exc import CommandError
from prometheus_client import start_http_server
from pydantic import ValidationError
from typer._click.exceptions import NoArgsIsHelpError

from app import logs, server
from app.backstop import Backstop, import_task_modules
from app.cli.database import describe, existing_service
from app.cli.schedules import schedules
from app.cli.tasks import tasks_cli
from app.cli.top import top
from app.errors import BackstopError, TaskFailed
from app.settings import Settings, parse_queues
from store import copy as store_copy
from store.engine import Database
from store.errors import StoreError

cli = typer.Typer(
    name="backstop",
    help="Durable background tasks for FastAPI services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_cli = typer.Typer(
    help="Manage the database: its schema, and moving it elsewhere.", no_args_is_help=True
)
cli.add_typer(db_cli, name="db")
cli.add_typer(tasks_cli, name="tasks")
cli.command("schedules")(schedules)
cli.command("top")(top)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _settings() -> Settings:
    return Settings()


def _configure_logging(settings: Settings) -> None:
    """uvicorn's and Alembic's lines at INFO; Backstop's at BACKSTOP_LOG_LEVEL."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logs.formatter(settings, LOG_FORMAT))
    # APScheduler logs every run of every job at INFO: several lines a second when idle.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logs.configure(settings)


DEFAULT_APP = "app.main:app"
# uvicorn's exit code when the app or its lifespan fails to start.
STARTUP_FAILURE = 3


class AppNotFound(BackstopError):
    """An `--app` that does not name an importable application."""


class MigrationFailed(BackstopError):
    """The database could not be brought to the newest migration."""


class MetricsUnavailable(BackstopError):
    """`--metrics-port` names an address the worker cannot listen on."""


# The failures whose message says enough on its own; main prints them as one line.
_EXPECTED = (
    BackstopError,
    TaskFailed,  # `tasks wait`; its WaitTimeout is a TimeoutError, an OSError
    StoreError,
    ValidationError,
    ValueError,
    OSError,
    CommandError,
    sa.exc.SQLAlchemyError,
)


def _check_app(target: str, *, factory: bool) -> None:
    """Import `module:attr` as uvicorn will, so that a wrong one is one line, not a traceback."""
    module_name, _, attrs = target.partition(":")
    if not module_name or not attrs:
        raise AppNotFound(f"--app {target!r}: expected module:attribute, e.g. myservice.main:app")
    try:
        found: object = importlib.import_module(module_name)
    except BackstopError:
        raise
    except ModuleNotFoundError as error:
        if error.name is not None and f"{module_name}.".startswith(f"{error.name}."):
            raise AppNotFound(
                f"--app {target!r}: no module named {error.name!r} "
                f"(looked in {os.getcwd()} and the installed packages)"
            ) from None
        raise AppNotFound(f"--app {target!r}: importing {module_name!r} failed: {error}") from None
    except Exception as error:
        raise AppNotFound(
            f"--app {target!r}: importing {module_name!r} failed: {type(error).__name__}: {error}"
        ) from None
    for attr in attrs.split("."):
        if not hasattr(found, attr):
            raise AppNotFound(f"--app {target!r}: module {module_name!r} has no {attrs!r}")
        found = getattr(found, attr)
    if factory and not callable(found):
        raise AppNotFound(f"--app {target!r} with --factory: {attrs!r} is not callable")


def _migrate(backstop: Backstop) -> None:
    """Create and migrate the database; whatever a migration raises becomes one line."""
    try:
        backstop.prepare()
    except Exception as error:
        reason = _one_line(error)
        if not isinstance(error, _EXPECTED):
            reason = f"{type(error).__name__}: {reason}"
        raise MigrationFailed(
            f"cannot migrate the database at {describe(backstop.settings.url)}: {reason}"
        ) from error


def _prepare(settings: Settings) -> None:
    """`_migrate` on a Backstop of its own, closed afterwards."""
    backstop = Backstop(settings)
    try:
        _migrate(backstop)
    finally:
        backstop.close()


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to bind.")] = 8000,
    app: Annotated[
        str,
        typer.Option(
            "--app",
            metavar="MODULE:ATTR",
            help="The ASGI app to serve, e.g. myservice.main:app (its lifespan runs Backstop).",
        ),
    ] = DEFAULT_APP,
    factory: Annotated[
        bool, typer.Option("--factory", help="--app names a function that returns the app.")
    ] = False,
) -> None:
    """Run the HTTP API (and the runner, unless BACKSTOP_RUN_WORKER=false)."""
    # Refuse bad settings, task modules and apps with one line, before uvicorn starts.
    settings = _settings()
    import_task_modules(settings.task_modules)
    if app == DEFAULT_APP and not factory:
        # The standalone service migrates in its lifespan too, where a failure would be
        # uvicorn's traceback. A team's app may use other settings: its lifespan migrates.
        _prepare(settings)
    _check_app(app, factory=factory)
    _configure_logging(settings)
    # Once it has shut down, uvicorn raises the SIGTERM it caught again under the handler
    # in place before it: a graceful stop then exits 0, as `backstop worker` does, rather
    # than dying of the signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    if not server.serve(settings, app, factory=factory, host=host, port=port):
        sys.exit(STARTUP_FAILURE)


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
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Serve this worker's Prometheus metrics at http://HOST:PORT/metrics.",
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address the metrics endpoint binds (with --metrics-port).")
    ] = "127.0.0.1",
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
    _configure_logging(settings)
    metrics = None if metrics_port is None else (metrics_host, metrics_port)
    asyncio.run(_work(settings, metrics))


async def _work(settings: Settings, metrics: tuple[str, int] | None = None) -> None:
    backstop = Backstop(settings)
    backstop.freeze_heap = True
    server: WSGIServer | None = None
    try:
        await asyncio.to_thread(_migrate, backstop)
        if metrics is not None:
            # Workers serve no HTTP otherwise: this process's own endpoint, a target of its
            # own for Prometheus (see docs/observability.md).
            host, port = metrics
            try:
                server, _thread = start_http_server(port, host, backstop.metrics_registry)
            except OSError as error:
                raise MetricsUnavailable(
                    f"--metrics-port: cannot listen on {host}:{port}: {error}"
                ) from None
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
    finally:
        if server is not None:
            server.shutdown()
        backstop.close()


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration (the service also does this at start)."""
    settings = _settings()
    _prepare(settings)
    typer.echo(f"database at {describe(settings.url)} is up to date")


@db_cli.command("copy")
def db_copy(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="URL",
            help="The PostgreSQL database to copy into, e.g. postgresql+psycopg://user@host/name;"
            " migrated ('backstop db upgrade') and holding no task.",
        ),
    ],
    batch_size: Annotated[
        int, typer.Option(min=1, help="Rows read and written per batch.")
    ] = store_copy.BATCH_SIZE,
) -> None:
    """Copy every task, attempt and schedule of this database into another, then verify the
    counts. Stop the API and the workers first."""
    if sa.make_url(to).get_backend_name() != "postgresql":
        raise typer.BadParameter(
            "copy into PostgreSQL: postgresql+psycopg://user@host/name", param_hint="--to"
        )
    target = Database.from_url(to)
    try:
        with existing_service(_settings()) as backstop:
            report = store_copy.copy_database(backstop.db, target, batch_size=batch_size)
    finally:
        target.dispose()
    typer.echo(f"{'table':<9} {'state':<14} {'source':>9} {'target':>9}")
    for table, states in report.source.items():
        for state, n in states.items():
            typer.echo(f"{table:<9} {state:<14} {n:>9} {report.target[table][state]:>9}")
    typer.echo(f"copied into {describe(to)}; every count matches")


def _one_line(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = "BACKSTOP_" + "_".join(str(part) for part in first["loc"]).upper()
        return f"invalid setting {where}: {first['msg']}"
    if isinstance(error, sa.exc.DBAPIError):
        # The driver's own message, without SQLAlchemy's statement and background link.
        error = error.orig if isinstance(error.orig, BaseException) else error
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure is one line on stderr and a non-zero exit."""
    # As uvicorn does: the team's modules (`--app`, BACKSTOP_TASK_MODULES) import from the
    # folder the command runs in, not only from installed packages.
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
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
    except _EXPECTED as error:
        print(f"backstop: {_one_line(error)}", file=sys.stderr)
        sys.exit(1)
