"""Keep-warm windows: `Mon-Fri 08:00-18:00 Europe/Berlin; Sat 10:00-14:00`, read on each zone's wall clock (summer
time included): whether one is open now, and when one last closed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Final

from orchestrator.errors import ConfigError

DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WINDOW_PATTERN: Final = re.compile(
    r"(?P<days>\S+)\s+(?P<start>[0-9]{2}:[0-9]{2})-(?P<end>[0-9]{2}:[0-9]{2})(?:\s+(?P<zone>\S+))?", re.ASCII
)


@dataclass(frozen=True)
class Window:
    """A keep-warm window: days of the week, a start and an end in minutes of the local day, a time zone.
    An end at or before the start crosses midnight: the window starts on the listed day, ends the next."""

    text: str
    days: frozenset[int]  # 0 is Monday, as datetime.weekday()
    start: int
    end: int  # up to 24 * 60
    zone: tzinfo

    def holds(self, moment: datetime) -> bool:
        """Whether the window is open at `moment`, read on the zone's wall clock (summer time included)."""
        local = moment.astimezone(self.zone)
        minute, day = local.hour * 60 + local.minute, local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        return (day in self.days and minute >= self.start) or ((day - 1) % 7 in self.days and minute < self.end)

    def last_end(self, after: datetime, before: datetime) -> datetime | None:
        """The latest time in (after, before] at which the window closed, if it closed in that span (within a week and
        a day of `before`), on the zone's wall clock: the end of the last opening that covered part of the span."""
        today = before.astimezone(self.zone).date()
        ends = []
        for back in range(9):
            day = today - timedelta(days=back)
            if day.weekday() in self.days:  # an opening that starts that day, and ends then or the next day
                closing = datetime.combine(day, datetime.min.time(), self.zone) + timedelta(minutes=self.end)
                ends.append(closing + timedelta(days=1) if self.end <= self.start else closing)
        return max((end for end in ends if after < end <= before), default=None)


def parse_keep_warm(name: str, raw: str) -> tuple[Window, ...]:
    """Windows separated by ';', each `Mon-Fri 08:00-18:00 Europe/Berlin` (the zone defaults to UTC)."""
    return tuple(_parse_window(name, part.strip()) for part in raw.split(";"))


def _parse_window(name: str, text: str) -> Window:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # tzdata ships in the zip: no system database needed

    example = "e.g. 'Mon-Fri 08:00-18:00 Europe/Berlin; Sat 10:00-14:00'"
    match = WINDOW_PATTERN.fullmatch(text)
    if match is None:
        raise ConfigError(
            f"{name}: {text!r} is not a window: write days, HH:MM-HH:MM and an optional IANA time zone, {example}."
        )
    days, opens, closes = _days(name, match["days"]), _minute(name, match["start"]), _minute(name, match["end"])
    if opens in (24 * 60, closes):
        raise ConfigError(
            f"{name}: {text!r} starts at 24:00 or ends when it starts; for a whole day write 00:00-24:00."
        )
    try:
        zone = ZoneInfo(match["zone"] or "UTC")
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory of the database (Europe), a long name
        raise ConfigError(f"{name}: {match['zone']!r} is not an IANA time zone, e.g. Europe/Berlin or UTC.") from None
    return Window(text, days, opens, closes, zone)


def _days(name: str, text: str) -> frozenset[int]:
    days: set[int] = set()
    for item in text.lower().split(","):
        first, dash, last = item.partition("-")
        if first not in DAYS or (dash and last not in DAYS):
            raise ConfigError(
                f"{name}: {text!r} is not a list of days: use Mon..Sun, ranges and commas, e.g. Mon-Fri,Sun."
            )
        first_day, last_day = DAYS.index(first), DAYS.index(last or first)
        days.update(
            day % 7 for day in range(first_day, last_day + (7 if last_day < first_day else 0) + 1)
        )  # Fri-Mon wraps
    return frozenset(days)


def _minute(name: str, text: str) -> int:
    hours, minutes = int(text[:2]), int(text[3:])
    if not (hours < 24 and minutes < 60) and text != "24:00":
        raise ConfigError(f"{name}: {text!r} is not a time of day: use HH:MM from 00:00 to 23:59, and 24:00 as an end.")
    return hours * 60 + minutes
