"""What every benchmark prints: the versions, the machine, figures as ratios against a peer
measured in the same run, and the performance targets they answer (met or not met)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

PACKAGES = (
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "sqlmodel",
    "pydantic",
    "huey",
    "psycopg",
    "pgqueuer",
    "procrastinate",
)


@dataclass
class Figure:
    """One printed figure, its peer from the same runs, and the target it answers."""

    label: str
    value: float
    unit: str
    peer: str = ""
    peer_value: float | None = None
    ratio: float | None = None
    target: str = ""  # "1", "3", "7"...: the number of the target (bench/README.md)
    goal: str = ""  # what the target asks of `ratio` (or of `value`), in words
    met: bool | None = None


@dataclass
class Report:
    """The figures and notes of one benchmark; printed as they come, saved as JSON."""

    bench: str
    settings: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        print(format_figure(figure), flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def save(self, path: Path | None) -> None:
        if path is not None:
            path.write_text(json.dumps(asdict(self), indent=2))


def format_figure(figure: Figure) -> str:
    line = f"  {figure.label:<46} {number(figure.value):>9} {figure.unit:<8}"
    if figure.peer_value is not None:
        line += f" vs {figure.peer} {number(figure.peer_value)}"
    if figure.ratio is not None:
        line += f"  = {figure.ratio:.2f}x"
    if figure.target:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[figure.met]
        line += f"  [target {figure.target}: {figure.goal}: {verdict}]"
    return line


def number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else float("nan")


def rotated(items: Sequence[T], run: int) -> list[T]:
    """`items` starting at position `run`: A B C, B C A, ... so no one always goes first."""
    shift = run % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def versions() -> dict[str, str]:
    """Python, SQLite, the packages that matter, and Backstop's commit."""
    found = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["backstop"] = commit()
    return found


def commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "app", "store")
    return f"{head}+uncommitted" if dirty else head


def machine() -> dict[str, str]:
    """Cores, CPU model, memory and load: other work on the machine skews every figure."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = "unknown"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
            break
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": memory,
        "kernel": platform.release(),
        "load": load,
    }


def header(title: str, settings: dict[str, Any]) -> None:
    print(f"== {title}", flush=True)
    print("  versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print("  machine:  " + ", ".join(f"{k} {v}" for k, v in machine().items()))
    print("  settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)


def arguments(doc: str | None, *, runs: int) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes: --runs and --json."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=runs, help="alternating runs (median)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser


def integers(text: str) -> list[int]:
    """`16,64` -> [16, 64] (an argparse type)."""
    return [int(part) for part in text.split(",") if part.strip()]


def percentile(values: Sequence[float], percent: float) -> float:
    """The `percent`th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, round(percent / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
