"""A real Prometheus (Debian's package) scrapes a real `meterhouse up` with the rule files loaded; a
failover and an ingestion backlog make alerts fire. The rules are a rendered copy with test-only short
`for:` durations and thresholds; the expressions are the committed ones."""

import json
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


@pytest.fixture
def prometheus(tmp_path):
    started = []

    def start(target_port: int) -> str:
        rules = tmp_path / "rules"
        rules.mkdir()
        render_rules(rules)
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
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
    assert alert["labels"]["severity"] == "warning" and alert["annotations"]["runbook_url"]

    time.sleep(0.5)
    faults.write_text(json.dumps({"down": ["embedded#a", "embedded#b"]}))  # nowhere to write: a backlog
    for _ in range(8):
        send(2)
        time.sleep(0.5)
    wait(lambda: "MeterhouseSpoolBacklogOld" in firing(prom), 60, "MeterhouseSpoolBacklogOld firing")
    faults.write_text(json.dumps({"down": ["embedded#a"]}))  # b returns; the backlog drains with its lag
    up.drain(60)
    wait(lambda: "MeterhouseIngestionLagHigh" in firing(prom), 90, "MeterhouseIngestionLagHigh firing")
    assert "MeterhouseTargetDown" not in firing(prom)
