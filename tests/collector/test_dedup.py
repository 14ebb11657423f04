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


def test_a_committed_request_s_digest_is_on_disk_before_its_spool_record_can_go(stack):
    """The writer makes a group's digests durable in the dedup file before the spool forgets the group
    (a segment whose records are all committed is deleted, e.g. after a write error sealed it). The file
    is read while the stack still runs, as a SIGKILL would leave it: a digest only in a userspace buffer
    is lost, and a re-send after the restart would be stored a second time. Regression: the hook was not
    wired on a fresh start, because an empty RecentRequests is falsy."""
    import requests
    from otlp_builders import point, sum_request

    from meterhouse.collector.model import content_digest

    body = sum_request({"calls": [point(7, {"org.id": "org-dedup"})]}).SerializeToString()
    url = f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics"
    headers = {"Content-Type": "application/x-protobuf"}
    assert requests.post(url, data=body, headers=headers, timeout=30).status_code == 200
    deadline = time.monotonic() + 30
    while stack.collector.spool.pending_points and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stack.collector.spool.pending_points == 0
    log = stack.config.data_dir / "spool" / "recent-requests.log"
    assert content_digest(body) in log.read_text()


def test_at_most_max_entries_digests_are_kept_the_oldest_going_first(tmp_path):
    r = RecentRequests(tmp_path / "recent.log", window_s=60, max_entries=3)
    r.load()
    now = time.time_ns()
    for i in range(5):
        r.claim(f"d{i}")
        r.add(f"d{i}", now + i)
    assert len(r) == 3 and r.claim("d4") == "settled" and r.claim("d0") == "new"
    r.sync()
    r.close()
    r2 = RecentRequests(tmp_path / "recent.log", window_s=60, max_entries=2)
    r2.load(extra=[("from-spool", now + 10)])
    assert len(r2) == 2 and r2.claim("from-spool") == "settled" and r2.claim("d4") == "settled"


def test_an_earlier_versions_pinned_digests_are_kept_for_their_window(tmp_path):
    """Earlier versions pinned the digest of a request with folded distribution points (identity could
    not check them then): its digests file marks them `` p`` and its spool's records carry the flag.
    Loaded, they are never evicted until their window ends; this version pins nothing (a folded point
    keeps its fingerprint and is checked), so its own digests come and go around them."""
    now = time.time_ns()
    (tmp_path / "recent.log").write_text(f"{now} f0 p\n{now} f1 p\n")
    r = RecentRequests(tmp_path / "recent.log", window_s=1.5, max_entries=4)
    r.load(extra=[("f2", now, True)])
    for i in range(10):  # unpinned digests come and go around the pinned ones
        assert r.claim(f"d{i}") == "new"
        r.add(f"d{i}", now + i)
    assert len(r) == 4 and all(r.claim(f"f{i}") == "settled" for i in range(3))
    assert r.claim("d9") == "settled" and r.claim("d8") == "new"
    r.release("d8")
    r.sync()
    r.close()
    assert not any(
        line.endswith(" p") and " d" in line for line in (tmp_path / "recent.log").read_text().splitlines()
    )
    r2 = RecentRequests(tmp_path / "recent.log", window_s=1.5, max_entries=4)
    r2.load()
    assert all(r2.claim(f"f{i}") == "settled" for i in range(3))
    time.sleep(1.6)  # the pinned digests leave the window
    assert r2.claim("f0") == "new"
