"""OTLP metrics request → columns of usage points, with every rejected point counted by reason.

Per-point work is kept minimal: the walk over points is the ceiling of the ingest path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, ResourceMetrics

from meterhouse.collector.cumulative import Change, CumulativePoint, CumulativeState, Rejected
from meterhouse.collector.model import BATCH_COLUMNS, PointBatch
from meterhouse.collector.series import Admission, SeriesLimiter
from meterhouse.core import schema

DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
_TEMPORALITY: dict[int, int] = {DELTA: schema.TEMPORALITY_DELTA, CUMULATIVE: schema.TEMPORALITY_CUMULATIVE}
MAX_VALUE_DEPTH = 16
#: The largest time a DateTime64(9) column holds (Int64 nanoseconds).
_MAX_TIME_NS = 2**63 - 1

log = logging.getLogger("meterhouse.decode")

# The native fast path (collector/_otlpfast.c): delta sums and gauges straight from the request bytes.
# Without it (no C compiler at install time) every request takes the Python path below.
_fast: ModuleType | None
try:
    from meterhouse.collector import _otlpfast
except ImportError as e:  # pragma: no cover - the test suite requires the extension
    _fast = None
    log.info("the native decoder is not available; decoding in Python", extra={"error": str(e)[:200]})
else:
    _fast = _otlpfast
    if tuple(_otlpfast.COLUMNS) != BATCH_COLUMNS:  # pragma: no cover - built from another version
        log.info("the native decoder was built for other columns; decoding in Python")
        _fast = None


#: What a protobuf request costs while the native fast path decodes it (delta sums and gauges straight
#: into columns), in bytes: its own bytes, and per data point and per repeated message (attribute, array
#: element, ...). Measured with ``bench/decode_cost.py`` (README, "Memory"); each weight is above the most
#: any shape measured.
FAST_POINT_BYTES = 800
FAST_VALUE_BYTES = 150
#: What it costs once it takes the Python walk (any other point, or a point the fast path would not take
#: as it is; a sender can always make it): four times its bytes (the parsed message, strings, columns),
#: and per data point, per packed number (a histogram's bucket count or bound) and per repeated message.
PYTHON_BYTE_FACTOR = 4
PYTHON_POINT_BYTES = 1000
PYTHON_NUMBER_BYTES = 40
PYTHON_VALUE_BYTES = 250
#: What OTLP/JSON costs while it is parsed and decoded: per byte, per object or array (``{}`` is a dict,
#: then a message: 141 bytes measured for 3 bytes of text; ``[]`` in a field no message has is a list
#: parsed before it is ignored), and per element of a list (a number: a Python float, a list slot, then
#: a repeated field's).
JSON_BYTE_FACTOR = 4
JSON_OBJECT_BYTES = 300
JSON_ELEMENT_BYTES = 60


@dataclass(frozen=True)
class WireCount:
    """What a protobuf request holds, counted off its wire format (collector/_otlpfast.c, ``wire_cost``):
    data points, packed numbers and repeated messages (quantiles count twice)."""

    points: int
    numbers: int
    values: int


def count_wire(body: bytes) -> WireCount | None:
    """What a protobuf request holds, read without decoding it (microseconds for thousands of points);
    None without the native decoder or when the bytes are not a request."""
    if _fast is None:
        return None
    counted = _fast.wire_cost(body)
    return None if counted is None else WireCount(*counted)


def count_wire_points(body: bytes) -> int | None:
    """Data points in a protobuf request, read off its wire format; None as :func:`count_wire`."""
    counted = count_wire(body)
    return None if counted is None else counted.points


def python_cost(body: bytes, counted: WireCount | None = None) -> int:
    """Bytes a protobuf request takes through the Python walk. Without its count (no native decoder,
    or bytes that are not a request, which protobuf refuses): as if every byte were a repeated message."""
    counted = counted or count_wire(body)
    if counted is None:
        return len(body) * PYTHON_VALUE_BYTES // 2
    return (
        len(body) * PYTHON_BYTE_FACTOR
        + counted.points * PYTHON_POINT_BYTES
        + counted.numbers * PYTHON_NUMBER_BYTES
        + counted.values * PYTHON_VALUE_BYTES
    )


def decoded_cost(body: bytes, protobuf: bool = True) -> int:
    """Bytes a request is expected to take while it is decoded, counted before anything is parsed: the
    decode budget's unit. A protobuf request is counted for the native fast path it usually takes; the
    receiver grows its share to :func:`python_cost` before the Python walk (``decode_request``'s
    ``before_python``). No shape of request (millions of empty buckets, array elements or JSON objects)
    costs more than it is counted for."""
    if not protobuf:
        return (
            len(body) * JSON_BYTE_FACTOR
            + (body.count(b"{") + body.count(b"[")) * JSON_OBJECT_BYTES
            + body.count(b",") * JSON_ELEMENT_BYTES
        )
    counted = count_wire(body)
    if counted is None:
        return python_cost(body, None)
    return len(body) + counted.points * FAST_POINT_BYTES + counted.values * FAST_VALUE_BYTES


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _clamp(n: int) -> int:
    return min(max(n, _INT64_MIN), _INT64_MAX)


@dataclass(frozen=True)
class Limits:
    org_attribute: str = "org.id"
    max_attributes: int = 128
    max_attribute_length: int = 4096
    max_past_ns: int = 2 * 366 * 86400 * 10**9
    max_future_ns: int = 86400 * 10**9
    #: Longest metric name, unit, scope name or version, and metric description, in characters.
    max_metric_name_length: int = 1024
    max_unit_length: int = 255
    max_scope_length: int = 1024
    max_description_length: int = 4096
    #: Most data points in one request: the writer cannot split a request, so this bounds one insert.
    max_points_per_request: int = 50_000


#: What no name, unit or scope name or version may contain: the C0 control characters and DEL.
_CONTROL = re.compile("[\x00-\x1f\x7f]")
#: A rejected name is cut to this length where it is shown (the answer's message, the rejection log).
_NAME_HINT_LENGTH = 128


def _bad_name(text: str, max_len: int) -> bool:
    """A name, unit or scope name or version over its limit or with a control character."""
    return len(text) > max_len or _CONTROL.search(text) is not None


def _bad_scope(scope: tuple[str, str], limits: Limits) -> bool:
    return _bad_name(scope[0], limits.max_scope_length) or _bad_name(scope[1], limits.max_scope_length)


def _bad_metric(m: Any, limits: Limits) -> bool:
    """A metric whose name or unit breaks the rules, or whose description is over its limit (a
    description is prose: it may hold line breaks, and it is not stored)."""
    return (
        _bad_name(m.name, limits.max_metric_name_length)
        or _bad_name(m.unit, limits.max_unit_length)
        or len(m.description) > limits.max_description_length
    )


@dataclass
class RejectSample:
    """Points rejected for one (reason, metric), and an org one of them named (for the log)."""

    points: int
    org: str


@dataclass
class DecodeResult:
    batch: PointBatch
    received: int = 0
    unattributed: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    #: reason → first metric name seen with it, for the partial-success message.
    examples: dict[str, str] = field(default_factory=dict)
    #: (reason, metric) → points and an example org, for the rejection log.
    by_metric: dict[tuple[str, str], RejectSample] = field(default_factory=dict)
    #: points stored with a field corrected (usage kept exactly), by repair reason.
    repaired: Counter[str] = field(default_factory=Counter)
    #: cumulative state changes made for this request, undone if it is not committed.
    changes: list[Change] = field(default_factory=list)
    #: points folded into an overflow series by the series limit, and the sets this request admitted.
    folded: int = 0
    admitted: list[Admission] = field(default_factory=list)

    @property
    def rejected_count(self) -> int:
        return sum(self.rejected.values())

    def reject(self, reason: str, metric: str, n: int = 1, org: str = "") -> None:
        self.rejected[reason] += n
        self.examples.setdefault(reason, metric)
        sample = self.by_metric.get((reason, metric))
        if sample is None:
            self.by_metric[(reason, metric)] = RejectSample(n, org)
        else:
            sample.points += n
            sample.org = sample.org or org

    def error_message(self) -> str:
        parts = [
            f"{n} {reason} (e.g. metric {self.examples[reason]!r})"
            for reason, n in sorted(self.rejected.items())
        ]
        return "rejected data points: " + "; ".join(parts) if parts else ""


class _TooDeep(ValueError):
    pass


def _plain(v: AnyValue, depth: int) -> Any:
    """AnyValue → a JSON-able Python value (bytes as base64)."""
    if depth > MAX_VALUE_DEPTH:
        raise _TooDeep
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "bool_value":
        return v.bool_value
    if which == "int_value":
        return v.int_value
    if which == "double_value":
        d = v.double_value
        return d if math.isfinite(d) else str(d)
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    if which == "array_value":
        return [_plain(x, depth + 1) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _plain(kv.value, depth + 1) for kv in v.kvlist_value.values}
    return None


def value_text(v: AnyValue) -> str:
    """The documented textual form of an attribute value.

    string → itself; bool → ``true``/``false``; int → decimal; double → shortest repr;
    bytes → base64; array and kvlist → compact JSON (keys sorted); empty → ``""``.
    """
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "int_value":
        return str(v.int_value)
    if which == "bool_value":
        return "true" if v.bool_value else "false"
    if which == "double_value":
        return repr(v.double_value)
    if which is None:
        return ""
    plain = _plain(v, 0)
    if isinstance(plain, str):
        return plain
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _attribute_columns(
    attrs: Any, org: str, org_key: str, max_len: int
) -> tuple[str, list[str], list[str]] | None:
    """A point's attributes as (org, sorted keys, values), the org attribute taken out (``org`` is the
    fallback); None when a key or value is over ``max_len`` or a value nests too deep. A key repeated
    in the request: the last one wins."""
    pairs = []
    for kv in attrs:
        key, v = kv.key, kv.value
        text = v.string_value  # the common case; anything else goes through value_text
        if not text and v.WhichOneof("value") != "string_value":
            try:
                text = value_text(v)
            except (_TooDeep, RecursionError):
                return None
        if len(key) > max_len or len(text) > max_len:
            return None
        if key == org_key:
            org = text
        else:
            pairs.append((key, text))
    if len(pairs) > 1:
        if len({k for k, _ in pairs}) != len(pairs):
            pairs = list(dict(pairs).items())  # in request order, so the last value of a key wins
        pairs.sort()
    return org, [k for k, _ in pairs], [v for _, v in pairs]


#: An example org in a log line is cut to this length.
_ORG_HINT_LENGTH = 128


def _org_hint(attrs: Iterable[KeyValue], fallback: str, org_key: str) -> str:
    """The org a rejected point names, for the rejection log (only called for rejected points)."""
    for kv in attrs:
        if kv.key == org_key and kv.value.WhichOneof("value") == "string_value":
            return str(kv.value.string_value)[:_ORG_HINT_LENGTH]
    return fallback[:_ORG_HINT_LENGTH]


def resource_columns(attrs: Sequence[KeyValue], limits: Limits) -> tuple[list[str], list[str], str] | None:
    """A resource's attributes as (sorted keys, values, org), the org attribute kept among them; None
    when they break the limits point attributes have (count, key or value length, nesting depth)."""
    if len(attrs) > limits.max_attributes:
        return None
    pairs = []
    max_len = limits.max_attribute_length
    for kv in attrs:
        try:
            text = value_text(kv.value)
        except (_TooDeep, RecursionError):
            return None
        if len(kv.key) > max_len or len(text) > max_len:
            return None
        pairs.append((str(kv.key), text))
    pairs.sort()
    org = next((v for k, v in pairs if k == limits.org_attribute), "")
    return [k for k, _ in pairs], [v for _, v in pairs], org


#: The first bytes hashed for every series id: another layout of the key is another version.
_SERIES_KEY = b"meterhouse.series.v2\0"


def _frame(texts: Sequence[str]) -> bytes:
    """Texts as one self-delimiting record: their number, each one's length (in code points), then the
    texts themselves (``3:2,0,1;abc`` is ``ab``, ``""``, ``c``), in UTF-8. A text ends where its length
    says, so no text's content can be read as a boundary (what the legacy key's separators allowed), and
    records one after another are unambiguous too."""
    head = ",".join([str(len(t)) for t in texts])
    return f"{len(texts)}:{head};{''.join(texts)}".encode("utf-8", "surrogatepass")


def series_prefix(
    metric: str,
    kind: str,
    unit: str,
    temporality: int,
    monotonic: int,
    scope: tuple[str, str],
    resource: tuple[Sequence[str], Sequence[str]],
) -> Any:
    """The hash state of what every point of one metric in one scope and resource shares: hashed once per
    metric, continued per point by :func:`series_id_in`."""
    keys, values = resource
    if len(keys) != len(values):
        raise ValueError("resource keys and values differ in number")
    h = hashlib.blake2b(_SERIES_KEY, digest_size=8)
    h.update(_frame((metric, kind, unit, str(temporality), str(monotonic), scope[0], scope[1])))
    h.update(_frame((*keys, *values)))  # as many keys as values: the number of texts says where they part
    return h


def series_id_in(prefix: Any, org: str, keys: Sequence[str], values: Sequence[str]) -> int:
    """The id of the series of one point: its org and attributes hashed after the metric's prefix (one
    record: the org, then as many keys as values)."""
    if len(keys) != len(values):
        raise ValueError("attribute keys and values differ in number")
    h = prefix.copy()
    h.update(_frame((org, *keys, *values)))
    return int.from_bytes(h.digest(), "little")


def series_id(
    metric: str,
    kind: str,
    unit: str,
    temporality: int,
    monotonic: int,
    org: str,
    scope: tuple[str, str],
    resource: tuple[Sequence[str], Sequence[str]],
    keys: Sequence[str],
    values: Sequence[str],
) -> int:
    """A stable 64-bit id of a series: the hash of everything that makes a stream of points one stream
    (metric name, kind, unit, temporality, monotonicity, org, scope name and version, resource and
    point attributes), as self-delimiting records in a fixed order. The encoding is one-to-one: two
    different streams hash different bytes, whatever their names and attributes contain."""
    prefix = series_prefix(metric, kind, unit, temporality, monotonic, scope, resource)
    return series_id_in(prefix, org, keys, values)


def legacy_series_id(
    metric: str, org: str, scope: str, resource: list[str], keys: list[str], values: list[str]
) -> int:
    """The series id of versions before the structural key (texts joined by unescaped separators, so
    ambiguous): read only, as a fallback for the state of series those versions wrote (cumulative.py)."""
    h = hashlib.blake2b(digest_size=8)
    h.update("\x1f".join((metric, org, scope, *resource, "\x1e", *keys, "\x1e", *values)).encode())
    return int.from_bytes(h.digest(), "little")


class _Decoder:
    """One request's walk. Number points (sum, gauge) and distributions go to separate columns."""

    def __init__(
        self,
        limits: Limits,
        now_ns: int,
        digest: str,
        cumulative: CumulativeState | None,
        allowed_org: Callable[[str], bool] | None = None,
        series: SeriesLimiter | None = None,
    ) -> None:
        self.limits = limits
        self.allowed_org = allowed_org
        self.series = series
        self.min_t = now_ns - limits.max_past_ns
        # However wide the window, a time is stored as a DateTime64(9): none past 2262 is kept.
        self.max_t = min(now_ns + limits.max_future_ns, _MAX_TIME_NS)
        self.now_ns = now_ns
        self.cumulative = cumulative
        self.result = DecodeResult(PointBatch(PointBatch.empty(), 0, digest, now_ns))
        self.cols = self.result.batch.columns
        self.dist: dict[str, list[Any]] | None = None
        self.cum_points: list[CumulativePoint] = []
        self.cum_rows: list[int] = []

    # -- shared per-point checks -----------------------------------------------------------------
    def bad_time(self, dp: Any) -> bool:
        t = dp.time_unix_nano
        return bool(t == 0 or t < self.min_t or t > self.max_t)

    def attributes(self, dp: Any, res_org: str) -> tuple[str, list[str], list[str]] | None:
        """(org, sorted keys, values), or None when over a limit."""
        attrs = dp.attributes
        if len(attrs) > self.limits.max_attributes:
            return None
        found = _attribute_columns(
            attrs, res_org, self.limits.org_attribute, self.limits.max_attribute_length
        )
        if found is not None and not found[0]:
            self.result.unattributed += 1
        return found

    # -- the walk ---------------------------------------------------------------------------------
    def run_fast(self, body: bytes) -> bool:
        """The native walk over the request bytes; False when it does not apply (the request is outside
        the fast path, a point would not be accepted as it is, or an org is not the sender's)."""
        if _fast is None:
            return False
        lim = self.limits
        # The C types' ranges: a point's time is a uint64 the fast path only takes up to 2**63 - 1, so
        # a window (or limit) past them is clamped without changing what it accepts.
        found = _fast.decode_numbers(
            body, lim.org_attribute, _clamp(self.min_t), _clamp(self.max_t),
            _clamp(lim.max_attributes), _clamp(lim.max_attribute_length),
            _clamp(lim.max_metric_name_length), _clamp(lim.max_unit_length), _clamp(lim.max_scope_length),
            _clamp(lim.max_description_length), schema.MAX_SUM_DOUBLE, self.now_ns,
        )  # fmt: skip
        if found is None:
            return False
        cols, points, unattributed, late_starts = found
        allowed = self.allowed_org
        if allowed is not None and not all(allowed(org) for org in set(cols["org_id"])):
            return False
        r = self.result
        r.batch.columns = self.cols = cols
        r.batch.size = points
        r.received = points
        r.unattributed = unattributed
        if late_starts:
            r.repaired["start_after_time"] += late_starts
        if self.series is not None:
            self.fold(self.series)
        return True

    def run(self, request: ExportMetricsServiceRequest) -> DecodeResult:
        org_key = self.limits.org_attribute
        for rm in request.resource_metrics:
            found = resource_columns(rm.resource.attributes, self.limits)
            if found is None:
                self.reject_resource(rm, _org_hint(rm.resource.attributes, "", org_key))
                continue
            res_keys, res_values, res_org = found
            res = (res_keys, res_values)
            for sm in rm.scope_metrics:
                scope = (sm.scope.name, sm.scope.version)
                bad_scope = _bad_scope(scope, self.limits)
                for m in sm.metrics:
                    which = m.WhichOneof("data")
                    if which is None:
                        continue  # a metric without data has no points to store or reject
                    data = getattr(m, which)
                    n = len(data.data_points)
                    self.result.received += n
                    if bad_scope or _bad_metric(m, self.limits):
                        if n:
                            org = _org_hint(data.data_points[0].attributes, res_org, org_key)
                            self.result.reject("invalid_name", m.name[:_NAME_HINT_LENGTH], n, org)
                        continue
                    if which in ("sum", "gauge"):
                        self.numbers(m, which, data, res, res_org, scope)
                    else:
                        self.distributions(m, which, data, res, res_org, scope)
        self.finish_cumulative()
        self.result.batch.size = len(self.cols["org_id"])
        if self.series is not None:  # after the cumulative conversion, which keys on the real attributes
            self.fold(self.series)
        return self.result

    def fold(self, series: SeriesLimiter) -> None:
        try:
            for cols in (self.cols, self.dist):
                if cols:
                    folded, admitted = series.fold(cols)
                    self.result.folded += folded
                    self.result.admitted += admitted
        except Exception:  # the admitted sets could not be read: nothing of this request is kept
            series.rollback(self.result.admitted)
            if self.result.changes and self.cumulative is not None:
                self.cumulative.rollback(self.result.changes)
            raise

    def reject_resource(self, rm: ResourceMetrics, org: str) -> None:
        """Every point of a resource whose attributes break the limits is rejected (and counted)."""
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                which = m.WhichOneof("data")
                if which is not None:
                    n = len(getattr(m, which).data_points)
                    self.result.received += n
                    if n:
                        self.result.reject("attribute_limit", m.name, n, org)

    def numbers(self, m: Any, which: str, data: Any, res: Any, res_org: str, scope: Any) -> None:
        name, unit, r = m.name, m.unit, self.result
        if which == "sum":
            temporality = _TEMPORALITY.get(data.aggregation_temporality)
            if temporality is None:
                r.reject("unsupported_metric", name, len(data.data_points), res_org)
                return
            mono = 1 if data.is_monotonic else 0
            kind = schema.KIND_SUM
        else:
            temporality, mono, kind = schema.TEMPORALITY_UNSPECIFIED, 0, schema.KIND_GAUGE
        cumulative = temporality == schema.TEMPORALITY_CUMULATIVE
        if cumulative and self.cumulative is None:
            r.reject("unsupported_metric", name, len(data.data_points), res_org)
            return
        if cumulative:
            prefix = series_prefix(name, kind, unit, temporality, mono, scope, res)
        c = self.cols
        res_keys, res_values = res
        min_t, max_t = self.min_t, self.max_t
        org_key = self.limits.org_attribute
        max_attrs, max_len = self.limits.max_attributes, self.limits.max_attribute_length
        check_finite = kind == schema.KIND_SUM
        bound_double = check_finite and not cumulative
        # The hot loop: per point only what varies per point is appended; the columns that are the
        # same for the whole metric are extended once after it.
        c_org, c_start, c_time = c["org_id"], c["start_time"], c["time"]
        c_isint, c_vi, c_vd = c["is_int"], c["value_int"], c["value_double"]
        c_ak, c_av = c["attr_keys"], c["attr_values"]
        c_sid, c_sstart, c_ci, c_cd = (
            c["series_id"],
            c["series_start"],
            c["cumulative_int"],
            c["cumulative_double"],
        )
        before = len(c_org)
        unattributed = 0
        late_starts = 0
        allowed = self.allowed_org
        for dp in data.data_points:
            t = dp.time_unix_nano
            start = dp.start_time_unix_nano
            if t == 0 or t < min_t or t > max_t or (cumulative and start > _MAX_TIME_NS):
                # A cumulative series keeps the sender's start as it is (series_start, a DateTime64):
                # one past 2262 cannot be stored, and a clamped one would read as a reset after a restart.
                r.reject("invalid_timestamp", name, 1, _org_hint(dp.attributes, res_org, org_key))
                continue
            vkind = dp.WhichOneof("value")
            if vkind == "as_int":
                vi, vd, is_int = dp.as_int, 0.0, 1
                negative = vi < 0
            elif vkind == "as_double":
                vi, vd, is_int = 0, dp.as_double, 0
                if check_finite and not math.isfinite(vd):
                    r.reject("invalid_value", name, 1, _org_hint(dp.attributes, res_org, org_key))
                    continue
                if bound_double and not abs(vd) <= schema.MAX_SUM_DOUBLE:
                    # Usage whose sums could reach ±Inf (schema.MAX_SUM_DOUBLE); a cumulative point's
                    # delta is bounded instead (cumulative.py), its running total is not summed.
                    r.reject("out_of_range", name, 1, _org_hint(dp.attributes, res_org, org_key))
                    continue
                negative = vd < 0
            else:
                r.reject("no_value", name, 1, _org_hint(dp.attributes, res_org, org_key))
                continue
            if mono and negative:
                # A monotonic delta that decreases; or a monotonic cumulative counter below zero.
                reason = "invalid_value" if cumulative else "negative_delta"
                r.reject(reason, name, 1, _org_hint(dp.attributes, res_org, org_key))
                continue
            attrs = dp.attributes
            if len(attrs) > max_attrs:
                r.reject("attribute_limit", name, 1, _org_hint(attrs, res_org, org_key))
                continue
            found = _attribute_columns(attrs, res_org, org_key, max_len)
            if found is None:
                r.reject("attribute_limit", name, 1, _org_hint(attrs, res_org, org_key))
                continue
            org, keys, values = found
            if allowed is not None and not allowed(org):
                r.reject("org_not_allowed", name, 1, org)
                continue
            if start > t and not cumulative:
                # The SDK race of a series created while a collection runs: the interval ends where
                # it starts; the usage is the same. (Cumulative points: see finish_cumulative.)
                start = t
                late_starts += 1
            if not org:
                unattributed += 1
            if cumulative:
                sid = series_id_in(prefix, org, keys, values)
                legacy = legacy_series_id(name, org, scope[0], res_keys + res_values, keys, values)
                self.cum_rows.append(len(c_org))
                self.cum_points.append(
                    CumulativePoint(sid, start, t, vi if is_int else vd, bool(mono), legacy)
                )
                c_sid.append(sid)
                c_sstart.append(start)
                c_ci.append(vi)
                c_cd.append(vd)
            c_org.append(org)
            c_start.append(start)
            c_time.append(t)
            c_isint.append(is_int)
            c_vi.append(vi)
            c_vd.append(vd)
            c_ak.append(keys)
            c_av.append(values)
        n = len(c_org) - before
        r.unattributed += unattributed
        if late_starts:
            r.repaired["start_after_time"] += late_starts
        if not n:
            return
        if not cumulative:
            for col in (c_sid, c_sstart, c_ci):
                col.extend([0] * n)
            c_cd.extend([0.0] * n)
        shared: tuple[tuple[str, Any], ...] = (
            ("metric", name), ("kind", kind), ("unit", unit), ("monotonic", mono),
            ("resource_keys", res_keys), ("resource_values", res_values), ("scope_name", scope[0]),
            ("scope_version", scope[1]), ("received_at", self.now_ns), ("temporality", temporality),
        )  # fmt: skip
        for column, value in shared:
            c[column].extend([value] * n)

    def finish_cumulative(self) -> None:
        """Turn the request's cumulative points into deltas (one state look-up for all of them)."""
        if not self.cum_points or self.cumulative is None:
            return
        results, self.result.changes = self.cumulative.convert(self.cum_points)
        c = self.cols
        drop = []
        for row, res in zip(self.cum_rows, results, strict=True):
            if isinstance(res, Rejected):
                drop.append(row)
                self.result.reject(res.value, c["metric"][row], 1, c["org_id"][row])
                continue
            delta, start = res
            t = c["time"][row]
            if start > t:
                # The sender's start is after the time (first point of a series): the series keeps
                # the sender's start (so its next point continues it), the stored interval ends at t.
                start = t
                self.result.repaired["start_after_time"] += 1
            c["start_time"][row] = start
            # The row follows the delta's type (cumulative.py: from its first double point on, a series
            # is a double stream): an int delta is an int row; a double delta is a double row, also for
            # an int point, whose sender's value then becomes the row's cumulative double, so the state
            # read back after a restart continues as a double.
            if isinstance(delta, float):
                if c["is_int"][row]:
                    c["is_int"][row] = 0
                    c["value_int"][row] = 0
                    c["cumulative_double"][row] = float(c["cumulative_int"][row])
                    c["cumulative_int"][row] = 0
                c["value_double"][row] = delta
            else:
                c["value_int"][row] = delta
        if drop:
            keep = sorted(set(range(len(c["org_id"]))) - set(drop))
            for name, col in c.items():
                c[name] = [col[i] for i in keep]

    def distributions(self, m: Any, which: str, data: Any, res: Any, res_org: str, scope: Any) -> None:
        name, r = m.name, self.result
        if self.dist is None:
            self.dist = self.result.batch.dist_columns = PointBatch.empty_dist()
        d = self.dist
        temporality = _TEMPORALITY.get(
            getattr(data, "aggregation_temporality", 0), schema.TEMPORALITY_UNSPECIFIED
        )
        kind = {
            "histogram": schema.KIND_HISTOGRAM,
            "exponential_histogram": schema.KIND_EXP_HISTOGRAM,
            "summary": schema.KIND_SUMMARY,
        }[which]
        org_key = self.limits.org_attribute
        for dp in data.data_points:
            if self.bad_time(dp):
                r.reject("invalid_timestamp", name, 1, _org_hint(dp.attributes, res_org, org_key))
                continue
            shape = _distribution(kind, dp)
            if shape is None:
                r.reject("invalid_value", name, 1, _org_hint(dp.attributes, res_org, org_key))
                continue
            attrs = self.attributes(dp, res_org)
            if attrs is None:
                r.reject("attribute_limit", name, 1, _org_hint(dp.attributes, res_org, org_key))
                continue
            org, keys, values = attrs
            if self.allowed_org is not None and not self.allowed_org(org):
                if not org:
                    self.result.unattributed -= 1  # counted by attributes(); rejected instead
                r.reject("org_not_allowed", name, 1, org)
                continue
            t, start = dp.time_unix_nano, dp.start_time_unix_nano
            if start > t:
                start = t
                r.repaired["start_after_time"] += 1
            row = {
                "org_id": org, "metric": name, "kind": kind, "unit": m.unit, "temporality": temporality,
                "start_time": start, "time": t,
                "attr_keys": keys, "attr_values": values, "resource_keys": res[0],
                "resource_values": res[1], "scope_name": scope[0], "scope_version": scope[1],
                "received_at": self.now_ns, **shape,
            }  # fmt: skip
            for col, values_ in d.items():
                values_.append(row[col])
        self.result.batch.dist_size = len(d["org_id"])


