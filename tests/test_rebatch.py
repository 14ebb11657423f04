"""A point counts once by its identity, whatever request brings it: real SDKs (Python and JS) export
delta counters through a re-batching forwarder (tests/rebatch_proxy.py, an OpenTelemetry Collector with
a persistent queue, made adversarial) that regroups the points into other requests, loses answers on
purpose, and after a restart sends again what was not done and a sample of what was. The forwarder and
`meterhouse up` are each SIGKILLed and restarted while the SDKs send. At the end, per org, what the
exporters saw acknowledged equals what meterhouse stores, in the raw table and in the hourly rollup.

First the raw table is read by point identity (stream and interval): its distinct points must add up
to what was exported and every copy of a point carry the same value, so the forwarder lost and altered
nothing, and a surplus in the totals after that is points counted twice. The same run with
``--passthrough`` (each request forwarded byte for byte, re-sends included) is the control: there,
deduplicating identical requests is enough. Values, kill moments and the forwarder's choices are
seeded; the processes' timing is not, so the numbers of copies vary from run to run.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter as Tally
from pathlib import Path

import pytest
import requests
from conftest import ROOT, UpProcess, free_port
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from test_conformance import TallyExporter
from test_otlp_js import node_packages  # noqa: F401 - a fixture: the JS SDK installed

from meterhouse.demo import fetch_usage

#: Per org, from the raw table of a stopped `meterhouse up`: rows, distinct point identities (stream and
#: interval), identities whose copies differ in value, and the total over distinct identities.
IDENTITIES = """
import json, sys
from pathlib import Path
from meterhouse.core.config import Config
from meterhouse.core.store import open_store
store = open_store(Config(data_dir=Path(sys.argv[1])))
rows = store.rows(f'''
    SELECT org_id, sum(n), count(), countIf(values > 1), toString(sum(vi)), sum(vd) FROM (
        SELECT org_id, count() AS n, uniqExact(value_int, value_double) AS values,
               any(value_int) AS vi, any(value_double) AS vd
        FROM {store.database}.usage_points
        GROUP BY org_id, metric, kind, unit, temporality, monotonic, scope_name, scope_version, resource,
                 attributes, start_time, time)
    GROUP BY org_id''')
print(json.dumps({org: {"rows": n, "identities": ids, "conflicting": c, "total": int(vi) + vd}
                  for org, n, ids, c, vi, vd in rows}))
