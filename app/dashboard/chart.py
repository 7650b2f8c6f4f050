"""The throughput chart's geometry: stacked bars a template draws as inline SVG."""

from __future__ import annotations

from dataclasses import dataclass

from store.stats import Minute

HEIGHT = 64
BAR = 14
GAP = 4


@dataclass(frozen=True, slots=True)
class Bar:
    """One minute's bar: succeeded from the bottom, failed stacked on it (SVG units)."""

    x: int
    ok_y: float
    ok_height: float
    failed_y: float
    failed_height: float
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    """The bars, the chart's size, and the busiest minute's count (the top of the scale)."""

    bars: list[Bar]
    width: int
    height: int
    peak: int
    total: int


def throughput_chart(minutes: list[Minute]) -> Chart:
    """Stacked bars of finished tasks per minute, scaled to the busiest minute."""
    peak = max((m.succeeded + m.failed for m in minutes), default=0)
    scale = HEIGHT / peak if peak else 0.0
    bars = []
    for n, minute in enumerate(minutes):
        ok = minute.succeeded * scale
        failed = minute.failed * scale
        label = f"{minute.start:%H:%M} UTC: {minute.succeeded} succeeded, {minute.failed} failed"
        bars.append(Bar(n * (BAR + GAP), HEIGHT - ok, ok, HEIGHT - ok - failed, failed, label))
    total = sum(m.succeeded + m.failed for m in minutes)
    return Chart(bars, len(minutes) * (BAR + GAP) - GAP, HEIGHT, peak, total)
