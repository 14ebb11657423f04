"""The Flask app over a real embedded ClickHouse: usage API, health, and the bounded /metrics."""

import time
from datetime import UTC, datetime

import pytest
from otlp_builders import point, sum_request
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from meterhouse.collector.decode import Limits, decode_request
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.exporter import create_app

H = 3600 * 10**9
T0 = int(datetime(2026, 11, 2, 10, tzinfo=UTC).timestamp()) * 10**9  # an hour boundary


def write(store, req):
    """The request's points as the embedded engine's writer inserts them (the catalog's rows too)."""
    from meterhouse.collector.writer import insert_calls

    b = decode_request(req, Limits(), now_ns=time.time_ns(), digest="x").batch
    for _kind, insert in insert_calls(store, f"tok-{time.time_ns()}", batches=[b]):
        insert(False)


@pytest.fixture
def app(store):
    registry = CollectorRegistry()
    PipelineMetrics(registry)
    a = create_app(store, registry, lambda: True)
    a.testing = True
    return a


@pytest.fixture
def client(app, store):
    pts = [
        point(10, {"org.id": "acme", "feature": "search"}, t_ns=T0 + 60 * 10**9),
        point(20, {"org.id": "acme", "feature": "export"}, t_ns=T0 + 30 * 60 * 10**9),
        point(2**62, {"org.id": "acme"}, t_ns=T0 + H + 1),
        point(2**62, {"org.id": "acme"}, t_ns=T0 + H + 2),
        point(7, {"org.id": "acme"}, t_ns=T0 + 25 * H),
        point(5, {"org.id": "other"}, t_ns=T0 + 60 * 10**9),
    ]
    write(store, sum_request({"api.calls": pts}, unit="{call}"))
    write(store, sum_request({"credits": [point(0.25, {"org.id": "acme"}, t_ns=T0 + 5)] * 3}))
    return app.test_client()


def usage(client, org="acme", **params):
    q = {"metric": "api.calls", "from": "2026-11-02T10:00:00Z", "to": "2026-11-03T12:00:00Z", **params}
    return client.get(f"/api/v1/orgs/{org}/usage", query_string=q)


def test_hourly_series_and_exact_total_from_the_rollup(client):
    r = usage(client, step="1h")
    assert r.status_code == 200
    body = r.get_json()
    assert body["source"] == "rollup" and body["unit"] == "{call}" and body["org_id"] == "acme"
    assert body["total"] == 30 + 2 * 2**62 + 7  # beyond Int64 and beyond 2^53, exact
    assert body["points"] == [
        {"start": "2026-11-02T10:00:00Z", "value": 30},
        {"start": "2026-11-02T11:00:00Z", "value": 2 * 2**62},
        {"start": "2026-11-03T11:00:00Z", "value": 7},
    ]


def test_raw_and_rollup_agree(client):
    rollup = usage(client, step="1d").get_json()
    raw = usage(client, step="1m").get_json()
    assert (rollup["source"], raw["source"]) == ("rollup", "raw")
    assert rollup["total"] == raw["total"]
    assert [p["start"] for p in rollup["points"]] == ["2026-11-02T00:00:00Z", "2026-11-03T00:00:00Z"]
    assert len(raw["points"]) == 4  # the two points at 11:00:00 share a minute


def test_range_is_half_open_and_unaligned_ranges_read_raw_points(client):
    body = usage(client, **{"from": "2026-11-02T10:01:00Z", "to": "2026-11-02T10:30:00Z"}).get_json()
    assert body["source"] == "raw"
    assert body["total"] == 10  # 10:01 included, 10:30 excluded


def test_doubles_sum_as_doubles(client):
    assert usage(client, metric="credits").get_json()["total"] == pytest.approx(0.75)


def test_unknown_org_is_empty_not_an_error(client):
    body = usage(client, org="nobody").get_json()
    assert body["total"] == 0 and body["points"] == []


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"metric": ""}, "metric"),
        ({"step": "5m"}, "step"),
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-11-02T10:00:00"}, "zone"),
        ({"metric": "m" * 1025}, "at most 1024"),
        ({"from": "2026-13-45T00:00:00Z"}, "from"),
    ],
)
def test_bad_parameters_are_400_with_a_json_error(client, params, needle):
    r = usage(client, **params)
    assert r.status_code == 400
    err = r.get_json()["error"]
    assert err["code"] in ("missing_parameter", "invalid_parameter") and needle in err["message"]


