"""Adversary 38: paging ``GET /api/v1/orgs`` stops at an org id of a few hundred characters, or at once
for a metric name of 700.

Claim (README, Reading usage, *What holds while usage arrives*): "With ``order=org``, every org that had usage
in the range when the first page was read comes back exactly once ... This is the order to read every org
by." The collector stores org ids up to ``max_attribute_length`` (4096 characters) and metric names up to
1024, and ``exporter/cursor.py`` says a cursor fits "an org id and a metric of 1024 characters each"
(``MAX_CHARS`` 12,288). But the API reads ``cursor`` through ``_text``, which refuses any query parameter
over 1024 characters (``MAX_ID_LENGTH``): a cursor is base64 of JSON, so its own next_cursor is refused as
soon as the last org of a page has an id of ~620 ASCII characters (or ~150 emoji, or ~100 control
characters), or the metric's name is ~650 characters long. Every org after that page is unreachable.

What I did: 5 orgs over OTLP/HTTP into a real in-process stack (one with a long id, or a long metric name),
paged by org with ``limit=1`` following ``next_cursor`` alone, as the README says.
Measured: the next_cursor answered after the long org (1,135 characters for a 700-character id) is 400
``invalid_parameter`` "cursor: at most 1024 characters"; 3 of the 5 orgs never come back (with a
700-character metric: 4 of 5). Each org id used is accepted by ``GET /api/v1/orgs/{org}/usage`` too.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from api_stack import TOKENS, WILD, api, send
from conftest import drain

T0 = int(datetime(2026, 11, 2, 10, tzinfo=UTC).timestamp()) * 10**9
RANGE = {"from": "2026-11-02T10:00:00Z", "to": "2026-11-02T12:00:00Z"}
LONG = {
    "ascii-700": ("api.calls", "b-" + "x" * 698),
    "emoji-160": ("api.calls", "b-" + "\U0001f600" * 160),
    "metric-700": ("m" * 700, "b-org"),
}


@pytest.mark.parametrize("case", list(LONG))
def test_paging_by_org_reaches_every_org_past_a_long_id_or_metric(stack_factory, case):
    metric, long_org = LONG[case]
    stack = stack_factory(auth_tokens=TOKENS)
    orgs = ["a-org", long_org, "c-org", "d-org", "e-org"]
    send(stack, metric, [(o, 10 + i, T0 + 60 * 10**9) for i, o in enumerate(orgs)])
    drain(stack)
    # The per-org API reads the long org (its id is within the API's 1024 characters).
    one = api(stack, f"/orgs/{long_org}/usage", WILD, metric=metric, **RANGE)
    assert one.status_code == 200 and one.json()["total"] == 11, one.text[:200]
    body = api(stack, "/orgs", WILD, metric=metric, order="org", limit=1, **RANGE).json()
    got = [o["org_id"] for o in body["orgs"]]
    failure = None
    while body["next_cursor"] is not None:
        r = api(stack, "/orgs", WILD, cursor=body["next_cursor"])
        if r.status_code != 200:
            failure = (len(body["next_cursor"]), r.status_code, r.text[:200])
            break
        body = r.json()
        got += [o["org_id"] for o in body["orgs"]]
    assert failure is None, f"paging stopped after {len(got)} of {len(orgs)} orgs: {failure}"
    assert got == orgs
