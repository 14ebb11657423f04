"""Adversary (adv28): the connection bound's default is now a share of the memory budget: 2% at 16 KiB a
connection, 1,310 per port at the default 1 GiB (10,000 before), with 256 per client address. Idle
connections from six loopback addresses (each under the per-address bound) fill a port: does an honest
sender on 127.0.0.1 still get its usage in? ("one sender cannot stop the others")."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import requests
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from otlp_builders import point, sum_request

EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
PROTOBUF = {"Content-Type": "application/x-protobuf"}
#: Under --http-max-connections-per-address (256) from each of six addresses: 1,500 in all.
ADDRESSES, PER_ADDRESS = [f"127.0.0.{i}" for i in range(2, 8)], 250


@contextmanager
def idle_connections(port: int) -> Iterator[list[socket.socket]]:
    """Connections that send nothing, from each of ADDRESSES (the attacker's), open while in the block."""
    held = []
    try:
        for address in ADDRESSES:
            for _ in range(PER_ADDRESS):
                s = socket.socket()
                s.bind((address, 0))
                try:
                    s.connect(("127.0.0.1", port))
                except OSError:
                    s.close()
                    continue
                held.append(s)
        time.sleep(1.0)  # every accept handled
        yield held
    finally:
        for s in held:
            s.close()


def honest_request() -> bytes:
    return sum_request({"honest.calls": [point(5, {"org.id": "org-honest"})]}).SerializeToString()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_idle_connections_from_six_addresses_do_not_lock_out_an_honest_otlp_http_sender(up):
    with idle_connections(up.otlp_http_port) as held:
        try:
            r = requests.post(
                f"{up.otlp_http}/v1/metrics", data=honest_request(), headers=PROTOBUF, timeout=10
            )
            answer = (r.status_code, r.content[:80])
        except requests.RequestException as e:
            answer = (0, repr(e)[:120].encode())
        assert answer[0] == 200, f"{len(held)} idle connections held; the honest sender got {answer}"


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_idle_connections_from_six_addresses_do_not_lock_out_the_api_health_checks(up):
    """The API port has the same bound: a supervisor's /healthz (or a dashboard's query) is refused."""
    with idle_connections(up.http_port) as held:
        try:
            answer = requests.get(f"{up.api}/healthz", timeout=10).status_code
        except requests.RequestException as e:
            answer = repr(e)[:120]
        assert answer == 200, f"{len(held)} idle connections held; /healthz got {answer}"


@pytest.mark.soak
@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_idle_connections_from_six_addresses_do_not_lock_out_an_honest_grpc_sender(up):
    """These never send the HTTP/2 preface; at --grpc-max-connections the longest idle is closed to make
    room. (grpcio's server closed every new connection at its bound while these lived up to its 120 s
    handshake timeout.)"""
    with idle_connections(up.otlp_grpc_port) as held, grpc.insecure_channel(up.otlp_grpc) as channel:
        export = channel.unary_unary(
            EXPORT,
            request_serializer=ExportMetricsServiceRequest.SerializeToString,
            response_deserializer=ExportMetricsServiceResponse.FromString,
        )
        try:
            export(ExportMetricsServiceRequest.FromString(honest_request()), timeout=10)
            answer = "OK"
        except grpc.RpcError as e:
            answer = f"{e.code()}: {e.details()}"[:160]
        assert answer == "OK", f"{len(held)} idle connections held; the honest call got {answer}"
