"""Every setting of the service: one class, read from `BACKSTOP_*` environment variables."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.tasks.addresses import AllowList
from store.engine import PostgresOptions, Synchronous, default_url, masked_url
from store.ratelimits import RateLimit

# The units a rate limit's period may be written in, as seconds.
PERIOD_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# The longest rate-limit period, a leap year: every claim computes now minus the period and
# the last start plus it, and a period in timedelta's range can still put those outside
# datetime's (years 1 to 9999), which would fail every claim and read of the queue.
MAX_PERIOD = timedelta(hours=8784)

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

BUILTIN_TASKS = ("email.send", "log.append", "webhook.deliver")


class Settings(BaseSettings):
    """Backstop's settings; see the README's table."""

    model_config = SettingsConfigDict(env_prefix="BACKSTOP_", extra="ignore")

    data_dir: Path = Path("./data")
    database_url: str = ""
    sqlite_synchronous: Synchronous = "NORMAL"
    sqlite_busy_timeout_ms: int = Field(default=10_000, ge=0)
    # PostgreSQL's connections (docs/postgresql-connections.md): ignored on SQLite.
    pg_pool_size: int = Field(default=5, ge=1)
    pg_max_overflow: int = Field(default=10, ge=0)
    pg_statement_timeout: float = Field(default=0, ge=0)
    pg_connect_timeout: int = Field(default=5, ge=1)
    pg_prepared_statements: bool = True
    # How long a write asked for by a request (an enqueue, a cancel, a retry) may wait for the
    # database before it is withdrawn and answered 503.
    enqueue_timeout: float = Field(default=5.0, gt=0)
    run_worker: bool = True
    concurrency: int = Field(default=8, ge=1)
    poll_interval: float = Field(default=0.5, gt=0)
    lease_seconds: float = Field(default=30, gt=0)
    shutdown_grace: float = Field(default=30, ge=0)
    task_modules: Annotated[list[str], NoDecode] = []
    # Named queues and their concurrency, `default=8,email=2`: this process's runner serves
    # exactly these. Empty: it serves every queue, `concurrency` tasks at a time in all.
    queues: Annotated[dict[str, int], NoDecode] = {}
    # Queues whose starts are limited across every process, `email=4/10s,sms=100/1m`: at
    # most that many starts in any such period (docs/queues.md). Every process claiming
    # these queues must be given the same limits.
    rate_limits: Annotated[dict[str, RateLimit], NoDecode] = {}
    max_lease_expiries: int = Field(default=3, ge=1)
    retain_succeeded: float = Field(default=7 * 86_400, gt=0)
    retain_failed: float = Field(default=30 * 86_400, gt=0)
    prune_interval: float = Field(default=60, gt=0)
    max_body_bytes: int = Field(default=1_048_576, ge=1)
    # A body refused before it is read (413, 401) is read and dropped up to this many bytes,
    # so that a client still sending it sees the answer; a longer one is cut off.
    max_discard_bytes: int = Field(default=16 * 1_048_576, ge=0)
    # `backstop serve`: seconds a connection has to send a whole request head, from its
    # opening or its previous answer; seconds an idle keep-alive connection stays open;
    # and how many connections may be open at once (at most half the open-file limit).
    header_timeout: float = Field(default=10, gt=0)
    keep_alive_timeout: int = Field(default=5, ge=1)
    max_connections: int = Field(default=1000, ge=1)
    # Secrets: shown as '**********' in any repr, log or error; `.get_secret_value()` reads them.
    api_token: SecretStr = SecretStr("")
    # The built-in tasks this process knows; the others are unknown tasks here.
    builtins: Annotated[list[str], NoDecode] = list(BUILTIN_TASKS)
    # What `webhook.deliver` may reach beyond public addresses, and its caps.
    webhook_allow: Annotated[list[str], NoDecode] = []
    webhook_max_response_bytes: int = Field(default=65_536, ge=0)
    webhook_timeout: float = Field(default=30, gt=0)
    webhook_max_redirects: int = Field(default=3, ge=0, le=20)
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_starttls: bool = False
    smtp_sender: str = "backstop@localhost"
    # How much Backstop logs (its `app` and `store` loggers): INFO shows runners starting and
    # stopping, WARNING the attempts that fail, retry or lose their runner.
    log_level: LogLevel = "INFO"
    # Also a line for every attempt that starts or succeeds (the `app.attempts` logger at INFO).
    log_attempts: bool = False
    # `json`: one JSON object a line (time, level, logger, message, and the task's fields).
    log_format: Literal["text", "json"] = "text"

    @field_validator("task_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        return _split(value)

    @field_validator("builtins", mode="before")
    @classmethod
    def _split_builtins(cls, value: object) -> object:
        names = _split(value)
        if isinstance(names, list):
            unknown = [name for name in names if name not in BUILTIN_TASKS]
            if unknown:
                raise ValueError(
                    f"{', '.join(map(repr, unknown))} is not a built-in task;"
                    f" the built-ins are {', '.join(BUILTIN_TASKS)}"
                )
        return names

    @field_validator("webhook_allow", mode="before")
    @classmethod
    def _parse_allow(cls, value: object) -> object:
        entries = _split(value)
        if isinstance(entries, list):
            AllowList.parse(entries)  # a ValueError naming the entry that is not one
        return entries

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("queues", mode="before")
    @classmethod
    def _parse_queues(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        return parse_queues(value)

    @field_validator("rate_limits", mode="before")
    @classmethod
    def _parse_rate_limits(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_rate_limits(value)
        if isinstance(value, dict):  # `Settings(rate_limits={"email": "4/10s"})`
            return {
                queue: parse_rate(queue, rate) if isinstance(rate, str) else rate
                for queue, rate in value.items()
            }
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr() and str() name the database without its password (`database_url` stays the
        # plain string the setting holds: `Settings(database_url=...)` and
        # `model_copy(update={"database_url": ...})` work as they always did).
        for name, value in super().__repr_args__():
            yield name, masked_url(value) if name == "database_url" and value else value

    @property
    def url(self) -> str:
        """The database URL in force: the setting, or the SQLite file under `data_dir`."""
        return self.database_url or default_url(self.data_dir)

    @property
    def postgres(self) -> PostgresOptions:
        """How to connect when the database is PostgreSQL."""
        return PostgresOptions(
            pool_size=self.pg_pool_size,
            max_overflow=self.pg_max_overflow,
            statement_timeout=self.pg_statement_timeout,
            connect_timeout=self.pg_connect_timeout,
            prepared_statements=self.pg_prepared_statements,
        )

    @property
    def logs_dir(self) -> Path:
        """Where `log.append` writes."""
        return self.data_dir / "logs"


def _split(value: object) -> object:
    """A comma-separated environment value as a list of its non-empty parts."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def parse_queues(text: str) -> dict[str, int]:
    """`default=8,email=2` (or `default,email` with the default concurrency of 1 each)."""
    queues: dict[str, int] = {}
    for part in (item.strip() for item in text.split(",")):
        if not part:
            continue
        name, _, limit = part.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"queue entry {part!r} has no name; expected name=concurrency")
        try:
            count = int(limit) if limit.strip() else 1
        except ValueError:
            raise ValueError(
                f"queue {name!r}: concurrency {limit!r} is not a whole number"
            ) from None
        if count < 1:
            raise ValueError(f"queue {name!r}: concurrency must be at least 1")
        queues[name] = count
    return queues