def test_an_inverted_range_is_empty(client):
    body = usage(client, **{"from": "2026-11-03T00:00:00Z", "to": "2026-11-02T00:00:00Z"}).get_json()
    assert body["total"] == 0 and body["points"] == []


def test_a_range_too_long_for_its_step_gets_the_step_it_needs(client):
    body = usage(client, step="1m", **{"from": "2020-01-01T00:00:00Z"}).get_json()  # 3.6M minutes
    assert body["step"] == "1h" and body["total"] == 30 + 2 * 2**62 + 7


def test_leap_seconds_and_lowercase_rfc3339(client):
    body = usage(client, **{"from": "2026-11-02t09:59:60z"}).get_json()
    assert body["from"] == "2026-11-02T10:00:00Z"


@pytest.mark.parametrize("org", ["o'; DROP TABLE x; --", 'a"b\\c', "ünïcødé-☃", "x" * 1000])
def test_hostile_org_ids_are_just_org_ids(client, org):
    r = usage(client, org=org)
    assert r.status_code == 200 and r.get_json()["total"] == 0


def test_metrics_parse_and_carry_no_org_label(client):
    r = client.get("/metrics")
    assert r.status_code == 200
    families = list(text_string_to_metric_families(r.get_data(as_text=True)))
    names = {f.name for f in families}
    assert {"meterhouse_points_received", "meterhouse_ingest_lag_seconds"} <= names
    for f in families:
        for s in f.samples:
            assert not {"org", "org_id", "org.id"} & set(s.labels), s


def test_openmetrics_on_request(client):
    r = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.content_type.startswith("application/openmetrics-text")
    assert r.get_data(as_text=True).rstrip().endswith("# EOF")


def test_health_and_readiness(client):
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 200 and r.get_json()["checks"] == {"pipeline": True, "store": True}


def test_readiness_follows_the_pipeline(store):
    state = {"ready": False}
    a = create_app(store, CollectorRegistry(), lambda: state["ready"])
    c = a.test_client()
    assert c.get("/readyz").status_code == 503
    state["ready"] = True
    assert c.get("/readyz").status_code == 200


def test_an_unreachable_store_is_503_not_500():
    class Down:
        database = "x"

        def rows(self, sql, params):
            raise ConnectionError("no endpoint")

        def ping(self):
            return False

    a = create_app(Down(), CollectorRegistry(), lambda: True)
    r = a.test_client().get("/api/v1/orgs/o/usage?metric=m")
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "unavailable"
    assert a.test_client().get("/readyz").status_code == 503


def test_raw_retention_is_a_ttl_and_older_minutes_come_from_the_rollup(engine_dir):
    import uuid

    from meterhouse.core.config import Config
    from meterhouse.core.store import open_store

    store = open_store(
        Config(data_dir=engine_dir, database=f"r_{uuid.uuid4().hex[:8]}", raw_retention_days=7)
    )
    try:
        ddl = store.scalar(f"SHOW CREATE TABLE {store.database}.usage_points")
        assert "TTL toDateTime(time) + toIntervalDay(7)" in ddl
        assert "TTL" not in store.scalar(f"SHOW CREATE TABLE {store.database}.usage_hourly")
        t = (
            time.time_ns() // H - 24 * 20
        ) * H + 90 * 10**9  # 20 days ago: past the raw TTL, kept in the rollup
        write(store, sum_request({"api.calls": [point(9, {"org.id": "old"}, t_ns=t)]}))
        store.client.command(f"OPTIMIZE TABLE {store.database}.usage_points FINAL")  # applies the TTL now
        assert store.scalar(f"SELECT count() FROM {store.database}.usage_points") == 0
        app = create_app(store, CollectorRegistry(), lambda: True, raw_retention_days=7)
        since = datetime.fromtimestamp(t // 10**9 - 3600 * 24, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = (
            app.test_client().get(f"/api/v1/orgs/old/usage?metric=api.calls&step=1m&from={since}").get_json()
        )
        assert (body["step"], body["source"], body["total"]) == ("1h", "rollup", 9)
    finally:
        store.client.command(f"DROP DATABASE IF EXISTS {store.database} SYNC")


