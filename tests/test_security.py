"""Ingest security end to end, over both transports: tokens, org scope, TLS and mutual TLS with a CA
made at test time, the real OpenTelemetry SDK over HTTPS and gRPC with TLS, the ingest rate limit and
the series limit (whole stacks in this process on loopback ports, real embedded ClickHouse)."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import grpc
import pytest
import requests
from certs import Authority
from conftest import drain
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from otlp_builders import point, sum_request

from meterhouse.core.config import Token

TOKEN_A = Token("ingest-token-org-a-000001", ("org-a",))
TOKEN_B = Token("ingest-token-org-b-000002", ("org-b",))
TOKEN_ALL = Token("ingest-token-everyone-03", ("*",))
API_TOKEN = Token("api-token-billing-0000004", ("*",))
EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
PROTOBUF = {"Content-Type": "application/x-protobuf"}


@pytest.fixture(autouse=True)
def no_ca_bundle_from_the_environment(monkeypatch):
    """requests (and the SDK's HTTP exporter through it) prefers REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE
    over a session's own ``verify``: the tests' CA must be the one used."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = Authority(d, "ca")
    rogue = Authority(d, "rogue")
    return {
        "ca": ca,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "rogue_client": rogue.issue("client", server=False),
    }


def tls_options(pki, mutual: bool = True) -> dict:
    opts = {"tls_cert_file": str(pki["server"].cert), "tls_key_file": str(pki["server"].key)}
    if mutual:
        opts["tls_client_ca_file"] = str(pki["ca"].ca_file)
    return opts


def totals(stack, metric: str) -> dict[str, int]:
    drain(stack)
    store = stack.collector.endpoints.endpoints[0].store
    rows = store.rows(
        f"SELECT org_id, sum(value_int) FROM {store.database}.usage_points WHERE metric = {{m:String}} "
        "GROUP BY org_id",
        {"m": metric},
    )
    return {org: int(v) for org, v in rows}


# -- plain clients of both transports ---------------------------------------------------------------
class Http:
    def __init__(self, stack, pki=None, client: str | None = "client") -> None:
        tls = stack.tls is not None
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{stack.collector.http.port}/v1/metrics"
        self.session = requests.Session()
        if tls:
            self.session.verify = str(pki["ca"].ca_file)
            if client:
                self.session.cert = (str(pki[client].cert), str(pki[client].key))

    def send(self, request: ExportMetricsServiceRequest, token: Token | None):
        headers = dict(PROTOBUF, **({"Authorization": f"Bearer {token.token}"} if token else {}))
        r = self.session.post(self.url, data=request.SerializeToString(), headers=headers, timeout=30)
        return r


class Grpc:
    def __init__(self, stack, pki=None, client: str | None = "client") -> None:
        target = f"127.0.0.1:{stack.collector.grpc.port}"
        if stack.tls is not None:
            creds = grpc.ssl_channel_credentials(
                pki["ca"].ca_file.read_bytes(),
                pki[client].key.read_bytes() if client else None,
                pki[client].cert.read_bytes() if client else None,
            )
            self.channel = grpc.secure_channel(target, creds)
        else:
            self.channel = grpc.insecure_channel(target)
        self.export = self.channel.unary_unary(
            EXPORT,
            request_serializer=ExportMetricsServiceRequest.SerializeToString,
            response_deserializer=ExportMetricsServiceResponse.FromString,
        )

    def send(self, request: ExportMetricsServiceRequest, token: Token | None):
        metadata = (("authorization", f"Bearer {token.token}"),) if token else ()
        return self.export(request, metadata=metadata, timeout=30)

    def close(self) -> None:
        self.channel.close()


def usage(metric: str, orgs: dict[str, int]) -> ExportMetricsServiceRequest:
    return sum_request({metric: [point(v, {"org.id": org, "feature": "x"}) for org, v in orgs.items()]})


# -- tokens and org scope -----------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_without_or_with_an_unknown_token_nothing_is_kept(stack_factory, transport):
    stack = stack_factory(ingest_tokens=(TOKEN_A, TOKEN_ALL))
    metric = f"unauth.{transport}"
    bad = [None, Token("not-a-configured-token-00", ("*",)), Token(TOKEN_A.token + "x", ("*",))]
    if transport == "http":
        client = Http(stack)
        for token in bad:
            r = client.send(usage(metric, {"org-a": 5}), token)
            assert r.status_code == 401, r.text
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert TOKEN_A.token not in r.text
        # Raw header forms that are not a bearer token.
        r = client.session.post(client.url, data=usage(metric, {"org-a": 5}).SerializeToString(),
                                headers=dict(PROTOBUF, Authorization=TOKEN_A.token), timeout=30)  # fmt: skip
        assert r.status_code == 401
        assert client.send(usage(metric, {"org-a": 7}), TOKEN_A).status_code == 200
    else:
        client = Grpc(stack)
        for token in bad:
            with pytest.raises(grpc.RpcError) as e:
                client.send(usage(metric, {"org-a": 5}), token)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        client.send(usage(metric, {"org-a": 7}), TOKEN_A)
        client.close()
    assert totals(stack, metric) == {"org-a": 7}
    outcome = stack.registry.get_sample_value(
        "meterhouse_requests_total", {"transport": transport, "outcome": "unauthenticated"}
    )
    assert outcome == (4 if transport == "http" else 3)


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_org_a_token_sending_org_a_and_org_b_keeps_org_a_and_rejects_org_b(stack_factory, transport):
    stack = stack_factory(ingest_tokens=(TOKEN_A, TOKEN_ALL))
    metric = f"scope.{transport}"
    request = usage(metric, {"org-a": 11, "org-b": 13})
    if transport == "http":
        r = Http(stack).send(request, TOKEN_A)
        assert r.status_code == 200
        answer = ExportMetricsServiceResponse.FromString(r.content)
    else:
        client = Grpc(stack)
        answer = client.send(request, TOKEN_A)
        client.close()
    assert answer.partial_success.rejected_data_points == 1
    assert "org_not_allowed" in answer.partial_success.error_message
    assert totals(stack, metric) == {"org-a": 11}
    assert (
        stack.registry.get_sample_value("meterhouse_points_rejected_total", {"reason": "org_not_allowed"})
        == 1
    )
    # The same bytes from a token allowed for both orgs are another request: org-b's point, refused
    # before, is kept now; org-a's is the same point again (its identity), so it counts once.
    if transport == "http":
        assert Http(stack).send(request, TOKEN_ALL).status_code == 200
    else:
        client = Grpc(stack)
        assert not client.send(request, TOKEN_ALL).HasField("partial_success")
        client.close()
    assert totals(stack, metric) == {"org-a": 11, "org-b": 13}


# -- TLS and mutual TLS, with the real SDK --------------------------------------------------------------
def sdk_provider(stack, pki, transport: str, token: Token):
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter
    from opentelemetry.sdk.metrics import Counter, MeterProvider
    from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader

    headers = {"authorization": f"Bearer {token.token}"}
    prefs = {Counter: AggregationTemporality.DELTA}
    client = pki["client"]
    if transport == "grpc":
        creds = grpc.ssl_channel_credentials(
            pki["ca"].ca_file.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
        )
        exporter = GrpcExporter(endpoint=f"127.0.0.1:{stack.collector.grpc.port}", insecure=False,
                                credentials=creds, headers=headers, preferred_temporality=prefs)  # fmt: skip
    else:
        exporter = HttpExporter(
            endpoint=f"https://127.0.0.1:{stack.collector.http.port}/v1/metrics",
            certificate_file=str(pki["ca"].ca_file),
            client_certificate_file=str(client.cert),
            client_key_file=str(client.key),
            headers=headers,
            preferred_temporality=prefs,
        )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    return MeterProvider(metric_readers=[reader])


def test_sdk_over_https_and_grpc_with_mutual_tls_and_tokens(stack_factory, pki):
    stack = stack_factory(ingest_tokens=(TOKEN_A, TOKEN_ALL), auth_tokens=(API_TOKEN,), **tls_options(pki))
    for transport in ("http", "grpc"):
        p = sdk_provider(stack, pki, transport, TOKEN_ALL)
        counter = p.get_meter("t").create_counter(f"tls.{transport}")
        for i in range(3):
            counter.add(2**40 + i, {"org.id": "org-a"})
            counter.add(7, {"org.id": "org-b"})
            assert p.force_flush(30_000)
        p.shutdown()
        assert totals(stack, f"tls.{transport}") == {"org-a": 3 * 2**40 + 3, "org-b": 21}
    # The API is served over the same TLS, with its own tokens.
    api = f"https://127.0.0.1:{stack.http_port}"
    mtls = {"verify": str(pki["ca"].ca_file), "cert": (str(pki["client"].cert), str(pki["client"].key))}
    now = int(time.time())
    r = requests.get(f"{api}/api/v1/orgs/org-b/usage", params={"metric": "tls.grpc", "from": now - 7200,
                     "to": now + 7200}, headers={"Authorization": f"Bearer {API_TOKEN.token}"},
                     timeout=30, **mtls)  # fmt: skip
    assert r.status_code in (200, 400), r.text  # served over TLS (parameters aside)
    r = requests.get(f"{api}/api/v1/orgs/org-b/usage?metric=tls.grpc", timeout=30,
                     headers={"Authorization": f"Bearer {API_TOKEN.token}"}, **mtls)  # fmt: skip
    assert r.status_code == 200 and r.json()["total"] == 21
    assert requests.get(f"{api}/healthz", timeout=30, **mtls).status_code == 200


@pytest.mark.parametrize("listener", ["otlp_http", "otlp_grpc", "api"])
def test_tls_ports_serve_no_plain_text_and_require_a_client_certificate_from_the_ca(
    stack_factory, pki, listener
):
    stack = stack_factory(ingest_tokens=(TOKEN_ALL,), **tls_options(pki))
    port = {"otlp_http": stack.collector.http.port, "otlp_grpc": stack.collector.grpc.port,
            "api": stack.http_port}[listener]  # fmt: skip
    # Plain HTTP to the TLS port: no HTTP answer.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = s.recv(100)
        except (ConnectionResetError, TimeoutError):
            answer = b""
        assert not answer.startswith(b"HTTP/"), answer
    # TLS without a client certificate, or with one from another CA: the handshake fails.
    for client in (None, "rogue_client"):
        ctx = ssl.create_default_context(cafile=str(pki["ca"].ca_file))
        if client:
            ctx.load_cert_chain(str(pki[client].cert), str(pki[client].key))
        if listener == "otlp_grpc":
            ctx.set_alpn_protocols(["h2"])
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # TLS 1.3: refused on first use
                    if not s.recv(100):
                        raise ConnectionResetError("closed")
    # The right client certificate works.
    ctx = ssl.create_default_context(cafile=str(pki["ca"].ca_file))
    ctx.load_cert_chain(str(pki["client"].cert), str(pki["client"].key))
    if listener == "otlp_grpc":
        ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")


def test_grpc_without_tls_or_without_client_certificate_is_refused(stack_factory, pki):
    stack = stack_factory(ingest_tokens=(TOKEN_ALL,), **tls_options(pki))
    plain = grpc.insecure_channel(f"127.0.0.1:{stack.collector.grpc.port}")
    no_cert = Grpc(stack, pki, client=None)
    for export in (plain.unary_unary(EXPORT), no_cert.export):
        with pytest.raises(grpc.RpcError) as e:
            export(usage("x", {"org-a": 1}).SerializeToString() if export is not no_cert.export
                   else usage("x", {"org-a": 1}), timeout=5, metadata=(("authorization", f"Bearer {TOKEN_ALL.token}"),))  # fmt: skip
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    plain.close()
    no_cert.close()
    assert totals(stack, "x") == {}


# -- reload -----------------------------------------------------------------------------------------------
def test_reload_swaps_tokens_and_certificates_keeping_open_connections(stack_factory, pki, tmp_path):
    import dataclasses

    stack = stack_factory(ingest_tokens=(TOKEN_A,), **tls_options(pki, mutual=False))
    http, g = Http(stack, pki), Grpc(stack, pki)
    assert http.send(usage("reload", {"org-a": 1}), TOKEN_A).status_code == 200
    g.send(usage("reload", {"org-a": 2}), TOKEN_A)
    # New certificate from a new CA, TOKEN_A removed, TOKEN_B added.
    ca2 = Authority(tmp_path / "pki2", "ca2")
    server2 = ca2.issue("server", server=True)
    config = dataclasses.replace(stack.config, ingest_tokens=(TOKEN_B,), tls_cert_file=str(server2.cert),
                                 tls_key_file=str(server2.key))  # fmt: skip
    stack.reload(config)
    # Open connections stay open (a new one would not verify with the old CA); the new tokens apply at once.
    assert http.send(usage("reload", {"org-b": 8}), TOKEN_B).status_code == 200
    g.send(usage("reload", {"org-b": 16}), TOKEN_B)
    assert http.send(usage("reload", {"org-a": 4}), TOKEN_A).status_code == 401
    with pytest.raises(grpc.RpcError) as e:
        g.send(usage("reload", {"org-a": 32}), TOKEN_A)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # New connections get the new certificate: the old CA no longer verifies it.
    with pytest.raises(requests.exceptions.SSLError):
        Http(stack, pki).send(usage("reload", {"org-b": 64}), TOKEN_B)
    fresh = requests.post(http.url, data=usage("reload", {"org-b": 128}).SerializeToString(), timeout=30,
                          headers=dict(PROTOBUF, Authorization=f"Bearer {TOKEN_B.token}"), verify=str(ca2.ca_file))  # fmt: skip
    assert fresh.status_code == 200
    g2 = grpc.secure_channel(f"127.0.0.1:{stack.collector.grpc.port}",
                             grpc.ssl_channel_credentials(ca2.ca_file.read_bytes()))  # fmt: skip
    g2.unary_unary(EXPORT)(usage("reload", {"org-b": 256}).SerializeToString(), timeout=30,
                           metadata=(("authorization", f"Bearer {TOKEN_B.token}"),))  # fmt: skip
    g.close()
    g2.close()
    assert totals(stack, "reload") == {"org-a": 3, "org-b": 8 + 16 + 128 + 256}
    # API tokens are reloaded too.
    api = f"https://127.0.0.1:{stack.http_port}/api/v1/orgs/org-b/usage?metric=reload"
    assert requests.get(api, verify=str(ca2.ca_file), timeout=30).status_code == 200  # open API
    stack.reload(dataclasses.replace(config, auth_tokens=(API_TOKEN,)))
    assert requests.get(api, verify=str(ca2.ca_file), timeout=30).status_code == 401
    r = requests.get(
        api, verify=str(ca2.ca_file), timeout=30, headers={"Authorization": f"Bearer {API_TOKEN.token}"}
    )
    assert r.status_code == 200 and r.json()["total"] == 8 + 16 + 128 + 256


# -- limits -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_flood_from_one_token_is_answered_retryable_while_another_token_is_served(stack_factory, transport):
    stack = stack_factory(ingest_tokens=(TOKEN_A, TOKEN_B), ingest_points_per_s=5, ingest_burst_points=40)
    metric = f"flood.{transport}"
    client = Http(stack) if transport == "http" else Grpc(stack)
    limited = served_a = 0
    retry_after = set()
    for _ in range(30):  # 30 requests of 10 points at once: the burst of 40 lets 4 through
        request = sum_request({metric: [point(1, {"org.id": "org-a", "i": str(i)}) for i in range(10)]})
        if transport == "http":
            r = client.send(request, TOKEN_A)
            if r.status_code == 429:
                limited += 1
                retry_after.add(int(r.headers["Retry-After"]))
                assert "rate limit" in r.text
            else:
                assert r.status_code == 200
                served_a += 1
        else:
            try:
                client.send(request, TOKEN_A)
                served_a += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                trailers = dict(e.trailing_metadata())
                info = error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
                status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
                assert status.details[0].Is(error_details_pb2.RetryInfo.DESCRIPTOR)
                retry_after.add(info.retry_delay.seconds)
                limited += 1
        # Meanwhile the other token is served.
        other = usage(metric, {"org-b": 1})
        if transport == "http":
            assert client.send(other, TOKEN_B).status_code == 200
        else:
            client.send(other, TOKEN_B)
    assert limited >= 20 and served_a >= 4 and retry_after and min(retry_after) >= 1
    assert totals(stack, metric) == {"org-a": 10 * served_a, "org-b": 30}
    assert (
        stack.registry.get_sample_value("meterhouse_limited_requests_total", {"reason": "ingest_rate"})
        == limited
    )


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_rate_limited_sdk_retries_and_nothing_is_lost(stack_factory, transport):
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter
    from opentelemetry.sdk.metrics import Counter, MeterProvider
    from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader

    stack = stack_factory(ingest_tokens=(TOKEN_A,), ingest_points_per_s=50, ingest_burst_points=50)
    prefs = {Counter: AggregationTemporality.DELTA}
    if transport == "http":
        exporter = HttpExporter(endpoint=f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics",
                                headers={"authorization": f"Bearer {TOKEN_A.token}"}, preferred_temporality=prefs)  # fmt: skip
    else:
        exporter = GrpcExporter(endpoint=f"127.0.0.1:{stack.collector.grpc.port}", insecure=True,
                                headers={"authorization": f"Bearer {TOKEN_A.token}"}, preferred_temporality=prefs)  # fmt: skip
    p = MeterProvider(
        metric_readers=[PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)]
    )
    c = p.get_meter("t").create_counter("retried")
    expected = 0
    for i in range(3):  # 40 points a flush: the second one finds the bucket short and is sent again
        for j in range(40):
            c.add(i + 1, {"org.id": "org-a", "j": str(j)})
            expected += i + 1
        assert p.force_flush(60_000)
    p.shutdown()
    assert totals(stack, "retried") == {"org-a": expected}
    assert (
        stack.registry.get_sample_value("meterhouse_limited_requests_total", {"reason": "ingest_rate"}) >= 1
    )


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_500_attribute_sets_under_a_limit_of_100_keep_the_total_exact(stack_factory, transport):
    stack = stack_factory(series_per_org_metric=100)
    metric = f"series.{transport}"
    client = Http(stack) if transport == "http" else Grpc(stack)
    expected = 0
    for batch in range(5):
        points = [
            point(i * 1000 + 7, {"org.id": "org-a", "session": f"s-{batch * 100 + i}"}) for i in range(100)
        ]
        expected += sum(i * 1000 + 7 for i in range(100))
        r = client.send(sum_request({metric: points}), None)
        assert transport == "grpc" or r.status_code == 200
    # Another org has its own 100.
    client.send(usage(metric, {"org-b": 3}), None)
    store = stack.collector.endpoints.endpoints[0].store
    assert totals(stack, metric) == {"org-a": expected, "org-b": 3}
    sets = store.scalar(f"SELECT uniqExact(attributes) FROM {store.database}.usage_points "
                        "WHERE org_id = 'org-a' AND metric = {m:String}", {"m": metric})  # fmt: skip
    assert sets == 101
    overflow = store.scalar(f"SELECT sum(value_int) FROM {store.database}.usage_points WHERE org_id = 'org-a' "
                            "AND attributes['otel.metric.overflow'] = 'true' AND metric = {m:String}", {"m": metric})  # fmt: skip
    assert overflow == expected - sum(i * 1000 + 7 for i in range(100))
    assert stack.registry.get_sample_value("meterhouse_series_folded_total") == 400
    hourly = store.scalar(f"SELECT sum(value_int) FROM {store.database}.usage_hourly WHERE org_id = 'org-a' "
                          "AND metric = {m:String}", {"m": metric})  # fmt: skip
    assert hourly == expected


