"""Org health computed in ClickHouse and exported bounded: 10,000 orgs, silent and spiking orgs."""

import time

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from usage_rows import put as put_rows

from meterhouse.core.metrics import PipelineMetrics
from meterhouse.exporter import OrgHealth, create_app

H = 3600
NS = 10**9


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def health_app(store, clock, **kw):
    registry = CollectorRegistry()
    PipelineMetrics(registry)
    health = OrgHealth(store, registry, clock=clock, **kw)
    app = create_app(store, registry, lambda: True, health)
    return health, registry, app.test_client()


def gauge(registry, name, **labels):
    return registry.get_sample_value(name, labels)


def test_ten_thousand_orgs_give_a_bounded_scrape(store):
    now = time.time()
    t = int(now * NS)
    rows = [{"org_id": f"org-{i:05d}", "metric": m, "time": t - i * 1000, "value_int": i + 1,
             "attrs": {"feature": f"f{i % 7}", "region": f"r{i % 3}"}}
            for i in range(10_000) for m in ("api.calls", "rows.read", "egress.bytes")]  # fmt: skip
    put_rows(store, rows)
    health, registry, client = health_app(store, Clock(now), top_k=5)
    health.refresh()
    assert gauge(registry, "meterhouse_orgs_active", window="1h") == 10_000
    assert gauge(registry, "meterhouse_orgs_active", window="24h") == 10_000

    started = time.perf_counter()
    text = client.get("/metrics").get_data(as_text=True)
    scrape_s = time.perf_counter() - started
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert len(samples) < 300  # bounded, whatever the number of orgs
    labelled = [s for s in samples if "org_id" in s.labels]
    assert [s.name for s in labelled] == ["meterhouse_top_org_points"] * 5  # only the capped top-K
    assert scrape_s < 1.0  # generous; the real figure is measured in the benchmarks


def test_silent_and_spiking_orgs_change_the_gauges_and_lists_after_a_refresh(store):
    now = (time.time() // H) * H + 1800  # half past an hour: the last complete hour is [now-5400, now-1800)
    last_hour = int(now) // H * H - H
    rows = []
    for h in range(1, 26):  # a steady baseline of 100/hour for "steady" and "spiky"
        for org in ("steady", "spiky"):
            rows.append({"org_id": org, "time": (last_hour - h * H + 60) * NS, "value_int": 100})
    rows.append({"org_id": "steady", "time": (last_hour + 60) * NS, "value_int": 100})
    rows.append({"org_id": "spiky", "time": (last_hour + 60) * NS, "value_int": 110})
    for org in ("steady", "spiky"):  # both still report now (the current hour is not judged)
        rows.append({"org_id": org, "time": int((now - 60) * NS), "value_int": 1})
    rows.append({"org_id": "goes-quiet", "time": int((now - 600) * NS), "value_int": 5})  # 10 min ago
    put_rows(store, rows)
    clock = Clock(now)
    health, registry, client = health_app(
        store, clock, silent_after_s=1800, spike_factor=5, spike_min_usage=50
    )

    health.refresh()
    assert gauge(registry, "meterhouse_orgs_silent") == 0
    assert gauge(registry, "meterhouse_orgs_spiking") == 0
    assert client.get("/api/v1/orgs?status=silent").get_json()["orgs"] == []

    # "spiky" uses 10× its baseline in the last complete hour; "goes-quiet" stops reporting.
    put_rows(store, [{"org_id": "spiky", "time": (last_hour + 120) * NS, "value_int": 1000}])
    clock.t = now + 1500  # 35 minutes after its last point (still the same last complete hour)
    health.refresh()
    assert gauge(registry, "meterhouse_orgs_silent") == 1
    assert gauge(registry, "meterhouse_orgs_spiking") == 1
    silent = client.get("/api/v1/orgs?status=silent").get_json()
    assert [o["org_id"] for o in silent["orgs"]] == ["goes-quiet"]
    spiking = client.get("/api/v1/orgs?status=spiking").get_json()["orgs"]
    assert [(o["org_id"], o["metric"]) for o in spiking] == [("spiky", "api.calls")]
    assert spiking[0]["last_hour_usage"] == 1110 and spiking[0]["baseline"] == 100
    assert gauge(registry, "meterhouse_org_health_refresh_ok") == 1


def test_a_failed_refresh_keeps_the_last_numbers_and_the_scrape_never_queries(store):
    put_rows(store, [{"org_id": "a", "time": time.time_ns(), "value_int": 1}])
    health, registry, client = health_app(store, Clock(time.time()))
    health.refresh()
    assert gauge(registry, "meterhouse_orgs_active", window="1h") == 1

    class Down:
        database = store.database

        def rows(self, *a, **k):
            raise ConnectionError("down")

        scalar = rows

    health.store = Down()
    health.refresh()
    assert gauge(registry, "meterhouse_orgs_active", window="1h") == 1  # kept
    assert gauge(registry, "meterhouse_org_health_refresh_ok") == 0
    assert client.get("/metrics").status_code == 200  # scraping does not touch ClickHouse


def test_silent_counts_are_counts_not_the_length_of_the_capped_list(store):
    """At 20,000 orgs an outage can silence more orgs than the API's list holds (LIST_LIMIT): the gauges
    the silent-org alerts divide by the active orgs must still count every one of them."""
    from meterhouse.exporter.health import LIST_LIMIT

    now = time.time()
    n = LIST_LIMIT + 25
    rows = [
        {"org_id": f"quiet-{i:05d}", "time": int((now - 2 * H - i) * NS), "value_int": 1} for i in range(n)
    ]
    rows += [
        {"org_id": f"gone-{i:05d}", "time": int((now - 48 * H - i) * NS), "value_int": 1} for i in range(n)
    ]
    put_rows(store, rows)
    health, registry, client = health_app(store, Clock(now), silent_after_s=1800)
    health.refresh()
    assert gauge(registry, "meterhouse_orgs_silent") == n
    assert gauge(registry, "meterhouse_orgs_silent_over_24h") == n
    assert gauge(registry, "meterhouse_orgs_active", window="24h") == n
    listed = client.get("/api/v1/orgs?status=silent").get_json()
    assert len(listed["orgs"]) <= LIST_LIMIT  # the list stays bounded
