"""`meterhouse demo`: realistic per-org usage sent with the OpenTelemetry SDK, then checked back.

The SDK exports with delta temporality over OTLP/HTTP. The demo keeps its own exact totals of what it
recorded and, at the end, reads a few orgs' totals from the usage API (rollup and raw) and compares. What
those orgs already had in the window before the run (an earlier demo against the same data directory) is
read first and subtracted, so the demo can be run again and again.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

HOUR = 3600
FEATURES = ("search", "export", "ingest", "query", "dashboards")
REGIONS = ("us-east-1", "eu-west-1", "ap-south-1")
#: (name, unit, integer?, typical size of one measurement)
METRICS = (
    ("api.requests", "{request}", True, 5),
    ("rows.processed", "{row}", True, 20_000),
    ("egress.bytes", "By", True, 2_000_000),
    ("compute.credits", "{credit}", False, 0.75),
)


def delta_exporter(endpoint: str) -> OTLPMetricExporter:
    return OTLPMetricExporter(
        endpoint=endpoint.rstrip("/") + "/v1/metrics",
        preferred_temporality={Counter: AggregationTemporality.DELTA},
    )


def make_provider(endpoint: str, interval_ms: int = 1000) -> MeterProvider:
    reader = PeriodicExportingMetricReader(
        delta_exporter(endpoint),
        export_interval_millis=interval_ms,
        # Every org × feature × region is its own series: lift the SDK's default limit of 2000,
        # beyond which points would be folded into an overflow series without an org.
        cardinality_limits={Counter: 1_000_000},
    )
    resource = Resource.create({"service.name": "meterhouse-demo", "deployment.environment": "demo"})
    return MeterProvider(metric_readers=[reader], resource=resource)


def fetch_usage(api: str, org: str, metric: str, start_s: int, end_s: int, step: str) -> dict:
    query = urllib.parse.urlencode(
        {
            "metric": metric,
            "step": step,
            "from": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start_s)),
            "to": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end_s)),
        }
    )
    url = f"{api.rstrip('/')}/api/v1/orgs/{urllib.parse.quote(org, safe='')}/usage?{query}"
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}") if e.code == 404 else {}
        if body.get("error", {}).get("code") != "unknown_metric":
            raise
        # Nothing of this metric was ever received (the API says so with a 404): none of it is stored.
        return {"org_id": org, "metric": metric, "total": 0, "points": [], "unknown_metric": True}


def wait_committed(api: str, timeout_s: float = 60.0) -> bool:
    """Wait until meterhouse reports nothing pending (answers are sent once points are spooled).

    Raises OSError when the API cannot be reached at all."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{api.rstrip('/')}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("meterhouse_pending_points ") and float(line.split()[1]) == 0:
                    return True
        time.sleep(0.1)
    return False


