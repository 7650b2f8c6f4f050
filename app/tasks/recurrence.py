"""When a periodic task runs: a crontab expression or a fixed interval, and its ticks.

APScheduler's trigger classes compute the times. Every process must agree on the ticks, so
both kinds are pinned in UTC, and intervals count from a fixed epoch rather than from the
moment a process started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

# Interval ticks fall on EPOCH + n * every, whichever process computes them.
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
# The Gregorian calendar repeats every 400 years: a crontab that fires at all fires within
# any window this long, so the search for the latest tick before a moment may stop there.
MAX_LOOKBACK = timedelta(days=400 * 366)
# APScheduler's crontab has no `#` or `L` in the day-of-week field; these are cron's names.
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def tick_key(name: str, tick: datetime) -> str:
    """The idempotency key of a periodic task's run for one tick: one task per key, ever."""
    return f"schedule:{name}:{tick.astimezone(UTC).isoformat()}"


# The longest periodic task name whose keys fit the 200 characters of an idempotency key.
MAX_PERIODIC_NAME = 200 - len(tick_key("", EPOCH + MICROSECOND))


def _day(token: str, expr: str) -> int:
    lowered = token.strip().lower()
    if lowered in _DAY_NAMES:
        return _DAY_NAMES.index(lowered)
    if lowered.isdigit() and int(lowered) <= 7:
        return int(lowered)
    raise ValueError(f"bad day of week {token!r} in {expr!r}: use 0-7 or sun-sat")


def crontab_weekdays(field: str, expr: str = "") -> str:
    """A crontab day-of-week field (0 and 7 are Sunday) as APScheduler 3 reads it.

    APScheduler 3 numbers weekdays from Monday = 0, so `1-5` would mean Tuesday to Saturday
    there; spelled as a list of names the two agree, so the field is rewritten that way.
    """
    expr = expr or field
    if field == "*":
        return field
    days: set[int] = set()
    for item in field.split(","):
        body, slash, step_text = item.partition("/")
        if slash and not (step_text.isdigit() and int(step_text) > 0):
            raise ValueError(f"bad step {step_text!r} in day of week of {expr!r}")
        step = int(step_text) if slash else 1
        if body == "*":
            first, last = 0, 6
        else:
            start, dash, end = body.partition("-")
            first = _day(start, expr)
            last = _day(end, expr) if dash else (6 if slash else first)
        if first > last:
            raise ValueError(f"day-of-week range {body!r} in {expr!r} runs backwards")
        days.update(day % 7 for day in range(first, last + 1, step))
    if len(days) == 7:
        return "*"
    return ",".join(_DAY_NAMES[day] for day in sorted(days))


def _interval(every: float | timedelta) -> timedelta:
    if isinstance(every, bool) or not isinstance(every, int | float | timedelta):
        raise ValueError(f"every must be seconds or a timedelta, not {type(every).__name__}")
    if isinstance(every, timedelta):
        period = every
    else:
        if not math.isfinite(every):
            raise ValueError("every must be a finite number of seconds")
        period = timedelta(seconds=every)
    if period < MICROSECOND:
        raise ValueError(f"every must be positive, got {every!r}")
    return period


@dataclass(frozen=True)
class Recurrence:
    """The ticks of a periodic task, computed by an APScheduler trigger in UTC."""

    cron: str | None
    every: timedelta | None
    trigger: BaseTrigger = field(repr=False, compare=False)
    # A first guess at the distance between ticks, where the search for a past tick starts.
    hint: timedelta = field(repr=False, compare=False)

    @classmethod
    def of(cls, cron: str | None, every: float | timedelta | None) -> Recurrence | None:
        """The recurrence `cron=` or `every=` asks for; None for neither, ValueError for both."""
        if cron is not None and every is not None:
            raise ValueError("give either cron or every, not both")
        if cron is not None:
            return cls.from_cron(cron)
        if every is not None:
            return cls.from_every(every)
        return None

    @classmethod
    def from_cron(cls, expr: str) -> Recurrence:
        """Five crontab fields, evaluated in UTC; ValueError if malformed or never due."""
        fields = expr.split()
        if len(fields) != 5:
            raise ValueError(f"cron expression {expr!r} needs 5 fields, has {len(fields)}")
        fields[4] = crontab_weekdays(fields[4], expr)
        try:
            trigger = CronTrigger.from_crontab(" ".join(fields), timezone=UTC)
        except ValueError as exc:
            raise ValueError(f"bad cron expression {expr!r}: {exc}") from None
        if trigger.get_next_fire_time(None, EPOCH) is None:
            raise ValueError(f"cron expression {expr!r} never fires")
        return cls(cron=expr, every=None, trigger=trigger, hint=timedelta(minutes=1))

    @classmethod
    def from_every(cls, every: float | timedelta) -> Recurrence:
        """Every `every` (seconds or a timedelta), on ticks counted from `EPOCH`."""
        period = _interval(every)
        trigger = IntervalTrigger(seconds=period.total_seconds(), start_date=EPOCH, timezone=UTC)
        return cls(cron=None, every=period, trigger=trigger, hint=period)

    def first_from(self, moment: datetime) -> datetime | None:
        """The first tick at or after `moment`."""
        tick: datetime | None = self.trigger.get_next_fire_time(None, moment)
        return None if tick is None else tick.astimezone(UTC)

    def next_after(self, moment: datetime) -> datetime | None:
        """The first tick strictly after `moment`."""
        return self.first_from(moment + MICROSECOND)

    def latest(self, now: datetime, *, after: datetime | None = None) -> datetime | None:
        """The latest tick in `(after, now]`, or None when there is none.

        The work is bounded however many ticks the span holds (a one-second interval after a
        month's outage): the search bisects the span instead of stepping through it.
        """
        low = self.next_after(after) if after is not None else self._some_tick_before(now)
        if low is None or low > now:
            return None
        # `low` is a tick <= now, and no tick lies in (high, now].
        high = now
        while True:
            following = self.next_after(low)
            if following is None or following > now:
                return low
            low = following
            middle = low + (high - low) / 2
            probe = self.first_from(middle)
            if probe is not None and probe <= now:
                low = probe
            else:
                high = middle

    def _some_tick_before(self, now: datetime) -> datetime | None:
        """Some tick at or before `now` (not necessarily the latest), looking ever further back."""
        span = self.hint
        while span <= MAX_LOOKBACK:
            tick = self.first_from(now - span)
            if tick is not None and tick <= now:
                return tick
            span *= 2
        return None
