"""A stall of one of two instances, watched by a real Prometheus with the committed rules (their real
thresholds and ``for:`` durations) and a real Alertmanager with the committed configuration: the
stalled instance pages once, from its symptom (MeterhouseFreshnessBudgetBurnFast), its causes warn, and
the healthy instance says nothing. About thirteen minutes: a soak test (``-m soak``)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml
from conftest import free_port
from otlp_builders import point, sum_request

pytestmark = pytest.mark.soak
ROOT = Path(__file__).resolve().parents[2]


class _Sink(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.path.strip("/"), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def _ready(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready")


@pytest.fixture
def watched(tmp_path):
    """Alertmanager (committed config, receivers pointed at a sink) and a Prometheus factory (committed
    rules, unchanged) sending to it; everything is stopped afterwards."""
    procs: list[subprocess.Popen] = []
    sink = ThreadingHTTPServer(("127.0.0.1", 0), type("Sink", (_Sink,), {"received": []}))
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    config = yaml.safe_load((ROOT / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"http://127.0.0.1:{sink.server_port}/{receiver['name']}"
    (tmp_path / "am.yml").write_text(yaml.safe_dump(config))
    am_port = free_port()
    am = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    assert am, "Alertmanager is missing: scripts/test.sh installs prometheus-alertmanager"
    procs.append(subprocess.Popen([am, f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'am'}",
                                   f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    _ready(f"http://127.0.0.1:{am_port}/-/ready")

    def prometheus(targets: list[int]) -> str:
        rules = tmp_path / "rules"
        rules.mkdir()
        for f in (ROOT / "alerts").glob("*.rules.yml"):
            shutil.copy(f, rules / f.name)
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "5s", "evaluation_interval": "15s",
                       "external_labels": {"runbook_base_url": "https://runbooks.example/runbooks.md"}},
            "rule_files": [str(rules / "*.rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [{"job_name": "meterhouse",
                                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in targets]}]}],
        }))  # fmt: skip
        port = free_port()
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: scripts/test.sh installs Debian's prometheus package"
        procs.append(subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        _ready(f"http://127.0.0.1:{port}/-/ready")
        return f"http://127.0.0.1:{port}"

    yield prometheus, sink.RequestHandlerClass.received
    for p in procs:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    sink.shutdown()


@pytest.mark.timeout(1500)
def test_a_stall_of_one_of_two_instances_pages_once_from_its_symptom(up_factory, tmp_path, watched):
    prometheus, received = watched
    faults = tmp_path / "faults.json"
    faults.write_text("{}")
    healthy = up_factory("--clickhouse-url", "embedded#h", data_dir=tmp_path / "healthy")
    stalled = up_factory("--clickhouse-url", "embedded#s", "--retry-max-backoff-s", "2",
                         data_dir=tmp_path / "stalled", faults=faults)  # fmt: skip
    prom = prometheus([healthy.http_port, stalled.http_port])
    stop = threading.Event()

    def send() -> None:  # both keep receiving usage throughout
        i = 0
        while not stop.is_set():
            for up in (healthy, stalled):
                body = sum_request({"calls": [point(1, {"org.id": f"org-{i % 5}"}, t_ns=time.time_ns())]})
                try:
                    requests.post(f"{up.otlp_http}/v1/metrics", data=body.SerializeToString(), timeout=10,
                                  headers={"Content-Type": "application/x-protobuf"})  # fmt: skip
                except requests.RequestException:
                    pass
            i += 1
            stop.wait(1)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        time.sleep(60)  # a minute of health in Prometheus first
        faults.write_text(json.dumps({"down": ["embedded#s"]}))  # the stalled instance's store goes away
        stall = f"127.0.0.1:{stalled.http_port}"
        stalled_at = time.monotonic()
        deadline = stalled_at + 720

        def pages() -> list[tuple[str, str]]:
            return [(a["labels"]["alertname"], a["labels"].get("instance", "")) for path, body in received
                    if path == "meterhouse-pager" and body["status"] == "firing" for a in body["alerts"]]  # fmt: skip

        while time.monotonic() < deadline and not pages():
            time.sleep(5)
        first = time.monotonic()
        # Past the causes' own `for:` (InsertsFailing, EndpointDown 5m; NothingWritten 10m from the stall).
        while time.monotonic() < max(first + 60, stalled_at + 11 * 60):
            time.sleep(5)
    finally:
        stop.set()
        sender.join()
    paged = set(pages())
    assert paged == {("MeterhouseFreshnessBudgetBurnFast", stall)}, paged
    warned = {(a["labels"]["alertname"], a["labels"].get("instance", "")) for path, body in received
              if path == "meterhouse-warnings" and body["status"] == "firing" for a in body["alerts"]}  # fmt: skip
    assert ("MeterhouseInsertsFailing", stall) in warned, warned  # the cause, said
    healthy_said = {a for a in paged | warned if a[1] == f"127.0.0.1:{healthy.http_port}"}
    assert not healthy_said, healthy_said
    firing = requests.get(f"{prom}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    assert all(a["labels"].get("instance") != f"127.0.0.1:{healthy.http_port}" for a in firing
               if a["state"] == "firing" and a["labels"]["alertname"] != "MeterhouseWatchdog"), firing  # fmt: skip
