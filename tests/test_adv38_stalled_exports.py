"""Adversary 38 (held): exports whose clients stop reading hold neither ingest nor the rest of the API, and
their slots come back once the clients go.

Claim (README, export): "a slow reader holds no connection the writer or other queries use"; brief: "a
slow or vanishing client does not hold up ingest or leak the export slots (max 2 at once, then 429)". On
the embedded engine a streamed query holds a chdb handle of its own for as long as its reader takes.

What I did: 300 orgs x 72 hours x 8 metrics (172,800 rollup rows, ~10 MB of CSV) over OTLP/HTTP into an in-process
stack; two raw-socket clients with a 4 KiB receive buffer ask for the whole export and read nothing (their
streams stall mid-way, each holding a slot, a WSGI thread and a chdb handle); then a third export (429),
new usage sent and drained, the per-org API and the paging API read; then the two clients close and the
export is asked again.
"""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime

import pytest
from api_stack import TOKENS, WILD, H, api, send
from conftest import drain

T0 = int(datetime(2026, 10, 1, tzinfo=UTC).timestamp()) * 10**9
METRICS = ["api.calls", *(f"m{i}.calls" for i in range(7))]
RANGE = {"from": "2026-10-01T00:00:00Z", "to": "2026-10-04T00:00:00Z"}


@pytest.mark.soak  # an attack that held
def test_stalled_exports_hold_neither_ingest_nor_the_api(stack_factory):
    stack = stack_factory(auth_tokens=TOKENS)
    for m in METRICS:
        send(stack, m, [(f"org-{o:04d}", 1 + h, T0 + h * H + o) for o in range(300) for h in range(72)])
    drain(stack, 120)
    held = []
    for _ in range(2):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", stack.http_port))
        s.sendall(f"GET /api/v1/usage/export?from={RANGE['from']}&to={RANGE['to']}&step=1h HTTP/1.1\r\n"
                  f"Host: x\r\nAuthorization: Bearer {WILD.token}\r\n\r\n".encode())  # fmt: skip
        held.append(s)
    try:
        time.sleep(2)
        assert api(stack, "/usage/export", **RANGE).status_code == 429
        t = time.monotonic()
        send(stack, "api.calls", [(f"new-{i}", 5, T0 + 5 * H + i) for i in range(2000)])
        drain(stack, 30)
        ingest_s = time.monotonic() - t
        t = time.monotonic()
        one = api(stack, "/orgs/new-7/usage", metric="api.calls", **RANGE)
        ranking = api(stack, "/orgs", metric="api.calls", order="org", limit=5, **RANGE)
        read_s = time.monotonic() - t
        assert one.status_code == 200 and one.json()["total"] == 5, one.text[:200]
        assert ranking.status_code == 200
        print(
            f"\ningest of 2,000 points with two stalled exports: {ingest_s:.2f} s; two API reads {read_s:.2f} s"
        )
        assert ingest_s < 10 and read_s < 5
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 15
    while (r := api(stack, "/usage/export", **RANGE)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200 and r.text.count("\r\n") == 1 + 300 * 72 * len(METRICS) + 2000, r.status_code
