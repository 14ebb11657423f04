"""`python -m bench --quick` keeps working (it checks the benchmark code; no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmarks_run_every_scenario(tmp_path):
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), "--work", str(tmp_path / "w")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["machine"]["cores"] >= 1
    systems = {row["system"] for row in res["ingest"]["rows"]}
    assert systems == {"meterhouse (http)", "meterhouse (grpc)", "naive baseline (http)"}
    for row in res["ingest"]["rows"]:
        assert row["points"] > 0 and row["points_per_s"] > 0
    assert set(res["ingest"]["throughput_ratio_vs_naive"]) == {"meterhouse (http)", "meterhouse (grpc)"}
    prom, mh = res["cardinality"]["rows"]
    assert prom["series"] > 10 * mh["series"]  # the org_id label makes Prometheus hold series per org
    assert [row["orgs"] for row in res["query"]["rows"]] == [1_000, 5_000]
    # meterhouse's own series do not grow with the number of orgs
    assert len({row["metrics_series"] for row in res["scale"]["rows"]}) == 1
    (closed,) = res["close"]["rows"]
    assert closed["lines"] == closed["orgs"] * 4 and closed["reconciled"]
