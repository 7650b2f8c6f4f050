"""Built-in tasks: useful on their own, and real work for the tests to run."""

from __future__ import annotations

import email.utils
import re
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import PurePosixPath
from typing import Annotated, Any

import httpx
from pydantic import AfterValidator, SecretStr
from tenacity import retry_if_exception, retry_if_exception_type

from app.settings import Settings
from app.tasks import webhook
from app.tasks.context import TaskContext
from app.tasks.registry import task
from app.tasks.webhook import RESERVED_HEADERS, WebhookPolicy, WebhookRetryable

# -- log.append -----------------------------------------------------------------------------


def _log_name(name: str) -> str:
    path = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or "\x00" in name
        or path.is_absolute()
        or any(part in ("..", ".", "") for part in name.split("/"))
    ):
        # "." or "a/.." name a folder, not a file; ".." or "/etc/x" a file outside.
        raise ValueError(
            f"{name!r} is not a file under the logs folder; give a relative name like 'log.txt'"
        )
    return name


LogName = Annotated[str, AfterValidator(_log_name)]


@task(name="log.append", max_attempts=3)
def append_line(message: str, file: LogName = "log.txt", *, ctx: TaskContext) -> dict[str, Any]:
    """Append `message` as one line to `file` under `BACKSTOP_DATA_DIR/logs`."""
    logs = ctx.settings.logs_dir.resolve()
    target = (logs / file).resolve()
    if not target.is_relative_to(logs):  # a symlink pointing out of the folder
        raise ValueError(f"{file!r} leaves the logs folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    line = message.replace("\n", " ") + "\n"
    with target.open("a", encoding="utf-8") as out:
        out.write(line)
    return {"file": file, "bytes": len(line.encode())}


# -- webhook.deliver -------------------------------------------------------------------------


def _webhook_url(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"url is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("url must be an absolute http(s) URL")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ValueError(f"url has port {parsed.port}; a port is 1 to 65535")
    return url


WebhookURL = Annotated[str, AfterValidator(_webhook_url)]

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _webhook_headers(headers: dict[str, str] | None) -> dict[str, str] | None:
    for name, value in (headers or {}).items():
        if not _TOKEN.match(name):
            raise ValueError(f"header name {name!r} is not a valid HTTP header name")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is set by webhook.deliver itself")
        if any(char in value for char in "\r\n\x00"):
            raise ValueError(f"header {name!r}: a value cannot hold line breaks or NUL")
    return headers


WebhookHeaders = Annotated[dict[str, str] | None, AfterValidator(_webhook_headers)]


@task(
    name="webhook.deliver",
    max_attempts=8,
    retry=retry_if_exception_type((httpx.TransportError, WebhookRetryable, TimeoutError)),
    grants=[WebhookPolicy],
)
async def deliver_webhook(
    url: WebhookURL, payload: Any, headers: WebhookHeaders = None, *, ctx: TaskContext
) -> dict[str, Any]:
    """POST `payload` as JSON to `url`, a public address unless BACKSTOP_WEBHOOK_ALLOW
    allows it; retries connection errors, timeouts, 429 and 5xx."""
    code = await webhook.deliver(ctx.grant(WebhookPolicy), url, payload, headers)
    return {"status": code}


# -- email.send ------------------------------------------------------------------------------


def _address(value: str) -> str:
    _, address = email.utils.parseaddr(value)
    if "@" not in address or " " in address:
        raise ValueError(f"{value!r} is not an email address")
    return value


Address = Annotated[str, AfterValidator(_address)]


def _smtp_transient(error: BaseException) -> bool:
    """Worth another attempt: the server was unreachable, or answered with a 4xx code."""
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return all(400 <= code < 500 for code, _ in error.recipients.values())
    if isinstance(error, smtplib.SMTPResponseException):
        return 400 <= error.smtp_code < 500
    # Connection refused or reset, a dropped connection, a timeout (SMTPException is an
    # OSError too, but its permanent kinds were answered above).
    return isinstance(error, OSError | TimeoutError) and not isinstance(
        error, smtplib.SMTPNotSupportedError | smtplib.SMTPAuthenticationError
    )


@dataclass(frozen=True)
class SmtpServer:
    """The SMTP settings, all `email.send` is given of the settings (the password stays a
    `SecretStr` until the login reads it)."""

    host: str
    port: int
    username: str
    password: SecretStr
    starttls: bool
    sender: str

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpServer:
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_username,
            password=settings.smtp_password,
            starttls=settings.smtp_starttls,
            sender=settings.smtp_sender,
        )


@task(
    name="email.send",
    max_attempts=5,
    timeout=120,
    retry=retry_if_exception(_smtp_transient),
    grants=[SmtpServer],
)
def send_email(to: Address, subject: str, body: str, ctx: TaskContext) -> dict[str, Any]:
    """Send a plain-text email through the configured SMTP server."""
    server = ctx.grant(SmtpServer)
    message = EmailMessage()
    message["From"] = server.sender
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = f"<{ctx.task_id}@backstop>"  # the same on every attempt
    message.set_content(body)
    with smtplib.SMTP(server.host, server.port, timeout=30) as smtp:
        if server.starttls:
            smtp.starttls()
        if server.username:
            smtp.login(server.username, server.password.get_secret_value())
        refused = smtp.send_message(message)
    return {"to": to, "refused": sorted(refused)}
