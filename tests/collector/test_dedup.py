import time

from meterhouse.collector.dedup import RecentRequests


def test_claim_add_and_release(tmp_path):
    r = RecentRequests(tmp_path / "recent.log", window_s=60)
    r.load()
    assert r.claim("d1")
    assert not r.claim("d1")  # claimed by a request in flight
    r.release("d1")
    assert r.claim("d1")
    r.add("d1", time.time_ns())
    assert not r.claim("d1")


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
    assert not r2.claim("d1") and not r2.claim("from-spool")
    assert r2.claim("old")  # outside the window


def test_the_window_expires(tmp_path):
    r = RecentRequests(tmp_path / "recent.log", window_s=0.2)
    r.load()
    r.claim("d")
    r.add("d", time.time_ns())
    time.sleep(0.3)
    assert r.claim("d")
