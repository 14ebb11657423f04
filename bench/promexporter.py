"""The naive Prometheus approach: per-org usage as counters with an org_id label (prometheus-client).

``python -m bench.promexporter --port P --orgs N``: 5 counters x N orgs, incremented continuously.
"""

from __future__ import annotations

import argparse
import random
import threading
import time

from prometheus_client import CollectorRegistry, Counter, start_http_server

METRICS = ("api_requests", "rows_processed", "egress_bytes", "compute_credits", "storage_writes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--orgs", type=int, required=True)
    args = ap.parse_args()
    registry = CollectorRegistry()
    counters = [Counter(f"usage_{m}", f"usage {m} per org", ["org_id"], registry=registry) for m in METRICS]
    orgs = [f"org-{i:06d}" for i in range(args.orgs)]
    for c in counters:
        for o in orgs:
            c.labels(org_id=o).inc(1)
    start_http_server(args.port, addr="127.0.0.1", registry=registry)
    rng = random.Random(1)

    def churn() -> None:
        while True:
            for _ in range(1000):
                rng.choice(counters).labels(org_id=rng.choice(orgs)).inc(rng.randint(1, 100))
            time.sleep(0.1)

    threading.Thread(target=churn, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