_DIST_DEFAULTS: dict[str, Any] = {
    "sum": None, "min": None, "max": None, "bucket_counts": [], "explicit_bounds": [], "scale": 0,
    "zero_count": 0, "zero_threshold": 0.0, "positive_offset": 0, "positive_counts": [],
    "negative_offset": 0, "negative_counts": [], "quantiles": [], "quantile_values": [], "series_id": 0,
}  # fmt: skip


def _finite_or_none(dp: Any, field_name: str) -> tuple[bool, float | None]:
    if not dp.HasField(field_name):
        return True, None
    v = getattr(dp, field_name)
    return math.isfinite(v), v


def _distribution(kind: str, dp: Any) -> dict[str, Any] | None:
    """The distribution columns of one point, or None when its numbers are inconsistent."""
    shape = dict(_DIST_DEFAULTS, count=dp.count)
    if kind == schema.KIND_SUMMARY:
        ok, shape["sum"] = math.isfinite(dp.sum), dp.sum
        qs = [(q.quantile, q.value) for q in dp.quantile_values]
        if not ok or any(not (0.0 <= q <= 1.0) or not math.isfinite(v) for q, v in qs):
            return None
        shape["quantiles"] = [q for q, _ in qs]
        shape["quantile_values"] = [v for _, v in qs]
        return shape
    for f in ("sum", "min", "max"):
        ok, shape[f] = _finite_or_none(dp, f)
        if not ok:
            return None
    if kind == schema.KIND_HISTOGRAM:
        counts, bounds = list(dp.bucket_counts), list(dp.explicit_bounds)
        if counts and (len(counts) != len(bounds) + 1 or sum(counts) != dp.count):
            return None
        if any(not math.isfinite(b) for b in bounds) or bounds != sorted(bounds):
            return None
        shape["bucket_counts"], shape["explicit_bounds"] = counts, bounds
        return shape
    pos, neg = list(dp.positive.bucket_counts), list(dp.negative.bucket_counts)
    if not -10 <= dp.scale <= 20 or dp.zero_count + sum(pos) + sum(neg) != dp.count:
        return None
    if not math.isfinite(dp.zero_threshold) or dp.zero_threshold < 0:
        return None
    shape.update(scale=dp.scale, zero_count=dp.zero_count, zero_threshold=dp.zero_threshold,
                 positive_offset=dp.positive.offset, positive_counts=pos,
                 negative_offset=dp.negative.offset, negative_counts=neg)  # fmt: skip
    return shape


