"""The Alertmanager configuration with the real Alertmanager (Debian's package): it loads, routes each
severity to its receiver, and its inhibitions make one ClickHouse outage page once."""

import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml
from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
AMTOOL = shutil.which("amtool")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


def amtool(*args: str) -> subprocess.CompletedProcess:
    assert AMTOOL, "amtool is missing: scripts/test.sh installs Debian's prometheus-alertmanager package"
    return subprocess.run([AMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_amtool_check_config():
    r = amtool("check-config", str(CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ("alertname=MeterhouseNothingWritten severity=critical", "meterhouse-pager"),
        ("alertname=MeterhouseSpoolBacklogOld severity=warning", "meterhouse-warnings"),
        ("alertname=MeterhouseFailoverOccurred severity=info", "meterhouse-events"),
        ("alertname=MeterhouseWatchdog severity=none", "meterhouse-deadmansswitch"),
    ],
)
def test_routes(labels, receiver):
    r = amtool("config", "routes", "test", f"--config.file={CONFIG}", *labels.split())
    assert r.returncode == 0 and r.stdout.strip() == receiver, r.stdout + r.stderr


def test_failover_events_are_not_resolved_and_not_paged():
    config = yaml.safe_load(CONFIG.read_text())
    events = next(r for r in config["receivers"] if r["name"] == "meterhouse-events")
    assert all(not w["send_resolved"] for w in events["webhook_configs"])


class _Sink(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def alertmanager(tmp_path):
    """A real Alertmanager on loopback with the committed config, its receivers pointed at a local sink
    and its group waits shortened."""
    assert ALERTMANAGER, "Alertmanager is missing: scripts/test.sh installs prometheus-alertmanager"
    sink = ThreadingHTTPServer(("127.0.0.1", 0), type("Sink", (_Sink,), {"received": []}))
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    config = yaml.safe_load(CONFIG.read_text())
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"http://127.0.0.1:{sink.server_port}/{receiver['name']}"
    config["route"].update(group_wait="1s", group_interval="1s")
    (tmp_path / "am.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "am.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([ALERTMANAGER, f"--config.file={tmp_path / 'am.yml'}",
                             f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--cluster.listen-address="], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/-/ready", timeout=1).ok:
                break
        except requests.RequestException:
            pass
        time.sleep(0.2)
    yield url, sink.RequestHandlerClass.received
    proc.terminate()
    proc.wait(20)
    log.close()
    sink.shutdown()


def post(url: str, *alerts: dict) -> None:
    body = [
        {"labels": {"job": "meterhouse", **a}, "annotations": {"summary": a["alertname"]}} for a in alerts
    ]
    requests.post(f"{url}/api/v2/alerts", json=body, timeout=5).raise_for_status()


def states(url: str) -> dict[tuple[str, str], list]:
    alerts = requests.get(f"{url}/api/v2/alerts", timeout=5).json()
    return {
        (a["labels"]["alertname"], a["labels"].get("instance", "")): a["status"]["inhibitedBy"]
        for a in alerts
    }


def test_one_clickhouse_outage_pages_once_from_its_symptom(alertmanager):
    """A stall of mh: its causes warn, its consequences are inhibited, the page is its freshness burn; the
    other instance's page is not muted by mh's causes."""
    url, received = alertmanager
    mh, other = {"instance": "mh:9464"}, {"instance": "other:9464"}
    post(url,
         {"alertname": "MeterhouseInsertsFailing", "severity": "warning", "cause": "unreachable", **mh},
         {"alertname": "MeterhouseEndpointDown", "severity": "warning", "endpoint": "http://ch:8123", **mh},
         {"alertname": "MeterhouseNothingWritten", "severity": "warning", **mh},
         {"alertname": "MeterhouseFreshnessBudgetBurnFast", "severity": "critical", **mh},
         {"alertname": "MeterhouseSpoolBacklogCritical", "severity": "critical", **mh},
         {"alertname": "MeterhouseSpoolBacklogOld", "severity": "warning", **mh},
         {"alertname": "MeterhouseIngestionLagCritical", "severity": "critical", **mh},
         {"alertname": "MeterhouseSilentOrgs", "severity": "warning", **mh},
         {"alertname": "MeterhouseOrgHealthStale", "severity": "warning", **mh},
         {"alertname": "MeterhouseReconciliationStale", "severity": "warning", **mh},
         {"alertname": "MeterhouseFreshnessBudgetBurnFast", "severity": "critical", **other},
         {"alertname": "MeterhouseSilentOrgs", "severity": "warning", **other},
         {"alertname": "MeterhouseFailoverFlapping", "severity": "critical", **other},
         {"alertname": "MeterhouseFailoverOccurred", "severity": "info", **other})  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = states(url)
        if len(s) == 14 and s[("MeterhouseSpoolBacklogOld", "mh:9464")]:
            break
        time.sleep(0.3)
    inhibited = {k for k, by in s.items() if by}
    assert inhibited == {
        ("MeterhouseSpoolBacklogCritical", "mh:9464"),
        ("MeterhouseSpoolBacklogOld", "mh:9464"),
        ("MeterhouseIngestionLagCritical", "mh:9464"),
        ("MeterhouseSilentOrgs", "mh:9464"),
        ("MeterhouseOrgHealthStale", "mh:9464"),
        ("MeterhouseReconciliationStale", "mh:9464"),
        ("MeterhouseSilentOrgs", "other:9464"),  # other's own page inhibits it
        ("MeterhouseFailoverOccurred", "other:9464"),
    }
    time.sleep(3)  # past group_wait: what reached the pager
    paged = {
        (a["labels"]["alertname"], a["labels"]["instance"])
        for path, body in received
        if path == "/meterhouse-pager"
        for a in body["alerts"]
    }
    assert paged == {("MeterhouseFreshnessBudgetBurnFast", "mh:9464"),
                     ("MeterhouseFreshnessBudgetBurnFast", "other:9464"),
                     ("MeterhouseFailoverFlapping", "other:9464")}  # fmt: skip


def test_target_down_inhibits_only_its_own_job_and_instance(alertmanager):
    url, _ = alertmanager
    post(url,
         {"alertname": "MeterhouseTargetDown", "severity": "critical", "instance": "mh:9464"},
         {"alertname": "MeterhouseSpoolNearFull", "severity": "critical", "instance": "mh:9464"},
         {"alertname": "MeterhouseSpoolNearFull", "severity": "critical", "instance": "other:9464"},
         {"alertname": "MeterhouseSpoolNearFull", "severity": "critical", "instance": "mh:9464", "job": "other"})  # fmt: skip
    time.sleep(2)
    alerts = requests.get(f"{url}/api/v2/alerts", timeout=5).json()
    inhibited = {(a["labels"]["alertname"], a["labels"]["instance"], a["labels"]["job"])
                 for a in alerts if a["status"]["inhibitedBy"]}  # fmt: skip
    assert inhibited == {("MeterhouseSpoolNearFull", "mh:9464", "meterhouse")}
