"""When traffic is expected (``--traffic-hours``): the hours an install's senders are awake.

``MeterhouseNoTraffic`` fires only while ``meterhouse_traffic_expected`` is 1, so an install whose usage
sleeps at night or over the weekend is not warned every night. The form is one or more windows separated
by ``;``, each ``DAYS HH:MM-HH:MM``, then an optional IANA time zone for all of them (UTC otherwise)::

    Mon-Fri 08:00-18:00 Europe/Berlin
    Mon-Fri 07:00-20:00; Sat 09:00-13:00 America/New_York
    * 00:00-24:00                      (the default, written empty: always)

Days are ``Mon`` ... ``Sun``, ranges (``Mon-Fri``, ``Fri-Mon`` wraps), lists (``Mon,Wed,Fri``) or ``*``;
a window ends before its end time (``18:00`` is outside ``08:00-18:00``); ``22:00-06:00`` runs past
midnight into the next day.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^(\S+)\s+(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


@dataclass(frozen=True)
class TrafficHours:
    """Windows of (weekdays, start minute, end minute) in ``zone``; none: traffic is always expected."""

    windows: tuple[tuple[frozenset[int], int, int], ...] = ()
    zone: str = "UTC"

    @classmethod
    def parse(cls, text: str) -> TrafficHours:
        """``text`` in the module's form; ValueError naming what is wrong."""
        text = text.strip()
        if not text:
            return cls()
        parts = [p.strip() for p in text.split(";")]
        zone = "UTC"
        last = parts[-1].rsplit(None, 1)
        if len(last) == 2 and not _WINDOW.match(parts[-1]) and _WINDOW.match(last[0]):
            parts[-1], zone = last
            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {zone!r} (an IANA name such as Europe/Berlin)") from None
        windows = []
        for part in parts:
            m = _WINDOW.match(part)
            if not m:
                raise ValueError(f"{part!r} is not DAYS HH:MM-HH:MM (e.g. Mon-Fri 08:00-18:00)")
            days = _days(m.group(1))
            start, end = int(m.group(2)) * 60 + int(m.group(3)), int(m.group(4)) * 60 + int(m.group(5))
            if int(m.group(3)) > 59 or int(m.group(5)) > 59 or start > 24 * 60 or end > 24 * 60:
                raise ValueError(f"{part!r}: a time is HH:MM from 00:00 to 24:00")
            if start == end:
                raise ValueError(f"{part!r}: the window is empty")
            windows.append((days, start, end))
        return cls(tuple(windows), zone)

    def expected(self, when: datetime) -> bool:
        """Whether ``when`` (aware) falls in a window."""
        if not self.windows:
            return True
        local = when.astimezone(ZoneInfo(self.zone))
        day, minute = local.weekday(), local.hour * 60 + local.minute
        for days, start, end in self.windows:
            if start < end and day in days and start <= minute < end:
                return True
            if start > end and (
                (day in days and minute >= start) or ((day - 1) % 7 in days and minute < end)
            ):
                return True
        return False


def _days(spec: str) -> frozenset[int]:
    if spec == "*":
        return frozenset(range(7))
    out: set[int] = set()
    for item in spec.lower().split(","):
        first, dash, last = item.partition("-")
        if first not in DAYS or (dash and last not in DAYS):
            raise ValueError(f"{spec!r}: days are Mon..Sun, ranges (Mon-Fri), lists (Mon,Wed) or *")
        a, b = DAYS.index(first), DAYS.index(last) if dash else DAYS.index(first)
        out.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(out)


def check(text: str) -> str | None:
    """The configuration check of ``--traffic-hours``."""
    try:
        TrafficHours.parse(text)
    except ValueError as e:
        return str(e)
    return None


#: No windows: traffic is expected at every hour (the default).
ALWAYS = TrafficHours()