def decode_request(
    request: ExportMetricsServiceRequest | None,
    limits: Limits,
    *,
    now_ns: int,
    digest: str,
    cumulative: CumulativeState | None = None,
    allowed_org: Callable[[str], bool] | None = None,
    series: SeriesLimiter | None = None,
    body: bytes | None = None,
    before_python: Callable[[], None] | None = None,
) -> DecodeResult:
    """Walk the request once into columns, counting every rejected point by reason.

    Cumulative sums need ``cumulative`` (their conversion state); without it they are rejected.
    ``allowed_org`` (the sender's scope) rejects points of other orgs as ``org_not_allowed``;
    ``series`` folds attribute sets over the per-(org, metric) limit into the overflow series.

    ``body``, the serialized request, lets the native fast path decode it when every point is a delta
    sum or gauge point accepted as it is (the common case); anything else takes the Python walk, for
    which ``request`` is parsed from ``body`` when it is None (raising protobuf's DecodeError).
    ``before_python`` runs before the Python walk parses anything (the receiver grows its share of the
    decode budget there; what it raises goes to the caller).
    """
    decoder = _Decoder(limits, now_ns, digest, cumulative, allowed_org, series)
    if body is not None and decoder.run_fast(body):
        return decoder.result
    if before_python is not None:
        before_python()
    if request is None:
        if body is None:
            raise ValueError("decode_request needs the request or its bytes")
        request = ExportMetricsServiceRequest.FromString(body)
    return decoder.run(request)