def parse_rate_limits(text: str) -> dict[str, RateLimit]:
    """`email=4/10s,sms=100/1m`: per queue, at most that many starts in any such period."""
    limits: dict[str, RateLimit] = {}
    for part in (item.strip() for item in text.split(",")):
        if not part:
            continue
        name, equals, rate = (piece.strip() for piece in part.partition("="))
        if not name or not equals:
            raise ValueError(
                f"rate limit entry {part!r}: expected queue=starts/period, e.g. email=4/10s"
            )
        if name in limits:
            raise ValueError(f"queue {name!r} has two rate limits")
        limits[name] = parse_rate(name, rate)
    return limits


def parse_rate(queue: str, rate: str) -> RateLimit:
    """`4/10s` (the period in ms, s, m or h; `4/s` for one unit) as the limit of `queue`."""
    starts, slash, period = (piece.strip() for piece in rate.partition("/"))
    if not slash:
        raise ValueError(f"queue {queue!r}: rate {rate!r} is not starts/period, e.g. 4/10s")
    if not starts.isdecimal() or int(starts) < 1:
        raise ValueError(f"queue {queue!r}: starts {starts!r} is not a whole number of at least 1")
    length = _period(period)
    if length is None:
        raise ValueError(
            f"queue {queue!r}: period {period!r} is not a duration like 500ms, 10s, 1m or 1h"
        )
    if length > MAX_PERIOD:
        raise ValueError(f"queue {queue!r}: period {period!r} is longer than 8784h")
    return RateLimit(int(starts), length)


def _period(text: str) -> timedelta | None:
    """`500ms`, `10s`, `1.5m`, `h`... as a positive duration; None when it is not one."""
    unit = "ms" if text.endswith("ms") else text[-1:]
    if unit not in PERIOD_UNITS:
        return None
    amount = text[: -len(unit)].strip() or "1"
    try:
        length = timedelta(seconds=float(amount) * PERIOD_UNITS[unit])
    except (ValueError, OverflowError):  # not a number; NaN or past timedelta's range
        return None
    return length if length > timedelta(0) else None
