"""Ingest tokens, org scope, rate limit and series limit, below the transports (real ClickHouse where
state is read back)."""

import time

import pytest
from otlp_builders import CUMULATIVE, point, sum_request
from prometheus_client import CollectorRegistry

from meterhouse.collector.auth import IngestTokens, Unauthenticated
from meterhouse.collector.decode import Limits, decode_request
from meterhouse.collector.ingest import attribute_sets_loader
from meterhouse.collector.ratelimit import RateLimiter
from meterhouse.collector.series import OVERFLOW_KEY, SeriesLimiter
from meterhouse.core.config import Token
from meterhouse.core.metrics import PipelineMetrics

A = Token("token-of-org-a-000000001", ("org-a",))
ALL = Token("token-of-everyone-000002", ("*",))


def test_tokens_authenticate_bearer_only_and_replace_atomically():
    tokens = IngestTokens((A, ALL))
    assert tokens.authenticate(f"Bearer {A.token}").token == A
    assert tokens.authenticate(f"bearer  {ALL.token} ").token == ALL
    for bad in (
        None,
        "",
        A.token,
        f"Basic {A.token}",
        "Bearer ",
        f"Bearer {A.token}x",
        f"Bearer {A.token[:-1]}",
    ):
        with pytest.raises(Unauthenticated) as e:
            tokens.authenticate(bad)
        assert A.token not in str(e.value)
    principal = tokens.authenticate(f"Bearer {A.token}")
    assert A.token not in principal.id and len(principal.id) == 12
    tokens.replace((ALL,))
    with pytest.raises(Unauthenticated):
        tokens.authenticate(f"Bearer {A.token}")
    tokens.replace(())
    assert tokens.authenticate(None) is None  # no tokens: ingest is open


def test_token_comparison_is_constant_time_over_all_tokens(monkeypatch):
    """Every configured token is compared (hmac.compare_digest on equal-length digests), match or not."""
    import meterhouse.collector.auth as auth

    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(
        auth.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b)
    )
    tokens = IngestTokens((A, ALL, Token("third-token-000000000003", ("x",))))
    tokens.authenticate(f"Bearer {A.token}")
    with pytest.raises(Unauthenticated):
        tokens.authenticate("Bearer short")
    with pytest.raises(Unauthenticated):
        tokens.authenticate("Bearer a-much-longer-unknown-token-" + "x" * 100)
    assert calls == [(32, 32)] * 9  # three tokens, three look-ups, lengths independent of the input


def test_rate_limiter_buckets_per_sender_with_retry_after():
    now = [0.0]
    r = RateLimiter(100, 200, clock=lambda: now[0])
    assert r.take("a", 150) == 0
    assert r.take("a", 100) == 1  # 50 left, 100 needed: half a second → 1 s
    assert r.take("b", 200) == 0  # another sender has its own bucket
    now[0] = 0.5
    assert r.take("a", 100) == 0
    assert r.take("a", 1000) == 2  # larger than the burst: admitted once the bucket is full (200 at 2 s)
    now[0] = 2.5
    assert r.take("a", 1000) == 0  # into debt: 200 - 1000
    assert r.take("a", 1) == 9  # ceil(801 / 100)
    r.refund("a", 1000)
    assert r.take("a", 1) == 0


def test_decode_rejects_points_of_orgs_outside_the_scope_and_keeps_the_rest():
    req = sum_request({"calls": [point(5, {"org.id": "org-a"}), point(7, {"org.id": "org-b"}), point(9, {})]})
    r = decode_request(req, Limits(), now_ns=time.time_ns(), digest="d", allowed_org=A.allows)
    assert r.batch.columns["org_id"] == ["org-a"] and r.batch.columns["value_int"] == [5]
    assert r.rejected == {"org_not_allowed": 2}
    assert r.unattributed == 0
    assert "org_not_allowed" in r.error_message()


def columns(sets: list[tuple[str, str, dict]]):
    return {
        "org_id": [o for o, _, _ in sets],
        "metric": [m for _, m, _ in sets],
        "attr_keys": [sorted(a) for _, _, a in sets],
        "attr_values": [[a[k] for k in sorted(a)] for _, _, a in sets],
    }


def test_series_limiter_folds_new_sets_over_the_limit_per_org_and_metric():
    loaded = []
    s = SeriesLimiter(2, lambda pairs: loaded.append(sorted(pairs)) or {})
    cols = columns([("o", "m", {"k": "1"}), ("o", "m", {"k": "2"}), ("o", "m", {"k": "3"}),
                    ("o", "m", {"k": "1"}), ("o", "n", {"k": "3"}), ("p", "m", {"k": "3"})])  # fmt: skip
    folded, admitted = s.fold(cols)
    assert folded == 1 and len(admitted) == 4
    assert cols["attr_keys"][2] == [OVERFLOW_KEY] and cols["attr_values"][2] == ["true"]
    assert cols["attr_values"][3] == ["1"]  # an admitted set stays
    assert loaded == [[("o", "m"), ("o", "n"), ("p", "m")]]  # one read for every new pair
    s.rollback(admitted[-1:])
    assert s.admitted("p", "m") == 0


