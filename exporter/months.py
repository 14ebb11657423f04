"""The monthly side of the API: close a month, read its statements and adjustments (``/api/v1``).

Statement lines are immutable; adjustments are the points of a closed month committed after its close.
JSON by default, CSV with ``Accept: text/csv``; pages of ``limit`` lines from ``offset``.
"""

from __future__ import annotations

import csv
import io
from contextlib import nullcontext
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from meterhouse.core import close, rollup, schema
from meterhouse.core.timefmt import format_rfc3339_ns

MAX_PAGE = 1000
MAX_OFFSET = 10**12
STATEMENT_CSV = (
    "month", "org_id", "metric", "unit", "total", "points", "total_int", "total_double", "first_point",
    "last_point", "close_id", "closed_at", "forced", "checksum", "rollup_total", "rollup_points",
)  # fmt: skip
ADJUSTMENT_CSV = ("month", "org_id", "metric", "unit", "amount", "points", "amount_int", "amount_double",
                  "arrived_at", "batch_id")  # fmt: skip


def _number(vi: int, vd: float) -> int | float:
    return int(vi) if vd == 0 else float(vi) + float(vd)


def _month_text(key: int) -> str:
    return f"{key // 100:04d}-{key % 100:02d}"


def close_json(r: close.CloseRecord) -> dict[str, Any]:
    return {
        "month": _month_text(r.month), "close_id": r.close_id, "status": r.status, "forced": bool(r.forced),
        "cutoff": format_rfc3339_ns(r.cutoff_ms * 10**6),
        "closed_at": format_rfc3339_ns(r.finished_ms * 10**6) if r.done else None,
        "orgs": r.orgs, "lines": r.lines, "points": r.points, "total": _number(r.total_int, r.total_double),
        "rollup": {"total": _number(r.rollup_int, r.rollup_double), "points": r.rollup_points},
        "mismatched_lines": r.mismatched_lines, "reconciled": r.reconciled,
        "unconfirmed_collectors": list(r.unconfirmed),
    }  # fmt: skip


def preview_json(p: close.Preview) -> dict[str, Any]:
    """A dry run: what the close writes (``status``: ``new``, ``running`` or ``done``); nothing written."""
    return {
        "dry_run": True, "month": _month_text(p.month), "status": p.status, "forced": bool(p.forced),
        "cutoff": format_rfc3339_ns(p.cutoff_ms * 10**6), "orgs": p.orgs, "lines": p.lines,
        "lines_written": p.lines_written, "points": p.points, "total": _number(p.total_int, p.total_double),
        "unconfirmed_collectors": list(p.unconfirmed),
    }  # fmt: skip


def statement_json(row: tuple) -> dict[str, Any]:
    s = dict(zip(schema.STATEMENT_FIELDS, row, strict=True))
    ti, td = int(s["total_int"]), float(s["total_double"])
    ri, rd = int(s["rollup_int"]), float(s["rollup_double"])
    return {
        "month": _month_text(int(s["month"])), "org_id": s["org_id"], "metric": s["metric"],
        "unit": s["unit"], "total": _number(ti, td), "points": int(s["points"]),
        "total_int": str(ti), "total_double": td,
        "first_point": format_rfc3339_ns(int(s["first_ns"])),
        "last_point": format_rfc3339_ns(int(s["last_ns"])),
        "close_id": s["close_id"], "closed_at": format_rfc3339_ns(int(s["closed_ms"]) * 10**6),
        "forced": bool(s["forced"]), "checksum": s["checksum"],
        "rollup_total": _number(ri, rd), "rollup_points": int(s["rollup_points"]),
        "reconciled": ri == ti and int(s["rollup_points"]) == int(s["points"])
        and abs(rd - td) <= close.DOUBLE_TOLERANCE * max(1.0, abs(td)),
    }  # fmt: skip