def test_a_restart_does_not_admit_more_attribute_sets(stack_factory, tmp_path):
    first = stack_factory(series_per_org_metric=10, data_dir=tmp_path / "d")
    client = Http(first)
    client.send(sum_request({"restart": [point(1, {"org.id": "o", "k": str(i)}) for i in range(8)]}), None)
    drain(first)
    first.shutdown(5)
    second = stack_factory(series_per_org_metric=10, data_dir=tmp_path / "d2", database=first.config.database)
    Http(second).send(
        sum_request({"restart": [point(1, {"org.id": "o", "k": f"new-{i}"}) for i in range(8)]}), None
    )
    drain(second)
    store = second.collector.endpoints.endpoints[0].store
    sets = store.scalar(
        f"SELECT uniqExact(attributes) FROM {store.database}.usage_points WHERE metric = 'restart'"
    )
    assert sets == 11  # 8 before, 2 more up to the limit, and the overflow series
    assert totals(second, "restart") == {"o": 16}


def test_concurrent_senders_of_one_org_never_exceed_the_limit(stack_factory):
    stack = stack_factory(series_per_org_metric=50)
    errors = []

    def send(k: int) -> None:
        try:
            c = Http(stack)
            for b in range(5):
                pts = [point(1, {"org.id": "o", "s": f"{k}-{b}-{i}"}) for i in range(20)]
                assert c.send(sum_request({"conc": pts}), None).status_code == 200
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = stack.collector.endpoints.endpoints[0].store
    assert totals(stack, "conc") == {"o": 400}
    assert (
        store.scalar(f"SELECT uniqExact(attributes) FROM {store.database}.usage_points WHERE metric = 'conc'")
        == 51
    )


