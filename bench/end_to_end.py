"""End to end: accepted and executed durable tasks per second, the runner in the server.

    .venv/bin/python -m bench.end_to_end [--runs 3] [--seconds 3] [--connections 16,64]
                                         [--json out.json]

The server (`uvicorn --factory bench.apps:build` with BACKSTOP_RUN_WORKER=true) is pinned
to CPU 0, wrk to CPU 1. Each run starts a fresh server and data folder and, at each
connection count, loads POST /bench/background and POST /bench/durable for a fixed time (in
a rotated order). For the durable endpoint the tasks that succeeded during the load are
counted right when wrk stops: executed/s is that over the load's wall-clock time; the
backlog is what was accepted but not yet finished then, and the drain is how long it takes
to finish. The peer is the BackgroundTasks endpoint's req/s on the same server. The backlog
counts as bounded when it is at most 5% of the tasks accepted: the runner kept pace.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench import harness
from bench.report import Figure, Report, arguments, header, integers, median, rotated

PEER = "/bench/background"
DURABLE = "/bench/durable"
BOUNDED = 0.05  # the backlog at the end of the load, as a share of the tasks accepted
SETTLE = 0.2  # seconds for the requests wrk abandoned when it stopped to finish


@dataclass(frozen=True)
class Run:
    peer_rps: float
    accepted: int
    executed: int
    seconds: float
    backlog: int
    drain: float

    @property
    def executed_rate(self) -> float:
        return self.executed / self.seconds


def durable_load(url: str, data: Path, conns: int, seconds: int, report: Report) -> Run:
    stored, done = harness.stored(data), harness.succeeded(data)
    load = harness.wrk(url + DURABLE, conns, seconds)
    stored_end, done_end = harness.stored(data), harness.succeeded(data)
    end = time.monotonic()
    drained = harness.wait_finished(data, timeout=120)
    accepted = stored_end - stored
    if load.errors or load.ok != load.requests or not 0 <= accepted - load.ok <= conns:
        report.note(
            f"CHECK FAILED c={conns}: {load.requests} requests, {load.ok} 2xx, "
            f"{load.errors} socket errors, {accepted} rows stored"
        )
    # Requests wrk abandoned when it stopped may still be stored and run: let them.
    time.sleep(SETTLE)
    harness.wait_finished(data, timeout=120)
    states = harness.by_status(data)
    if set(states) != {"succeeded"}:
        report.note(f"CHECK FAILED c={conns}: not every task succeeded: {states}")
    return Run(0.0, accepted, done_end - done, load.seconds, stored_end - done_end, drained - end)


def one_run(run: int, connections: list[int], seconds: int, report: Report) -> dict[int, Run]:
    results: dict[int, Run] = {}
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        with harness.server(data, run_worker=True) as url:
            for endpoint in (PEER, DURABLE):
                harness.wrk(url + endpoint, connections[0], 1)
            # Requests wrk abandoned may still be stored: not in the first load's count.
            time.sleep(SETTLE)
            harness.wait_finished(data, timeout=120)
            for conns in connections:
                peer_rps = 0.0
                durable: Run | None = None
                for endpoint in rotated((PEER, DURABLE), run):
                    if endpoint == PEER:
                        peer_rps = harness.wrk(url + PEER, conns, seconds).rps
                    else:
                        durable = durable_load(url, data, conns, seconds, report)
                assert durable is not None
                results[conns] = Run(
                    peer_rps,
                    durable.accepted,
                    durable.executed,
                    durable.seconds,
                    durable.backlog,
                    durable.drain,
                )
    return results


def main() -> None:
    parser = arguments(__doc__, runs=3)
    parser.add_argument("--seconds", type=int, default=3, help="wrk duration per endpoint")
    parser.add_argument("--connections", type=integers, default=[16, 64])
    options = parser.parse_args()
    settings = {
        "runs": options.runs,
        "seconds": options.seconds,
        "connections": options.connections,
        "server": "uvicorn + runner (concurrency 8), CPU 0",
        "load": "wrk -t1, CPU 1",
    }
    header("end to end: durable tasks accepted and executed vs BackgroundTasks", settings)
    report = Report("end_to_end", settings)
    runs: dict[int, list[Run]] = defaultdict(list)
    for run in range(options.runs):
        for conns, result in one_run(run, options.connections, options.seconds, report).items():
            runs[conns].append(result)
    for conns in options.connections:
        results = runs[conns]
        peer = median(r.peer_rps for r in results)
        ratio = median(r.executed_rate / r.peer_rps for r in results)
        backlog = median(r.backlog / max(r.accepted, 1) for r in results)
        report.add(Figure(f"{PEER} c={conns}", peer, "req/s"))
        report.add(
            Figure(
                f"executed during load c={conns}",
                median(r.executed_rate for r in results),
                "tasks/s",
                peer="background",
                peer_value=peer,
                ratio=ratio,
                target="2",
                goal=">= 0.8x",
                met=ratio >= 0.8,
            )
        )
        report.add(
            Figure(
                f"accepted during load c={conns}",
                median(r.accepted / r.seconds for r in results),
                "tasks/s",
            )
        )
        report.add(
            Figure(
                f"backlog at end of load c={conns}",
                median(r.backlog for r in results),
                "tasks",
                peer="accepted",
                peer_value=median(r.accepted for r in results),
                ratio=backlog,
                target="2",
                goal=f"bounded (<= {BOUNDED:.2f}x)",
                met=backlog <= BOUNDED,
            )
        )
        report.add(Figure(f"backlog drained in c={conns}", median(r.drain for r in results), "s"))
    report.save(options.json)


if __name__ == "__main__":
    main()
