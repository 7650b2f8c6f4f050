"""Enqueue over HTTP: durable endpoints against the same endpoints with BackgroundTasks.

    .venv/bin/python -m bench.enqueue [--runs 3] [--seconds 2] [--connections 16,64]
                                      [--synchronous NORMAL,FULL] [--json out.json]

Pairs: POST /bench/durable (a sync endpoint calling `tasks.add_task`) and POST /tasks (the
API's route, async) against POST /bench/background (sync, BackgroundTasks); POST
/bench/durable-async (`await tasks.add_task_async`) against POST /bench/background-async.
Beside them, the issue's reference design, POST /bench/reference and
/bench/reference-async: the same row inserted on one sqlite3 connection shared by the
process, `BEGIN IMMEDIATE` and a commit per request (in the sync endpoint's worker thread,
or on the event loop). It is compared with the same BackgroundTasks endpoints, and
Backstop's endpoints with it; no target.
The server (`uvicorn --factory bench.apps:build`, no runner) is pinned to CPU 0 and wrk to
CPU 1. Each run starts a fresh server on a fresh data folder and measures the endpoints one
after the other, in a rotated order, at each connection count; figures are medians over the
runs, ratios the median of each run's own ratio. Afterwards the rows stored are checked
against wrk's 2xx count (wrk drops the requests in flight when it stops, so up to one per
connection may be stored and not counted).

The profile: the server's CPU time during each load, per request, by kind of thread (the
event loop, the enqueue writer, the worker threads that run `def` endpoints and
BackgroundTasks' sync functions), read from /proc. It says where a durable request's
extra time goes; printed for the first connection count.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench import harness
from bench.report import Figure, Report, arguments, header, integers, median, rotated

# Each durable endpoint and the BackgroundTasks endpoint it is compared with.
PEERS = {
    "/bench/durable": "/bench/background",
    "/tasks": "/bench/background",
    "/bench/durable-async": "/bench/background-async",
}
# The reference design and the BackgroundTasks endpoint it is compared with.
REFERENCES = {
    "/bench/reference": "/bench/background",
    "/bench/reference-async": "/bench/background-async",
}
# Each Backstop endpoint and the reference design of its kind (sync or async).
AGAINST_REFERENCE = {
    "/bench/durable": "/bench/reference",
    "/tasks": "/bench/reference-async",
    "/bench/durable-async": "/bench/reference-async",
}
ENDPOINTS = (
    "/bench/background",
    "/bench/durable",
    "/tasks",
    "/bench/reference",
    "/bench/background-async",
    "/bench/durable-async",
    "/bench/reference-async",
)
WARMUP = 1
SETTLE = 0.2  # seconds for the requests wrk abandoned when it stopped to finish

Key = tuple[str, int, str]  # synchronous, connections, endpoint
Profile = dict[str, float]  # CPU µs per request by kind of thread


def one_run(
    synchronous: str,
    run: int,
    connections: list[int],
    seconds: int,
    loads: dict[Key, list[harness.Load]],
    profiles: dict[Key, list[Profile]],
    report: Report,
) -> None:
    order = rotated(ENDPOINTS, run)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        with harness.server(data, run_worker=False, synchronous=synchronous) as url:
            for endpoint in order:
                harness.wrk(url + endpoint, connections[0], WARMUP)
            time.sleep(SETTLE)  # the warm-up's abandoned requests must not count as the next's
            for conns in connections:
                for endpoint in order:
                    before = harness.stored(data)
                    cpu = harness.thread_cpu(url)
                    load = harness.wrk(url + endpoint, conns, seconds)
                    used = harness.thread_cpu(url)
                    time.sleep(SETTLE)  # let the requests wrk abandoned finish
                    rows = harness.stored(data) - before
                    key = (synchronous, conns, endpoint)
                    loads[key].append(load)
                    profiles[key].append(per_request(cpu, used, load.requests))
                    check(report, endpoint, conns, load, rows)


def per_request(
    before: dict[str, tuple[str, float]], after: dict[str, tuple[str, float]], requests: int
) -> Profile:
    """CPU µs per request by kind of thread, between two readings of `harness.thread_cpu`.
    A thread that ended in between is left out: what it used is gone with it (AnyIO's idle
    worker threads end after 10 s)."""
    used: Profile = {}
    for tid, (kind, seconds) in after.items():
        start = before[tid][1] if tid in before else 0.0
        used[kind] = used.get(kind, 0.0) + (seconds - start) / max(requests, 1) * 1e6
    return used


def check(report: Report, endpoint: str, conns: int, load: harness.Load, rows: int) -> None:
    expected = load.ok if endpoint in PEERS or endpoint in REFERENCES else 0
    extra = rows - expected
    if load.errors or load.ok != load.requests or not 0 <= extra <= conns:
        report.note(
            f"CHECK FAILED {endpoint} c={conns}: {load.requests} requests, {load.ok} 2xx, "
            f"{load.errors} socket errors, {rows} rows stored"
        )


def summarize(
    report: Report,
    synchronous: str,
    connections: list[int],
    loads: dict[Key, list[harness.Load]],
    profiles: dict[Key, list[Profile]],
) -> None:
    target = "1" if synchronous == "NORMAL" else "7"
    for conns in connections:
        for peer_endpoint in sorted(set(PEERS.values())):
            peer = loads[(synchronous, conns, peer_endpoint)]
            label = f"{peer_endpoint} c={conns} {synchronous}"
            report.add(Figure(label, median(x.rps for x in peer), "req/s"))
            report.add(Figure(f"{label} p99", median(x.p99_ms for x in peer), "ms"))
        for endpoint, peer_endpoint in PEERS.items():
            mine = loads[(synchronous, conns, endpoint)]
            peer = loads[(synchronous, conns, peer_endpoint)]
            name = peer_endpoint.removeprefix("/bench/")
            speed = median(a.rps / b.rps for a, b in zip(mine, peer, strict=True))
            slowest = median(a.p99_ms / b.p99_ms for a, b in zip(mine, peer, strict=True))
            report.add(
                Figure(
                    f"{endpoint} c={conns} {synchronous}",
                    median(x.rps for x in mine),
                    "req/s",
                    peer=name,
                    peer_value=median(x.rps for x in peer),
                    ratio=speed,
                    target=target,
                    goal=">= 1.0x",
                    met=speed >= 1.0,
                )
            )
            report.add(
                Figure(
                    f"{endpoint} c={conns} {synchronous} p99",
                    median(x.p99_ms for x in mine),
                    "ms",
                    peer=name,
                    peer_value=median(x.p99_ms for x in peer),
                    ratio=slowest,
                    target=target,
                    goal="<= 1.0x",
                    met=slowest <= 1.0,
                )
            )
        compare(report, loads, synchronous, conns)
    profile(report, synchronous, connections[0], profiles)


def compare(
    report: Report, loads: dict[Key, list[harness.Load]], synchronous: str, conns: int
) -> None:
    """The reference design against BackgroundTasks, and Backstop against the reference
    (labelled so, apart from the target's figures of the same endpoint)."""
    pairs = [*REFERENCES.items(), *AGAINST_REFERENCE.items()]
    for endpoint, peer_endpoint in pairs:
        mine = loads[(synchronous, conns, endpoint)]
        peer = loads[(synchronous, conns, peer_endpoint)]
        against = "" if endpoint in REFERENCES else " vs reference"
        report.add(
            Figure(
                f"{endpoint} c={conns} {synchronous}{against}",
                median(x.rps for x in mine),
                "req/s",
                peer=peer_endpoint.removeprefix("/bench/"),
                peer_value=median(x.rps for x in peer),
                ratio=median(a.rps / b.rps for a, b in zip(mine, peer, strict=True)),
            )
        )


def profile(
    report: Report, synchronous: str, conns: int, profiles: dict[Key, list[Profile]]
) -> None:
    """Each endpoint's CPU per request (a figure) and its split by kind of thread (a note)."""
    for endpoint in ENDPOINTS:
        runs = profiles[(synchronous, conns, endpoint)]
        kinds = sorted({kind for run in runs for kind in run}, key=_kind_order)
        split = {kind: median(run.get(kind, 0.0) for run in runs) for kind in kinds}
        total = median(sum(run.values()) for run in runs)
        report.add(Figure(f"{endpoint} c={conns} {synchronous} CPU/request", total, "µs"))
        parts = ", ".join(f"{kind} {value:,.0f}" for kind, value in split.items())
        report.note(f"CPU µs per request, {endpoint} c={conns} {synchronous}: {parts}")


def _kind_order(kind: str) -> int:
    order = [*harness.THREAD_KINDS.values(), "other"]
    return order.index(kind) if kind in order else len(order)


def main() -> None:
    parser = arguments(__doc__, runs=3)
    parser.add_argument("--seconds", type=int, default=2, help="wrk duration per endpoint")
    parser.add_argument("--connections", type=integers, default=[16, 64])
    parser.add_argument("--synchronous", default="NORMAL,FULL", help="SQLite synchronous modes")
    options = parser.parse_args()
    modes = [mode.strip().upper() for mode in options.synchronous.split(",") if mode.strip()]
    settings = {
        "runs": options.runs,
        "seconds": options.seconds,
        "connections": options.connections,
        "synchronous": modes,
        "server": "uvicorn, 1 worker, CPU 0",
        "load": "wrk -t1, CPU 1",
    }
    header("enqueue: durable endpoints vs the same with BackgroundTasks", settings)
    report = Report("enqueue", settings)
    loads: dict[Key, list[harness.Load]] = defaultdict(list)
    profiles: dict[Key, list[Profile]] = defaultdict(list)
    for synchronous in modes:
        for run in range(options.runs):
            one_run(synchronous, run, options.connections, options.seconds, loads, profiles, report)
        summarize(report, synchronous, options.connections, loads, profiles)
    failed = [note for note in report.notes if note.startswith("CHECK FAILED")]
    if not failed:
        report.note("rows stored = 2xx answers in every run (within the requests in flight)")
    report.save(options.json)


if __name__ == "__main__":
    main()
