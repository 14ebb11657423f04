"""Scenario 7: queries, meterhouse beside VictoriaMetrics, at 15k and 100k orgs.

Every org reports ``api.requests`` once a day for 30 days (the last one half an hour ago) with
``feature``, ``region`` and ``plan`` attributes (12 attribute sets per org). The same OTLP requests
go to ``meterhouse up`` and, as line protocol, to VictoriaMetrics. Then, median of 5 after one warm-up:

- one org over 24 h in 1 h steps: ``GET /api/v1/orgs/{org}/usage?step=1h`` against ``query_range`` of
  ``sum(sum_over_time(api_requests_value{org_id="..."}[1h]))`` with ``step=1h``;
- one org over 30 days in 1 d steps: the same with ``step=1d`` and ``[1d]``;
- the top 20 orgs over 30 days: ``GET /api/v1/orgs?limit=20`` against
  ``topk(20, sum by (org_id) (sum_over_time(api_requests_value[30d])))``.

VictoriaMetrics runs with its defaults; its queries are timed with ``nocache=1`` (computed, as
meterhouse's are) and again as they come with its rollup-result cache. Where a query is refused by a
default limit, the row says so and the query is timed again on a restart with that limit raised.
"""

from __future__ import annotations

import json
import pickle
import random
import time
import urllib.parse
from pathlib import Path

from bench.common import get, median_time, run_load
from bench.ingest import start_up, wait_written
from bench.payloads import ATTRS
from bench.victoria import QueryError, Victoria, exact, line_protocol

DAY, HOUR, NS = 86400, 3600, 10**9
METRIC = "api.requests"
SERIES = "api_requests_value"


