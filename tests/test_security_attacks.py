"""Attacks on ingest security that found nothing, kept as regressions: org scope under case, whitespace,
duplicate and misplaced org attributes (protobuf and gzipped JSON); header and metadata forms that are
not a bearer token, pipelined requests, 100-continue, API and ingest tokens swapped; the rate limit under concurrent senders on both transports (a 429 stores nothing,
a 200 loses nothing); expired client certificates. A SIGHUP storm with a broken certificate on a real
`meterhouse up` while both transports send is a soak test."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import signal
import socket
import threading
import time

import grpc
import pytest
import requests
from certs import Authority
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from otlp_builders import kv, point, sum_request
from test_security import API_TOKEN, EXPORT, TOKEN_A, TOKEN_ALL, Grpc, Http, pki, tls_options, totals, usage  # noqa: F401 (pki: a fixture)


@pytest.fixture(autouse=True)
def no_ca_bundle_from_the_environment(monkeypatch):
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


def _rejected(r: requests.Response) -> int:
    assert r.status_code == 200, r.text
    if r.headers["Content-Type"].startswith("application/json"):
        return int(json.loads(r.text or "{}").get("partialSuccess", {}).get("rejectedDataPoints", 0))
    return ExportMetricsServiceResponse.FromString(r.content).partial_success.rejected_data_points


def test_org_scope_holds_against_case_whitespace_duplicates_and_placement(stack_factory):
    stack = stack_factory(ingest_tokens=(TOKEN_A,))
    client = Http(stack)
    m = "scope.attacks"
    refused = {
        "case": point(1, {"org.id": "ORG-A"}),
        "leading space": point(2, {"org.id": " org-a"}),
        "trailing newline": point(4, {"org.id": "org-a\n"}),
        "int": point(8, {"org.id": 5}),
        "empty": point(16, {"org.id": ""}),
        "key case": point(32, {"ORG.ID": "org-a"}),
    }
    dup = point(64, {})
    dup.attributes.extend([kv("org.id", "org-a"), kv("org.id", "org-b")])  # the last one counts
    refused["duplicate, other org last"] = dup
    assert _rejected(client.send(sum_request({m: list(refused.values())}), TOKEN_A)) == len(refused)
    # The org on the resource or on the scope, the point without one.
    assert (
        _rejected(client.send(sum_request({m: [point(128, {})]}, resource={"org.id": "org-b"}), TOKEN_A)) == 1
    )
    req = sum_request({m: [point(256, {})]})
    req.resource_metrics[0].scope_metrics[0].scope.attributes.append(kv("org.id", "org-a"))
    assert _rejected(client.send(req, TOKEN_A)) == 1  # scope attributes name no org
    # gzipped OTLP/JSON, with a JSON object that names the org key twice (the last value is parsed).
    text = json_format.MessageToJson(sum_request({m: [point(512, {"org.id": "org-a"})]}))
    text = text.replace('"stringValue": "org-a"', '"stringValue": "org-a", "stringValue": "org-b"')
    r = client.session.post(client.url, data=gzip.compress(text.encode()), timeout=30, headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip", "Authorization": f"Bearer {TOKEN_A.token}"})  # fmt: skip
    assert _rejected(r) == 1
    # Kept: the token's org wherever it is named, a point's org over its resource's.
    dup = point(1024, {})
    dup.attributes.extend([kv("org.id", "org-b"), kv("org.id", "org-a")])
    assert _rejected(client.send(sum_request({m: [dup]}), TOKEN_A)) == 0
    assert (
        _rejected(client.send(sum_request({m: [point(2048, {})]}, resource={"org.id": "org-a"}), TOKEN_A))
        == 0
    )
    pt = point(4096, {"org.id": "org-a"})
    assert _rejected(client.send(sum_request({m: [pt]}, resource={"org.id": "org-b"}), TOKEN_A)) == 0
    assert totals(stack, m) == {"org-a": 1024 + 2048 + 4096}
    assert (
        stack.registry.get_sample_value("meterhouse_points_rejected_total", {"reason": "org_not_allowed"})
        == 10
    )


def _raw_post(port: int, body: bytes, header_lines: list[str]) -> bytes:
    head = ("POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            + "".join(h + "\r\n" for h in header_lines)
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode("latin-1") + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.split(b"\r\n", 1)[0]


def test_what_is_not_a_bearer_token_is_refused_and_what_is_one_is_served(stack_factory):
    stack = stack_factory(ingest_tokens=(TOKEN_A,), auth_tokens=(API_TOKEN,))
    port, t = stack.collector.http.port, TOKEN_A.token
    refused = [[f"Authorization: Bearer\t{t}"], [f"Authorization: Basic {t}"], [f"Authorization: {t}"],
               [f"Authorization: Bearer {t} extra"], [f"Authorization: Bearer {t}, Bearer {t}"],
               [f"X-Api-Key: {t}"], [f"Proxy-Authorization: Bearer {t}"], ["Authorization: Bearer "],
               ["Authorization: Bearer     "], [f"Authorization: Bearer {t[:-1]}"]]  # fmt: skip
    for i, lines in enumerate(refused):
        assert _raw_post(port, usage("forms", {"org-a": 1 + i}).SerializeToString(), lines).endswith(
            b"401 Unauthorized"
        )
    served = [
        [f"Authorization: bearer {t}"],
        [f"Authorization: BEARER  {t}"],
        [f"Authorization: Bearer {t}   "],
    ]
    for i, lines in enumerate(served):
        assert _raw_post(port, usage("forms", {"org-a": 100 * (i + 1)}).SerializeToString(), lines).endswith(
            b"200 OK"
        )
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.collector.grpc.port}")
    export = channel.unary_unary(EXPORT)
    body = usage("forms", {"org-a": 1000}).SerializeToString()
    for metadata in ((("x-authorization", f"Bearer {t}"),), (("authorization-bin", f"Bearer {t}".encode()),),
                     (("authorization", t),), (("authorization", "Bearer"),)):  # fmt: skip
        with pytest.raises(grpc.RpcError) as e:
            export(body, metadata=metadata, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    export(body, metadata=(("authorization", f"bearer {t}"),), timeout=30)
    channel.close()

    # Each request of a keep-alive connection is authenticated on its own: a pipelined second request
    # without a token is refused; a refused one asking `Expect: 100-continue` gets no 100.
    def head(extra: str, n: int) -> bytes:
        return (f"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n{extra}"
                f"Content-Length: {n}\r\n\r\n").encode()  # fmt: skip

    first, second = (usage("forms", {"org-a": v}).SerializeToString() for v in (10_000, 20_000))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head(f"Authorization: Bearer {t}\r\n", len(first)) + first + head("", len(second)) + second)
        answers = b""
        while answers.count(b"HTTP/1.1 ") < 2 and (chunk := s.recv(65536)):
            answers += chunk
    assert [line for line in answers.split(b"\r\n") if line.startswith(b"HTTP/")] == [
        b"HTTP/1.1 200 OK", b"HTTP/1.1 401 Unauthorized"]  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            head("Authorization: Bearer unknown-token-0000000\r\nExpect: 100-continue\r\n", len(second))
        )
        assert s.recv(100).startswith(b"HTTP/1.1 401 Unauthorized")
    # API and ingest tokens are separate lists.
    assert _raw_post(port, second, [f"Authorization: Bearer {API_TOKEN.token}"]).endswith(b"401 Unauthorized")
    r = requests.get(f"http://127.0.0.1:{stack.http_port}/api/v1/orgs/org-a/usage?metric=forms", timeout=30,
                     headers={"Authorization": f"Bearer {t}"})  # fmt: skip
    assert r.status_code == 401
    assert totals(stack, "forms") == {"org-a": 100 + 200 + 300 + 1000 + 10_000}


def test_rate_limit_under_concurrent_senders_on_both_transports_stores_exactly_what_was_accepted(
    stack_factory,
):
    """One token's bucket is shared by its connections on both transports; every answered request is
    either stored whole (200) or not at all (429 / RESOURCE_EXHAUSTED)."""
    stack = stack_factory(ingest_tokens=(TOKEN_A,), ingest_points_per_s=200, ingest_burst_points=300)
    accepted, limited, lock = [], [], threading.Lock()
    rng = random.Random(15)
    plans = [
        [[rng.randint(1, 10**12) for _ in range(rng.randint(1, 60))] for _ in range(8)] for _ in range(6)
    ]

    def sender(k: int) -> None:
        client = Http(stack) if k % 2 else Grpc(stack)
        for j, values in enumerate(plans[k]):
            req = sum_request({"rate.exact": [point(v, {"org.id": "org-a", "w": f"{k}-{j}-{i}"})
                                              for i, v in enumerate(values)]})  # fmt: skip
            if k % 2:
                status = client.send(req, TOKEN_A).status_code
                ok = status == 200
                assert status in (200, 429)
            else:
                try:
                    client.send(req, TOKEN_A)
                    ok = True
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    ok = False
            with lock:
                (accepted if ok else limited).append(sum(values))
        if not k % 2:
            client.close()

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert limited and accepted
    assert totals(stack, "rate.exact") == {"org-a": sum(accepted)}
    limited_count = stack.registry.get_sample_value(
        "meterhouse_limited_requests_total", {"reason": "ingest_rate"}
    )
    assert limited_count == len(limited)


def test_an_expired_client_certificate_is_refused_on_both_transports(stack_factory, pki):  # noqa: F811
    stack = stack_factory(ingest_tokens=(TOKEN_ALL,), **tls_options(pki))
    expired = pki["ca"].issue("expired-client", server=False, valid_from_days=-3, valid_days=2)
    with_expired = dict(pki, expired=expired)
    # TLS 1.3: the client may see its handshake fail or the connection closed right after it.
    with pytest.raises(requests.exceptions.ConnectionError):
        Http(stack, with_expired, client="expired").send(usage("expired.client", {"org-a": 1}), TOKEN_ALL)
    client = Grpc(stack, with_expired, client="expired")
    with pytest.raises(grpc.RpcError) as e:
        client.send(usage("expired.client", {"org-a": 2}), TOKEN_ALL)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    client.close()
    assert totals(stack, "expired.client") == {}


@pytest.mark.soak
def test_sighup_storm_with_a_broken_certificate_while_both_transports_send(up_factory, tmp_path):
    """Twenty SIGHUPs while HTTPS and gRPC/TLS senders run, the certificate file broken half-way: every
    request is answered 200, new connections keep the old certificate, each refusal is logged, and the
    stored total is what the senders were told was accepted."""
    ca = Authority(tmp_path / "pki", "ca")
    served = ca.issue("server", server=True)
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(served.cert, cert)
    shutil.copy(served.key, key)
    token = "ingest-token-storm-0000001"
    tokens = tmp_path / "ingest.yml"
    tokens.write_text(f"tokens: [{{token: {token}, orgs: ['*']}}]\n")
    config = tmp_path / "mh.yml"
    config.write_text(f"tls: {{cert_file: {cert}, key_file: {key}}}\n")
    up = up_factory("--config", str(config), env={"MH_INGEST_TOKENS_FILE": str(tokens)}, wait=False)
    api, verify = f"https://127.0.0.1:{up.http_port}", str(ca.ca_file)
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{api}/readyz", verify=verify, timeout=1).ok:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline and up.proc.poll() is None, up.output()[-3000:]
        time.sleep(0.2)
    sent, errors, stop = [0, 0], [], threading.Event()
    auth = f"Bearer {token}"

    def http_sender() -> None:
        session, i = requests.Session(), 0
        session.verify = verify
        while not stop.is_set():
            i += 1
            body = sum_request({"storm": [point(1000 + i, {"org.id": "o", "i": str(i)})]}).SerializeToString()
            try:
                r = session.post(f"https://127.0.0.1:{up.otlp_http_port}/v1/metrics", data=body, timeout=30,
                                 headers={"Content-Type": "application/x-protobuf", "Authorization": auth})  # fmt: skip
                if r.status_code == 200:
                    sent[0] += 1000 + i
                else:
                    errors.append(r.status_code)
            except requests.RequestException as e:
                errors.append(repr(e))

    def grpc_sender() -> None:
        channel = grpc.secure_channel(
            f"127.0.0.1:{up.otlp_grpc_port}", grpc.ssl_channel_credentials(ca.ca_file.read_bytes())
        )
        export, i = channel.unary_unary(EXPORT), 0
        while not stop.is_set():
            i += 1
            body = sum_request(
                {"storm": [point(10**6 + i, {"org.id": "o", "g": str(i)})]}
            ).SerializeToString()
            try:
                export(body, metadata=(("authorization", auth),), timeout=30)
                sent[1] += 10**6 + i
            except grpc.RpcError as e:
                errors.append(e.code())
        channel.close()

    threads = [threading.Thread(target=http_sender), threading.Thread(target=grpc_sender)]
    for t in threads:
        t.start()
    for k in range(20):
        time.sleep(0.15)
        if k == 10:
            cert.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        up.proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert requests.get(
        f"{api}/healthz", verify=verify, timeout=10
    ).ok  # a new connection, the old certificate
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    deadline = time.monotonic() + 30
    while (
        "\nmeterhouse_pending_points 0.0\n"
        not in requests.get(f"{api}/metrics", verify=verify, timeout=10).text
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = requests.get(f"{api}/api/v1/orgs/o/usage", params={"metric": "storm"}, verify=verify, timeout=30)
    assert r.json()["total"] == sum(sent) and sent[0] and sent[1]
    wait_until = time.monotonic() + 10
    while up.output().count("reload refused") < 1 and time.monotonic() < wait_until:
        time.sleep(0.1)
    out = up.output()
    assert "reload refused, still serving the previous tokens and certificates" in out
    assert token not in out
    assert up.stop() == 0
