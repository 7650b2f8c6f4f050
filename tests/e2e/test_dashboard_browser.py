"""The dashboard in a real browser: the distribution's headless Chromium, driven by Selenium
through the distribution's chromedriver (Selenium Manager is told to stay offline), against
`backstop serve` started as a subprocess with an API token.

It logs in with the token, watches the overview update itself, and uses the retry and
cancel buttons; a screenshot of each page goes to `BACKSTOP_TEST_ARTIFACTS` (by default
`.artifacts/` in the checkout), under `dashboard/`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.projects import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.timeout(180)]

REPO_ROOT = Path(__file__).resolve().parents[2]
BACKSTOP = Path(sys.executable).parent / "backstop"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "browser-test-token"
START_TIMEOUT = 20.0
WAIT = 15.0


def artifacts() -> Path:
    """Where this run keeps its screenshots."""
    root = Path(os.environ.get("BACKSTOP_TEST_ARTIFACTS") or REPO_ROOT / ".artifacts")
    folder = root / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing: apt-get install chromium chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    return None


class Service:
    """`backstop serve` on its own data folder, with the API token set."""

    def __init__(self, tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "server.log"
        env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
        env.update(
            BACKSTOP_DATA_DIR=str(tmp_path / "data"),
            BACKSTOP_TASK_MODULES="tests.support.tasks",
            BACKSTOP_POLL_INTERVAL="0.05",
            BACKSTOP_API_TOKEN=TOKEN,
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        )
        with self.log.open("wb") as log:
            process = subprocess.Popen(
                [str(BACKSTOP), "serve", "--port", str(self.port)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        processes.append(process)
        self.process = process
        self.http = httpx.Client(
            base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def enqueue(self, name: str, **body: Any) -> str:
        answer = self.http.post("/tasks", json={"name": name, **body})
        assert answer.status_code == 202, answer.text
        task_id: str = answer.json()["id"]
        return task_id

    def task(self, task_id: str, wait: float = 0) -> dict[str, Any]:
        answer = self.http.get(f"/tasks/{task_id}", params={"wait": wait})
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def attempts(self, task_id: str) -> list[dict[str, Any]]:
        body: list[dict[str, Any]] = self.http.get(f"/tasks/{task_id}/attempts").json()
        return body


@pytest.fixture
def service(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> Iterator[Service]:
    running = Service(tmp_path, processes)
    yield running
    running.http.close()
    print(running.log.read_text(errors="replace")[-4000:])


@pytest.fixture
def chromium(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Starts headless Chromium from the distribution (`javascript=False`: with scripts off).
    Missing, the test skips, except under CI (`CI=true`), where it fails: `.ci/run` installs
    it."""
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    # Selenium Manager would look for (and download) a browser and driver: it may not.
    monkeypatch.setenv("SE_OFFLINE", "true")
    started: list[Any] = []

    def start(*, javascript: bool = True) -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in (
            "--headless=new",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1100,760",
        ):
            options.add_argument(argument)
        if not javascript:
            options.add_argument("--blink-settings=scriptEnabled=false")
        driver = webdriver.Chrome(service=DriverService(str(CHROMEDRIVER)), options=options)
        started.append(driver)
        return driver

    yield start
    for driver in started:
        driver.quit()


