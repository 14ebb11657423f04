"""Adversary (adv28): a group that fails for memory, nothing of it landed, is given back to the spool and
grouped afresh under half its points and bytes (collector/writer.py ``Writer._halve``, collector/spool.py
``Spool.release``); a retry feeds the views one at a time (``Store.insert_in_doubt``). SIGKILL at moments
around the halving, restart on the same data directory, and compare every table's totals with what was
acknowledged: numbers beside cumulative sums and histograms in the same records."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import requests
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from otlp_builders import CUMULATIVE, kv, point
from test_adv_engine_share import stored_total
from test_group_over_engine_memory import assert_honest_usage_written

PROTOBUF = {"Content-Type": "application/x-protobuf"}
SEC = 10**9
REQUESTS, POINTS, KEYS = 16, 250, 126
#: The bound on an insert's distinct attribute keys taken away, so that these records group into inserts
#: that fail for memory, and the fallbacks under test (halving, one view at a time) are taken.
NO_KEY_BOUND = ("--max-insert-attribute-keys", str(10**9))


def mixed_request(k: int, t: int) -> bytes:
    """250 points of 126 distinct attribute keys (the engine-share attack: 16 of them grouped need more
    than the engine's share), one cumulative point of its own series and one histogram point."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(kv("service.name", "adv28"))
    sm = rm.scope_metrics.add()
    keys = sm.metrics.add(name="attack.keys", unit="1")
    keys.sum.aggregation_temporality, keys.sum.is_monotonic = 1, True
    first = k * POINTS
    keys.sum.data_points.extend(
        point(1, {"org.id": "org-attack", **{f"{i}.{j}": "" for j in range(KEYS)}}, t_ns=t, start_ns=t - SEC)
        for i in range(first, first + POINTS)
    )
    cum = sm.metrics.add(name="adv28.cumulative", unit="1")
    cum.sum.aggregation_temporality, cum.sum.is_monotonic = CUMULATIVE, True
    cum.sum.data_points.append(
        point(10 + k, {"org.id": "org-cum", "k": str(k)}, t_ns=t, start_ns=t - 60 * SEC)
    )
    hist = sm.metrics.add(name="adv28.latency", unit="ms")
    hist.histogram.aggregation_temporality = 1
    dp = hist.histogram.data_points.add(start_time_unix_nano=t - SEC, time_unix_nano=t)
    dp.count, dp.sum = k + 1, float(k)
    dp.bucket_counts.extend([k + 1, 0])
    dp.explicit_bounds.append(100.0)
    dp.attributes.append(kv("org.id", "org-hist"))
    dp.attributes.append(kv("k", str(k)))
    return req.SerializeToString()


EXPECTED = {
    "raw": {"attack.keys": REQUESTS * POINTS, "adv28.cumulative": sum(10 + k for k in range(REQUESTS))},
    "hourly": {"attack.keys": REQUESTS * POINTS, "adv28.cumulative": sum(10 + k for k in range(REQUESTS))},
    "by_metric": {"attack.keys": REQUESTS * POINTS, "adv28.cumulative": sum(10 + k for k in range(REQUESTS))},
    "hist_count": sum(k + 1 for k in range(REQUESTS)),
    "hist_points": REQUESTS,
}

READ = r"""
import json, sys
from pathlib import Path
from meterhouse.core.store import connect
s = connect("embedded", Path(sys.argv[1]), "meterhouse")
db = "meterhouse"
def by_metric(sql):
    return {m: int(v) for m, v in s.rows(sql)}
out = {
    "raw": by_metric(f"SELECT metric, sum(value_int) FROM {db}.usage_points WHERE kind = 'sum' GROUP BY metric"),
    "hourly": by_metric(f"SELECT metric, sum(value_int) FROM {db}.usage_hourly GROUP BY metric"),
    "by_metric": by_metric(f"SELECT metric, sum(value_int) FROM {db}.usage_hourly_by_metric GROUP BY metric"),
    "hist_count": int(s.scalar(f"SELECT sum(count) FROM {db}.distribution_points") or 0),
    "hist_points": int(s.scalar(f"SELECT count() FROM {db}.distribution_points") or 0),
}
print(json.dumps(out))
"""


def stored(data_dir) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", READ, str(data_dir)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for table in ("raw", "hourly", "by_metric"):
        got[table] = {m: v for m, v in got[table].items() if m in EXPECTED[table]}
    return got


def backlog(up_factory, data) -> object:
    """A first process that never flushes takes the 16 requests (acknowledged, in the spool) and is killed."""
    first = up_factory("--flush-interval-s", "3600", "--flush-max-bytes", str(1 << 30),
                       "--flush-max-points", "1000000", *NO_KEY_BOUND, data_dir=data)  # fmt: skip
    t = time.time_ns() - 30 * SEC
    for k in range(REQUESTS):
        r = requests.post(
            f"{first.otlp_http}/v1/metrics", data=mixed_request(k, t), headers=PROTOBUF, timeout=60
        )
        assert r.status_code == 200 and b"rejected" not in r.content, r.content[:300]
    first.stop(signal.SIGKILL)
    return first


def wait_for(up, text: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in up.output():
        assert time.monotonic() < deadline, up.output()[-3000:]
        assert up.proc.poll() is None, up.output()[-3000:]
        time.sleep(0.005)


@pytest.mark.soak  # kills at three moments, each a restart and a replay of a group failing for memory
@pytest.mark.e2e
@pytest.mark.timeout(400)
@pytest.mark.parametrize("delay_s", [0.0, 0.4, 1.5])
def test_a_kill_after_a_group_was_halved_loses_and_doubles_nothing(up_factory, tmp_path, delay_s):
    data = tmp_path / "d"
    first = backlog(up_factory, data)
    second = up_factory(*NO_KEY_BOUND, data_dir=data, ports_of=first, wait=False)
    wait_for(second, "grouped afresh, smaller")
    time.sleep(delay_s)
    second.stop(signal.SIGKILL)
    halved_before = second.output().count("grouped afresh, smaller")
    third = up_factory(*NO_KEY_BOUND, data_dir=data, ports_of=first)
    third.drain(240)
    third.stop()
    got = stored(data)
    assert got == EXPECTED, (halved_before, got)


READ_ALL = r"""
import json, sys
from pathlib import Path
from meterhouse.core.store import connect
s = connect("embedded", Path(sys.argv[1]), "meterhouse")
db = "meterhouse"
def pairs(sql):
    return {str(k): int(v) for k, v in s.rows(sql)}
print(json.dumps({
    "raw": pairs(f"SELECT metric, sum(value_int) FROM {db}.usage_points WHERE kind = 'sum' GROUP BY metric"),
    "raw_points": pairs(f"SELECT metric, count() FROM {db}.usage_points GROUP BY metric"),
    "hourly": pairs(f"SELECT metric, sum(value_int) FROM {db}.usage_hourly GROUP BY metric"),
    "hourly_points": pairs(f"SELECT metric, sum(points) FROM {db}.usage_hourly GROUP BY metric"),
    "by_metric": pairs(f"SELECT metric, sum(value_int) FROM {db}.usage_hourly_by_metric GROUP BY metric"),
    "orgs": pairs(f"SELECT org_id, sum(points) FROM {db}.org_last_seen GROUP BY org_id"),
    "catalog": pairs(f"SELECT metric, sum(points) FROM {db}.metric_catalog GROUP BY metric"),
    "dist": pairs(f"SELECT metric, sum(count) FROM {db}.distribution_points GROUP BY metric"),
}))
"""


def single_record_in_doubt(t: int) -> bytes:
    """The engine-share attack as one record (2,000 points of 126 distinct keys: fails for memory when all
    views are fed at once, fits one view at a time), with the cumulative and histogram points beside it."""
    req = ExportMetricsServiceRequest.FromString(mixed_request(0, t))
    pts = req.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points
    pts.extend(
        point(1, {"org.id": "org-attack", **{f"{i}.{j}": "" for j in range(KEYS)}}, t_ns=t, start_ns=t - SEC)
        for i in range(POINTS, 2000)
    )
    return req.SerializeToString()


@pytest.mark.soak  # five kills and restarts
@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_kills_while_a_group_in_doubt_goes_through_the_views_one_at_a_time(up_factory, tmp_path):
    """The group fails for memory on its first try (one record: not halved), so every later try, and every
    replay after a kill, feeds the views one at a time through the redo table. Killed at several moments
    inside those, then left to finish: every table holds the group exactly once."""
    data = tmp_path / "d"
    t = time.time_ns() - 30 * SEC
    first = up_factory(
        "--flush-interval-s", "3600", "--flush-max-points", "1000000", *NO_KEY_BOUND, data_dir=data
    )  # fmt: skip
    r = requests.post(
        f"{first.otlp_http}/v1/metrics", data=single_record_in_doubt(t), headers=PROTOBUF, timeout=60
    )
    assert r.status_code == 200 and b"rejected" not in r.content, r.content[:300]
    first.stop(signal.SIGKILL)
    second = up_factory(*NO_KEY_BOUND, data_dir=data, ports_of=first, wait=False)
    wait_for(second, "insert failed, will retry")
    second.stop(signal.SIGKILL)
    for delay_s in (0.3, 0.8, 1.5, 2.5, 4.0):
        again = up_factory(*NO_KEY_BOUND, data_dir=data, ports_of=first, wait=False)
        wait_for(again, "replaying spool")
        time.sleep(delay_s)
        again.stop(signal.SIGKILL)
    last = up_factory(*NO_KEY_BOUND, data_dir=data, ports_of=first)
    last.drain(240)
    last.stop()
    out = subprocess.run(
        [sys.executable, "-c", READ_ALL, str(data)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    expected = {
        "raw": {"attack.keys": 2000, "adv28.cumulative": 10},
        "raw_points": {"attack.keys": 2000, "adv28.cumulative": 1},
        "hourly": {"attack.keys": 2000, "adv28.cumulative": 10},
        "hourly_points": {"attack.keys": 2000, "adv28.cumulative": 1},
        "by_metric": {"attack.keys": 2000, "adv28.cumulative": 10},
        "orgs": {"org-attack": 2000, "org-cum": 1},  # the distributions feed no org row
        "catalog": {"attack.keys": 2000, "adv28.cumulative": 1, "adv28.latency": 1},
        "dist": {"adv28.latency": 1},
    }
    assert got == expected


def attack_only(k: int, t: int) -> bytes:
    req = ExportMetricsServiceRequest.FromString(mixed_request(k, t))
    del req.resource_metrics[0].scope_metrics[0].metrics[1:]
    return req.SerializeToString()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_records_of_many_distinct_keys_are_grouped_under_the_key_bound_and_none_fails_for_memory(
    up_factory, tmp_path
):
    """The adversary's case: 64 alike records (250 points of 126 distinct keys each, 31,500 keys, each
    fitting alone) sent to a process that flushes only at the byte bound (16 MiB) made one group there,
    whose first insert failed for memory "while pushing to view usage_points_mv" after views fired before
    it had landed: not halved (something landed), and fed one view at a time usage_points_mv alone needed
    256-260 MiB of the 256 MiB share: MEMORY_LIMIT_EXCEEDED on every try (139 tries in 6.5 minutes,
    nothing written, every later group behind it). The engine's memory grows with an insert's distinct
    attribute keys, which bytes undercount: groups are now bounded by the keys their records carry
    (32,768 at the default budget), so each of these records is an insert alone, and nothing fails for
    memory. Here 8 records and a byte bound of their size (the code before made one group of 7 of them, and
    halved it after it failed for memory)."""
    data = tmp_path / "d"
    t = time.time_ns() - 30 * SEC
    bodies = [attack_only(k, t) for k in range(8)]
    up = up_factory("--flush-interval-s", "10", "--flush-max-points", "1000000",
                    "--flush-max-bytes", str(8 * 341_000), data_dir=data)  # fmt: skip
    for body in bodies:
        r = requests.post(f"{up.otlp_http}/v1/metrics", data=body, headers=PROTOBUF, timeout=60)
        assert r.status_code == 200, r.content[:300]
    assert_honest_usage_written(up, 120)
    up.drain(120)
    metrics = requests.get(f"{up.api}/metrics", timeout=10).text
    up.stop()
    failures = [line[:300] for line in up.output().splitlines() if "insert failed" in line]
    assert not failures and "\nmeterhouse_groups_halved_total 0.0" in metrics, failures[:2]
    out = subprocess.run(
        [sys.executable, "-c", READ_ALL, str(data)], capture_output=True, text=True, timeout=120
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["raw"]["attack.keys"] == got["hourly"]["attack.keys"] == 8 * POINTS


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_request_with_more_distinct_attribute_keys_than_an_insert_may_hold_is_refused(up):
    """300 points of 126 distinct keys: 37,800 keys, past the 32,768 one insert may hold at the default
    budget (a 300 kB body, 400 kB as stored, inside every other bound): 413 with the reason, nothing
    kept; the same keys over two requests are taken."""
    t = time.time_ns() - 30 * SEC

    def wide(first: int, last: int) -> bytes:
        req = ExportMetricsServiceRequest.FromString(attack_only(0, t))
        pts = req.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points
        del pts[:]
        pts.extend(
            point(
                1, {"org.id": "org-attack", **{f"{i}.{j}": "" for j in range(KEYS)}}, t_ns=t, start_ns=t - SEC
            )
            for i in range(first, last)
        )
        return req.SerializeToString()

    r = requests.post(f"{up.otlp_http}/v1/metrics", data=wide(0, 300), headers=PROTOBUF, timeout=60)
    assert r.status_code == 413 and b"37800 distinct attribute keys" in r.content, (r.status_code, r.content)
    for body in (wide(0, 150), wide(150, 300)):
        r = requests.post(f"{up.otlp_http}/v1/metrics", data=body, headers=PROTOBUF, timeout=60)
        assert r.status_code == 200, r.content[:300]
    assert_honest_usage_written(up)
    up.drain(60)
    assert stored_total(up, "org-attack", "attack.keys") == 300
