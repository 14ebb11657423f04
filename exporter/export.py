"""The bulk export (``GET /api/v1/usage/export``): every org's usage over a range, streamed.

Read from the hourly rollup in its own order (org, metric, time) on a ClickHouse connection of the
export's own, one block at a time, and written out as CSV or NDJSON as the client reads: memory holds a
block, whatever the number of orgs and steps. The range is whole hours (the rollup is exact for them); any
other range is refused rather than widened. Exports at once are bounded (``MAX_EXPORTS``): a slow reader
holds one of the API's threads for as long as it reads.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from flask import Blueprint, Response, current_app, g, stream_with_context

from meterhouse.core import schema
from meterhouse.core.timefmt import format_rfc3339

HOUR_NS = 3600 * 10**9
MAX_NS = 2**63 - 1  # the largest time the API takes (api.py clamps to it)
STEPS = ("1h", "1d", "1mo")
FORMATS = {"csv": "text/csv; charset=utf-8", "ndjson": "application/x-ndjson"}
COLUMNS = ("org_id", "metric", "start", "value", "unit")
#: Exports streaming at once; one more is answered 429 with Retry-After.
MAX_EXPORTS = 2


def _number(vi: int, vd: float) -> int | float:
    """Exact integer usage stays an integer; double usage is a double (as everywhere in the API)."""
    return int(vi) if vd == 0 else float(vi) + float(vd)


class _Times:
    """RFC 3339 text of a bucket's start (Unix seconds), each distinct start formatted once."""

    def __init__(self) -> None:
        self._seen: dict[int, str] = {}

    def __call__(self, seconds: int) -> str:
        text = self._seen.get(seconds)
        if text is None:
            if len(self._seen) > 100_000:  # a bound on memory: starts repeat per org and metric
                self._seen.clear()
            text = self._seen[seconds] = format_rfc3339(int(seconds) * 10**9)
        return text


def _csv_chunks(blocks: Iterator[Sequence[tuple]]) -> Iterator[bytes]:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    times = _Times()
    for block in blocks:
        writer.writerows(
            (org, metric, times(start), _number(vi, vd), unit) for org, metric, start, vi, vd, unit in block
        )
        yield out.getvalue().encode()
        out.seek(0)
        out.truncate()
    if out.tell():
        yield out.getvalue().encode()


def _ndjson_chunks(blocks: Iterator[Sequence[tuple]]) -> Iterator[bytes]:
    times = _Times()
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    for block in blocks:
        lines = [
            dumps({"org_id": org, "metric": metric, "start": times(start), "value": _number(vi, vd),
                   "unit": unit})
            for org, metric, start, vi, vd, unit in block
        ]  # fmt: skip
        if lines:
            yield ("\n".join(lines) + "\n").encode()


def register_export(api: Blueprint, store, errors) -> None:
    """Add the export route to the ``/api/v1`` blueprint; ``errors`` holds the API's error helpers."""
    bad = errors.bad
    slots = threading.BoundedSemaphore(MAX_EXPORTS)

    def whole_hour(name: str) -> int:
        ns = errors.time(name, required=True)
        if ns == MAX_NS:  # a time past 2262, clamped: the last whole hour there is (nothing is later)
            ns -= ns % HOUR_NS
        if ns % HOUR_NS:
            raise bad(
                f"{name}: must be a whole hour (UTC), such as 2026-01-01T00:00:00Z: the export reads the "
                "hourly rollup, exact for whole hours only (GET /api/v1/orgs/{org}/usage reads any range)"
            )
        return ns

    @api.get("/usage/export")
    def usage_export():
        step = errors.choice("step", STEPS, "1h")
        fmt = errors.choice("format", tuple(FORMATS), "csv")
        from_ns, to_ns = whole_hour("from"), whole_hour("to")
        metric = errors.text("metric")
        if metric is not None:
            errors.summable(store, metric)
        scope = g.get("scope")
        scoped = scope is not None and not scope.all_orgs
        params: dict[str, Any] = {"from_ns": from_ns, "to_ns": max(from_ns, to_ns)}
        if metric is not None:
            params["metric"] = metric
        if scoped:
            params["orgs"] = list(scope.orgs)
        sql = schema.usage_export_sql(store.database, step, scoped, metric is not None)
        if not slots.acquire(blocking=False):
            response = errors.response(
                429, "too_many_exports", f"{MAX_EXPORTS} exports are streaming; retry later"
            )
            response.headers["Retry-After"] = "5"
            return response
        opened = contextlib.ExitStack()
        opened.callback(slots.release)
        try:
            blocks = errors.query(
                lambda: opened.enter_context(store.stream(sql, params, schema.EXPORT_SETTINGS))
            )
            # The first block read here: a query ClickHouse refuses or cannot run is an error answer (503),
            # not a 200 that ends early.
            first = errors.query(lambda: next(blocks, None))
        except BaseException:
            opened.close()
            raise
        rest = itertools.chain([] if first is None else [first], blocks)
        chunks = (_csv_chunks if fmt == "csv" else _ndjson_chunks)(rest)
        return Response(
            stream_with_context(_finishing(chunks, opened)),
            content_type=FORMATS[fmt],
            headers={"Content-Disposition": f'attachment; filename="usage-{step}.{fmt}"',
                     "Cache-Control": "no-store"},
        )  # fmt: skip


def _finishing(chunks: Iterator[bytes], opened: contextlib.ExitStack) -> Iterator[bytes]:
    """``chunks``, then the stream closed and the export's slot given back, however the reading ends (the
    client gone too). A failure mid-stream (ClickHouse gone) ends the answer without its last chunk: the
    client sees a truncated transfer, never a short file that looks whole."""
    with opened:
        try:
            yield from chunks
        except Exception:
            current_app.logger.warning("export ended early: its query failed mid-stream", exc_info=True)
            raise