def register_months(
    api: Blueprint, store, late_window_days: int, wait_committed: close.WaitCommitted | None, errors
) -> None:
    """Add the month routes to the ``/api/v1`` blueprint; ``errors`` holds the API's error helpers;
    ``wait_committed`` is what a close waits for before its cutoff (None: nothing to wait for)."""
    ApiError, query, bad = errors.ApiError, errors.query, errors.bad

    def month_of(text: str) -> close.Month:
        try:
            return close.Month.parse(text)
        except ValueError as e:
            raise bad(str(e)) from None

    def page() -> tuple[int, int]:
        out = []
        for name, default, top in (("limit", MAX_PAGE, MAX_PAGE), ("offset", 0, MAX_OFFSET)):
            raw = request.args.get(name)
            if raw in (None, ""):
                out.append(default)
                continue
            # ASCII digits, and no more of them than the bound has: str.isdigit() is also true for '²' and
            # other scripts' digits, which int() refuses or reads, and int() of thousands of digits raises.
            if (
                not (raw.isascii() and raw.isdigit())
                or len(raw) > len(str(top))
                or not (1 if name == "limit" else 0) <= int(raw) <= top
            ):
                raise bad(
                    f"{name}: must be a whole number up to {top}"
                    + (" and at least 1" if name == "limit" else "")
                )
            out.append(int(raw))
        return out[0], out[1]

    def scope_params() -> tuple[bool, dict[str, Any]]:
        scope = g.get("scope")
        if scope is None or scope.all_orgs:
            return False, {}
        return True, {"orgs": list(scope.orgs)}

    def visible(month: close.Month, record: close.CloseRecord) -> close.CloseRecord:
        """The close as this token may see it: an org-scoped token gets its orgs' totals only."""
        scoped, params = scope_params()
        if not scoped:
            return record
        return query(lambda: close.scoped_close(store, month, record, params["orgs"]))

    def finished(month: close.Month) -> close.CloseRecord:
        record = query(lambda: close.get_close(store, month))
        if record is None or not record.done:
            raise ApiError(404, "not_closed", f"{month} is not closed")
        return record

    def wants_csv() -> bool:
        accept = request.accept_mimetypes
        return (
            accept.best_match(["application/json", "text/csv"]) == "text/csv"
            and accept["text/csv"] > accept["application/json"]
        )

    def csv_response(header: tuple[str, ...], lines: list[dict], next_offset: int | None) -> Response:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=header, extrasaction="ignore", lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(lines)
        response = Response(out.getvalue(), content_type="text/csv; charset=utf-8")
        if next_offset is not None:
            response.headers["X-Next-Offset"] = str(next_offset)
        return response

    @api.post("/months/<month>/close")
    def close_month(month: str):
        m = month_of(month)
        scope = g.get("scope")
        if scope is not None and not scope.admin:
            raise ApiError(403, "forbidden", "closing a month needs an admin token")
        force, dry = request.args.get("force", "false"), request.args.get("dry_run", "false")
        for name, value in (("force", force), ("dry_run", dry)):
            if value not in ("true", "false"):
                raise bad(f"{name}: must be true or false")
        kw: dict[str, Any] = dict(
            late_window_days=late_window_days, force=force == "true", wait_committed=wait_committed
        )
        try:
            if dry == "true":
                if scope_params()[0]:  # the month's totals over every org are not an org token's to read
                    raise ApiError(403, "forbidden", "a dry run needs a token for every org")
                return jsonify(preview_json(query(lambda: close.dry_run(store, m, **kw))))
            record = query(lambda: close.close_month(store, m, **kw))
        except close.CloseRefused as e:
            raise ApiError(409, e.code, str(e)) from None
        return jsonify(close_json(visible(m, record)))

    @api.post("/months/<month>/rollup/rebuild")
    def rollup_rebuild(month: str):
        """The month's hourly rollups computed again from raw points (core/rollup.py), with the collector's
        writer held meanwhile; the remedy of MeterhouseReconciliationDrift."""
        m = month_of(month)
        scope = g.get("scope")
        if scope is not None and not scope.admin:
            raise ApiError(403, "forbidden", "rebuilding a month's rollup needs an admin token")
        hold = current_app.extensions.get("meterhouse.writer_hold", nullcontext)
        try:
            target = store.active_store() if hasattr(store, "active_store") else store
            done = query(lambda: rollup.rebuild_month(target, m, hold=hold))
        except rollup.RebuildRefused as e:
            raise ApiError(409, "refused", str(e)) from None
        return jsonify(done.as_json())

    @api.get("/months/<month>/close")
    def month_close(month: str):
        m = month_of(month)
        verify = request.args.get("verify", "false")
        if verify not in ("true", "false"):
            raise bad("verify: must be true or false")
        record = query(lambda: close.get_close(store, m))
        if record is None:
            raise ApiError(404, "not_closed", f"{m} has no close")
        body = close_json(visible(m, record))
        if verify == "true" and record.done:
            # The lines that no longer match the raw points they were computed from (at most 1000).
            scope = g.get("scope")
            found = query(lambda: close.verify_statements(store, m))
            found = [x for x in found if scope is None or scope.allows(x["org_id"])]
            body["verification"] = {
                "verified": not found,
                "mismatches": [
                    {"org_id": x["org_id"], "metric": x["metric"], "statement_points": x["statement_points"],
                     "raw_points": x["raw_points"], "statement_total": _number(x["statement_total"],
                     x["statement_double"]), "raw_total": _number(x["raw_total"], x["raw_double"])}
                    for x in found
                ],
            }  # fmt: skip
        progress = close.running_progress(m)
        if progress is not None and not record.done and not scope_params()[0]:  # orgs of the month: all
            eta = progress.eta_s
            body["progress"] = {
                "done": progress.done, "total": progress.total, "rate": round(progress.rate, 1),
                "eta_s": None if eta is None else round(eta),
            }  # fmt: skip
        return jsonify(body)

    @api.get("/months/<month>/statements")
    def statements(month: str):
        m = month_of(month)
        limit, offset = page()
        record = finished(m)
        scoped, params = scope_params()
        params.update(month=m.key, limit=limit, offset=offset)
        rows = query(lambda: store.rows(schema.statements_sql(store.database, scoped), params))
        lines = [statement_json(r) for r in rows]
        next_offset = offset + limit if len(lines) == limit else None
        if wants_csv():
            return csv_response(STATEMENT_CSV, lines, next_offset)
        return jsonify({"month": str(m), "close": close_json(visible(m, record)), "limit": limit,
                        "offset": offset, "next_offset": next_offset, "statements": lines})  # fmt: skip

    @api.get("/months/<month>/adjustments")
    def adjustments(month: str):
        m = month_of(month)
        limit, offset = page()
        record = finished(m)
        scoped, params = scope_params()
        rows = query(lambda: store.rows(schema.adjustments_sql(store.database, scoped), {
            **params, "from_ns": m.start_ns, "to_ns": m.end_ns, "cutoff_ms": record.cutoff_ms,
            "limit": limit, "offset": offset}))  # fmt: skip
        lines = [
            {"month": str(m), "org_id": org, "metric": metric, "unit": unit, "amount": _number(ai, ad),
             "points": int(n), "amount_int": str(int(ai)), "amount_double": float(ad),
             "arrived_at": format_rfc3339_ns(int(arrived)), "batch_id": batch}
            for org, metric, unit, ai, ad, n, arrived, batch in rows
        ]  # fmt: skip
        next_offset = offset + limit if len(lines) == limit else None
        if wants_csv():
            return csv_response(ADJUSTMENT_CSV, lines, next_offset)
        return jsonify({"month": str(m), "close": close_json(visible(m, record)), "limit": limit,
                        "offset": offset, "next_offset": next_offset, "adjustments": lines})  # fmt: skip

    @api.get("/orgs/<path:org_id>/statements")
    def org_statements(org_id: str):
        org_id = errors.org_id(org_id)
        limit, offset = page()
        rows = query(lambda: store.rows(schema.org_statements_sql(store.database),
                                        {"org": org_id, "limit": limit, "offset": offset}))  # fmt: skip
        lines = [statement_json(r) for r in rows]
        next_offset = offset + limit if len(lines) == limit else None
        if wants_csv():
            return csv_response(STATEMENT_CSV, lines, next_offset)
        return jsonify({"org_id": org_id, "limit": limit, "offset": offset, "next_offset": next_offset,
                        "statements": lines})  # fmt: skip