def edge_counts(api: str) -> dict[tuple[str, str], float]:
    """meterhouse's points rejected, repaired and checked by identity so far, by reason or outcome:
    {("rejected", reason): n, ..., ("identity", "repeat"): n, ...}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{api.rstrip('/')}/metrics", timeout=10) as r:
        text = r.read().decode()
    kinds = {
        "meterhouse_points_rejected": "rejected",
        "meterhouse_points_repaired": "repaired",
        "meterhouse_points_identity_checked": "identity",
    }
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        kind = kinds.get(family.name)
        if kind is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                label = sample.labels.get("reason", sample.labels.get("outcome", ""))
                counts[(kind, label)] = sample.value
    return counts


def edge_report(before: dict, after: dict) -> str:
    """What meterhouse rejected, repaired or checked by identity during the demo, by reason, e.g.
    ``rejected 0; repaired 3 (start_after_time 3); identity 2 (repeat 2)`` (a repeat counted zero)."""
    parts = []
    for kind in ("rejected", "repaired", "identity"):
        diff = {r: after[(k, r)] - before.get((k, r), 0) for (k, r) in after if k == kind}
        diff = {r: int(n) for r, n in sorted(diff.items()) if n}
        by_reason = ", ".join(f"{r} {n:,}" for r, n in diff.items())
        parts.append(f"{kind} {sum(diff.values()):,}" + (f" ({by_reason})" if by_reason else ""))
    return "; ".join(parts)


def _matches(expected: int | float, got: int | float, exact: bool) -> bool:
    return got == expected if exact else math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)


def run_demo(
    orgs: int, seconds: float, endpoint: str, api: str, seed: int | None = None, out=sys.stdout
) -> int:
    """Send for ``seconds``; return 0 when every checked total matches, 1 otherwise."""
    if orgs < 1 or seconds <= 0:
        print("demo: --orgs must be at least 1 and --seconds more than 0", file=sys.stderr)
        return 2
    rng = random.Random(seed)
    org_ids = [f"org-{i:05d}" for i in range(1, orgs + 1)]
    # A few big customers and a long tail, as on a real platform.
    weights = [1.0 / (i + 1) ** 0.8 for i in range(orgs)]
    # Checked: the three biggest orgs by weight and the two smallest (chosen before sending, so that
    # what they had before the run can be read and subtracted).
    checked = list(dict.fromkeys(org_ids[:3] + org_ids[-2:]))
    started = time.time()
    start_s = int(started) // HOUR * HOUR
    end_s = (int(started + seconds + 600) // HOUR + 1) * HOUR  # the run, its flush and then some
    try:
        wait_committed(api)
        edge_before = edge_counts(api)
        baseline = {
            (org, name, step): fetch_usage(api, org, name, start_s, end_s, step)["total"]
            for org in checked
            for name, _, _, _ in METRICS
            for step in ("1h", "1m")
        }
    except OSError as e:
        print(f"demo: cannot read usage from {api}: {e}", file=out)
        return 1
    provider = make_provider(endpoint)
    meter = provider.get_meter("meterhouse.demo", "1")
    counters = {
        name: meter.create_counter(name, unit=unit, description=f"demo {name}")
        for name, unit, _, _ in METRICS
    }
    sent: dict[tuple[str, str], int | float] = defaultdict(int)
    deadline = time.monotonic() + seconds
    measurements, next_report = 0, time.monotonic() + 1
    print(f"demo: sending usage for {orgs} orgs for {seconds:g}s to {endpoint}", file=out)
    while time.monotonic() < deadline:
        for org in rng.choices(org_ids, weights, k=min(200, 10 * orgs)):
            name, _, integer, size = rng.choice(METRICS)
            value = max(1, int(rng.expovariate(1 / size))) if integer else round(rng.expovariate(1 / size), 6)
            counters[name].add(
                value, {"org.id": org, "feature": rng.choice(FEATURES), "region": rng.choice(REGIONS)}
            )
            sent[(org, name)] += value
            measurements += 1
        if time.monotonic() >= next_report:
            elapsed = seconds - max(0.0, deadline - time.monotonic())
            print(
                f"demo: {measurements:,} measurements recorded ({elapsed:.0f}s/{seconds:g}s)",
                file=out,
                flush=True,
            )
            next_report += 1
        time.sleep(0.02)
    flushed = provider.force_flush(timeout_millis=30_000)
    provider.shutdown()
    if not flushed:
        print("demo: the SDK could not export everything (is meterhouse up running?)", file=out)
        return 1
    print(f"demo: {measurements:,} measurements exported; reading totals back from {api}", file=out)
    try:
        if not wait_committed(api):
            print("demo: meterhouse still has points waiting for ClickHouse; totals may be short", file=out)
    except OSError as e:
        print(f"demo: cannot read usage from {api}: {e}", file=out)
        return 1
    print(f"{'org':<12} {'metric':<16} {'sent':>22} {'api (rollup)':>22} {'api (raw)':>22}  ok", file=out)
    ok_all = True
    for org in checked:
        for name, _, integer, _ in METRICS:
            expected = sent.get((org, name), 0)
            try:
                rollup = fetch_usage(api, org, name, start_s, end_s, "1h")["total"]
                raw = fetch_usage(api, org, name, start_s, end_s, "1m")["total"]
                rollup -= baseline[(org, name, "1h")]
                raw -= baseline[(org, name, "1m")]
            except OSError as e:
                print(f"demo: cannot read usage from {api}: {e}", file=out)
                return 1
            ok = _matches(expected, rollup, integer) and _matches(expected, raw, integer)
            ok_all &= ok
            print(
                f"{org:<12} {name:<16} {expected!s:>22} {rollup!s:>22} {raw!s:>22}  {'yes' if ok else 'NO'}",
                file=out,
            )
    verdict = "all totals match" if ok_all else "MISMATCH"
    try:
        edge = edge_report(edge_before, edge_counts(api))
    except OSError as e:
        edge = f"cannot read {api}/metrics: {e}"
    print(f"demo: {verdict} (integers exactly; doubles within 1e-9 relative)", file=out)
    print(
        "demo: points meterhouse rejected, repaired, or checked by identity (a repeat counts zero) "
        f"while the demo ran: {edge}",
        file=out,
    )
    return 0 if ok_all else 1
