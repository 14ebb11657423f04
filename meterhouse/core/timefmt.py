"""RFC 3339 times ↔ integer nanoseconds since the epoch (exact, UTC)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_rfc3339(text: str) -> int:
    """Nanoseconds since the epoch; raises ValueError for anything but a zoned RFC 3339 time.

    A leap second (``:60``) is read as the first instant of the next minute."""
    text = text.strip().upper()
    if "T" not in text or len(text) > 64:
        raise ValueError("expected an RFC 3339 time such as 2026-01-31T00:00:00Z")
    leap = len(text) > 19 and text[17:19] == "60" and text[16] == ":"
    if leap:
        text = text[:17] + "59" + text[19:]
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        raise ValueError("the time needs a zone offset or Z")
    return ((dt - EPOCH) // timedelta(microseconds=1) + (10**6 if leap else 0)) * 1000


def format_rfc3339(value: datetime | int) -> str:
    """``2026-01-31T13:00:00Z``; naive datetimes are taken as UTC (ClickHouse returns them so)."""
    if isinstance(value, int):
        value = EPOCH + timedelta(microseconds=value // 1000)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    text = value.astimezone(UTC).isoformat()
    return text.replace("+00:00", "Z")


def format_rfc3339_ns(ns: int) -> str:
    """``2026-01-31T23:59:59.999999999Z``: every nanosecond kept (statement times are exact)."""
    seconds, frac = divmod(int(ns), 10**9)
    base = (EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}Z"