def test_series_limit_counts_sets_stored_in_clickhouse_before_a_restart(store):
    cols = columns([("org-a", "calls", {"k": str(i)}) for i in range(3)])
    n = len(cols["org_id"])
    full = {
        "org_id": cols["org_id"], "metric": cols["metric"], "kind": ["sum"] * n, "unit": [""] * n,
        "monotonic": [1] * n, "start_time": [1] * n, "time": [2] * n, "is_int": [1] * n,
        "value_int": [1] * n, "value_double": [0.0] * n, "attr_keys": cols["attr_keys"],
        "attr_values": cols["attr_values"], "resource_keys": [[]] * n, "resource_values": [[]] * n,
        "scope_name": [""] * n, "scope_version": [""] * n, "received_at": [1] * n, "temporality": [1] * n,
        "series_id": [0] * n, "series_start": [0] * n, "cumulative_int": [0] * n,
        "cumulative_double": [0.0] * n, "batch_id": ["b"] * n,
    }  # fmt: skip
    from meterhouse.collector.model import BATCH_COLUMNS, PointBatch
    from meterhouse.collector.writer import insert_calls

    batch = PointBatch({c: full[c] for c in BATCH_COLUMNS}, n, "t1", 0)
    for _kind, insert in insert_calls(store, "t1", batches=[batch]):  # as the writer stores them
        insert(False)
    restarted = SeriesLimiter(3, attribute_sets_loader(store, 3))
    new = columns([("org-a", "calls", {"k": "0"}), ("org-a", "calls", {"k": "new"})])
    assert restarted.fold(new)[0] == 1  # three sets stored already: the new one is folded
    assert new["attr_values"] == [["0"], ["true"]]


def test_fold_comes_after_cumulative_conversion_so_each_series_keeps_its_own_delta():
    from meterhouse.collector.cumulative import CumulativeState

    state = CumulativeState(lambda ids: {})
    series = SeriesLimiter(1, lambda pairs: {})
    start = time.time_ns() - 10**10
    totals = 0
    for i, values in enumerate(((100, 1000), (150, 1600))):  # two series of one org, limit 1
        req = sum_request({"c": [point(v, {"org.id": "o", "k": str(j)}, t_ns=start + (i + 1) * 10**9, start_ns=start)
                                 for j, v in enumerate(values)]}, temporality=CUMULATIVE)  # fmt: skip
        r = decode_request(
            req, Limits(), now_ns=time.time_ns(), digest=str(i), cumulative=state, series=series
        )
        totals += sum(r.batch.columns["value_int"])
        assert r.folded == 1 and r.batch.columns["attr_keys"][1] == [OVERFLOW_KEY]
    assert totals == 150 + 1600  # exact: each cumulative series converted on its own attributes


def test_new_metrics_are_pre_created():
    reg = CollectorRegistry()
    PipelineMetrics(reg)
    assert reg.get_sample_value("meterhouse_limited_requests_total", {"reason": "ingest_rate"}) == 0
    assert reg.get_sample_value("meterhouse_series_folded_total") == 0
    assert reg.get_sample_value("meterhouse_points_rejected_total", {"reason": "org_not_allowed"}) == 0


def test_a_point_rejected_for_its_org_is_not_also_counted_as_repaired():
    """A delta point whose start is after its time is stored repaired (start_after_time); one of an org
    outside the token's scope is not stored at all, so it is a rejection only."""
    t = time.time_ns()
    late = {"t_ns": t, "start_ns": t + 5_000_000}
    req = sum_request(
        {"calls": [point(5, {"org.id": "org-a"}, **late), point(7, {"org.id": "org-b"}, **late)]}
    )
    r = decode_request(req, Limits(), now_ns=time.time_ns(), digest="d", allowed_org=A.allows)
    assert r.batch.columns["value_int"] == [5]
    assert r.rejected == {"org_not_allowed": 1}
    assert r.repaired == {"start_after_time": 1}


def test_a_set_kept_by_one_request_stays_admitted_when_another_that_admitted_it_is_refused():
    """Request A admits a new set, B (at the same time) carries the same set and is stored, then A is
    refused by a full spool: the set is stored (by B), so it still counts, and a further new set is
    folded. Forgetting it would let the org and metric grow past the limit."""
    import threading

    from meterhouse.collector.ingest import Ingestor
    from meterhouse.collector.model import Backpressure

    a_folded, b_stored = threading.Event(), threading.Event()
    stored = []

    class Spool:
        def consume(self, batch):
            if batch.columns["value_int"] == [1]:  # request A: refused once B is stored
                a_folded.set()
                assert b_stored.wait(10)
                raise Backpressure("full")
            stored.append(batch.columns["attr_values"])
            return None

    ingestor = Ingestor(Spool(), PipelineMetrics(CollectorRegistry()), Limits(),
                        series=SeriesLimiter(1, lambda pairs: {}))  # fmt: skip

    def request(v: int, session: str):
        return sum_request({"calls": [point(v, {"org.id": "org-a", "session": session})]})

    outcomes = []
    a = threading.Thread(target=lambda: outcomes.append(ingestor.export(request(1, "s"), "a").kind))
    a.start()
    assert a_folded.wait(10)
    assert ingestor.export(request(2, "s"), "b").kind == "ok"
    b_stored.set()
    a.join(10)
    assert outcomes == ["backpressure"]
    assert ingestor.export(request(3, "t"), "c").kind == "ok"
    assert stored == [[["s"]], [["true"]]]  # set "s" (from B), then "t" folded: one set and the overflow
