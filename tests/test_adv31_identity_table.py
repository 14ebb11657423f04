"""Adversary 31: the edge's stream table (``EdgeIdentity``, ``_native.stream_table_marks``).

A new stream that finds no room in the table is marked to verify, and is *not* entered in it. The next
eviction frees room and raises the floor only to the greatest time it forgot, which can be older than
that stream's point. The stream's copy, re-sent, then finds room, is after the floor, and is marked new:
the writer never verifies it and it counts twice. "A point is marked new only if its time is after
everything its stream has shown" no longer holds for a stream that was once refused a slot.

Whole stacks in this process (real loopback sockets, the real embedded engine) as
tests/test_adv29c_fold_identity.py runs them, and the class directly."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from otlp_builders import point, sum_request
from test_adv28_dedup_eviction import SEC, post, raw_and_rollup

from meterhouse.collector import identity
from meterhouse.collector.identity import EdgeIdentity

sys.path.insert(0, str(Path(__file__).parent / "collector"))
from test_identity import _batch  # noqa: E402

ORG = "org-adv31"


@pytest.mark.parametrize("native", [True, False], ids=["c-table", "python-dict"])
def test_a_stream_refused_a_slot_is_verified_when_re_sent_after_an_eviction(native, monkeypatch):
    """--identity-max-streams 1: a request with streams a (t=100) and b (t=200); b finds no room and is
    marked to verify (stored, rightly). b's copy re-sent alone: the eviction forgets a, the floor rises
    to 100, b is not in the table and 200 > 100: marked new (None: nothing to verify)."""
    if not native:
        monkeypatch.setattr(identity, "_c_table_marks", None)
    edge = EdgeIdentity(floor_ns=0, max_streams=1)
    assert edge.mark(_batch([("a", 0, 100), ("b", 0, 200)]))[0] == [0, 1]
    assert edge.mark(_batch([("b", 0, 200)]))[0] == [1], "b's copy passed for new"


def test_the_eleventh_stream_of_a_batch_larger_than_the_table_is_verified_when_re_sent():
    """--identity-max-streams 10, a forwarder's batch of 11 streams at times 1000..1010: o10 finds no
    room. One new stream later (n0, evicting o0 and o1: floor 1001), o10's copy re-sent is marked new."""
    edge = EdgeIdentity(floor_ns=0, max_streams=10)
    assert edge.mark(_batch([(f"o{i}", 0, 1000 + i) for i in range(11)]))[0] == [0] * 10 + [1]
    edge.mark(_batch([("n0", 0, 2000)]))
    assert edge.mark(_batch([("o10", 0, 1010)]))[0] == [1], f"o10 passed for new; floor {edge.floor_ns}"


@pytest.mark.parametrize("max_streams", [1, 10])
def test_a_point_re_batched_after_its_stream_found_no_room_counts_once(stack_factory, max_streams):
    """End to end: a request with max_streams + 1 streams, each at its own second (the last finds no room),
    then the forwarder re-sends the last point re-batched before a new stream's point (another request,
    another digest). Sent: 1 + 2 + ... + (max_streams + 1), plus 1000 for the new point."""
    stack = stack_factory(identity_max_streams=max_streams)
    metric, t = f"adv31.room.{max_streams}", time.time_ns() - 60 * SEC
    pts = [
        point(i + 1, {"org.id": ORG, "s": str(i)}, t_ns=t + i * SEC, start_ns=t + i * SEC - SEC)
        for i in range(max_streams + 1)
    ]
    post(stack, sum_request({metric: pts}))
    sent = sum(range(1, max_streams + 2))
    assert raw_and_rollup(stack, metric) == ({ORG: sent}, {ORG: sent})
    fresh = point(1000, {"org.id": ORG, "s": "new"}, t_ns=t + 50 * SEC, start_ns=t + 49 * SEC)
    post(stack, sum_request({metric: [pts[-1], fresh]}))  # the re-send, re-batched with new usage
    got = raw_and_rollup(stack, metric)
    assert got == ({ORG: sent + 1000}, {ORG: sent + 1000}), got
