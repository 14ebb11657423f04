"""The spool on a real disk: durability, replay, torn tails, back-pressure, segments."""

import os
import threading
import time

import pytest
from otlp_builders import point, sum_request

from meterhouse.collector.decode import Limits, decode_request
from meterhouse.collector.model import Backpressure, content_digest
from meterhouse.collector.spool import Spool


def batch(org="a", value=1, n=1):
    req = sum_request({"api": [point(value, {"org.id": org, "i": str(i)}) for i in range(n)]})
    return decode_request(
        req, Limits(), now_ns=time.time_ns(), digest=content_digest(req.SerializeToString())
    ).batch


def opened(path, **kw):
    s = Spool(path, **kw)
    return s, s.open()


def take(spool, max_points=10**9):
    stop = threading.Event()
    stop.set()  # do not wait for the flush interval
    return spool.next_group(max_points, 60, stop)


def test_appended_records_survive_a_restart_in_order(tmp_path):
    s, _ = opened(tmp_path)
    for i in range(5):
        s.consume(batch(value=i + 1))
    s.shutdown(1)
    s2, report = opened(tmp_path)
    assert report.pending_records == 5 and s2.pending_points == 5
    group = take(s2)
    values = [s2.load(r).columns["value_int"][0] for r in group.records]
    assert values == [1, 2, 3, 4, 5]


def test_committed_records_are_not_replayed(tmp_path):
    s, _ = opened(tmp_path)
    s.consume(batch(value=1))
    s.consume(batch(value=2))
    g = take(s, max_points=1)
    s.intent(g, "tok")
    s.commit(g)
    s.shutdown(1)
    s2, report = opened(tmp_path)
    assert report.committed_through == 1 and report.pending_records == 1
    (rec,) = take(s2).records
    assert s2.load(rec).columns["value_int"] == [2]


def test_an_uncommitted_intent_is_replayed_with_its_grouping_and_token(tmp_path):
    s, _ = opened(tmp_path)
    for v in (1, 2, 3):
        s.consume(batch(value=v))
    g = take(s, max_points=2)
    s.intent(g, "the-token")
    s.shutdown(1)  # crash between intent and commit
    s2, report = opened(tmp_path)
    assert report.replay_groups == 1
    replay = take(s2)
    assert replay.replay and replay.token == "the-token" and [r.seq for r in replay.records] == [1, 2]
    s2.commit(replay)
    fresh = take(s2)
    assert fresh.token is None and [r.seq for r in fresh.records] == [3]


def segment(path):
    (seg,) = [p for p in sorted(path.glob("seg-*.wal")) if p.stat().st_size > 50][-1:]
    return seg


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_tail_is_quarantined_and_start_up_goes_on(tmp_path, damage):
    s, _ = opened(tmp_path)
    for v in (1, 2, 3):
        s.consume(batch(value=v))
    s.shutdown(1)
    seg = segment(tmp_path)
    data = bytearray(seg.read_bytes())
    if damage == "truncate":  # power loss in the middle of the last append
        data = data[:-7]
    elif damage == "flip":
        data[-3] ^= 0xFF
    else:
        data += b"\x00garbage after the last record"
    seg.write_bytes(bytes(data))

    s2, report = opened(tmp_path)
    assert report.quarantined_records == 1 and report.quarantined_bytes > 0
    kept = 3 if damage == "garbage" else 2
    assert report.pending_records == kept
    assert list((tmp_path / "quarantine").iterdir())
    s2.consume(batch(value=9))  # and the spool works on
    assert s2.pending_points == kept + 1


def test_full_spool_pushes_back_and_recovers_when_space_frees(tmp_path):
    s, _ = opened(tmp_path, max_bytes=3000)
    s.consume(batch(n=5))
    with pytest.raises(Backpressure) as e:
        for _ in range(10):
            s.consume(batch(n=5))
    assert e.value.retry_after_s >= 1
    g = take(s)
    s.intent(g, "t")
    s.commit(g)
    s.consume(batch(n=5))  # room again


def test_committed_segments_are_deleted(tmp_path):
    s, _ = opened(tmp_path, segment_bytes=2000)
    for _ in range(20):
        s.consume(batch(n=3))
    assert len(list(tmp_path.glob("seg-*.wal"))) > 3
    while s.pending_points:
        g = take(s, max_points=9)
        s.intent(g, f"t{g.first}")
        s.commit(g)
    assert len(list(tmp_path.glob("seg-*.wal"))) <= 2
    s.shutdown(1)
    assert opened(tmp_path)[1].pending_records == 0


def test_records_beyond_the_memory_budget_are_read_back_from_disk(tmp_path):
    s, _ = opened(tmp_path, max_cached_points=2)
    s.consume(batch(value=1, n=2))
    s.consume(batch(value=7, n=3))
    g = take(s)
    assert g.records[0].batch is not None and g.records[1].batch is None
    assert s.load(g.records[1]).columns["value_int"] == [7, 7, 7]


def test_appends_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    s, _ = opened(tmp_path)
    before = len(synced)
    s.consume(batch())
    assert len(synced) == before + 1


def test_the_oldest_age_rises_and_falls(tmp_path):
    s, _ = opened(tmp_path)
    assert s.oldest_age_s() == 0
    s.consume(batch())
    time.sleep(0.2)
    assert s.oldest_age_s() >= 0.2
    g = take(s)
    s.intent(g, "t")
    s.commit(g)
    assert s.oldest_age_s() == 0
