"""A real Prometheus (Debian's package) scrapes a real `meterhouse up` with the rule files loaded; a
failover, a stall (no ClickHouse endpoint reachable while points keep arriving) and the lag of the
drained backlog make alerts fire; the critical freshness alert fires before the backlog drains. The rules are a rendered copy with test-only short
`for:` durations and thresholds; the expressions are the committed ones."""

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import free_port
from otlp_builders import point, sum_request

pytestmark = pytest.mark.e2e
ALERTS = Path(__file__).resolve().parents[2] / "alerts"
#: Test-only thresholds, so the conditions arise within seconds.
FAST_THRESHOLDS = {
    "MeterhouseSpoolBacklogOld": ("> 300", "> 3"),
    "MeterhouseSpoolBacklogCritical": ("> 1800", "> 6"),
    "MeterhouseIngestionLagHigh": ("> 60", "> 1"),
}


def render_rules(out: Path) -> None:
    for f in ALERTS.glob("*.rules.yml"):
        doc = yaml.safe_load(f.read_text())
        for group in doc["groups"]:
            group.pop("interval", None)
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "2s"
                old_new = FAST_THRESHOLDS.get(rule.get("alert", ""))
                if old_new:
                    assert old_new[0] in rule["expr"]
                    rule["expr"] = rule["expr"].replace(*old_new)
        (out / f.name).write_text(yaml.safe_dump(doc))
    for name in FAST_THRESHOLDS:
        assert any(r.get("alert") == name for r in rules_in(out)), f"{name} is not in the rules"


def rules_in(directory: Path) -> list[dict]:
    return [r for f in directory.glob("*.rules.yml") for g in yaml.safe_load(f.read_text())["groups"]
            for r in g["rules"]]  # fmt: skip


@pytest.fixture
def prometheus(tmp_path):
    started = []

    def start(target_port: int) -> str:
        rules = tmp_path / "rules"
        rules.mkdir()
        render_rules(rules)
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "external_labels": {"runbook_base_url": "https://runbooks.example/runbooks.md"}},
            "rule_files": [str(rules / "*.rules.yml")],
            "scrape_configs": [{"job_name": "meterhouse", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }))  # fmt: skip
        port = free_port()
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: scripts/test.sh installs Debian's prometheus package"
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        started.append((proc, log))
        url = f"http://127.0.0.1:{port}"
        wait(lambda: _ok(f"{url}/-/ready"), 60, "prometheus ready")
        return url

    yield start
    for proc, log in started:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def firing(prom_url: str) -> dict[str, dict]:
    alerts = requests.get(f"{prom_url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    return {a["labels"]["alertname"]: a for a in alerts if a["state"] == "firing"}


def test_failover_and_backlog_alerts_fire_in_a_real_prometheus(up_factory, tmp_path, prometheus):
    faults = tmp_path / "faults.json"
    faults.write_text("{}")
    up = up_factory("--clickhouse-url", "embedded#a,embedded#b", "--health-check-interval-s", "0.2",
                    "--failover-after-failures", "2", "--failback-hold-s", "3600", "--retry-max-backoff-s", "0.5",
                    faults=faults)  # fmt: skip
    prom = prometheus(up.http_port)
    wait(lambda: requests.get(f"{prom}/api/v1/query", params={"query": 'up{job="meterhouse"}'},
                              timeout=5).json()["data"]["result"], 30, "first scrape")  # fmt: skip

    def send(n: int) -> None:
        for i in range(n):
            body = sum_request({"calls": [point(1, {"org.id": "org-p", "i": str(time.time_ns() + i)})]})
            r = requests.post(f"{up.otlp_http}/v1/metrics", data=body.SerializeToString(),
                              headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # fmt: skip
            assert r.status_code == 200

    send(3)
    faults.write_text(json.dumps({"down": ["embedded#a"]}))  # the primary goes away: failover to b
    send(3)
    wait(lambda: "MeterhouseFailoverOccurred" in firing(prom), 60, "MeterhouseFailoverOccurred firing")
    alert = firing(prom)["MeterhouseFailoverOccurred"]
    assert (alert["labels"]["from_endpoint"], alert["labels"]["to_endpoint"]) == ("embedded#a", "embedded#b")
    assert alert["labels"]["severity"] == "info"  # an event: notified, never paged
    assert (
        alert["annotations"]["runbook_url"]
        == "https://runbooks.example/runbooks.md#meterhousefailoveroccurred"
    )

    time.sleep(0.5)
    faults.write_text(json.dumps({"down": ["embedded#a", "embedded#b"]}))  # nowhere to write: a stall
    # Points keep arriving during the stall; nothing commits, so the lag histogram observes nothing, but
    # the age of the oldest spooled point grows: the warning, then the critical tier fire.
    deadline = time.monotonic() + 90
    seen: set[str] = set()
    while time.monotonic() < deadline and "MeterhouseSpoolBacklogCritical" not in seen:
        send(1)
        time.sleep(0.5)
        seen |= set(firing(prom))
    assert {"MeterhouseSpoolBacklogOld", "MeterhouseSpoolBacklogCritical"} <= seen, seen
    critical = firing(prom)["MeterhouseSpoolBacklogCritical"]
    assert critical["labels"]["severity"] == "critical"
    pending = requests.get(f"{up.api}/metrics", timeout=10).text
    assert re.search(r"^meterhouse_pending_points [1-9]", pending, re.M), (
        "the backlog drained before the page"
    )
    faults.write_text(json.dumps({"down": ["embedded#a"]}))  # b returns; the backlog drains with its lag
    up.drain(60)
    wait(lambda: "MeterhouseIngestionLagHigh" in firing(prom), 90, "MeterhouseIngestionLagHigh firing")
    assert "MeterhouseTargetDown" not in firing(prom)
