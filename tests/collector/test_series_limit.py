"""The series limit's bookkeeping (collector/series.py) on its own: the C row keys and the pure-Python
ones fold the same rows, a refused request gives its sets back, a set other requests rely on stays."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meterhouse.collector import series as series_mod
from meterhouse.collector.series import FOLDED_KEYS, OVERFLOW_KEY, OVERFLOW_VALUE, SeriesLimiter
from meterhouse.core._native import row_keys


def _columns(rows: list[tuple[str, str, tuple[str, ...]]]) -> dict[str, list[Any]]:
    return {
        "org_id": [r[0] for r in rows],
        "metric": [r[1] for r in rows],
        "attr_keys": [[f"k{i}" for i in range(len(r[2]))] for r in rows],
        "attr_values": [list(r[2]) for r in rows],
        "series_id": [0] * len(rows),
    }


def test_row_keys_tell_rows_apart_and_treat_lists_and_tuples_alike():
    a = row_keys([["o1", "o1", "o2"], ["m", "m", "m"], [["k"], ("k",), ["k"]], [["v"], ("v",), ["v"]]])
    assert a[0] == a[1] != a[2]
    # a cell's length is part of its key: ["a", "b"] + [] differs from ["a"] + ["b"]
    b = row_keys([[["a", "b"], ["a"]], [[], ["b"]]])
    assert b[0] != b[1]


rows_st = st.lists(
    st.tuples(
        st.sampled_from(["o1", "o2"]), st.sampled_from(["m1", "m2"]), st.tuples(st.sampled_from("abcd"))
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(requests=st.lists(st.tuples(rows_st, st.booleans()), max_size=6), limit=st.integers(1, 3))
def test_the_c_and_python_keys_fold_alike(requests, limit):
    """Requests in turn, each stored or refused: the same rows folded and the same sets admitted."""

    def run() -> list[Any]:
        limiter = SeriesLimiter(limit, lambda pairs: {})
        out = []
        for rows, stored in requests:
            cols = _columns(rows)
            folded, admitted = limiter.fold(cols)
            (limiter.settle if stored else limiter.rollback)(admitted)
            out.append((folded, [k is FOLDED_KEYS for k in cols["attr_keys"]]))
        return [*out, sorted((o, m, limiter.admitted(o, m)) for o in ("o1", "o2") for m in ("m1", "m2"))]

    native = run()
    c_keys, series_mod._c_row_keys = series_mod._c_row_keys, None
    try:
        assert run() == native
    finally:
        series_mod._c_row_keys = c_keys
    # the limit holds: never more sets admitted than it
    assert all(n <= limit for *_, n in native[-1])


def test_a_refused_request_gives_back_only_sets_no_stored_request_used():
    limiter = SeriesLimiter(1, lambda pairs: {})
    a = _columns([("o", "m", ("x",))])
    b = _columns([("o", "m", ("x",))])
    _, held_a = limiter.fold(a)
    _, held_b = limiter.fold(b)  # relies on the set A admitted, not settled yet
    limiter.settle(held_b)
    limiter.rollback(held_a)
    assert limiter.admitted("o", "m") == 1  # B was stored with it: it stays
    c = _columns([("o", "m", ("y",))])
    assert limiter.fold(c)[0] == 1  # over the limit: folded
    # a refused request whose set nobody else used frees its place
    limiter2 = SeriesLimiter(1, lambda pairs: {})
    _, held = limiter2.fold(_columns([("o", "m", ("x",))]))
    limiter2.rollback(held)
    assert limiter2.admitted("o", "m") == 0
    assert limiter2.fold(_columns([("o", "m", ("y",))]))[0] == 0


def test_overflow_points_an_sdk_folded_are_neither_admitted_nor_folded_again():
    limiter = SeriesLimiter(1, lambda pairs: {})
    cols = {
        "org_id": ["o", "o"], "metric": ["m", "m"], "attr_keys": [[OVERFLOW_KEY], ["k"]],
        "attr_values": [[OVERFLOW_VALUE], ["v"]], "series_id": [0, 0],
    }  # fmt: skip
    folded, admitted = limiter.fold(cols)
    assert folded == 0 and len(admitted) == 1  # only k=v took a place
    assert limiter.admitted("o", "m") == 1 and cols["attr_keys"][0] == [OVERFLOW_KEY]
