"""A team's own app with Backstop added, served by plain uvicorn and killed: what its endpoint
enqueued survives the SIGKILL and runs after the restart, and the team's own routes, start-up
and auth behave as they would without Backstop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.support.projects import free_port

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]

TEAM_APP = """
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Header, HTTPException

from app import Backstop, DurableTasks

backstop = Backstop()


def team_auth(x_team_key: str | None = Header(default=None)) -> None:
    if x_team_key != "team":
        raise HTTPException(status_code=403, detail="team key required")


@asynccontextmanager
async def lifespan(app: FastAPI):
    async with backstop.lifespan(app):
        Path("started.txt").write_text("yes")
        yield


app = FastAPI(lifespan=lifespan)
app.include_router(backstop.router, prefix="/jobs", dependencies=[Depends(team_auth)])


@app.get("/tasks")
def own_tasks() -> list[str]:
    return ["the team's own list"]


@app.post("/signup")
def signup(tasks: DurableTasks) -> dict[str, str]:
    return {"task_id": tasks.add_task("log.append", "welcome ada")}
"""

TEAM = {"X-Team-Key": "team", "Authorization": "Bearer s3cret"}


class TeamServer:
    def __init__(self, folder: Path, run_worker: bool, command: list[str]) -> None:
        self.port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
        env.update(
            BACKSTOP_DATA_DIR=str(folder / "data"),
            BACKSTOP_RUN_WORKER="true" if run_worker else "false",
            BACKSTOP_POLL_INTERVAL="0.05",
            BACKSTOP_API_TOKEN="s3cret",
            PYTHONPATH=str(REPO_ROOT),  # the app under test, not an installed copy
        )
        self.log = (folder / f"uvicorn-{self.port}.log").open("wb")
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)],
            cwd=folder,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"uvicorn exited with {self.process.returncode}")
            try:
                if self.http.get("/jobs/readyz", headers=TEAM).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("uvicorn did not get ready")
            time.sleep(0.05)

    def stop(self, signum: int) -> None:
        self.process.send_signal(signum)
        self.process.wait(timeout=20)
        self.http.close()
        self.log.close()


SERVERS = {
    "uvicorn": [sys.executable, "-m", "uvicorn", "team:app"],
    "backstop serve --app": [
        str(Path(sys.executable).parent / "backstop"),
        "serve",
        "--app",
        "team:app",
    ],
}


@pytest.mark.parametrize("serve", SERVERS.values(), ids=SERVERS.keys())
def test_a_task_the_team_endpoint_added_survives_a_sigkill(
    tmp_path: Path, serve: list[str]
) -> None:
    (tmp_path / "team.py").write_text(textwrap.dedent(TEAM_APP))
    server = TeamServer(tmp_path, run_worker=False, command=serve)
    try:
        assert (tmp_path / "started.txt").read_text() == "yes"
        assert server.http.get("/tasks").json() == ["the team's own list"]
        assert server.http.get("/docs").status_code == 200
        assert server.http.post("/jobs/tasks", json={"name": "log.append"}).status_code == 401
        bearer_only = {"Authorization": TEAM["Authorization"]}
        refused = server.http.post("/jobs/tasks", json={"name": "log.append"}, headers=bearer_only)
        assert refused.status_code == 403
        from_endpoint = server.http.post("/signup").json()["task_id"]
        posted = server.http.post(
            "/jobs/tasks", json={"name": "log.append", "args": ["posted"]}, headers=TEAM
        )
        assert posted.status_code == 202
        from_api = posted.json()["id"]
    finally:
        server.stop(signal.SIGKILL)

    server = TeamServer(tmp_path, run_worker=True, command=serve)
    try:
        for task_id in (from_endpoint, from_api):
            task = server.http.get(f"/jobs/tasks/{task_id}?wait=20", headers=TEAM).json()
            assert task["status"] == "succeeded", task
    finally:
        server.stop(signal.SIGTERM)
    lines = (tmp_path / "data" / "logs" / "log.txt").read_text().splitlines()
    assert sorted(lines) == ["posted", "welcome ada"]
