"""A month closed on a running `meterhouse up` while usage for that month keeps arriving over OTLP: every
unit acknowledged is in the statement or an adjustment, exactly once, and the close still reconciles."""

import threading
import time
from collections import Counter

import requests
from otlp_builders import point, sum_request

from meterhouse.core.close import Month

LAST = Month.of_ns(time.time_ns()).previous()  # always inside the 35-day late window: a forced close


def test_a_forced_close_while_ingest_runs(up_factory, tmp_path):
    up = up_factory("--late-window-days", "35", data_dir=tmp_path / "srv")
    sent: Counter = Counter()
    stop = threading.Event()
    errors: list[str] = []

    def ingest() -> None:
        i = 0
        while not stop.is_set() and i < 2000:
            i += 1
            org, value = f"org-{i % 7}", (i * 7919) % 1000 + (2**40 if i % 5 == 0 else 0)
            t = LAST.start_ns + (i * 3_600_000_000_017) % (LAST.end_ns - LAST.start_ns)
            body = sum_request({"calls": [point(value, {"org.id": org}, t_ns=t, start_ns=t - 1)]})
            try:
                r = requests.post(f"{up.otlp_http}/v1/metrics", data=body.SerializeToString(),
                                  headers={"Content-Type": "application/x-protobuf"}, timeout=30)  # fmt: skip
            except requests.RequestException as e:
                errors.append(str(e))
                continue
            if r.status_code == 200:
                sent[org] += value
            else:
                errors.append(f"{r.status_code} {r.text[:200]}")
            time.sleep(0.005)

    worker = threading.Thread(target=ingest)
    worker.start()
    try:
        time.sleep(4.0)  # some of the traffic before the close is asked for
        refused = requests.post(f"{up.api}/api/v1/months/{LAST}/close", timeout=60)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "late_window"
        closed = requests.post(f"{up.api}/api/v1/months/{LAST}/close?force=true", timeout=300)
        assert closed.status_code == 200, closed.text
        time.sleep(1.5)  # and more of the month after its close
    finally:
        stop.set()
        worker.join(60)
    assert not errors, errors[:3]
    up.drain()
    record = closed.json()
    assert record["forced"] and record["status"] == "done"
    assert record["reconciled"], record  # what arrived during the close is no mismatch
    statements = requests.get(f"{up.api}/api/v1/months/{LAST}/statements", timeout=30).json()["statements"]
    adjustments = requests.get(f"{up.api}/api/v1/months/{LAST}/adjustments", timeout=30).json()["adjustments"]
    got: Counter = Counter()
    for line in statements:
        got[line["org_id"]] += int(line["total_int"])
        assert line["forced"] and line["reconciled"]
    for a in adjustments:
        got[a["org_id"]] += int(a["amount_int"])
    assert adjustments and statements  # the close fell in the middle of the traffic
    assert got == sent  # to the unit, once each
    verify = requests.get(f"{up.api}/api/v1/months/{LAST}/close?verify=true", timeout=60).json()
    assert verify["verification"] == {"verified": True, "mismatches": []}
    assert requests.post(f"{up.api}/api/v1/months/{LAST}/close", timeout=60).json() == record
