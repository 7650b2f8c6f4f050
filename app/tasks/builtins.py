"""Built-in tasks: useful on their own, and real work for the tests to run."""

from __future__ import annotations

import email.utils
import smtplib
from email.message import EmailMessage
from pathlib import PurePosixPath
from typing import Annotated, Any

import httpx
from pydantic import AfterValidator
from tenacity import retry_if_exception, retry_if_exception_type

from app.tasks.context import TaskContext
from app.tasks.registry import task

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


class WebhookRetryable(Exception):
    """The receiver answered 429 or 5xx: worth trying again later."""


class WebhookRejected(Exception):
    """The receiver answered another 4xx: trying again would not help."""


def _webhook_url(url: str) -> str:
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("url must be an absolute http(s) URL")
    return url


WebhookURL = Annotated[str, AfterValidator(_webhook_url)]


@task(
    name="webhook.deliver",
    max_attempts=8,
    timeout=60,
    retry=retry_if_exception_type((httpx.TransportError, WebhookRetryable, TimeoutError)),
)
async def deliver_webhook(
    url: WebhookURL, payload: Any, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """POST `payload` as JSON to `url`; retries connection errors, timeouts, 429 and 5xx."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client:
        response = await client.post(url, json=payload, headers=headers)
    code = response.status_code
    if code == 429 or code >= 500:
        raise WebhookRetryable(f"{url} answered {code}")
    if code >= 400:
        raise WebhookRejected(f"{url} answered {code}")
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


@task(name="email.send", max_attempts=5, timeout=120, retry=retry_if_exception(_smtp_transient))
def send_email(to: Address, subject: str, body: str, ctx: TaskContext) -> dict[str, Any]:
    """Send a plain-text email through the configured SMTP server."""
    settings = ctx.settings
    message = EmailMessage()
    message["From"] = settings.smtp_sender
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = f"<{ctx.task_id}@backstop>"  # the same on every attempt
    message.set_content(body)
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=30) as smtp:
        if settings.smtp_starttls:
            smtp.starttls()
        if settings.smtp_username:
            smtp.login(settings.smtp_username, settings.smtp_password)
        refused = smtp.send_message(message)
    return {"to": to, "refused": sorted(refused)}
