"""Several hosts and their faults: an API host and worker hosts on one PostgreSQL server,
through a cut link, a server restart and killed backends. Nothing accepted is lost.

Each host is a network namespace joined to this machine by a veth pair, on a /24 of its own
under 10.213.0.0/16 (the first free ones: no address or route of the machine's in them). The
test starts a private PostgreSQL server (initdb and pg_ctl, as the postgres user, in a
temporary folder) that listens on the machine's end of each pair; the machine's own server is
never touched. Every namespace, link, process and the server go away after the test, failed
or not. It needs root, `ip netns` and PostgreSQL 15's binaries: without them it skips, and
under CI (`CI=true`) fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from store.engine import Database
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.multihost, pytest.mark.e2e, pytest.mark.timeout(240)]

REPO_ROOT = Path(__file__).resolve().parents[2]
BACKSTOP = Path(sys.executable).parent / "backstop"
PG_BIN = Path("/usr/lib/postgresql/15/bin")

TASKS = 2500
NAP = 0.1  # each task's work, seconds: the run lasts long enough to fault it midway
WORKERS = 3
CONCURRENCY = 4
LEASE = 3  # seconds: the cut-off host's leases lapse soon
FAULTS = 3
API_PORT = 8000


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _free_subnets(count: int) -> list[int]:
    """Third octets of `count` /24s under 10.213.0.0/16 that the machine uses nowhere."""
    taken = _run("ip", "-4", "-o", "addr", "show") + _run(
        "ip", "-4", "route", "show", "table", "all"
    )
    free = [n for n in range(16, 250) if f"10.213.{n}." not in taken]
    if len(free) < count:
        raise RuntimeError("no free /24 under 10.213.0.0/16")
    start = secrets.randbelow(len(free) - count + 1)
    return free[start : start + count]


@dataclass
class Host:
    """One namespace: its name, the machine's end of its link, and the two addresses."""

    namespace: str
    link: str
    subnet: int

    @property
    def gateway(self) -> str:
        """The machine's address on this host's link (where the server listens)."""
        return f"10.213.{self.subnet}.1"

    @property
    def address(self) -> str:
        return f"10.213.{self.subnet}.2"


