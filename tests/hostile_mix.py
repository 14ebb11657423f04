"""A hostile mix beside honest senders, against a `meterhouse up` inside a real memory cgroup.

Hostile senders: the largest requests meterhouse takes (many small points, protobuf and OTLP/JSON, both
transports), gzip bombs, bodies trickled byte by byte, metric names of megabytes, cumulative values whose
deltas do not fit Int64, and connection floods. Honest senders send small requests and retry what is
answered retryable, keeping a tally of what was acknowledged; the test compares it with what is stored.
The cgroup (version 1 memory controller, root only) holds the process to its budget: past it the kernel
OOM-kills it, which the cgroup counts.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import requests
from google.protobuf import json_format
from otlp_builders import CUMULATIVE, point, sum_request

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
PROTOBUF = {"Content-Type": "application/x-protobuf"}


def cgroup_unavailable() -> str | None:
    """Why a memory cgroup cannot be made here, or None."""
    if os.geteuid() != 0:
        return "memory cgroups need root"
    if not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
        return "no cgroup v1 memory controller mounted"
    return None


class MemoryCgroup:
    """A fresh memory cgroup with a hard limit and no swap; removed by :meth:`remove`."""

    def __init__(self, limit_bytes: int) -> None:
        self.path = CGROUP_ROOT / f"meterhouse-test-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        memsw = self.path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(limit_bytes))

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def peak_bytes(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.2)


class AnonPeak:
    """Samples a process's anonymous resident memory (RssAnon: what it allocated, not the file pages of
    its libraries and data, which the kernel may drop) every 0.1 s; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anon-peak", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while not self._stop.wait(0.1):
            try:
                text = status.read_text()
            except OSError:
                return
            for line in text.splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def many_points(org: str, n: int, metric: str = "flood.calls") -> bytes:
    return sum_request(
        {metric: [point(1, {"org.id": org, "i": str(i)}) for i in range(n)]}
    ).SerializeToString()


@dataclass
class Tally:
    """What one honest sender had acknowledged, by org."""

    acknowledged: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, org: str, v: int) -> None:
        with self.lock:
            self.acknowledged[org] = self.acknowledged.get(org, 0) + v


