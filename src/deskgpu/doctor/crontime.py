"""When a schedule fires: cron time fields and systemd timer lines, down to the longest gap.

Doctor needs more than "a line exists": observation must run within `reap.max_sample_gap` of
the last one, the reap at least weekly. `cron_gap_s("*/5 * * * *")` is 300; `"0 0 31 2 *"`
never fires, `@reboot` fires once per boot. Pure functions; crontab(5) semantics (a day fires
when day-of-month OR day-of-week matches, if both are restricted).
"""

from __future__ import annotations

import datetime as dt
import itertools
import re

DAY_S = 86400
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELDS = (  # name, low, high, names
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)
SPECIALS = {
    "@yearly": 366 * DAY_S,
    "@annually": 366 * DAY_S,
    "@monthly": 31 * DAY_S,
    "@weekly": 7 * DAY_S,
    "@daily": DAY_S,
    "@midnight": DAY_S,
    "@hourly": 3600,
}
_WINDOW = (dt.date(2025, 1, 1), 4 * 366)  # four years: every weekday/leap-day combination


class CronTimeError(ValueError):
    """Time fields cron refuses (it then ignores the line, or on Debian the whole file)."""


def _value(text: str, low: int, names: tuple[str, ...], what: str) -> int:
    if text.isdigit():
        return int(text)
    key = text.lower()[:3]
    if names and key in names and len(text) == 3:
        return names.index(key) + (1 if low == 1 else 0)
    raise CronTimeError(f"{what} {text!r} is not a number" + (" or a name" if names else ""))


def parse_field(text: str, index: int) -> set[int]:
    """The values one of the five fields matches."""
    what, low, high, names = _FIELDS[index]
    out: set[int] = set()
    for part in text.split(","):
        rng, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronTimeError(f"{what} step {step_text!r} is not a positive number")
            step = int(step_text)
        if rng == "*":
            first, last = low, high
        elif "-" in rng:
            a, _, b = rng.partition("-")
            first, last = _value(a, low, names, what), _value(b, low, names, what)
        else:
            first = _value(rng, low, names, what)
            last = high if step_text else first
        if not (low <= first <= high and low <= last <= high) or first > last:
            raise CronTimeError(f"{what} {rng!r} is outside {low}-{high}")
        out.update(range(first, last + 1, step))
    if index == 4 and 7 in out:  # Sunday is 0 and 7
        out = (out - {7}) | {0}
    return out


def cron_gap_s(spec: str) -> float | None:
    """The longest wait between two runs of a cron time spec; None: it never fires again.

    Raises `CronTimeError` for time fields cron would refuse; `@reboot` is None (once a boot).
    """
    spec = spec.strip()
    if spec.startswith("@"):
        if spec == "@reboot":
            return None
        if spec not in SPECIALS:
            raise CronTimeError(f"{spec!r} is not one of cron's @-names")
        return float(SPECIALS[spec])
    fields = spec.split()
    if len(fields) != 5:
        raise CronTimeError(f"{len(fields)} time fields where cron wants 5")
    minutes, hours, doms, months, dows = (parse_field(f, i) for i, f in enumerate(fields))
    dom_any, dow_any = fields[2].startswith("*"), fields[4].startswith("*")
    start, days = _WINDOW
    fire_days = []
    for n in range(days):
        day = start + dt.timedelta(days=n)
        if day.month not in months:
            continue
        dom_ok, dow_ok = day.day in doms, (day.isoweekday() % 7) in dows
        ok = (dom_ok or dow_ok) if not (dom_any or dow_any) else (dom_ok and dow_ok)
        if ok:
            fire_days.append(n)
    times = sorted(h * 60 + m for h in hours for m in minutes)
    if not fire_days or not times:
        return None
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for a, b in itertools.pairwise(fire_days):
        gaps.append((b - a) * 1440 - times[-1] + times[0])
    if len(fire_days) == 1:  # fires once in four years: as good as never
        return None
    return 60.0 * max(gaps)


_SPAN_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": DAY_S, "day": DAY_S, "days": DAY_S,
    "w": 7 * DAY_S, "week": 7 * DAY_S, "weeks": 7 * DAY_S,
    "month": 30.44 * DAY_S, "months": 30.44 * DAY_S, "M": 30.44 * DAY_S,
    "y": 365.25 * DAY_S, "year": 365.25 * DAY_S, "years": 365.25 * DAY_S,
}  # fmt: skip
_CALENDAR_SHORTHANDS = {
    "minutely": 60, "hourly": 3600, "daily": DAY_S, "weekly": 7 * DAY_S,
    "monthly": 31 * DAY_S, "quarterly": 92 * DAY_S, "semiannually": 184 * DAY_S,
    "yearly": 366 * DAY_S, "annually": 366 * DAY_S,
}  # fmt: skip
_REPEATING = ("OnUnitActiveSec", "OnUnitInactiveSec", "OnCalendar")
_ONCE = ("OnActiveSec", "OnBootSec", "OnStartupSec")


def timespan_s(text: str) -> float | None:
    """systemd.time(7) time span (`5min`, `1h 30min`, `300`); None if it does not parse."""
    total = 0.0
    found = False
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", text):
        scale = _SPAN_UNITS.get(unit or "s")
        if scale is None:
            return None
        total += float(number) * scale
        found = True
    return total if found else None


def timer_gap_s(lines: dict[str, list[str]]) -> tuple[float | None, str | None]:
    """(longest wait, problem) for a timer's `[Timer]` settings, by key.

    A problem: no trigger at all (systemd refuses to start the timer) or one that fires once.
    The wait is None when it cannot be told (an `OnCalendar=` expression), which is no verdict.
    """
    repeating = {k: v for k, v in lines.items() if k in _REPEATING and any(x.strip() for x in v)}
    once = [k for k in _ONCE if any(x.strip() for x in lines.get(k, []))]
    if not repeating:
        if once:
            return None, f"it fires once ({once[0]}=), not again"
        return None, "it has no On…= trigger, so systemd refuses to start it"
    gaps: list[float] = []
    for key, values in repeating.items():
        for value in (v.strip() for v in values if v.strip()):
            if key == "OnCalendar":
                shorthand = _CALENDAR_SHORTHANDS.get(value.lower())
                if shorthand is None:
                    return None, None  # a calendar expression: not judged here
                gaps.append(shorthand)
            else:
                span = timespan_s(value)
                if span is None:
                    return None, f"{key}={value} is not a systemd time span"
                gaps.append(span)
    return (min(gaps) if gaps else None), None