"""
pytestmark = pytest.mark.e2e
PROXY = ROOT / "tests" / "rebatch_proxy.py"
HOUR = 3600
PY_ORGS = [f"py-{i}" for i in range(4)]
JS_APPS = (("proto", "gzip", "jsp"), ("json", "none", "jsj"))  # protocol, compression, org prefix


class Proxy:
    """tests/rebatch_proxy.py as a subprocess on a free port; SIGKILLed and restarted on the same queue."""

    def __init__(self, queue: Path, up: UpProcess, seed: int, *flags: str) -> None:
        self.queue, self.up, self.seed, self.flags = queue, up, seed, flags
        self.port = free_port()
        self.log_path = queue.with_suffix(".log")
        self.proc: subprocess.Popen | None = None
        self.lives: list[dict] = []  # each run's last status: what it received, forwarded, lost, ...

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/metrics"

    def start(self) -> Proxy:
        cmd = [sys.executable, str(PROXY), "--listen-port", str(self.port), "--queue", str(self.queue),
               "--target-http", f"{self.up.otlp_http}/v1/metrics", "--target-grpc", self.up.otlp_grpc,
               "--seed", str(self.seed * 100 + len(self.lives)), *self.flags]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                self.status()
                return self
            except requests.RequestException:
                assert time.monotonic() < deadline, "the proxy did not start"
                time.sleep(0.05)

    def status(self) -> dict:
        return requests.get(f"http://127.0.0.1:{self.port}/status", timeout=5).json()

    def kill(self) -> None:
        try:
            self.lives.append(self.status())
        except requests.RequestException:
            self.lives.append({})
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def wait_drained(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (status := self.status())["pending"]:
            assert time.monotonic() < deadline, f"not drained: {status}\n{self.log_path.read_text()[-3000:]}"
            time.sleep(0.1)


def python_app(url: str, name: str, compression: Compression, adds: int, seed: int, out: dict) -> None:
    """An application with the Python SDK: delta counters for several orgs, exported every 150 ms."""
    inner = OTLPMetricExporter(endpoint=url, compression=compression, timeout=30,  # outlives a restart
                               preferred_temporality={Counter: AggregationTemporality.DELTA})  # fmt: skip
    tally = TallyExporter(inner, "delta")
    reader = PeriodicExportingMetricReader(tally, export_interval_millis=150)
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": name}))
    counter = provider.get_meter("rebatch", "1.0").create_counter("rebatch.calls", unit="{call}")
    rng, recorded = random.Random(seed), Tally()
    for _ in range(adds):
        org, value = rng.choice(PY_ORGS), rng.randint(1, 10**9)
        counter.add(value, {"org.id": org, "feature": rng.choice(("search", "export", "ingest"))})
        recorded[org] += value
        time.sleep(0.02)
    provider.force_flush(60_000)
    provider.shutdown()
    out[name] = (tally, recorded)


def js_app(url: str, protocol: str, compression: str, prefix: str, rounds: int) -> subprocess.Popen:
    return subprocess.Popen(["node", "export.js", url, protocol, compression, prefix, str(rounds)],
                            cwd=ROOT / "tests" / "js", stdout=subprocess.PIPE, text=True)  # fmt: skip


def stored(up: UpProcess, orgs_by_metric: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """Per org: the hourly rollup's total and the raw table's (the usage API: 1h and 1m steps)."""
    now = int(time.time())
    start, end = now // HOUR * HOUR - HOUR, (now // HOUR + 2) * HOUR
    out: dict[str, dict[str, int]] = {"rollup": {}, "raw": {}}
    for name, orgs in orgs_by_metric.items():
        for org in orgs:
            for table, step in (("rollup", "1h"), ("raw", "1m")):
                usage = fetch_usage(up.api, org, name, start, end, step)
                assert usage["source"] == table
                out[table][org] = usage["total"]
    return out


def rebatch_run(up_factory, tmp_path, seed: int, send_s: float, kills: int, *proxy_flags: str) -> None:
    rng = random.Random(seed)
    up = up_factory(data_dir=tmp_path / "d")
    proxy = Proxy(tmp_path / "proxy.queue", up, seed, *proxy_flags).start()
    js: list[subprocess.Popen] = []
    try:
        py: dict = {}
        adds = int(send_s / 0.025)
        senders = [
            threading.Thread(target=python_app, args=(proxy.url, f"py-{c.value}", c, adds, seed + i, py))
            for i, c in enumerate((Compression.NoCompression, Compression.Gzip))
        ]
        for s in senders:
            s.start()
        js = [js_app(proxy.url, *app, rounds=adds) for app in JS_APPS]

        # SIGKILL the proxy and meterhouse, by turns, at seeded moments while the SDKs send.
        t0 = time.monotonic()
        moments = sorted(rng.uniform(1, send_s) for _ in range(kills))
        for k, at in enumerate(moments):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            if k % 2 == 0:
                proxy.kill()
                time.sleep(rng.uniform(0.05, 0.5))
                proxy.start()
            else:  # the proxy's forwards fail, or are stored but unanswered, until it is back
                up.wait_ready()
                up.stop(signal.SIGKILL)
                up = up_factory(data_dir=tmp_path / "d", ports_of=up, wait=False)
            print(f"{time.monotonic() - t0:.1f}s: {'proxy' if k % 2 == 0 else 'meterhouse'} killed")
        for s in senders:
            s.join(120)
        js_results = []
        for p in js:
            out, _ = p.communicate(timeout=120)
            js_results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{time.monotonic() - t0:.1f}s: the SDKs are done")
        proxy.kill()  # once more with everything queued: what was done is partly sent again
        proxy.start()
        up.wait_ready()
        proxy.wait_drained(120)
        up.drain(60)
        proxy.kill()
    finally:
        for p in [proxy.proc, *js]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)

    assert len(py) == len(senders), "a Python application failed"
    expected: dict[str, int] = {}
    for tally, recorded in py.values():
        assert tally.failures == 0, "an SDK export failed: what it held is not known to be stored"
        exported = Tally()
        for (org, _name), value in tally.totals().items():
            exported[org] += value
        assert exported == recorded  # the exporter took everything recorded
        for org, value in exported.items():
            expected[org] = expected.get(org, 0) + value
    for result in js_results:
        assert result["failures"] == [], result["failures"][:3]
        expected.update(result["totals"])
    js_orgs = sorted(o for o in expected if o.startswith("js"))
    got = stored(up, {"rebatch.calls": PY_ORGS, "js.calls": js_orgs})
    lives = [{k: v for k, v in life.items() if v} for life in proxy.lives]
    print(f"proxy {' '.join(proxy_flags)}, seed {seed}: its runs {lives}")
    assert "rejected" not in proxy.log_path.read_text(), proxy.log_path.read_text()[-2000:]
    assert sum(life.get("rejected", 0) for life in proxy.lives) == 0
    assert up.stop() == 0
    # The forwarder lost and altered nothing: every point exported is stored, each copy of a point with
    # its value. What more is stored (today) are copies of points, counted again.
    out = subprocess.run([sys.executable, "-c", IDENTITIES, str(tmp_path / "d")], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    points = json.loads(out.stdout)
    report = "\n".join(
        f"{org}: exported {expected[org]}, raw {got['raw'][org]} ({got['raw'][org] - expected[org]:+}), "
        f"rollup {got['rollup'][org]} ({got['rollup'][org] - expected[org]:+}); "
        f"{points[org]['rows']} rows of {points[org]['identities']} points"
        for org in sorted(expected)
    )
    print(report)
    assert {org: p["conflicting"] for org, p in points.items()} == dict.fromkeys(expected, 0)
    assert {org: p["total"] for org, p in points.items()} == expected, report
    assert got["raw"] == expected, f"raw table ≠ exported:\n{report}"
    assert got["rollup"] == expected, f"hourly rollup ≠ exported:\n{report}"


MODES = {  # the forwarder's flags: re-batching with re-sends, and the control (byte for byte)
    "rebatch": ("--resend-done", "0.2", "--lose-answers", "0.1"),
    "passthrough": ("--resend-done", "0.2", "--lose-answers", "0.1", "--passthrough"),
}


# The control (byte for byte, which the request-level dedup holds) runs with the soaks: the default suite
# keeps to its 15 minutes.
@pytest.mark.parametrize("mode", ["rebatch", pytest.param("passthrough", marks=pytest.mark.soak)])
def test_rebatched_and_resent_points_count_once(up_factory, tmp_path, node_packages, mode):  # noqa: F811
    rebatch_run(up_factory, tmp_path, 20260, 10, 3, *MODES[mode])


@pytest.mark.soak
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("mode", list(MODES))
def test_rebatch_soak(up_factory, tmp_path, node_packages, mode, seed):  # noqa: F811
    rebatch_run(up_factory, tmp_path, seed, 60, 12, *MODES[mode])