def history(orgs: int, days: int, per_request: int, now_hour: int) -> tuple[list[bytes], int]:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

    rng = random.Random(7)
    points = [(i, k) for i in range(orgs) for k in range(days)]
    out = []
    for start in range(0, len(points), per_request):
        req = ExportMetricsServiceRequest()
        rm = req.resource_metrics.add()
        rm.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="billing")))
        m = rm.scope_metrics.add().metrics.add(name=METRIC, unit="1")
        m.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
        m.sum.is_monotonic = True
        for i, k in points[start : start + per_request]:
            dp = m.sum.data_points.add()
            dp.time_unix_nano = (now_hour - k * DAY - HOUR // 2 + i % 600) * NS
            dp.start_time_unix_nano = dp.time_unix_nano - 60 * NS
            dp.as_int = rng.randint(1, 10_000)
            for key, value in (("org.id", f"org-{i:06d}"), ("feature", ATTRS["feature"][(i + k) % 6]),
                               ("region", ATTRS["region"][(i * 7 + k) % 4]), ("plan", ATTRS["plan"][i % 4])):  # fmt: skip
                dp.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
        out.append(req.SerializeToString())
    return out, len(points)


def _dump(path: Path, payloads: list[bytes], total: int) -> Path:
    with open(path, "wb") as f:
        pickle.dump((payloads, total // len(payloads)), f)
    return path


def meterhouse_side(work: Path, orgs: int, otlp: Path, total: int, win: dict, org: str) -> dict:
    name = f"up-q-{orgs}"
    proc, ports = start_up(work, name)
    api = f"http://127.0.0.1:{ports['api']}"
    try:
        t0 = time.monotonic()
        load = run_load(otlp, f"http://127.0.0.1:{ports['http']}", "http")
        wait_written(api, load["points"], 3600)
        load_s = time.monotonic() - t0

        def usage(frm: int, step: str) -> dict:
            q = urllib.parse.urlencode(
                {"metric": METRIC, "step": step, "from": _iso(frm), "to": _iso(win["to"])}
            )
            return json.loads(get(f"{api}/api/v1/orgs/{org}/usage?{q}"))

        def top() -> dict:
            q = urllib.parse.urlencode(
                {"metric": METRIC, "limit": 20, "from": _iso(win["month"]), "to": _iso(win["to"])}
            )
            return json.loads(get(f"{api}/api/v1/orgs?{q}", 300))

        return {
            "system": "meterhouse (usage API)",
            "orgs": orgs,
            "samples": load["points"],
            "load_s": load_s,
            "org_24h_1h_s": median_time(lambda: usage(win["day"], "1h")),
            "org_30d_1d_s": median_time(lambda: usage(win["month"], "1d")),
            "top20_30d_s": median_time(top),
            "org_30d_total": usage(win["month"], "1d")["total"],
            "top1": [(o["org_id"], o["total"]) for o in top()["orgs"][:1]],
        }
    finally:
        proc.stop()


def victoria_side(work: Path, orgs: int, lines: Path, total: int, win: dict, org: str) -> list[dict]:
    vm = Victoria(work, f"vm-q-{orgs}")
    try:
        t0 = time.monotonic()
        load = run_load(lines, vm.base, "influx")
        _wait_month(vm, load["points"])
        load_s = time.monotonic() - t0
        rows = [
            _victoria_row(vm, orgs, load["points"], load_s, win, org, nocache) for nocache in (True, False)
        ]
        series = json.loads(get(f"{vm.base}/api/v1/series/count"))["data"][0]
    finally:
        vm.stop()
    if any(str(r["top20_30d_s"]).startswith("refused") for r in rows):
        limit = max(orgs * 12 * 2, 300_000)
        flag = f"-search.maxUniqueTimeseries={limit}"
        vm = Victoria(work, f"vm-q-{orgs}", (flag,))
        try:
            _wait_month(vm, load["points"])
            row = _victoria_row(vm, orgs, load["points"], None, win, org, True)
            row["system"] = f"VictoriaMetrics ({flag}, nocache=1)"
            rows.append(row)
        finally:
            vm.stop()
    for r in rows:
        r["series"] = series
    return rows


def _wait_month(vm: Victoria, expected: int, timeout_s: float = 3600) -> None:
    """Until every loaded sample sits in a searchable part, confirmed by a counting query where
    -search.maxUniqueTimeseries allows one (not at 100k orgs; the totals compared after the run check
    the data there)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = vm.metrics()
        stored = m.get('vm_rows{type="storage/small"}', 0) + m.get('vm_rows{type="storage/big"}', 0)
        if vm.settled() and stored >= expected:
            try:  # confirmed by a counting query where the series limit allows one
                if vm.samples((METRIC,), "31d") >= expected:
                    return
            except QueryError:
                return
        time.sleep(0.5)
    raise RuntimeError("VictoriaMetrics did not make the history queryable in time")


def _victoria_row(vm: Victoria, orgs: int, samples: int, load_s: float | None, win: dict, org: str,
                  nocache: bool) -> dict:  # fmt: skip
    one = f'sum(sum_over_time({SERIES}{{org_id="{org}"}}[%s]))'

    def day() -> list:
        return vm.query_range(one % "1h", win["day"] + HOUR, win["to"], HOUR, nocache)

    def month() -> list:
        return vm.query_range(one % "1d", win["month"] + DAY, win["to"], DAY, nocache)

    def top() -> list:
        return vm.query(f"topk(20, sum by (org_id) (sum_over_time({SERIES}[30d])))", win["to"], nocache)

    row = {
        "system": f"VictoriaMetrics ({'nocache=1' if nocache else 'defaults, result cache on'})",
        "orgs": orgs,
        "samples": samples,
        "load_s": load_s,
        "org_24h_1h_s": median_time(day),
        "org_30d_1d_s": median_time(month),
        "org_30d_total": sum(exact(v) for r in month() for _, v in r["values"]),
    }
    try:
        row["top20_30d_s"] = median_time(top)
        best = max(top(), key=lambda r: float(r["value"][1]))
        row["top1"] = [(best["metric"]["org_id"], exact(best["value"][1]))]
    except QueryError as e:
        row["top20_30d_s"] = f"refused: {e}"
    return row


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


COLUMNS = ["system", "orgs", "samples", "series", "load_s", "org_24h_1h_s", "org_30d_1d_s", "top20_30d_s"]


def run(work: Path, quick: bool) -> dict:
    scales = (1_000,) if quick else (15_000, 100_000)
    days = 30
    now_hour = int(time.time()) // HOUR * HOUR
    win = {"to": now_hour + HOUR, "day": now_hour + HOUR - DAY, "month": now_hour + HOUR - 30 * DAY}
    rows = []
    for orgs in scales:
        payloads, total = history(orgs, days, 5_000, now_hour)
        otlp = _dump(work / f"history-{orgs}.pkl", payloads, total)
        lines = _dump(work / f"history-{orgs}-lp.pkl", [line_protocol(p)[0] for p in payloads], total)
        del payloads
        org = f"org-{orgs // 2:06d}"
        rows.append(meterhouse_side(work, orgs, otlp, total, win, org))
        rows.extend(victoria_side(work, orgs, lines, total, win, org))
    # the translation carries the same usage: both systems must give the same totals
    agree = {
        str(orgs): all(
            r["org_30d_total"] == mine["org_30d_total"] and r.get("top1", mine["top1"]) == mine["top1"]
            for r in rows if r["orgs"] == orgs
        )
        for orgs in scales
        for mine in [next(r for r in rows if r["orgs"] == orgs and r["system"].startswith("meterhouse"))]
    }  # fmt: skip
    return {"rows": rows, "days": days, "totals_agree": agree}
