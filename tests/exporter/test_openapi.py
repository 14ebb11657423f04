"""schemathesis, with its default checks, against the Flask app and its own OpenAPI description."""

import time
import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from prometheus_client import CollectorRegistry
from schemathesis.specs.openapi.checks import positive_data_acceptance
from usage_rows import put

from meterhouse.core.close import Month, close_month
from meterhouse.core.config import Config
from meterhouse.core.store import open_store
from meterhouse.exporter import OrgHealth, create_app


@pytest.fixture(scope="module")
def api_app(engine_dir):
    store = open_store(Config(data_dir=engine_dir, database=f"oa_{uuid.uuid4().hex[:10]}"))
    now = time.time_ns()
    put(store, [{"org_id": f"org-{i}", "time": now - i * 10**10, "value_int": i, "attrs": {"f": str(i % 2)}}
                for i in range(20)])  # fmt: skip
    # A closed month with statements and an adjustment, so that the month routes answer with data.
    month = Month.of_ns(now).previous().previous().previous()
    put(store, [{"org_id": f"org-{i}", "time": month.start_ns + i, "value_int": 2**62} for i in range(5)])
    close_month(store, month, late_window_days=35)
    put(store, [{"org_id": "org-1", "time": month.start_ns, "value_int": 1}])
    registry = CollectorRegistry()
    health = OrgHealth(store, registry)
    health.refresh()
    yield create_app(store, registry, lambda: True, health)
    store.client.command(f"DROP DATABASE IF EXISTS {store.database} SYNC")


@pytest.fixture(scope="module")
def api_schema(api_app):
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", api_app)


def refused_by_value(path: str, query: dict) -> bool:
    from meterhouse.core.timefmt import parse_rfc3339

    if "cursor" in query:
        return True
    if path == "/api/v1/orgs" and "status" in query and {"metric", "from", "to", "order"} & set(query):
        return True  # a ranking's parameters with a health list: exclusive, which parameters cannot say
    if path != "/api/v1/usage/export":
        return False
    try:
        return any(parse_rfc3339(str(query[n])) % (3600 * 10**9) for n in ("from", "to") if n in query)
    except (ValueError, OverflowError):
        return True


def operations():
    # The operations are listed from the spec itself, so a new route is tested as soon as it is described.
    from meterhouse.exporter.openapi import spec

    return [(path, method) for path, item in spec()["paths"].items() for method in item]


@pytest.mark.parametrize(("path", "method"), operations())
def test_api_conforms_to_its_openapi_description(api_schema, path, method):
    # schemathesis' pytest plugin does not load under this pytest; its engine is driven through hypothesis.
    operation = api_schema[path][method.upper()]

    @given(operation.as_strategy())
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        # Values no schema can tell from valid ones: an opaque cursor (any text of the API's alphabet may be
        # garbled), an export's range off the whole hours, a ranking's parameters with a status list.
        # Their 400 is still checked against the spec.
        if refused_by_value(path, case.query or {}):
            case.call_and_validate(excluded_checks=[positive_data_acceptance])
        else:
            case.call_and_validate()

    check()


def test_the_spec_is_served_and_names_every_route(api_app):
    spec = api_app.test_client().get("/api/v1/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    routes = {
        r.rule
        for r in api_app.url_map.iter_rules()
        if r.rule.startswith("/api/v1/") and "openapi" not in r.rule
    }
    documented = {p.replace("{org_id}", "<path:org_id>").replace("{month}", "<month>") for p in spec["paths"]}
    assert routes == documented
