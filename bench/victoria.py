"""The VictoriaMetrics peer: Debian's ``victoria-metrics`` (1.79) started by the benchmark on loopback,
and the translation of the benchmark's OTLP requests into the Influx line protocol it ingests.

Translation, one OTLP data point to one line (1.79 has no OTLP receiver):

    <metric, dots as underscores>,<resource and point attributes, dots as underscores>
        value=<as_int>i | value=<as_double> <time_unix_nano>

VictoriaMetrics names the series ``<measurement>_value`` (``api.requests`` becomes
``api_requests_value{org_id="org-000042",feature="search",...}``), keeps the timestamp to the
millisecond and every value as a float64. ``start_time_unix_nano``, the unit and the temporality are
dropped: the benchmark's usage points are deltas, so an org's usage is ``sum_over_time`` of the samples.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
from decimal import Decimal
from pathlib import Path

from bench.common import Proc, free_port, get, wait_http

BINARY = "victoria-metrics"
INSTALL = "apt-get install -y victoria-metrics"


def series_name(metric: str) -> str:
    return metric.replace(".", "_") + "_value"


def _escape(text: str, measurement: bool = False) -> str:
    text = text.replace("\\", "\\\\").replace(",", "\\,").replace(" ", "\\ ")
    return text if measurement else text.replace("=", "\\=")


def line_protocol(otlp: bytes) -> tuple[bytes, int]:
    """One serialized ExportMetricsServiceRequest as line protocol; returns the body and its samples."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    req = ExportMetricsServiceRequest.FromString(otlp)
    lines: list[str] = []
    for rm in req.resource_metrics:
        resource = "".join(
            f",{_escape(kv.key.replace('.', '_'))}={_escape(kv.value.string_value)}"
            for kv in rm.resource.attributes
        )
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                head = _escape(m.name.replace(".", "_"), measurement=True) + resource
                points = m.sum.data_points if m.HasField("sum") else m.gauge.data_points
                for dp in points:
                    tags = "".join(
                        f",{_escape(kv.key.replace('.', '_'))}={_escape(kv.value.string_value)}"
                        for kv in dp.attributes
                    )
                    value = f"{dp.as_int}i" if dp.HasField("as_int") else repr(dp.as_double)
                    lines.append(f"{head}{tags} value={value} {dp.time_unix_nano}")
    return ("\n".join(lines) + "\n").encode(), len(lines)


def require_binary() -> str:
    path = shutil.which(BINARY)
    if path is None:
        raise RuntimeError(
            f"{BINARY} is not installed: the VictoriaMetrics scenarios need Debian's package "
            f"(`{INSTALL}`; `bash scripts/test.sh` installs it)"
        )
    return path


class Victoria:
    """``victoria-metrics`` with its documented defaults, its own storage directory and a loopback port;
    ``flags`` adds command-line flags (only where a row says so)."""

    def __init__(self, work: Path, name: str, flags: tuple[str, ...] = ()) -> None:
        self.data = work / name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.flags = flags
        self.proc = Proc([require_binary(), f"-storageDataPath={self.data}", f"-httpListenAddr=127.0.0.1:{self.port}",
                          *flags], work / f"{name}.log")  # fmt: skip
        wait_http(f"{self.base}/health", 60)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.stop()

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in get(f"{self.base}/metrics").decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def settled(self) -> bool:
        """Nothing waits in the in-memory buffers (rows and index entries become searchable from parts)."""
        m = self.metrics()
        return (
            m.get('vm_pending_rows{type="storage"}', 1) == 0
            and m.get('vm_pending_rows{type="indexdb"}', 1) == 0
        )

    def flush(self) -> None:
        get(f"{self.base}/internal/force_flush")

    def query(self, promql: str, at: float | None = None, nocache: bool = False) -> list[dict]:
        params = {"query": promql}
        if at is not None:
            params["time"] = str(at)
        if nocache:
            params["nocache"] = "1"
        return self._api("query", params)

    def query_range(
        self, promql: str, start: float, end: float, step: int, nocache: bool = False
    ) -> list[dict]:
        params = {"query": promql, "start": str(start), "end": str(end), "step": str(step)}
        if nocache:
            params["nocache"] = "1"
        return self._api("query_range", params)

    def _api(self, path: str, params: dict) -> list[dict]:
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = json.loads(get(url, 300))
        except urllib.error.HTTPError as e:
            raise QueryError(e.read().decode(errors="replace")[:300]) from None
        if body.get("status") != "success":
            raise QueryError(str(body)[:300])
        return body["data"]["result"]

    def samples(self, metrics: tuple[str, ...], window: str = "2d") -> int:
        """Samples a query sees now, over the last ``window``, one query per metric."""
        total = 0
        for metric in metrics:
            for r in self.query(f"sum(count_over_time({series_name(metric)}[{window}]))", nocache=True):
                total += int(float(r["value"][1]))
        return total

    def wait_queryable(self, metrics: tuple[str, ...], expected: int, timeout_s: float = 900) -> float:
        """The moment all ``expected`` samples are queryable: the buffers are polled (cheap, like
        meterhouse's written counter) until empty, then counting queries confirm that every sample is
        returned; the moment is the poll's, so the counting queries' own time is not charged."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen = time.monotonic()
            if self.settled() and self.samples(metrics) >= expected:
                return seen
            time.sleep(0.05)
        raise RuntimeError(f"VictoriaMetrics did not make {expected} samples queryable in {timeout_s}s")


class QueryError(RuntimeError):
    """VictoriaMetrics refused a query (for example over -search.maxUniqueTimeseries)."""


def exact(value: str) -> int | str:
    """A sample value as VictoriaMetrics returned it (a float64 in text), as an integer when it is one."""
    d = Decimal(value)
    return int(d) if d == d.to_integral_value() else value
