"""Every setting of the service: one class, read from `BACKSTOP_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from store.engine import Synchronous, default_url


class Settings(BaseSettings):
    """Backstop's settings; see the README's table."""

    model_config = SettingsConfigDict(env_prefix="BACKSTOP_", extra="ignore")

    data_dir: Path = Path("./data")
    database_url: str = ""
    sqlite_synchronous: Synchronous = "NORMAL"
    sqlite_busy_timeout_ms: int = Field(default=10_000, ge=0)
    run_worker: bool = True
    concurrency: int = Field(default=8, ge=1)
    poll_interval: float = Field(default=0.5, gt=0)
    lease_seconds: float = Field(default=30, gt=0)
    shutdown_grace: float = Field(default=30, ge=0)
    task_modules: Annotated[list[str], NoDecode] = []
    max_body_bytes: int = Field(default=1_048_576, ge=1)
    api_token: str = ""
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_starttls: bool = False
    smtp_sender: str = "backstop@localhost"

    @field_validator("task_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def url(self) -> str:
        """The database URL in force: the setting, or the SQLite file under `data_dir`."""
        return self.database_url or default_url(self.data_dir)

    @property
    def logs_dir(self) -> Path:
        """Where `log.append` writes."""
        return self.data_dir / "logs"