def test_grouped_totals_equal_the_ungrouped_total_for_every_key_raw_and_rollup(app, store, tmp_path):
    """Through the spool's Native blocks and the writer: unicode, empty, very long and repeated keys,
    a key some points lack; every group_by key splits the same total, and the rollup names the same
    groups as the raw points."""
    from meterhouse.collector.deadletter import DeadLetters
    from meterhouse.collector.spool import Spool
    from meterhouse.collector.writer import Writer

    long_value = "ü" * 4096
    attr_sets = [
        {"org.id": "acme", "feature": "search"},
        {"org.id": "acme", "feature": ""},
        {"org.id": "acme"},
        {"org.id": "acme", "feature": "ünïcødé ✓", "région": "eu"},
        {"org.id": "acme", "région": "", "feature": long_value},
        {"org.id": "acme", "": "empty key", "feature": "search"},
        {"org.id": "acme", "a": "1", "b": "2", "feature": "x\x00y"},
    ]
    pts = [point(i * 1000 + h, attrs, t_ns=T0 + h * H + 61 * 10**9) for i, attrs in enumerate(attr_sets)
           for h in range(3)]  # fmt: skip
    dup = point(9, {"org.id": "acme", "feature": "first"}, t_ns=T0 + 5)
    dup.attributes.append(dup.attributes[0].__class__(key="feature", value=dup.attributes[0].value))
    dup.attributes[-1].value.string_value = "last"  # a repeated key: the last value wins
    req = sum_request({"api.calls": [*pts, dup, point(2**62, {"org.id": "acme"}, t_ns=T0 + 7)]})
    b = decode_request(req, Limits(), now_ns=time.time_ns(), digest="g" * 32).batch
    spool = Spool(tmp_path / "spool", max_cached_bytes=0)  # every record read back from disk
    spool.open()
    writer = Writer(spool, store, PipelineMetrics(CollectorRegistry()), DeadLetters(tmp_path / "dead"),
                    flush_interval_s=0.01)  # fmt: skip
    spool.consume(b)
    writer.start()
    deadline = time.monotonic() + 20
    while spool.pending_points and time.monotonic() < deadline:
        time.sleep(0.02)
    writer.shutdown(5)
    spool.shutdown(1)
    assert spool.pending_points == 0
    expected = sum(i * 1000 + h for i in range(len(attr_sets)) for h in range(3)) + 9 + 2**62
    c = app.test_client()
    for source, frm, to in (("rollup", "2026-11-02T10:00:00Z", "2026-11-02T14:00:00Z"),
                            ("raw", "2026-11-02T10:00:00Z", "2026-11-02T13:59:59Z")):  # fmt: skip
        whole = usage(c, step="1h", **{"from": frm, "to": to}).get_json()
        assert whole["source"] == source and whole["total"] == expected
        for key in ("feature", "région", "a", "missing", "org.id"):
            body = usage(c, step="1h", group_by=key, **{"from": frm, "to": to}).get_json()
            assert body["source"] == source
            assert body["total"] == expected, (source, key)
            assert sum(g["total"] for g in body["groups"]) == expected, (source, key)
            if key == "feature":
                got = {g["value"]: g["total"] for g in body["groups"]}
                assert got["last"] == 9 and "first" not in got
                assert got[long_value] == 4000 + 4001 + 4002
                assert got["ünïcødé ✓"] == 3000 + 3001 + 3002
                assert got["x\x00y"] == 6000 + 6001 + 6002
        by_source = {}
        for key in ("feature", "région"):
            body = usage(c, step="1h", group_by=key, **{"from": frm, "to": to}).get_json()
            by_source[key] = sorted((g["value"], g["total"]) for g in body["groups"])
        if source == "rollup":
            rollup_groups = by_source
        else:
            assert by_source == rollup_groups  # the rollup's groups are the raw points' groups


def test_a_misspelled_or_unsummable_metric_is_said_so_not_answered_zero(client, store):
    """A misspelled metric answered 200 with total 0, and so did a histogram: the caller billed 0."""
    from otlp_builders import histogram_request

    r = usage(client, metric="api.call")
    body = r.get_json()
    assert r.status_code == 404 and body["error"]["code"] == "unknown_metric"
    assert "api.calls" in body["error"]["message"]
    r = usage(client, metric="zzz.nothing.like.it")
    assert r.status_code == 404 and "metrics-catalog" in r.get_json()["error"]["message"]
    write(store, histogram_request([(3, {"org.id": "acme"})], "latency", T0 + 60 * 10**9))
    r = usage(client, metric="latency")
    body = r.get_json()
    assert r.status_code == 400 and body["error"]["code"] == "not_a_sum"
    assert "histogram" in body["error"]["message"] and "distribution_points" in body["error"]["message"]
    assert usage(client, metric="api.calls").status_code == 200
