"""`python -m bench --quick` keeps working (it checks the benchmark code; no timing is asserted).
The VictoriaMetrics peer is Debian's `victoria-metrics` package, which `scripts/test.sh` installs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.soak  # two minutes: with the soaks (README, "Tests")
@pytest.mark.timeout(900)  # every scenario starts its own servers; a loaded 2-core machine needs minutes
def test_quick_benchmarks_run_every_scenario(tmp_path):
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), "--work", str(tmp_path / "w")],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["machine"]["cores"] >= 1
    systems = {(row["system"], row["points_per_request"], row["data"]) for row in res["ingest"]["rows"]}
    assert systems == {("meterhouse (http)", 2_000, "all-new"), ("meterhouse (grpc)", 2_000, "all-new"),
                       ("naive baseline (http)", 2_000, "all-new"), ("meterhouse (http)", 50, "all-new"),
                       ("naive baseline (http)", 50, "all-new"), ("meterhouse (http)", 2_000, "fleet"),
                       ("naive baseline (http)", 2_000, "fleet")}  # fmt: skip
    for row in res["ingest"]["rows"]:
        assert row["points"] > 0 and row["points_per_s"] > 0
    assert set(res["ingest"]["throughput_ratio_vs_naive"]) == {
        "meterhouse (http), 2000 points/request, all-new", "meterhouse (grpc), 2000 points/request, all-new",
        "meterhouse (http), 50 points/request, all-new", "meterhouse (http), 2000 points/request, fleet",
    }  # fmt: skip
    prom, mh = res["cardinality"]["rows"]
    assert prom["series"] > 10 * mh["series"]  # the org_id label makes Prometheus hold series per org
    assert [row["orgs"] for row in res["query"]["rows"]] == [1_000, 5_000]
    # meterhouse's own series do not grow with the number of orgs
    assert len({row["metrics_series"] for row in res["scale"]["rows"]}) == 1
    (closed,) = res["close"]["rows"]
    assert closed["lines"] == closed["orgs"] * 4 and closed["reconciled"]

    vm_systems = {(row["system"], row["per_request"]) for row in res["vm-ingest"]["rows"]}
    assert vm_systems == {(s, n) for n in (2_000, 48) for s in ("meterhouse (OTLP/HTTP)", "VictoriaMetrics (new series)",
                                                                "VictoriaMetrics (known series)")}  # fmt: skip
    for row in res["vm-ingest"]["rows"]:
        assert row["acked_per_s"] > 0 and row["queryable_per_s"] > 0 and row["disk_bytes_per_sample"] > 0
    # the line-protocol translation carries the same usage: the same totals and the same top org
    assert res["vm-query"]["totals_agree"] == {"1000": True}, res["vm-query"]["rows"]
    exact = {row["check"].split(" (")[0]: row for row in res["vm-exactness"]["rows"]}
    assert all(row["meterhouse_exact"] for row in exact.values()), exact
    # what the benchmark reports about the peer (VictoriaMetrics 1.79 with its defaults)
    assert exact["integer sum above 2^53"]["VictoriaMetrics"] != str(2**53 + 9)  # float64
    assert exact["the same request sent twice"]["VictoriaMetrics"] == "120"  # counted twice
    assert exact["late sample for last month"]["VictoriaMetrics_retention_13"] == "7"
    stages = {row["stage"]: row["cpu_s_per_million"] for row in res["breakdown"]["rows"]}
    assert stages["insert, the whole schema"] > stages["insert, no view (the engine's floor)"] > 0
    assert stages["decode, native fast path (from the bytes)"] > 0
    (group,) = res["groupmem"]["rows"]
    assert group["group_mib"] > 1 and group["group_peak_mib"] > 0
    (insert,) = res["insertkeys"]["rows"]
    assert insert["distinct_keys"] == insert["entries"] == 200 and insert["fits_under_mib"] in (64, 256)
    steady = res["steady"]
    assert steady["exact"] and steady["written"] == steady["sent"] > 0 and steady["rows"]
