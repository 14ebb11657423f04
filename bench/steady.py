"""Scenario 14: the realistic fleet at its own rate for 30 minutes, merges included.

One ``meterhouse up`` receives the fleet of ``bench/payloads.py`` (15,000 orgs x 4 metrics x 12 attribute
sets, each series a delta sum every 10-60 s: about 25,800 points/s) over OTLP/HTTP in 5,000-point
requests, as one gateway Collector would send it, for ``--minutes``. Every minute the server's CPU,
RSS, points written and lag histogram are read; the table gives each 5-minute window. At the end every
point sent must be written (``meterhouse_points_written_total``).

The fleet is prepared once, one round of its schedule (``make_fleet_requests`` over
:data:`bench.payloads.FLEET_PERIOD_S`'s longest period), with every time written as a sentinel; each
round is sent with its times moved to the round's place, so 30 minutes need one round prepared (about
1.5 million points), not 46 million. A series' points stay in time order across rounds.
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

from bench.common import lag_buckets, quantile, scrape
from bench.ingest import start_up, wait_written
from bench.payloads import FLEET_PERIOD_S, make_fleet_requests
from bench.procstat import cpu_seconds, memory

#: Templates' times start here: its top two bytes (0x5A5A) find the fixed64 time fields in the bytes (a
#: first point's start, a period before it, and three rounds after it keep them).
SENTINEL = 0x5A5A << 48 | 1 << 47
_TIME_TAGS = (0x11, 0x19)  # NumberDataPoint.start_time_unix_nano, .time_unix_nano (fixed64)
_U64 = struct.Struct("<Q")

COLUMNS = ["minutes", "points", "points_per_s", "cpu_s_per_million", "p50_lag_s", "p99_lag_s", "rss_mb"]


def time_offsets(body: bytes, span_ns: int) -> list[int]:
    """Where ``body`` holds a time field written from :data:`SENTINEL` (a fixed64 field 2 or 3 whose value
    is within ``span_ns`` of it, either side)."""
    out, at = [], body.find(b"\x5a\x5a")
    while at >= 0:
        o = at - 6
        if o >= 1 and body[o - 1] in _TIME_TAGS and abs(_U64.unpack_from(body, o)[0] - SENTINEL) < span_ns:
            out.append(o)
        at = body.find(b"\x5a\x5a", at + 1)
    return out


def moved(body: bytes, offsets: list[int], shift: int) -> bytes:
    """``body`` with every sentinel time moved by ``shift`` nanoseconds (to ``start + t``)."""
    out = bytearray(body)
    for o in offsets:
        _U64.pack_into(out, o, _U64.unpack_from(out, o)[0] + shift)
    return bytes(out)


def send(target: str, rounds: list[tuple[bytes, list[int], int]], rate: float, seconds: float, shift0: int,
         round_ns: int) -> dict:  # fmt: skip
    """Send the round's requests in order, round after round, each at its share of ``rate`` points/s,
    for ``seconds``; returns points sent and failures."""
    host, port = target.rsplit(":", 1)
    state = {"next": 0, "points": 0, "failed": 0}
    lock = threading.Lock()
    started = time.monotonic()
    points_each = rounds[0][2]

    def worker() -> None:
        conn = HTTPConnection(host.split("//")[-1], int(port), timeout=60)
        while True:
            with lock:
                i = state["next"]
                due = started + i * points_each / rate
                if due - started >= seconds:
                    return
                state["next"] = i + 1
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            body, offsets, points = rounds[i % len(rounds)]
            data = moved(body, offsets, shift0 + (i // len(rounds)) * round_ns)
            for _attempt in range(100):
                try:
                    conn.request(
                        "POST", "/v1/metrics", body=data, headers={"Content-Type": "application/x-protobuf"}
                    )
                    r = conn.getresponse()
                    r.read()
                except OSError:
                    conn.close()
                    conn = HTTPConnection(host.split("//")[-1], int(port), timeout=60)
                    continue
                if r.status in (429, 503):
                    time.sleep(0.2)
                    continue
                with lock:
                    state["points" if r.status == 200 else "failed"] += points
                break

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return state


def run(work: Path, quick: bool, minutes: float = 30) -> dict:
    orgs = 300 if quick else 15_000
    minutes = 0.5 if quick else minutes
    longest_s = FLEET_PERIOD_S[1]
    round_ns = int(longest_s * 1e9)
    # One round: every point of the schedule's first longest period, in 5,000-point requests.
    bodies, total, _ = make_fleet_requests(orgs, 5_000, 0, SENTINEL, span_s=longest_s)
    sizes = [5_000] * (len(bodies) - 1) + [total - 5_000 * (len(bodies) - 1)]
    rounds = [(b, time_offsets(b, 3 * round_ns), n) for b, n in zip(bodies, sizes, strict=True)]
    rate = total / longest_s  # the fleet's own rate: one round of its schedule per longest period
    proc, ports = start_up(work, "steady")
    api = f"http://127.0.0.1:{ports['api']}"
    rows: list[dict] = []
    try:
        start = time.time_ns() - 3600 * 10**9  # an hour ago: times never pass the clock within the hour
        result: dict = {}
        sender = threading.Thread(
            target=lambda: result.update(
                send(f"127.0.0.1:{ports['http']}", rounds, rate, minutes * 60, start - SENTINEL, round_ns)
            )  # fmt: skip
        )
        t0 = time.monotonic()
        sender.start()
        window_s = 60 if quick else 300
        last = (t0, cpu_seconds(proc.pid), 0.0, lag_buckets(scrape(f"{api}/metrics")))
        rss = 0
        while sender.is_alive():
            sender.join(min(window_s, 60))
            rss = max(rss, memory(proc.pid)["rss"])
            now = time.monotonic()
            if now - last[0] < window_s and sender.is_alive():
                continue
            m = scrape(f"{api}/metrics")
            written, cpu, lag = (
                m.get("meterhouse_points_written_total", 0),
                cpu_seconds(proc.pid),
                lag_buckets(m),
            )
            delta = [(le, c - dict(last[3]).get(le, 0)) for le, c in lag]
            n = written - last[2]
            rows.append({
                "minutes": round((now - t0) / 60, 1), "points": int(n), "points_per_s": n / (now - last[0]),
                "cpu_s_per_million": (cpu - last[1]) / max(n, 1) * 1e6, "p50_lag_s": quantile(0.5, delta),
                "p99_lag_s": quantile(0.99, delta), "rss_mb": rss / 2**20,
            })  # fmt: skip
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
            last, rss = (now, cpu, written, lag), 0
        wait_written(api, result["points"])
        written = scrape(f"{api}/metrics").get("meterhouse_points_written_total", 0)
        return {
            "orgs": orgs, "rate_points_per_s": rate, "sent": result["points"], "failed": result["failed"],
            "written": written, "exact": written == result["points"] and not result["failed"],
            "peak_rss_mb": memory(proc.pid)["peak_rss"] / 2**20, "rows": rows,
        }  # fmt: skip
    finally:
        proc.stop()
