"""Processes the benchmarks start (always stopped again), the HTTP server, wrk, and the
counts read from a Backstop database file while something else works on it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Connection

from bench.report import ROOT
from store.models import CLAIMABLE_WHERE, RUNNING_WHERE
from store.tasks import NewTask, enqueue_batch
from store.timeutil import utcnow

BIN = Path(sys.executable).parent
POST_LUA = Path(__file__).with_name("post.lua")
SERVER_CPU = 0
LOAD_CPU = 1


def backlog(conn: Connection, name: str, count: int) -> None:
    """Queue `count` tasks of `name` as the service's enqueues create them: each with a
    creation time of its own, in order.

    Not `enqueue_many`, which gives a whole batch one creation time: no request or call of
    Backstop's makes such a backlog, and within one creation time the indexes keyed by it
    order tasks by their random ids, so a drain of it writes a random index page for each
    task (34 WAL pages a cycle of 8 tasks instead of 19; a cycle costs half as much again).
    """
    enqueue_batch(conn, [(NewTask(name=name), utcnow()) for _ in range(count)])


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """`command` under `taskset -c cpu` (taskset execs it: the pid stays the command's)."""
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


def backstop_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """This environment with `BACKSTOP_DATA_DIR` and the given `BACKSTOP_*` settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKSTOP_")}
    env["BACKSTOP_DATA_DIR"] = str(data_dir)
    env["BACKSTOP_TASK_MODULES"] = "bench.tasks"
    # `backstop worker` is a console script: it finds `bench` only on the path.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update({f"BACKSTOP_{key.upper()}": value for key, value in settings.items()})
    return env


@contextmanager
def process(
    command: list[str],
    *,
    env: Mapping[str, str] | None = None,
    cpu: int | None = None,
    pipes: bool = False,
    log: Path | None = None,
) -> Iterator[subprocess.Popen[str]]:
    """Start `command` (pinned to `cpu`); whatever happens, stop it on the way out.

    With `log`, its stderr (and its stdout, unless `pipes`) go to that file, shown only if
    it did not end by the SIGTERM it was sent.
    """
    pipe = subprocess.PIPE if pipes else None
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(log.open("w")) if log is not None else None
        proc = subprocess.Popen(
            pinned(command, cpu),
            cwd=ROOT,
            env=env,
            stdin=pipe,
            stdout=pipe or sink,
            stderr=sink,
            text=True,
        )
        try:
            yield proc
        finally:
            stop(proc)
            if log is not None and proc.returncode not in (0, -signal.SIGTERM):
                tail = log.read_text().splitlines()[-30:]
                print(f"{command[0]} exited with {proc.returncode}:", *tail, sep="\n  ")


def stop(proc: subprocess.Popen[str], grace: float = 15) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The child's next stdout line; fails if it exits or says nothing for `timeout` s."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"{proc.args!r} said nothing in {timeout}s (exit {proc.poll()})")
    return line.strip()


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def server(data_dir: Path, *, run_worker: bool, synchronous: str = "NORMAL") -> Iterator[str]:
    """`uvicorn --factory bench.apps:build` on the server core; yields its base URL."""
    port = free_port()
    command = [
        str(BIN / "uvicorn"),
        "--factory",
        "bench.apps:build",
        "--host=127.0.0.1",
        f"--port={port}",
        "--no-access-log",
        "--log-level=warning",
    ]
    env = backstop_env(data_dir, run_worker=str(run_worker).lower(), sqlite_synchronous=synchronous)
    with process(command, env=env, cpu=SERVER_CPU, log=data_dir / "server.log") as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        yield url


def wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server at {url} not ready after {timeout}s")


# What a server thread is, by its Python name (the names `bench.apps` reports).
THREAD_KINDS = {
    "MainThread": "event loop",
    "backstop-enqueue": "enqueue writer",
    "AnyIO worker thread": "worker threads",
}


def thread_cpu(url: str) -> dict[str, tuple[str, float]]:
    """The CPU seconds each thread of the server at `url` has used so far, by thread id,
    with what kind of thread it is (`THREAD_KINDS`; the rest is "other")."""
    with urllib.request.urlopen(f"{url}/bench/threads", timeout=10) as answer:
        found = json.load(answer)
    pid, names = found["pid"], found["threads"]
    tick = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, tuple[str, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # it ended between the listing and the read
            continue
        fields = stat.rsplit(")", 1)[1].split()  # utime and stime: fields 14 and 15
        kind = THREAD_KINDS.get(names.get(tid, ""), "other")
        seconds[tid] = (kind, (int(fields[11]) + int(fields[12])) / tick)
    return seconds


@dataclass(frozen=True)
class Load:
    """What wrk measured."""

    requests: int
    ok: int  # 2xx answers (wrk counts non-2xx/3xx; none of these endpoints redirects)
    rps: float
    p99_ms: float
    errors: int
    seconds: float  # wall clock around wrk, for rates of things wrk does not count


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(url: str, connections: int, seconds: int) -> Load:
    """`wrk -t1 -cN -dXs -s post.lua --latency` on the load core (whole seconds only)."""
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "-s",
        str(POST_LUA),
        "--latency",
        url,
    ]
    start = time.monotonic()
    done = subprocess.run(
        pinned(command, LOAD_CPU), capture_output=True, text=True, check=True, timeout=seconds + 60
    )
    elapsed = time.monotonic() - start
    out = done.stdout
    requests = int(_match(r"(\d+) requests in", out))
    non_ok = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if p99 is None:
        raise RuntimeError(f"no p99 in wrk's output:\n{out}")
    return Load(
        requests=requests,
        ok=requests - (int(non_ok.group(1)) if non_ok else 0),
        rps=float(_match(r"Requests/sec:\s+([\d.]+)", out)),
        p99_ms=float(p99.group(1)) * _UNITS[p99.group(2)],
        errors=sum(int(n) for n in errors.groups()) if errors else 0,
        seconds=elapsed,
    )


def _match(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    if found is None:
        raise RuntimeError(f"{pattern!r} not in wrk's output:\n{text}")
    return found.group(1)


# -- counts, read beside the processes that write ----------------------------------------
# Measurement only, so plain sqlite3: WAL readers never wait for the writers measured.


def database_file(data_dir: Path) -> Path:
    return data_dir / "backstop.db"


def _scalar(path: Path, query: str) -> int:
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        value: int = conn.execute(query).fetchone()[0]
        return value


def stored(data_dir: Path) -> int:
    """Tasks in the table, in any state."""
    return _scalar(database_file(data_dir), "SELECT count(*) FROM task")


def succeeded(data_dir: Path) -> int:
    return _scalar(database_file(data_dir), "SELECT count(*) FROM task WHERE status = 'succeeded'")


def unfinished(data_dir: Path) -> int:
    """Queued, retrying or running, in one snapshot (a task claimed between two queries
    would be in neither). The subqueries carry the partial indexes' own WHERE clauses, so
    they read those indexes (the backlog), not the whole history."""
    return _scalar(
        database_file(data_dir),
        f"SELECT (SELECT count(*) FROM task WHERE {CLAIMABLE_WHERE})"
        f" + (SELECT count(*) FROM task WHERE {RUNNING_WHERE})",
    )


def by_status(data_dir: Path) -> dict[str, int]:
    """How many tasks are in each state, in one snapshot."""
    with closing(sqlite3.connect(database_file(data_dir), timeout=30)) as conn:
        rows = conn.execute("SELECT status, count(*) FROM task GROUP BY status").fetchall()
    return {status: count for status, count in rows}


def wait_finished(data_dir: Path, timeout: float, every: float = 0.005) -> float:
    """Poll until nothing is left to run; the monotonic time it was first seen so."""
    return wait_until(lambda: unfinished(data_dir) == 0, timeout, every)


def wait_until(done: Callable[[], bool], timeout: float, every: float = 0.005) -> float:
    """Poll `done()` until it is true; the monotonic time it was first seen so."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return time.monotonic()
        time.sleep(every)
    raise RuntimeError(f"tasks still unfinished after {timeout}s")
