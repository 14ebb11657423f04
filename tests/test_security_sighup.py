"""SIGHUP on a real `meterhouse up`: ingest tokens added and removed from MH_INGEST_TOKENS_FILE, on both
transports, with keep-alive connections and spooled points kept; a bad file changes nothing."""

import signal
import time

import grpc
import pytest
import requests
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from otlp_builders import point, sum_request

from meterhouse.demo import fetch_usage

pytestmark = pytest.mark.e2e
OLD = "ingest-token-old-00000001"
NEW = "ingest-token-new-00000002"
EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


def body(org: str, v: int) -> bytes:
    return sum_request({"hup": [point(v, {"org.id": org})]}).SerializeToString()


def statuses(up, session, channel, token: str, org: str, v: int) -> tuple[int, str]:
    r = session.post(f"{up.otlp_http}/v1/metrics", data=body(org, v), timeout=30,
                     headers={"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {token}"})  # fmt: skip
    try:
        channel.unary_unary(EXPORT)(
            body(org, v * 10), timeout=30, metadata=(("authorization", f"Bearer {token}"),)
        )
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
    return r.status_code, code


def wait_for_log(up, needle: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while needle not in up.output():
        assert time.monotonic() < deadline, f"{needle!r} not logged:\n{up.output()[-3000:]}"
        time.sleep(0.05)


def test_sighup_adds_and_removes_ingest_tokens_without_dropping_connections(up_factory, tmp_path):
    tokens = tmp_path / "ingest.yml"
    tokens.write_text(f"tokens: [{{token: {OLD}, orgs: [org-a]}}]\n")
    up = up_factory(env={"MH_INGEST_TOKENS_FILE": str(tokens)})
    session = requests.Session()
    channel = grpc.insecure_channel(up.otlp_grpc)
    assert statuses(up, session, channel, OLD, "org-a", 1) == (200, "OK")
    assert statuses(up, session, channel, NEW, "org-b", 2) == (401, "UNAUTHENTICATED")

    tokens.write_text(f"tokens: [{{token: {OLD}, orgs: [org-a]}}, {{token: {NEW}, orgs: [org-b]}}]\n")
    up.proc.send_signal(signal.SIGHUP)
    wait_for_log(up, '"ingest_tokens": 2')
    assert statuses(up, session, channel, NEW, "org-b", 4) == (200, "OK")  # added
    assert statuses(up, session, channel, OLD, "org-a", 8) == (200, "OK")

    tokens.write_text(f"tokens: [{{token: {NEW}, orgs: [org-b]}}]\n")
    up.proc.send_signal(signal.SIGHUP)
    wait_for_log(up, '"ingest_tokens": 1')
    assert statuses(up, session, channel, OLD, "org-a", 16) == (401, "UNAUTHENTICATED")  # removed
    assert statuses(up, session, channel, NEW, "org-b", 32) == (200, "OK")

    tokens.write_text("tokens: [{token: short, orgs: [x]}]\n")  # a bad file: nothing changes
    up.proc.send_signal(signal.SIGHUP)
    wait_for_log(up, "reload refused")
    assert statuses(up, session, channel, NEW, "org-b", 64) == (200, "OK")
    assert up.proc.poll() is None

    channel.close()
    up.drain()
    now = int(time.time())
    window = (now // 3600 * 3600 - 3600, (now // 3600 + 2) * 3600)
    assert fetch_usage(up.api, "org-a", "hup", *window, "1h")["total"] == 1 + 10 + 8 + 80
    assert fetch_usage(up.api, "org-b", "hup", *window, "1h")["total"] == 4 + 40 + 32 + 320 + 64 + 640
    for secret in (OLD, NEW):
        assert secret not in up.output()  # tokens are never logged
    assert up.stop() == 0


def test_org_scope_answer_over_http_json(up_factory, tmp_path):
    """The partial_success of a scoped token is also answered in OTLP/JSON."""
    tokens = tmp_path / "ingest.yml"
    tokens.write_text(f"tokens: [{{token: {OLD}, orgs: [org-a]}}]\n")
    up = up_factory(env={"MH_INGEST_TOKENS_FILE": str(tokens)})
    from google.protobuf import json_format

    req = sum_request({"json": [point(3, {"org.id": "org-a"}), point(4, {"org.id": "org-b"})]})
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=json_format.MessageToJson(req), timeout=30,
                      headers={"Content-Type": "application/json", "Authorization": f"Bearer {OLD}"})  # fmt: skip
    assert r.status_code == 200
    answer = json_format.Parse(r.text, ExportMetricsServiceResponse())
    assert answer.partial_success.rejected_data_points == 1
    assert up.stop() == 0


def test_sigterm_arriving_with_a_sighup_still_stops(up_factory, tmp_path):
    """A SIGHUP right after SIGTERM (a config tool reloading while an orchestrator stops the service)
    must not swallow the SIGTERM: the process stops, having written what it acknowledged."""
    import os

    tokens = tmp_path / "ingest.yml"
    tokens.write_text(f"tokens: [{{token: {OLD}, orgs: [org-a]}}]\n")
    up = up_factory(env={"MH_INGEST_TOKENS_FILE": str(tokens)})
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=body("org-a", 5), timeout=30,
                      headers={"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {OLD}"})  # fmt: skip
    assert r.status_code == 200
    os.kill(up.proc.pid, signal.SIGTERM)
    os.kill(up.proc.pid, signal.SIGHUP)
    assert up.proc.wait(30) == 0, up.output()[-3000:]
    assert '"msg": "stopped"' in up.output()