def test_reload_of_the_client_ca_applies_to_new_connections_on_every_listener(stack_factory, pki, tmp_path):
    import dataclasses

    stack = stack_factory(ingest_tokens=(TOKEN_ALL,), **tls_options(pki))
    ca2 = Authority(tmp_path / "pki2", "ca2")
    client2 = ca2.issue("client", server=False)
    stack.reload(dataclasses.replace(stack.config, tls_client_ca_file=str(ca2.ca_file)))
    pki2 = dict(pki, client=client2)
    # Old client certificate: refused on new connections (with TLS 1.3 the client sees the connection
    # closed after its handshake); the new CA's: served.
    with pytest.raises(requests.exceptions.ConnectionError):
        Http(stack, pki).send(usage("ca", {"org-a": 1}), TOKEN_ALL)
    assert Http(stack, pki2).send(usage("ca", {"org-a": 2}), TOKEN_ALL).status_code == 200
    old, new = Grpc(stack, pki), Grpc(stack, pki2)
    with pytest.raises(grpc.RpcError):
        old.send(usage("ca", {"org-a": 4}), TOKEN_ALL)
    new.send(usage("ca", {"org-a": 8}), TOKEN_ALL)
    old.close()
    new.close()
    api = f"https://127.0.0.1:{stack.http_port}/healthz"
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(
            api,
            verify=str(pki["ca"].ca_file),
            cert=(str(pki["client"].cert), str(pki["client"].key)),
            timeout=10,
        )
    assert requests.get(
        api, verify=str(pki["ca"].ca_file), cert=(str(client2.cert), str(client2.key)), timeout=10
    ).ok
    assert totals(stack, "ca") == {"org-a": 10}
    # Turning mutual TLS off is refused by a reload (it needs a restart); nothing changes.
    from meterhouse.core.config import ConfigError

    with pytest.raises(ConfigError, match="needs a restart"):
        stack.reload(dataclasses.replace(stack.config, tls_client_ca_file=""))
    assert Http(stack, pki2).send(usage("ca", {"org-a": 16}), TOKEN_ALL).status_code == 200


