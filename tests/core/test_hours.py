"""``--traffic-hours``: when MeterhouseNoTraffic may warn (meterhouse_traffic_expected)."""

from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from meterhouse.core.config import Config, ConfigError
from meterhouse.core.hours import TrafficHours
from meterhouse.exporter.health import OrgHealth


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("spec", "when", "expected"),
    [
        ("", "2026-12-06T03:00", True),  # unset: always
        ("Mon-Fri 08:00-18:00", "2026-12-07T08:00", True),  # a Monday, at the start
        ("Mon-Fri 08:00-18:00", "2026-12-07T17:59", True),
        ("Mon-Fri 08:00-18:00", "2026-12-07T18:00", False),  # the end is outside
        ("Mon-Fri 08:00-18:00", "2026-12-06T12:00", False),  # a Sunday
        ("Mon-Fri 08:00-18:00 Europe/Berlin", "2026-12-07T07:30", True),  # 08:30 in Berlin (UTC+1)
        ("Mon-Fri 08:00-18:00 Europe/Berlin", "2026-12-07T17:30", False),  # 18:30 there
        ("Mon-Fri 08:00-18:00 Europe/Berlin", "2026-07-06T06:30", True),  # 08:30, summer time (UTC+2)
        ("Fri 22:00-06:00", "2026-12-12T05:59", True),  # Saturday early: Friday's window runs on
        ("Fri 22:00-06:00", "2026-12-12T06:00", False),
        ("Fri 22:00-06:00", "2026-12-11T21:59", False),
        ("Mon,Wed 09:00-10:00; Sat 12:00-13:00", "2026-12-12T12:30", True),
        ("Mon,Wed 09:00-10:00; Sat 12:00-13:00", "2026-12-08T09:30", False),  # a Tuesday
        ("Fri-Mon 00:00-24:00", "2026-12-07T23:59", True),  # wraps over the weekend: Monday
        ("Fri-Mon 00:00-24:00", "2026-12-08T00:00", False),
        ("* 00:00-24:00", "2026-12-09T13:00", True),
    ],
)
def test_windows(spec, when, expected):
    assert TrafficHours.parse(spec).expected(at(when)) is expected


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("Mon-Fri 8-18", "DAYS HH:MM-HH:MM"),
        ("Monday 08:00-18:00", "days are Mon..Sun"),
        ("Mon 08:00-25:00", "00:00 to 24:00"),
        ("Mon 08:61-09:00", "00:00 to 24:00"),
        ("Mon 08:00-08:00", "empty"),
        ("Mon-Fri 08:00-18:00 Mars/Olympus", "unknown time zone"),
    ],
)
def test_a_bad_value_is_a_configuration_error_that_says_why(spec, said):
    with pytest.raises(ConfigError, match="traffic_hours") as e:
        Config(traffic_hours=spec)
    assert said in str(e.value)


def test_the_gauge_follows_the_clock(store):
    berlin_office = TrafficHours.parse("Mon-Fri 08:00-18:00 Europe/Berlin")
    for when, value in (("2026-12-07T09:00", 1.0), ("2026-12-07T20:00", 0.0)):
        registry = CollectorRegistry()
        OrgHealth(store, registry, traffic_hours=berlin_office, clock=lambda w=when: at(w).timestamp())
        assert registry.get_sample_value("meterhouse_traffic_expected") == value
