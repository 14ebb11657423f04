"""Senders whose requests each take (almost) the whole decode budget, legitimately counted, beside an
honest sender of one-point requests: the honest sender waits for the budget with them, on equal terms
(``DecodeBudget._take``: every waiter woken, the first to take the lock wins), and after ``wait_s``
(10 s) is answered 503."""

from __future__ import annotations

import gzip
import threading
import time
import uuid

import pytest
import requests
from hostile_mix import PROTOBUF
from otlp_builders import point, sum_request


def json_points_request(points: int) -> bytes:
    """OTLP/JSON of one gauge with ``points`` one-value points: 33 bytes and one object each (432 bytes
    counted), over ``--max-points-per-request`` but counted only once parsed (seconds of CPU)."""
    head = '{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"attack.json","gauge":{"dataPoints":['
    return (head + ",".join(['{"asInt":"1","timeUnixNano":"1"}'] * points) + "]}}]}]}]}").encode()


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_budget_sized_requests_do_not_shut_out_an_honest_sender(up):
    """6 senders of OTLP/JSON of 372,822 points (12.3 MB, 30 kB gzipped): each counted 261 bytes short of
    the whole decode budget (161 MB) and parsed for seconds (3.4 s here) before its points are counted
    and it is refused 413, so one is parsed at a time and everything else waits for it, honest requests
    too. Of 20 honest one-point requests sent
    one after another, those that lose the race for the budget to a hostile one over 10 s are answered
    503 (a 5xx for an honest sender): 3 of 20 on main, in 43 s (hostile answers: 5 413, 13 503)."""
    template = json_points_request(372_822)
    stop = threading.Event()
    answers: dict[str, int] = {}

    def attack() -> None:
        while not stop.is_set():
            body = template.replace(b"attack.json", uuid.uuid4().hex[:11].encode())  # no two alike
            try:
                r = requests.post(f"{up.otlp_http}/v1/metrics", data=gzip.compress(body, 1),
                                  headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}, timeout=120)  # fmt: skip
                answers[str(r.status_code)] = answers.get(str(r.status_code), 0) + 1
            except requests.RequestException:
                time.sleep(0.2)

    threads = [threading.Thread(target=attack, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        honest = []
        for i in range(20):
            body = sum_request({"honest.calls": [point(1, {"org.id": "org-honest", "i": str(i)})]})
            r = requests.post(f"{up.otlp_http}/v1/metrics", data=body.SerializeToString(), headers=PROTOBUF,
                              timeout=60)  # fmt: skip
            honest.append(r.status_code)
    finally:
        stop.set()
    refused = [s for s in honest if s != 200]
    assert not refused, f"honest answers {honest}; hostile answers {answers}"
