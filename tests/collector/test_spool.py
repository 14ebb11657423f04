"""The spool on a real disk: durability, replay, torn tails, back-pressure, segments."""

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from faulty_files import FaultyFiles
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from otlp_builders import point, sum_request

from meterhouse.collector.decode import Limits, decode_request
from meterhouse.collector.model import Backpressure, content_digest
from meterhouse.collector.spool import Spool, SpoolError, SpoolFormatError, encode_blocks


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


def test_a_request_whose_record_would_pass_the_bound_is_refused_before_it_is_built(tmp_path):
    """Its resource is stored with each of its points: 200 points under 64 KB of resource attributes are a
    13 MB record. Refused (nothing appended, no number burned), the next request is stored as usual."""
    from meterhouse.collector.spool import RecordTooLarge

    req = sum_request({"api": [point(1, {"i": str(i)}) for i in range(200)]},
                      resource={f"r{i}": "x" * 4000 for i in range(16)})  # fmt: skip
    wide = decode_request(req, Limits(), now_ns=time.time_ns(), digest="w" * 32).batch
    s, _ = opened(tmp_path, max_record_bytes=1 << 20)
    with pytest.raises(RecordTooLarge, match="as stored"):
        s.consume(wide)
    assert s.consume(batch(value=7)) == 1 and s.uncommitted_bytes < 10_000
    (rec,) = take(s).records
    assert s.load(rec).columns["value_int"] == [7]


def test_a_group_takes_records_up_to_the_byte_bound_and_a_larger_record_alone(tmp_path):
    s, _ = opened(tmp_path)
    for n in (10, 10, 10, 100, 10):
        s.consume(batch(n=n))
    lengths = [r.length for r in s.uncommitted_records()]
    bound = lengths[0] * 2 + 10
    groups = []
    while s.pending_points:
        stop = threading.Event()
        stop.set()
        g = s.next_group(10**9, 60, stop, bound)
        groups.append([r.seq for r in g.records])
        s.intent(g, f"t{len(groups)}")
        s.commit(g)
    assert lengths[3] > bound and groups == [[1, 2], [3], [4], [5]]


def keyed(keys_per_point, points=1, metric="api", t_ns=None, first=0):
    """A batch whose points each carry ``keys_per_point`` attribute keys named after the point."""
    t = t_ns or time.time_ns()
    pts = [
        point(1, {"org.id": "a", **{f"{first + i}.{j}": "" for j in range(keys_per_point)}}, t_ns=t)
        for i in range(points)
    ]
    req = sum_request({metric: pts})
    return decode_request(
        req, Limits(), now_ns=time.time_ns(), digest=content_digest(req.SerializeToString())
    ).batch


