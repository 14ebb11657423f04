"""The close while usage for the month is still on its way: points acknowledged (spooled) but not yet
committed because the writer cannot reach ClickHouse. The close waits for them (``Stack.wait_committed``)
only so long: then it goes on and names the collector in its record; the points, delta and cumulative, are
kept out of the statement and listed as adjustments once they land; statement + adjustments = every unit
sent, and the statement still verifies."""

import json
import time
import uuid

import requests
from conftest import drain, shared_engine
from faulty_store import faulty_connect
from otlp_builders import CUMULATIVE, point, sum_request

from meterhouse.core import close, schema
from meterhouse.core.close import Month
from meterhouse.core.config import Config
from meterhouse.runtime import Stack

M = Month.of_ns(time.time_ns()).previous().previous().previous()
NXT = Month.of_ns(M.end_ns)


def send(stack, body) -> None:
    r = requests.post(f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics", data=body.SerializeToString(),
                      headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text


def test_points_in_the_spool_at_close_become_adjustments(engine_dir, tmp_path):
    database = f"sp_{uuid.uuid4().hex[:12]}"
    control = tmp_path / "faults.json"
    control.write_text(json.dumps({"down": []}))
    config = Config(data_dir=tmp_path / "stack", database=database, otlp_http_port=0, otlp_grpc_port=0,
                    http_port=0, sql_port=0, flush_interval_s=0.05)  # fmt: skip
    stack = Stack(config, faulty_connect(shared_engine(engine_dir, database), control))
    stack.start()
    reader = shared_engine(engine_dir, database)("embedded")  # the close's own handle, never "down"
    try:
        start = M.end_ns - 3600 * 10**9
        send(
            stack,
            sum_request({"calls": [point(5, {"org.id": "a"}, t_ns=M.start_ns + 1, start_ns=M.start_ns)]}),
        )
        send(stack, sum_request({"credits": [point(10, {"org.id": "c"}, t_ns=M.end_ns - 60 * 10**9, start_ns=start)]},
                                temporality=CUMULATIVE))  # fmt: skip
        drain(stack)
        # ClickHouse goes away for the writer: what is sent now is acknowledged from the spool only.
        control.write_text(json.dumps({"down": ["embedded"]}))
        time.sleep(0.3)
        send(
            stack,
            sum_request({"calls": [point(7, {"org.id": "a"}, t_ns=M.end_ns - 1, start_ns=M.end_ns - 2)]}),
        )
        send(
            stack,
            sum_request({"calls": [point(2**62, {"org.id": "b"}, t_ns=M.start_ns, start_ns=M.start_ns - 1)]}),
        )
        send(stack, sum_request({"credits": [point(25, {"org.id": "c"}, t_ns=M.end_ns - 1, start_ns=start)]},
                                temporality=CUMULATIVE))  # fmt: skip
        assert stack.collector.spool.pending_points == 3
        stack.close_wait_s = 1.0
        record = close.close_month(reader, M, late_window_days=35, wait_committed=stack.wait_committed)
        assert record.unconfirmed == [stack.name]  # it had not committed what it acknowledged
        statement = {(o, m): (int(ti), int(n)) for _k, o, m, _u, ti, _td, n, *_ in reader.rows(
            schema.statements_sql(database, False), {"month": M.key, "limit": 100, "offset": 0})}  # fmt: skip
        assert statement == {("a", "calls"): (5, 1), ("c", "credits"): (10, 1)}
        assert record.reconciled
        # ClickHouse is back: the spooled points land, after the close, and the series goes on next month.
        control.write_text(json.dumps({"down": []}))
        drain(stack)
        send(stack, sum_request({"credits": [point(70, {"org.id": "c"}, t_ns=NXT.start_ns + 3600 * 10**9, start_ns=start)]},
                                temporality=CUMULATIVE))  # fmt: skip
        drain(stack)
        adjustments = reader.rows(schema.adjustments_sql(database, False), {
            "from_ns": M.start_ns, "to_ns": M.end_ns, "cutoff_ms": record.cutoff_ms, "limit": 100, "offset": 0})  # fmt: skip
        adj = {(o, m): (int(ai), int(n)) for o, m, _u, ai, _ad, n, _t, _b in adjustments}
        assert adj == {("a", "calls"): (7, 1), ("b", "calls"): (2**62, 1), ("c", "credits"): (15, 1)}
        # Nothing changed the signed month, nothing was lost or counted twice.
        assert close.get_close(reader, M) == record and close.verify_statements(reader, M) == []
        following = close.close_month(reader, NXT, late_window_days=35)
        nxt = reader.rows(
            schema.statements_sql(database, False), {"month": NXT.key, "limit": 100, "offset": 0}
        )
        assert [(o, m, int(ti)) for _k, o, m, _u, ti, *_ in nxt] == [("c", "credits", 45)]
        assert statement[("c", "credits")][0] + adj[("c", "credits")][0] + 45 == 70  # the series' last value
        assert following.reconciled
    finally:
        stack.shutdown(5)
        reader.client.command(f"DROP DATABASE IF EXISTS {database} SYNC")
