"""Every benchmark, one after the other, then bench/RESULTS.md: what `make bench` runs.

    .venv/bin/python -m bench.run_all [--only drain,latency] [--quick] [--output PATH]

Each script runs in its own process with its default options (about 10 minutes in all on
a 2-core machine); `--quick` shortens them all to check that they work (about 2 minutes;
its figures are not worth keeping). A script that fails is reported as such and the others
still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.report import Figure, format_figure, machine, number, versions

SCRIPTS = ("enqueue", "end_to_end", "drain", "latency", "pg_latency", "pg_drain", "scale", "memory")
QUICK = {
    "enqueue": ["--runs", "1", "--seconds", "1"],
    "end_to_end": ["--runs", "1", "--seconds", "1"],
    "drain": ["--runs", "1", "--tasks", "2000"],
    "latency": ["--samples", "15"],
    "pg_latency": ["--samples", "15"],
    "pg_drain": ["--runs", "1", "--tasks", "2000"],
    "scale": ["--runs", "2", "--history", "10000,100000", "--tasks", "1000"],
    "memory": ["--tasks", "10000", "--warmup", "2000"],
}
TARGETS = {
    "1": "Enqueue: /bench/durable, /bench/durable-async and POST /tasks >= 1.0x the req/s of "
    "the same endpoint with BackgroundTasks at 16 and 64 connections, p99 no worse "
    "(synchronous=NORMAL)",
    "2": "End to end, runner in the server: executed tasks/s >= 0.8x the BackgroundTasks "
    "endpoint's req/s, backlog bounded",
    "3": "Drain: one runner process >= 3x Huey's 4-thread SQLite consumer (sync and async); "
    "two runner processes >= 1.6x one",
    "4": "Idle pickup p50 <= 5 ms enqueued in the runner's process, <= 20 ms from another",
    "5": "Claim throughput with 1,000,000 finished tasks >= 0.9x that with 10,000",
    "6": "Runner RSS grows <= 5% over 500,000 tasks",
    "7": "Targets 1 and 3 again with synchronous=FULL",
    "8": "Idle pickup on PostgreSQL from another process p50 <= 5 ms (PgQueuer beside it)",
    "9": "Drain on PostgreSQL: one runner process >= 3x Procrastinate's worker (sync and async)",
    "10": "Drain on PostgreSQL: one runner process >= 1.0x PgQueuer at its best batch size",
    "11": "Drain on PostgreSQL: two runner processes >= 1.6x one",
}


def run(script: str, extra: list[str], folder: Path) -> dict[str, Any] | str:
    """The script's report, or why there is none."""
    out = folder / f"{script}.json"
    command = [sys.executable, "-m", f"bench.{script}", "--json", str(out), *extra]
    started = time.monotonic()
    done = subprocess.run(command, check=False)
    print(f"  ({script}: {time.monotonic() - started:.0f}s)\n", flush=True)
    if done.returncode != 0 or not out.exists():
        return f"failed (exit {done.returncode}); see its output"
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def verdict(figures: list[Figure]) -> str:
    judged = [figure for figure in figures if figure.met is not None]
    if not judged:
        return "not measured"
    met = sum(1 for figure in judged if figure.met)
    if met == len(judged):
        return "met"
    return "not met" if met == 0 else f"not met ({met} of {len(judged)} figures met)"


def brief(figure: Figure) -> str:
    text = f"{figure.label}: {number(figure.value)} {figure.unit}"
    if figure.ratio is not None:
        text += f" = {figure.ratio:.2f}x {figure.peer}"
    return text + ("" if figure.met else " (not met)")


def table(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]


def markdown(
    results: dict[str, dict[str, Any] | str], started: datetime, quick: bool, load: str
) -> str:
    info = machine()
    info["load"] = load
    found = versions()
    figures = {
        name: [Figure(**item) for item in result["figures"]]
        for name, result in results.items()
        if not isinstance(result, str)
    }
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (`python -m bench.run_all`) on {started:%Y-%m-%d %H:%M} UTC."
        " Every ratio is against a peer measured in the same runs, alternating; figures are"
        " medians. See [README.md](README.md) for what each script does.",
    ]
    if quick:
        lines += ["", "**A `--quick` run: short and single; these figures are not worth keeping.**"]
    lines += ["", "## Machine", "", *table([list(info), list(info.values())])]
    lines += ["", "## Versions", "", *table([list(found), list(found.values())])]
    rows = [["#", "target", "verdict", "figures"]]
    for number_, text in TARGETS.items():
        mine = [f for fs in figures.values() for f in fs if f.target == number_]
        shown = "<br>".join(brief(f) for f in mine)
        rows.append([number_, text, verdict(mine), shown])
    lines += ["", "## Targets", "", *table(rows)]
    for name, result in results.items():
        lines += ["", f"## {name}", ""]
        if isinstance(result, str):
            lines.append(result)
            continue
        settings = ", ".join(f"{k}: {v}" for k, v in result["settings"].items())
        lines += [f"Settings: {settings}.", ""]
        rows = [["figure", "value", "peer", "ratio", "target"]]
        for f in figures[name]:
            peer = f"{f.peer} {number(f.peer_value)}" if f.peer_value is not None else ""
            ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
            target = ""
            if f.target:
                target = f"{f.target}: {f.goal}: {'met' if f.met else 'NOT met'}"
            rows.append([f.label, f"{number(f.value)} {f.unit}", peer, ratio, target])
        lines += table(rows)
        lines += [f"\n- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="comma-separated scripts (default: all)")
    parser.add_argument("--quick", action="store_true", help="short runs, to check they work")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    options = parser.parse_args()
    chosen = options.only.split(",") if options.only else list(SCRIPTS)
    started = datetime.now(UTC)
    load = machine()["load"]  # before the benchmarks add their own
    results: dict[str, dict[str, Any] | str] = {}
    with tempfile.TemporaryDirectory() as folder:
        for script in chosen:
            extra = QUICK[script] if options.quick else []
            results[script] = run(script, extra, Path(folder))
    options.output.write_text(markdown(results, started, options.quick, load))
    print(f"== wrote {options.output}")
    for name, result in results.items():
        if isinstance(result, str):
            print(f"  {name}: {result}")
            continue
        for item in result["figures"]:
            figure = Figure(**item)
            if figure.target:
                print(format_figure(figure))


if __name__ == "__main__":
    main()