def test_attribute_keys_are_counted_distinct_per_metric_and_hour():
    """What the attribute-cardinality views keep states for: a key repeated on points of one metric and
    hour counts once, another metric or hour counts again."""
    from meterhouse.collector.spool import attribute_keys

    hour = 3600 * 10**9
    t = (time.time_ns() // hour - 2) * hour
    shared = sum_request({"api": [point(1, {"org.id": "a", "k": str(i)}, t_ns=t + i) for i in range(50)]})
    b = decode_request(shared, Limits(), now_ns=time.time_ns(), digest="s" * 32).batch
    assert attribute_keys(b) == 1  # k, on 50 points (the org is a column of its own)
    spread = sum_request({
        "api": [point(1, {"org.id": "a", "k": "1"}, t_ns=t), point(1, {"org.id": "a"}, t_ns=t + hour)],
        "db": [point(1, {"org.id": "a", "k": "1"}, t_ns=t)],
    })  # fmt: skip
    b = decode_request(spread, Limits(), now_ns=time.time_ns(), digest="p" * 32).batch
    assert attribute_keys(b) == 2  # k under api and under db; the second hour's point has none
    assert attribute_keys(keyed(5, points=10)) == 50


def test_a_request_with_more_distinct_attribute_keys_than_an_insert_may_hold_is_refused(tmp_path):
    """The engine's memory for an insert grows with its distinct attribute keys (31,750 took 96-112 MiB)
    far faster than with its bytes (a few hundred kilobytes): refused whole, nothing appended."""
    from meterhouse.collector.spool import RecordTooLarge

    s, _ = opened(tmp_path, max_record_keys=999)
    with pytest.raises(RecordTooLarge, match="1000 distinct attribute keys"):
        s.consume(keyed(100, points=10))
    assert s.consume(keyed(10, points=10)) == 1 and s.pending_points == 10


def test_a_group_takes_records_up_to_the_key_bound_and_the_counts_survive_a_restart(tmp_path):
    s, _ = opened(tmp_path)
    for k, (keys, points) in enumerate(((40, 1), (40, 1), (40, 1), (100, 3), (40, 1))):
        s.consume(keyed(keys, points, first=k * 1000))
    assert [r.keys for r in s.uncommitted_records()] == [40, 40, 40, 300, 40]
    s.shutdown(1)
    s, _ = opened(tmp_path)
    assert [r.keys for r in s.uncommitted_records()] == [40, 40, 40, 300, 40]
    groups = []
    while s.pending_points:
        stop = threading.Event()
        stop.set()
        g = s.next_group(10**9, 60, stop, None, 100)
        groups.append([r.seq for r in g.records])
        s.intent(g, f"t{len(groups)}")
        s.commit(g)
    assert groups == [[1, 2], [3], [4], [5]]


def test_the_records_of_a_version_3_segment_get_their_keys_counted_on_start(tmp_path):
    """Version 3's DATA head has no key count: counted from the points when the spool is opened."""
    import struct

    from meterhouse.collector.spool import (
        _BLOCKS_HEAD,
        _DATA_HEAD_V3,
        COLUMN_SET,
        COMMIT,
        DATA,
        FORMAT,
        _digest_bytes,
        _encode,
    )

    seg = [_encode(FORMAT, struct.pack("<H", 3)), _encode(COMMIT, struct.pack("<Q", 0))]
    for seq, keys in enumerate((7, 70), 1):
        b = keyed(keys, points=3)
        blocks = encode_blocks(b)
        body = _BLOCKS_HEAD.pack(COLUMN_SET, len(blocks.numbers)) + blocks.numbers + blocks.dists
        head = _DATA_HEAD_V3.pack(seq, b.received_ns, b.total, _digest_bytes(b.digest))
        seg.append(_encode(DATA, head + body))
    (tmp_path / "seg-00000000000000000001.wal").write_bytes(b"".join(seg))
    s, report = opened(tmp_path)
    assert report.pending_records == 2
    assert [r.keys for r in s.uncommitted_records()] == [3 * 7, 3 * 70]
    assert [s.load(r).size for r in take(s).records] == [3, 3]


def test_a_released_group_is_grouped_afresh_each_record_once_and_so_after_a_restart(tmp_path):
    """The writer gives back a group that failed for memory (nothing of it landed) to be written in
    smaller groups: each record comes back once, in order, and a restart after the smaller group's intent
    replays that group and leaves the rest pending. (Giving back a live group's records once queued them
    twice: 8,750 points stored of 4,000.)"""
    s, _ = opened(tmp_path)
    for i in range(4):
        s.consume(batch(value=i + 1))
    whole = take(s)
    s.intent(whole, "t-whole")
    s.release(whole)
    assert s.pending_points == 4
    half = take(s, max_points=2)
    assert [r.seq for r in half.records] == [r.seq for r in whole.records[:2]]
    s.intent(half, "t-half")
    s.shutdown(1)  # killed before the half's insert
    s2, report = opened(tmp_path)
    assert report.replay_groups == 1 and s2.pending_points == 4
    replayed = take(s2)
    assert replayed.replay and replayed.token == "t-half" and len(replayed.records) == 2
    s2.commit(replayed)
    rest = take(s2)
    assert [s2.load(r).columns["value_int"][0] for r in rest.records] == [3, 4]
    s2.commit(rest)
    assert s2.pending_points == 0 and take(s2) is None


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
    first = batch(value=1, n=2)
    s, _ = opened(tmp_path, max_cached_bytes=len(encode_blocks(first).numbers))
    second = batch(value=7, n=3)
    s.consume(first)
    s.consume(second)
    g = take(s)
    assert g.records[0].blocks is not None and g.records[1].blocks is None
    assert s.load(g.records[1]).columns["value_int"] == [7, 7, 7]
    assert s.blocks(g.records[1]) == encode_blocks(second)


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


# -- faults at the file layer ---------------------------------------------------------------------------


def values_after_restart(path):
    s, report = opened(path)
    g = take(s)
    values = [s.load(r).columns["value_int"][0] for r in g.records] if g else []
    s.shutdown(1)
    return values, report


@pytest.mark.parametrize("truncate_fails", [False, True])
def test_a_torn_write_does_not_cost_later_acknowledged_records(tmp_path, truncate_fails):
    files = FaultyFiles(seed=3)
    files.truncate_fails = truncate_fails  # the disk is full: even cutting the torn bytes may fail
    s, _ = opened(tmp_path, files=files)
    s.consume(batch(value=1))
    files.fail_write()
    with pytest.raises(SpoolError):
        s.consume(batch(value=2))  # answered 503: the client re-sends it
    for v in (3, 4, 5):
        s.consume(batch(value=v))  # answered 200
    del s  # a crash: no shutdown
    values, report = values_after_restart(tmp_path)
    assert values == [1, 3, 4, 5]
    assert report.pending_records == 4


def test_a_failed_fsync_fails_the_request_and_its_record_is_never_replayed(tmp_path):
    files = FaultyFiles()
    s, _ = opened(tmp_path, files=files)
    s.consume(batch(value=1))
    files.fail_fsync()
    with pytest.raises(SpoolError):
        s.consume(batch(value=2))  # its bytes may be on disk, but it was answered 503
    s.consume(batch(value=3))  # the re-sent copy (and its ABORT of seq 2) is acknowledged
    values, _ = values_after_restart(tmp_path)
    assert values == [1, 3]


def test_a_failed_intent_seals_the_segment_and_the_writer_can_try_again(tmp_path):
    files = FaultyFiles()
    s, _ = opened(tmp_path, files=files)
    s.consume(batch(value=1))
    g = take(s)
    files.fail_write()
    with pytest.raises(SpoolError):
        s.intent(g, "tok")
    assert g.token is None
    s.intent(g, "tok")
    s.consume(batch(value=2))
    s.shutdown(1)
    s2, report = opened(tmp_path)
    assert report.replay_groups == 1 and report.pending_records == 2


def test_a_damaged_record_in_the_middle_is_skipped_not_the_rest(tmp_path):
    s, _ = opened(tmp_path)
    for v in (1, 2, 3, 4):
        s.consume(batch(value=v))
    s.shutdown(1)
    seg = segment(tmp_path)
    data = bytearray(seg.read_bytes())
    second = data.find(b"MH", data.find(b"MH", data.find(b"MH", data.find(b"MH") + 1) + 1) + 1)
    data[second + 40] ^= 0xFF  # a bit flip inside the second DATA record
    seg.write_bytes(bytes(data))
    values, report = values_after_restart(tmp_path)
    assert values == [1, 3, 4]
    assert report.quarantined_records == 1


class RecordingFiles(FaultyFiles):
    def __init__(self):
        super().__init__()
        self.ops = []

    def write_durably(self, path, data):
        self.ops.append(("durable", path.parent.name))
        super().write_durably(path, data)

    def fsync_dir(self, path):
        self.ops.append(("fsync_dir", path.name))
        super().fsync_dir(path)


def test_the_quarantine_copy_is_durable_before_the_segment_is_cut(tmp_path):
    s, _ = opened(tmp_path)
    s.consume(batch(value=1))
    s.shutdown(1)
    seg = segment(tmp_path)
    seg.write_bytes(seg.read_bytes() + b"torn")
    files = RecordingFiles()
    opened(tmp_path, files=files)
    q = files.ops.index(("durable", "quarantine"))
    assert files.ops[q + 1] == ("fsync_dir", "quarantine")
    assert files.ops.index(("durable", tmp_path.name)) > q


def test_a_spool_of_an_unknown_future_format_is_refused_with_a_clear_message(tmp_path):
    from meterhouse.collector.spool import FORMAT, _encode

    (tmp_path / "seg-00000000000000000001.wal").write_bytes(_encode(FORMAT, (99).to_bytes(2, "little")))
    with pytest.raises(SpoolFormatError, match="format version 99.*README"):
        opened(tmp_path)


# -- a model-based test: the spool against a list, with crashes and I/O errors at random points ----------


class SpoolMachine(RuleBasedStateMachine):
    """Model: acknowledged values not yet committed must come back after any crash, exactly once;
    values whose append failed may come back (at most once) only if no ABORT reached the disk."""

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-model-"))
        self.files = FaultyFiles(seed=7)
        self.spool, _ = opened(self.dir, files=self.files, segment_bytes=3000)
        self.next_value = 1
        self.acked: set[int] = set()  # acknowledged, not committed
        self.maybe: set[int] = set()  # failed appends, or committed with a mark not yet durable
        self.committed: set[int] = set()

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(fault=st.sampled_from([None, None, None, "write", "fsync"]))
    def append(self, fault):
        v, self.next_value = self.next_value, self.next_value + 1
        if fault == "write":
            self.files.fail_write()
        elif fault == "fsync":
            self.files.fail_fsync()
        try:
            self.spool.consume(batch(value=v))
        except SpoolError:
            self.maybe.add(v)
            return
        self.acked.add(v)

    @rule(n=st.integers(1, 4), fault=st.sampled_from([None, None, "intent", "commit"]))
    def write_some(self, n, fault):
        g = take(self.spool, max_points=n)
        if g is None:
            return
        values = {self.spool.load(r).columns["value_int"][0] for r in g.records}
        if g.token is None:
            if fault == "intent":
                self.files.fail_write()
            try:
                self.spool.intent(g, f"t{g.first}")
            except SpoolError:
                return  # retried by the writer later
        if fault == "commit":
            self.files.fail_write()
        self.spool.commit(g)
        assert values <= self.acked | self.maybe
        self.acked -= values
        self.maybe |= values  # a replay under the same token is allowed (ClickHouse drops it)
        self.committed |= values

    @rule(power=st.booleans())
    def crash(self, power):
        """The process dies (no shutdown); with ``power``, what was not fsync'd is lost or torn."""
        self.spool._file = None  # abandoned, as a killed process leaves it
        if power:
            self.files.power_loss(self.dir)
        synced, self.files = self.files.synced, FaultyFiles(seed=self.next_value)
        self.files.synced = synced  # the disk outlives the process
        self.spool, _ = opened(self.dir, files=self.files, segment_bytes=3000)
        present = [self.spool.load(r).columns["value_int"][0] for r in self.spool.uncommitted_records()]
        assert len(present) == len(set(present)), "a record came back twice"
        assert self.acked <= set(present), f"acknowledged records lost: {self.acked - set(present)}"
        assert set(present) <= self.acked | self.maybe
        # Committed records that came back are written again under their token (the writer's ledger or
        # ClickHouse drops what landed); a commit mark is durable only with the next fsync, so a committed
        # record that did not come back now may still come back after a later power loss.
        self.maybe = {v for v in self.maybe if v in present or v in self.committed}

    @invariant()
    def pending_matches(self):
        assert self.spool.pending_points >= len(self.acked)


SpoolMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_spool_against_a_model = SpoolMachine.TestCase


def test_a_record_written_by_an_older_version_with_fewer_columns_is_replayed(tmp_path):
    import pickle
    import struct

    from meterhouse.collector.spool import _DATA_HEAD_V3, COMMIT, DATA, _encode

    b = batch(value=5)
    old_columns = {k: v for k, v in b.columns.items() if k not in ("series_id", "cumulative_double")}
    body = pickle.dumps((old_columns, b.size, {}, 0))
    head = _DATA_HEAD_V3.pack(1, b.received_ns, b.total, bytes(16))
    # A version-1 segment: no FORMAT record, a COMMIT first.
    (tmp_path / "seg-00000000000000000001.wal").write_bytes(
        _encode(COMMIT, struct.pack("<Q", 0)) + _encode(DATA, head + body)
    )
    s, report = opened(tmp_path)
    assert report.pending_records == 1
    loaded = s.load(take(s).records[0])
    assert loaded.columns["value_int"] == [5] and loaded.columns["series_id"] == [0]
    assert list(loaded.columns) == list(b.columns)


# -- group commit ---------------------------------------------------------------------------------------


class SlowFsync(FaultyFiles):
    """fsync takes a while (as on a real disk) and is counted; the first one may be held and failed."""

    def __init__(self, hold_first=False):
        super().__init__()
        self.count = 0
        self.hold_first = hold_first
        self.entered, self.release = threading.Event(), threading.Event()

    def fsync(self, f):
        self.count += 1
        if self.hold_first and self.count == 1:
            self.entered.set()
            self.release.wait(10)
            raise OSError(5, "Input/output error (injected)")
        time.sleep(0.005)
        super().fsync(f)


def test_one_fsync_covers_every_append_that_arrived_while_the_previous_ran(tmp_path):
    files = SlowFsync()
    s, _ = opened(tmp_path, files=files)
    b = batch()
    threads = [threading.Thread(target=lambda: [s.consume(b) for _ in range(20)]) for _ in range(8)]
    before = files.count
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert s.pending_points == 160
    assert files.count - before < 160 * 0.75  # appends shared fsyncs
    s.shutdown(1)
    assert opened(tmp_path)[1].pending_records == 160


def test_a_failed_group_fsync_fails_every_request_that_depended_on_it(tmp_path):
    files = SlowFsync(hold_first=True)
    s, _ = opened(tmp_path, files=files)
    results = {}

    def send(name, value):
        try:
            s.consume(batch(value=value))
            results[name] = "ok"
        except SpoolError:
            results[name] = "failed"

    leader = threading.Thread(target=send, args=("a", 1))
    leader.start()
    assert files.entered.wait(5)  # a's fsync runs; b and c are written behind it and wait
    others = [threading.Thread(target=send, args=(n, v)) for n, v in (("b", 2), ("c", 3))]
    for t in others:
        t.start()
    time.sleep(0.2)
    files.release.set()  # the fsync fails
    for t in (leader, *others):
        t.join(10)
    assert results == {"a": "failed", "b": "failed", "c": "failed"}
    assert s.pending_points == 0
    s.consume(batch(value=4))  # a new segment; the ABORTs ride on its fsync
    s.shutdown(1)
    values, _ = values_after_restart(tmp_path)
    assert values == [4]


def test_an_earlier_versions_record_keeps_its_verify_flags_when_conformed(tmp_path):
    """A record of an earlier column set (a version before a column was added) is conformed to today's
    columns when read back; the edge's verify flags it carries stay with its points. Dropped with the
    columns since removed, the points an earlier version marked to verify (copies of stored points,
    re-sent by a forwarder) were inserted unchecked after an upgrade (adversary 32: 17 stored where 12
    were sent)."""
    import struct

    from meterhouse.collector.spool import (
        _BLOCKS_HEAD,
        _DATA_HEAD,
        COLUMN_SET,
        COMMIT,
        DATA,
        FORMAT,
        FORMAT_VERSION,
        _digest_bytes,
        _encode,
        _with_verify,
    )

    earlier = (COLUMN_SET + 1) & 0xFFFFFFFF  # any column set but today's
    b = batch(value=5)
    b.columns["value_int"] = [5, 6, 7]
    for name, col in b.columns.items():
        if name != "value_int":
            b.columns[name] = col * 3
    b.size = 3
    blocks = _with_verify(encode_blocks(b), [1, 0, 1], None)
    body = _BLOCKS_HEAD.pack(earlier, len(blocks.numbers)) + blocks.numbers + blocks.dists
    head = _DATA_HEAD.pack(1, b.received_ns, b.total, _digest_bytes(b.digest), 3, 0)
    seg = [_encode(FORMAT, struct.pack("<H", FORMAT_VERSION)), _encode(COMMIT, struct.pack("<Q", 0)),
           _encode(DATA, head + body)]  # fmt: skip
    (tmp_path / "seg-00000000000000000001.wal").write_bytes(b"".join(seg))
    s, _ = opened(tmp_path)
    (record,) = take(s).records
    got = s.blocks(record)
    assert got.verify
    points, numbers, dists = s.load_flagged(record, got)
    assert points.columns["value_int"] == [5, 6, 7] and numbers == [1, 0, 1] and dists == []