@dataclass
class Answers:
    """Every answer a hostile sender got, by kind and status (so a 5xx is seen)."""

    seen: dict[str, dict[str, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, status: object) -> None:
        with self.lock:
            by = self.seen.setdefault(kind, {})
            by[str(status)] = by.get(str(status), 0) + 1

    def server_errors(self) -> dict[str, dict[str, int]]:
        """Answers that are neither a refusal nor a retryable 503/429/UNAVAILABLE/RESOURCE_EXHAUSTED."""
        bad = {"500", "INTERNAL", "UNKNOWN"}
        return {k: {s: n for s, n in v.items() if s in bad} for k, v in self.seen.items() if bad & set(v)}


class HostileMix:
    """Runs hostile and honest senders against one collector until :meth:`stop`."""

    def __init__(
        self, http_url: str, grpc_target: str, max_request_bytes: int, max_points: int = 50_000
    ) -> None:
        self.http_url, self.grpc_target = http_url, grpc_target
        self.stop_event = threading.Event()
        self.answers = Answers()
        self.tally = Tally()
        self.threads: list[threading.Thread] = []
        self.max_points = max_points
        # The largest protobuf request of small points under max_request_bytes: over the points bound,
        # so it is decoded whole and then refused (413 / RESOURCE_EXHAUSTED).
        per_point = len(many_points("org-flood", 100)) / 100
        self.over = many_points("org-flood", int(max_request_bytes * 0.95 / per_point))
        # OTLP/JSON over the points bound, just under max_request_bytes: parsed whole, then refused.
        request = sum_request(
            {"flood.json": [point(1, {"org.id": "org-flood", "i": str(i)}) for i in range(100)]}
        )
        per_json = len(json_format.MessageToJson(request, indent=None)) / 100
        n = int(max_request_bytes * 0.95 / per_json)
        request = sum_request(
            {"flood.json": [point(1, {"org.id": "org-flood", "i": str(i)}) for i in range(n)]}
        )
        self.big_json = json_format.MessageToJson(request, indent=None).encode()
        # At the points bound: taken and stored (each one distinct, so none is a re-sent copy).
        self.at_bound = sum_request(
            {"flood.calls": [point(1, {"org.id": "org-flood", "i": str(i)}) for i in range(max_points)]}
        )
        self.bomb = gzip.compress(b"\0" * (1 << 30), compresslevel=9)
        self.huge_name = sum_request(
            {"n" * (12 << 20): [point(1, {"org.id": "org-names"})]}
        ).SerializeToString()

    def _at_bound(self) -> None:
        """One distinct request at the points bound every 3 s: stored, so the writer inserts groups of
        the largest records, at a rate it can keep up with beside everything else."""
        self._post("at-bound", self._unique_at_bound(), PROTOBUF)
        self.stop_event.wait(3)

    def _unique_at_bound(self) -> bytes:
        self.at_bound.resource_metrics[0].resource.attributes[0].value.string_value = uuid.uuid4().hex
        return self.at_bound.SerializeToString()

    def _loop(self, name: str, once: Callable[[], None]) -> None:
        def run() -> None:
            while not self.stop_event.is_set():
                try:
                    once()
                except (OSError, requests.RequestException, grpc.RpcError) as e:
                    self.answers.add(name, type(e).__name__)
                    time.sleep(0.05)

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def _post(self, kind: str, body: bytes, headers: dict[str, str], timeout: float = 120) -> int:
        r = requests.post(f"{self.http_url}/v1/metrics", data=body, headers=headers, timeout=timeout)
        self.answers.add(kind, r.status_code)
        if r.status_code in (429, 503):
            time.sleep(0.2)
        return r.status_code

    def start_hostile(self, floods: int = 3) -> None:
        for i in range(floods):
            self._loop(f"flood-http-{i}", lambda: self._post("flood-http", self.over, PROTOBUF))
        self._loop(
            "flood-json",
            lambda: self._post("flood-json", self.big_json, {"Content-Type": "application/json"}),
        )
        self._loop("at-bound", self._at_bound)
        channel = grpc.insecure_channel(
            self.grpc_target, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        export = channel.unary_unary(EXPORT)

        def grpc_flood() -> None:
            try:
                export(self.over, timeout=120)
                self.answers.add("flood-grpc", "OK")
            except grpc.RpcError as e:
                self.answers.add("flood-grpc", e.code().name)
                time.sleep(0.2)

        for i in range(2):
            self._loop(f"flood-grpc-{i}", grpc_flood)
        self._loop("bomb", lambda: self._post("bomb", self.bomb, {**PROTOBUF, "Content-Encoding": "gzip"}))
        self._loop("huge-name", lambda: self._post("huge-name", self.huge_name, PROTOBUF))
        self._loop("overflow", self._overflow)
        self._loop("trickle", self._trickle)

    def _overflow(self) -> None:
        series = {"org.id": "org-overflow", "s": uuid.uuid4().hex}
        start = time.time_ns() - 10**9
        for v in (-(2**63), 2**63 - 1):  # the second point's delta does not fit Int64
            body = sum_request(
                {"overflow.sum": [point(v, series, start_ns=start)]}, monotonic=False, temporality=CUMULATIVE
            ).SerializeToString()
            self._post("overflow", body, PROTOBUF)

    def _trickle(self) -> None:
        """150 connections that send headers and two bytes of a 100 kB body, reopened when closed."""
        port = int(self.http_url.rsplit(":", 1)[1])
        conns: list[socket.socket] = []
        head = (
            b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            b"Content-Length: 100000\r\n\r\n\n\x05"
        )
        try:
            while not self.stop_event.is_set():
                while len(conns) < 150:
                    try:
                        s = socket.create_connection(("127.0.0.1", port), timeout=5)
                        s.sendall(head)
                        conns.append(s)
                    except OSError as e:
                        self.answers.add("trickle", type(e).__name__)
                        break
                time.sleep(1)
                alive = []
                for s in conns:
                    try:
                        s.setblocking(False)
                        if s.recv(65536):
                            self.answers.add("trickle", "answered")
                        s.close()
                    except BlockingIOError:
                        s.setblocking(True)
                        try:
                            s.sendall(b"\x00")
                            alive.append(s)
                        except OSError:
                            s.close()
                    except OSError:
                        s.close()
                conns = alive
        finally:
            for s in conns:
                s.close()

    def start_honest(self, source: str = "127.0.0.2") -> None:
        """Honest senders from another loopback address: one per transport, retrying what is retryable."""
        port = int(self.http_url.rsplit(":", 1)[1])

        def http_sender() -> None:
            session = requests.Session()
            session.mount("http://", _SourceAdapter(source))
            v = 0
            while not self.stop_event.is_set():
                v += 1
                body = sum_request(
                    {"honest.calls": [point(v, {"org.id": "org-honest-http"})]}
                ).SerializeToString()
                while True:
                    try:
                        r = session.post(
                            f"http://127.0.0.1:{port}/v1/metrics", data=body, headers=PROTOBUF, timeout=60
                        )
                    except requests.RequestException:
                        self.tally.retried += 1
                        time.sleep(0.2)
                        continue
                    if r.status_code == 200:
                        self.tally.add("org-honest-http", v)
                        break
                    assert r.status_code in (429, 503), (r.status_code, r.text)
                    self.tally.retried += 1
                    time.sleep(0.2)
                time.sleep(0.05)

        def grpc_sender() -> None:
            channel = grpc.insecure_channel(self.grpc_target)
            export = channel.unary_unary(EXPORT)
            v = 0
            while not self.stop_event.is_set():
                v += 1
                body = sum_request(
                    {"honest.calls": [point(v, {"org.id": "org-honest-grpc"})]}
                ).SerializeToString()
                while True:
                    try:
                        export(body, timeout=60)
                        self.tally.add("org-honest-grpc", v)
                        break
                    except grpc.RpcError as e:
                        assert e.code() in (
                            grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                        ), e
                        self.tally.retried += 1
                        time.sleep(0.2)
                time.sleep(0.05)
            channel.close()

        for target in (http_sender, grpc_sender):
            t = threading.Thread(target=target, name=target.__name__, daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self, timeout_s: float = 180) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout_s)
        assert not any(t.is_alive() for t in self.threads), "a sender did not stop"


class SdkSenders:
    """The real OpenTelemetry SDK as honest senders: one MeterProvider per transport, cumulative (what an
    export that failed did not deliver, the next one does), exporting every second from another loopback
    address's view of the world: the test process. Its tally is what the application counted."""

    def __init__(self, http_url: str, grpc_target: str) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter
        from opentelemetry.sdk.metrics import Counter, MeterProvider
        from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader

        cumulative = {Counter: AggregationTemporality.CUMULATIVE}
        exporters = {
            "org-sdk-http": HttpExporter(endpoint=f"{http_url}/v1/metrics", preferred_temporality=cumulative),
            "org-sdk-grpc": GrpcExporter(
                endpoint=grpc_target, insecure=True, preferred_temporality=cumulative
            ),
        }
        self.providers = {
            org: MeterProvider(metric_readers=[PeriodicExportingMetricReader(e, export_interval_millis=1000)])
            for org, e in exporters.items()
        }
        self.counters = {
            org: p.get_meter("hostile").create_counter("honest.sdk") for org, p in self.providers.items()
        }
        self.counted = dict.fromkeys(self.providers, 0)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._count, name="sdk-counter", daemon=True)
        self.thread.start()

    def _count(self) -> None:
        i = 0
        while not self.stop_event.is_set():
            i += 1
            for org, counter in self.counters.items():
                counter.add(i, {"org.id": org})
                self.counted[org] += i
            time.sleep(0.01)

    def stop(self, timeout_s: float = 120) -> dict[str, int]:
        """Stop counting; flush until each provider's last export is acknowledged; the tally."""
        self.stop_event.set()
        self.thread.join(10)
        deadline = time.monotonic() + timeout_s
        for org, provider in self.providers.items():
            while not provider.force_flush(30_000):
                assert time.monotonic() < deadline, f"the SDK could not deliver {org}'s last export"
                time.sleep(1)
            provider.shutdown()
        return dict(self.counted)


class _SourceAdapter(requests.adapters.HTTPAdapter):
    """Connections from a given local address (another loopback address than the hostile senders')."""

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]


def summary(mix: HostileMix) -> str:
    return json.dumps(
        {"answers": mix.answers.seen, "honest": mix.tally.acknowledged, "retried": mix.tally.retried}
    )
