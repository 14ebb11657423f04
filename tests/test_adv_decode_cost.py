"""Requests whose decoded cost the decode budget counted low (collector/decode.py ``decoded_cost``:
OTLP/JSON was four bytes per byte of text and 300 per ``{``; a resource's entity references were not
counted), sent at a real `meterhouse up` inside a memory cgroup limited to its budget, beside honest
senders (``run_attack``). Each had the process OOM-killed within seconds; both are counted now."""

from __future__ import annotations

import time
import uuid

import pytest
from google.protobuf.internal.encoder import _VarintBytes
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from test_decode_cost_attacks import run_attack

JSON = {"Content-Type": "application/json"}
_ONE_POINT = (
    '{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"attack.json","gauge":{"dataPoints":'
    '[{"asInt":"1","timeUnixNano":"1"}]}}]}]}]'
)


def json_unknown_lists_request(lists: int) -> bytes:
    """OTLP/JSON of one point beside an unknown field holding ``lists`` empty arrays: three bytes of text
    each (``[],``), no brace, so counted 12 bytes; ``json.loads`` builds every one (a list object and a
    pointer, 64-72 bytes) before the unknown field is ignored."""
    return (_ONE_POINT + f',"nonce":"{uuid.uuid4().hex}","x":[' + ",".join(["[]"] * lists) + "]}").encode()


@pytest.mark.soak  # the default suite has the walker's and the JSON counts (tests/collector/test_wire_cost.py)
@pytest.mark.timeout(300)
def test_json_empty_arrays_in_an_unknown_field_keep_the_process_in_its_budget(up_factory):
    """4 senders of OTLP/JSON with 6.6 million empty arrays in an unknown field (19.8 MB, 20 kB gzipped):
    counted 76 MiB, 470 MiB measured in ``bench.decode_cost --measure json`` (Python on malloc); two fit
    the decode budget (161 MiB) at once."""
    run_attack(up_factory, lambda: json_unknown_lists_request(6_600_000), senders=4, seconds=15, ctype=JSON)


def entity_refs_request(refs: int) -> bytes:
    """One histogram point (so the request takes the Python walk) and a second ResourceMetrics whose
    resource holds ``refs`` empty ``entity_refs`` (Resource field 3, two bytes each on the wire). The wire
    walker (``wire_cost``) does not count them (it reads a resource's attributes only), so they are
    counted as bytes (4 each); protobuf parses every one into a message."""
    r = ExportMetricsServiceRequest()
    rm = r.resource_metrics.add()
    rm.resource.attributes.add(key="org.id").value.string_value = "org-attack"
    rm.resource.attributes.add(key="nonce").value.string_value = uuid.uuid4().hex  # no two alike
    m = rm.scope_metrics.add().metrics.add(name="attack.h")
    m.histogram.aggregation_temporality = 1
    m.histogram.data_points.add(time_unix_nano=time.time_ns())
    resource = b"\x1a\x00" * refs
    resource_metrics = b"\x0a" + _VarintBytes(len(resource)) + resource
    return r.SerializeToString() + b"\x0a" + _VarintBytes(len(resource_metrics)) + resource_metrics


@pytest.mark.soak  # the default suite has the walker's and the JSON counts (tests/collector/test_wire_cost.py)
@pytest.mark.timeout(300)
def test_resource_entity_refs_keep_the_process_in_its_budget(up_factory):
    """4 senders of 9.9 million empty resource entity_refs (19.8 MB, 20 kB gzipped): counted 76 MiB,
    732 MiB measured in ``bench.decode_cost --measure protobuf`` (Python on malloc)."""
    run_attack(up_factory, lambda: entity_refs_request(9_900_000), senders=4, seconds=15)
