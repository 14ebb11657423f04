import time

from meterhouse.collector.dedup import RecentRequests


def test_claim_add_and_release(tmp_path):
    r = RecentRequests(tmp_path / "recent.log", window_s=60)
    r.load()
    assert r.claim("d1") == "new"
    assert r.claim("d1") == "busy"  # claimed by a request in flight, not settled: no promise
    r.release("d1")
    assert r.claim("d1") == "new"
    r.add("d1", time.time_ns())
    assert r.claim("d1") == "settled"


def test_digests_survive_a_restart_within_the_window(tmp_path):
    r = RecentRequests(tmp_path / "recent.log", window_s=60)
    r.load()
    r.claim("d1")
    r.add("d1", time.time_ns())
    r.claim("old")
    r.add("old", time.time_ns() - 120 * 10**9)
    r.sync()
    r.close()
    r2 = RecentRequests(tmp_path / "recent.log", window_s=60)
    r2.load(extra=[("from-spool", time.time_ns())])
    assert r2.claim("d1") == "settled" and r2.claim("from-spool") == "settled"
    assert r2.claim("old") == "new"  # outside the window


def test_the_window_expires(tmp_path):
    r = RecentRequests(tmp_path / "recent.log", window_s=0.2)
    r.load()
    r.claim("d")
    r.add("d", time.time_ns())
    time.sleep(0.3)
    assert r.claim("d") == "new"