def test_a_reload_never_opens_ingest_or_the_api_and_a_refused_one_changes_nothing(
    stack_factory, pki, tmp_path
):
    """Dropping every ingest (or API) token by a reload would serve anyone, like turning TLS off: it
    needs a restart. A refused reload changes nothing, the certificate included."""
    import dataclasses

    from meterhouse.core.config import ConfigError

    stack = stack_factory(
        ingest_tokens=(TOKEN_A,), auth_tokens=(API_TOKEN,), **tls_options(pki, mutual=False)
    )
    server2 = Authority(tmp_path / "pki2", "ca2").issue("server", server=True)
    new_cert = {"tls_cert_file": str(server2.cert), "tls_key_file": str(server2.key)}
    for change in ({"ingest_tokens": ()}, {"auth_tokens": ()}):
        with pytest.raises(ConfigError, match="restart"):
            stack.reload(dataclasses.replace(stack.config, **change, **new_cert))
    client = Http(stack, pki)  # a new connection: still the old certificate
    assert client.send(usage("reopen", {"org-a": 1}), None).status_code == 401
    assert client.send(usage("reopen", {"org-a": 2}), TOKEN_A).status_code == 200
    api = f"https://127.0.0.1:{stack.http_port}/api/v1/orgs/org-a/usage?metric=reopen"
    assert requests.get(api, verify=str(pki["ca"].ca_file), timeout=30).status_code == 401
    assert totals(stack, "reopen") == {"org-a": 2}


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_more_than_one_authorization_header_is_refused_on_both_transports(stack_factory, transport):
    """Which of two Authorization values counts would be a guess (HTTP took the last, gRPC the first;
    proxies guess as they like): a request carrying more than one is refused, and nothing is kept."""
    import http.client

    stack = stack_factory(ingest_tokens=(TOKEN_A, TOKEN_B))
    metric = f"twice.{transport}"
    pairs = [(TOKEN_A, TOKEN_B), (TOKEN_B, TOKEN_A), (TOKEN_A, TOKEN_A)]
    for i, (first, second) in enumerate(pairs):
        body = usage(metric, {"org-a": 10**i}).SerializeToString()
        if transport == "http":
            conn = http.client.HTTPConnection("127.0.0.1", stack.collector.http.port, timeout=30)
            conn.putrequest("POST", "/v1/metrics")
            conn.putheader("Content-Type", PROTOBUF["Content-Type"])
            conn.putheader("Content-Length", str(len(body)))
            conn.putheader("Authorization", f"Bearer {first.token}")
            conn.putheader("Authorization", f"Bearer {second.token}")
            conn.endheaders(body)
            answer = conn.getresponse()
            assert answer.status == 401, (first, second)
            assert b"more than one" in answer.read()
            conn.close()
        else:
            channel = grpc.insecure_channel(f"127.0.0.1:{stack.collector.grpc.port}")
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary(EXPORT)(body, timeout=30, metadata=(
                    ("authorization", f"Bearer {first.token}"), ("authorization", f"Bearer {second.token}")))  # fmt: skip
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "more than one" in e.value.details()
            channel.close()
    assert totals(stack, metric) == {}
    # Open ingest (no tokens) does not look at the header at all.
    open_stack = stack_factory()
    conn = http.client.HTTPConnection("127.0.0.1", open_stack.collector.http.port, timeout=30)
    body = usage(metric, {"org-a": 5}).SerializeToString()
    conn.request("POST", "/v1/metrics", body, {"Content-Type": PROTOBUF["Content-Type"]})
    assert conn.getresponse().status == 200
    conn.close()


def test_a_reload_to_an_expired_certificate_is_refused_and_the_old_one_served(stack_factory, pki, tmp_path):
    import dataclasses

    from meterhouse.core.config import ConfigError

    stack = stack_factory(ingest_tokens=(TOKEN_ALL,), **tls_options(pki))
    expired = pki["ca"].issue("expired", server=True, valid_from_days=-3, valid_days=2)
    with pytest.raises(ConfigError, match="expired"):
        stack.reload(
            dataclasses.replace(stack.config, tls_cert_file=str(expired.cert), tls_key_file=str(expired.key))
        )
    assert (
        Http(stack, pki).send(usage("expired", {"org-a": 3}), TOKEN_ALL).status_code == 200
    )  # a new connection
    client = Grpc(stack, pki)
    client.send(usage("expired", {"org-a": 4}), TOKEN_ALL)
    client.close()
    assert totals(stack, "expired") == {"org-a": 7}
