"""Usage sent to an in-process stack over OTLP/HTTP, for the paging and export tests."""

from __future__ import annotations

import requests
from otlp_builders import point, sum_request

from meterhouse.core.config import Token

H = 3600 * 10**9
SCOPED = Token("scoped-token-0123456789", ("org-00002", "org-00005", "org-00007", "org-b"))
WILD = Token("wildcard-token-0123456789", ("*",))
TOKENS = (SCOPED, WILD)


def send(
    stack, metric: str, points: list[tuple[str, int | float, int]], unit: str = "{call}", per: int = 25_000
):
    """``(org, value, time_ns)`` points of one delta sum through the OTLP/HTTP receiver, ``per`` a request."""
    url = f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics"
    for i in range(0, len(points), per):
        pts = [point(v, {"org.id": org}, t_ns=t) for org, v, t in points[i : i + per]]
        body = sum_request({metric: pts}, unit=unit).SerializeToString()
        r = requests.post(url, data=body, headers={"Content-Type": "application/x-protobuf"}, timeout=120)
        assert r.status_code == 200, r.text[:300]


def api(stack, path: str, token: Token | None = WILD, **params) -> requests.Response:
    headers = {"Authorization": f"Bearer {token.token}"} if token else {}
    return requests.get(f"http://127.0.0.1:{stack.http_port}/api/v1{path}", params=params, headers=headers,
                        timeout=120)  # fmt: skip