@dataclass
class Server:
    """A private PostgreSQL server in a folder of its own."""

    folder: Path
    port: int
    addresses: list[str]

    def _ctl(self, *args: str) -> None:
        _run("runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def create(self) -> None:
        """initdb, and a configuration for the test: its addresses, trust for its subnets,
        no fsync, and a short leash on clients that vanished mid-transaction."""
        shutil.chown(self.folder, "postgres")
        self.folder.chmod(0o755)
        _run(
            "runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(self.data),
            "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '{','.join(['127.0.0.1', *self.addresses])}'\n"
                f"port = {self.port}\nunix_socket_directories = '{self.folder}'\n"
                "max_connections = 300\nfsync = off\nsynchronous_commit = off\n"
                "full_page_writes = off\nshared_buffers = 32MB\n"
                # A host cut off mid-transaction holds its locks until the server notices.
                "idle_in_transaction_session_timeout = '5s'\n"
                "tcp_keepalives_idle = 5\ntcp_keepalives_interval = 2\ntcp_keepalives_count = 3\n"
                "tcp_user_timeout = 10000\n"
            )
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host all all 10.213.0.0/16 trust\n"
        )

    def start(self) -> None:
        self._ctl("-l", str(self.folder / "server.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "-t", "60", "stop")

    def url(self, host: str = "127.0.0.1", database: str = "backstop") -> str:
        return f"postgresql+psycopg://postgres@{host}:{self.port}/{database}"


@dataclass
class Lab:
    """The hosts, the server and the processes of one test; `close` removes them all."""

    folder: Path
    hosts: list[Host] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    server: Server | None = None

    def add_host(self, tag: str, subnet: int) -> Host:
        host = Host(f"backstop-{tag}", f"bsm{tag}", subnet)
        _run("ip", "netns", "add", host.namespace)
        self.hosts.append(host)
        _run("ip", "link", "add", host.link, "type", "veth", "peer", "name", "eth0",
             "netns", host.namespace)  # fmt: skip
        _run("ip", "addr", "add", f"{host.gateway}/24", "dev", host.link)
        _run("ip", "link", "set", host.link, "up")
        inside = ("ip", "netns", "exec", host.namespace)
        _run(*inside, "ip", "addr", "add", f"{host.address}/24", "dev", "eth0")
        _run(*inside, "ip", "link", "set", "eth0", "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        return host

    def start(
        self, host: Host, name: str, args: list[str], **settings: str
    ) -> subprocess.Popen[bytes]:
        """`backstop ARGS` on `host`, on the private server; its output in `name`.log."""
        assert self.server is not None
        env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
        env.update(
            BACKSTOP_DATABASE_URL=self.server.url(host.gateway),
            BACKSTOP_DATA_DIR=str(self.folder / name),
            BACKSTOP_TASK_MODULES="tests.support.tasks",
            BACKSTOP_POLL_INTERVAL="0.2",
            BACKSTOP_LEASE_SECONDS=str(LEASE),
            BACKSTOP_CONCURRENCY=str(CONCURRENCY),
            BACKSTOP_PG_CONNECT_TIMEOUT="2",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        )
        env.update({f"BACKSTOP_{key.upper()}": value for key, value in settings.items()})
        with (self.folder / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", host.namespace, str(BACKSTOP), *args],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait(timeout=30)
        for host in self.hosts:  # deleting a namespace deletes its end of the link, and so both
            subprocess.run(["ip", "netns", "delete", host.namespace], check=False)
            subprocess.run(["ip", "link", "delete", host.link], capture_output=True, check=False)
        if self.server is not None and (self.server.data / "postmaster.pid").exists():
            self.server.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """An API host and `WORKERS` worker hosts, linked to a private server (not started)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        _missing("network namespaces need root and iproute2 (`ip netns`)")
    if not (PG_BIN / "initdb").exists():
        _missing(f"no PostgreSQL 15 binaries in {PG_BIN} (apt-get install postgresql-15)")
    lab = Lab(Path(tempfile.mkdtemp(prefix="backstop-multihost-")))
    try:
        try:
            subnets = _free_subnets(1 + WORKERS)
            tag = secrets.token_hex(2)
            hosts = [lab.add_host(f"{tag}{index}", n) for index, n in enumerate(subnets)]
        except RuntimeError as error:
            lab.close()
            _missing(f"cannot make the hosts' network: {error}")
        lab.server = Server(lab.folder, _free_port(), [host.gateway for host in hosts])
        lab.server.create()
        lab.server.start()
        admin = sa.create_engine(lab.server.url(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql("CREATE DATABASE backstop")
        admin.dispose()
        yield lab
    finally:
        lab.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Tally:
    """What the API answered to the test's enqueues."""

    accepted: set[str] = field(default_factory=set)
    unavailable: int = 0
    other: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def post(self, http: httpx.Client, number: int) -> int | None:
        """POST one task; the answer's status (None when no answer came in time)."""
        try:
            answer = http.post("/tasks", json={"name": "test.nap", "args": [NAP], "kwargs": {}})
        except httpx.TimeoutException:
            with self.lock:
                self.other["no answer within the client's timeout"] += 1
            return None
        except httpx.TransportError as error:
            with self.lock:
                self.other[f"transport: {type(error).__name__}"] += 1
            return None
        with self.lock:
            if answer.status_code == 202:
                self.accepted.add(answer.json()["id"])
            elif answer.status_code == 503 and answer.json().get("detail"):
                self.unavailable += 1
            else:
                self.other[f"{answer.status_code}: {answer.text[:200]}"] += 1
        return answer.status_code


def _succeeded(db: Database) -> int:
    with db.read() as conn:
        count = conn.exec_driver_sql("SELECT count(*) FROM task WHERE status = 'succeeded'")
        return int(count.scalar_one())


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    wait_until(predicate, timeout, what)


def test_api_and_workers_on_several_hosts_lose_nothing_through_a_cut_link_a_restart_and_killed_backends(  # noqa: E501
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    assert lab.server is not None
    api_host, *worker_hosts = lab.hosts
    lab.start(api_host, "api", ["serve", "--host", api_host.address, "--port", str(API_PORT)],
              run_worker="false")  # fmt: skip
    http = httpx.Client(base_url=f"http://{api_host.address}:{API_PORT}", timeout=10)
    _wait_for(lambda: _ready(http), "the API host to answer /readyz", timeout=60)
    workers = [
        lab.start(host, f"worker{index}", ["worker"]) for index, host in enumerate(worker_hosts)
    ]
    db = Database.from_url(lab.server.url())
    tally = Tally()
    try:
        with ThreadPoolExecutor(8) as pool:
            posting = [pool.submit(tally.post, http, number) for number in range(TASKS)]

            # 1. One worker host loses its link mid-run: its leases lapse, the others take them.
            _wait_for(lambda: _succeeded(db) >= TASKS // 10, "a tenth of the tasks to run")
            _run("ip", "link", "set", worker_hosts[0].link, "down")
            cut_at = _succeeded(db)

            # 2. The server restarts mid-run; meanwhile the API answers 503, and then
            # recovers by itself.
            _wait_for(lambda: _succeeded(db) >= cut_at + TASKS // 5, "work after the cut")
            lab.server.stop()
            db.dispose()
            down = [tally.post(http, -1) for _ in range(3)]
            ready_while_down = http.get("/readyz").status_code
            lab.server.start()
            # The connections the server ended are replaced before use: no request made
            # once it is back pays for them.
            first_after_restart = tally.post(http, -1)
            _wait_for(lambda: tally.post(http, -1) == 202, "the API to accept again", 30)
            restarted_at = _succeeded(db)

            # 3. An administrator ends every connection to the database.
            _wait_for(lambda: _succeeded(db) >= restarted_at + TASKS // 5, "work after restart")
            ended = _terminate_backends(lab.server.url(database="postgres"))
            terminated_at = _succeeded(db)
            for future in posting:
                future.result()
        total = len(tally.accepted)
        _wait_for(lambda: _succeeded(db) >= total, "every accepted task to succeed", 120)
        report = _report(db, workers[0].pid)
    finally:
        db.dispose()
        http.close()

    with capsys.disabled():
        print(
            f"\nmultihost: {report.tasks} tasks ({len(tally.accepted)} accepted, 202),"
            f" {tally.unavailable} answers 503 while the server was down,"
            f" {report.attempts} attempts, {report.reruns} re-runs,"
            f" {report.lapsed_on_cut_host} leases of the cut-off host recovered elsewhere;"
            f" faults at {cut_at}, {restarted_at}, {terminated_at} succeeded;"
            f" {ended} backends terminated"
        )
    assert tally.other == Counter(), "answers other than 202 and 503"
    assert 503 in down, down
    assert ready_while_down == 503
    assert first_after_restart == 202
    # Every fault came mid-run: work was left after each.
    assert cut_at < restarted_at < terminated_at < total
    assert report.statuses == {"succeeded": report.tasks}
    assert tally.accepted <= report.ids
    # At least once, and only as often as a fault made it: one attempt succeeded per task,
    # every other lost its lease, and each fault cost at most one re-run per slot.
    assert set(report.succeeded_attempts) == report.ids
    assert set(report.succeeded_attempts.values()) == {1}
    assert set(report.other_outcomes) <= {"lease_expired"}, report.other_outcomes
    assert report.reruns <= FAULTS * WORKERS * CONCURRENCY
    assert report.lapsed_on_cut_host >= 1
    assert ended >= 1


def _terminate_backends(url: str) -> int:
    """End every connection to the test's database (as an administrator would); how many."""
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            ended = conn.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = 'backstop' AND pid <> pg_backend_pid()"
            ).scalar_one()
    finally:
        admin.dispose()
    return int(ended)


def _ready(http: httpx.Client) -> bool:
    try:
        return http.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class Report:
    """What the database holds once the run is over."""

    ids: set[str]
    statuses: dict[str, int]
    attempts: int
    succeeded_attempts: Counter[str]
    other_outcomes: Counter[str]
    lapsed_on_cut_host: int

    @property
    def tasks(self) -> int:
        return len(self.ids)

    @property
    def reruns(self) -> int:
        return self.attempts - self.tasks


def _report(db: Database, cut_pid: int) -> Report:
    with db.read() as conn:
        statuses = {
            str(status): int(count)
            for status, count in conn.exec_driver_sql(
                "SELECT status, count(*) FROM task GROUP BY 1"
            )
        }
        ids = {str(row[0]) for row in conn.exec_driver_sql("SELECT id FROM task")}
        attempts = conn.exec_driver_sql("SELECT task_id, outcome, worker FROM attempt").all()
    cut_host = f"{socket.gethostname()}:{cut_pid}:"
    return Report(
        ids=ids,
        statuses=statuses,
        attempts=len(attempts),
        succeeded_attempts=Counter(
            str(task_id) for task_id, outcome, _ in attempts if outcome == "succeeded"
        ),
        other_outcomes=Counter(
            str(outcome) for _, outcome, _ in attempts if outcome != "succeeded"
        ),
        lapsed_on_cut_host=sum(
            1
            for _, outcome, worker in attempts
            if outcome == "lease_expired" and str(worker).startswith(cut_host)
        ),
    )