@pytest.fixture
def browser(chromium: Callable[..., Any]) -> Any:
    """Headless Chromium with JavaScript on."""
    return chromium()


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    """Poll `condition(driver)` until it is truthy (stale elements count as not yet)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    wait = WebDriverWait(driver, WAIT, poll_frequency=0.1, ignored_exceptions=ignored)
    try:
        return wait.until(condition)
    except Exception:
        driver.save_screenshot(str(artifacts() / "failure.png"))
        pytest.fail(f"timed out waiting for {what} at {driver.current_url}")


def text_of(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    value: str = driver.find_element(By.CSS_SELECTOR, css).text
    return value


def click(driver: Any, css: str) -> None:
    """Click the element, found afresh if the live refresh replaced it meanwhile."""
    from selenium.webdriver.common.by import By

    def clicked(d: Any) -> bool:
        d.find_element(By.CSS_SELECTOR, css).click()
        return True

    wait_for(driver, clicked, f"{css} to click")


def shoot(driver: Any, name: str) -> None:
    driver.save_screenshot(str(artifacts() / f"{name}.png"))


def test_the_dashboard_in_chromium(service: Service, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    for queue in ("mail", "mail", "reports"):
        service.enqueue("test.echo", args=[7], queue=queue)
    fatal = service.enqueue("test.fatal", queue="reports")
    service.enqueue("test.anything", args=["<script>alert('x')</script>"], queue="reports")
    service.enqueue("test.flaky", args=[4], queue="mail")
    later = service.enqueue("test.noop", delay=3600, queue="mail")
    assert service.task(fatal, wait=20)["status"] == "failed"

    # Logging in: the dashboard sends the browser to the form, which takes the token once.
    browser.get(f"{service.url}/dashboard")
    wait_for(browser, lambda d: d.find_element(By.ID, "token"), "the login form")
    shoot(browser, "login")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    click(browser, "#login")
    wait_for(browser, lambda d: d.find_element(By.ID, "queues"), "the overview")
    assert browser.current_url == f"{service.url}/dashboard"
    assert browser.execute_script("return document.documentElement.dataset.script") == "on"
    assert text_of(browser, 'tr[data-queue="reports"] td[data-state="failed"]') == "1"
    shoot(browser, "overview")

    # Live: a task enqueued now shows up without a reload (the marker survives).
    browser.execute_script("window.backstopMarker = 1")
    service.enqueue("test.noop", queue="live", delay=3600)
    wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, 'tr[data-queue="live"]'), "live")
    assert browser.execute_script("return window.backstopMarker") == 1

    browser.get(f"{service.url}/dashboard/failing")
    wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-task="{fatal}"]'), "it")
    assert "Fatal: not worth retrying" in text_of(browser, f'tr[data-task="{fatal}"]')
    shoot(browser, "failing")

    # The task's page, then its retry button: the task runs (and fails) once more.
    click(browser, f'tr[data-task="{fatal}"] a')
    wait_for(browser, lambda d: d.find_element(By.ID, "attempts"), "the task's page")
    assert text_of(browser, "#status") == "failed"
    assert "test.fatal" in text_of(browser, "h1")
    shoot(browser, "task")
    click(browser, "#retry")
    wait_for(browser, lambda _: len(service.attempts(fatal)) == 2, "the retried attempt")
    assert service.task(fatal, wait=20)["status"] == "failed"
    wait_for(browser, lambda d: text_of(d, "#status") == "failed", "the page to follow")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#attempts tbody tr")) == 2

    # The cancel button on a task that waits for its time.
    browser.get(f"{service.url}/dashboard/tasks/{later}")
    wait_for(browser, lambda d: text_of(d, "#status") == "queued", "the waiting task")
    click(browser, "#cancel")
    wait_for(browser, lambda d: text_of(d, "#status") == "cancelled", "cancelled")
    assert service.task(later)["status"] == "cancelled"

    browser.get(f"{service.url}/dashboard/schedules")
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text == "Schedules", "it")
    shoot(browser, "schedules")
    # Nothing on any page came from another origin, and the page ran no injected script.
    logs = browser.get_log("browser") if hasattr(browser, "get_log") else []
    assert not [entry for entry in logs if entry.get("level") == "SEVERE"], logs


def test_the_dashboard_works_with_javascript_off(
    service: Service, chromium: Callable[..., Any]
) -> None:
    from selenium.webdriver.common.by import By

    browser = chromium(javascript=False)
    fatal = service.enqueue("test.fatal", queue="reports")
    assert service.task(fatal, wait=20)["status"] == "failed"

    browser.get(f"{service.url}/dashboard/tasks/{fatal}")
    wait_for(browser, lambda d: d.find_element(By.ID, "token"), "the login form")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    click(browser, "#login")
    wait_for(browser, lambda d: text_of(d, "#status") == "failed", "the task's page")
    # The shipped script marks the page when it runs: here it did not.
    assert browser.execute_script("return document.documentElement.dataset.script") is None
    click(browser, "#retry")
    wait_for(browser, lambda _: len(service.attempts(fatal)) == 2, "the retried attempt")
    browser.get(f"{service.url}/dashboard")
    assert text_of(browser, 'tr[data-queue="reports"] td[data-state="failed"]') == "1"
