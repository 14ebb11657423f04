"""The ingestor's answers to identical requests re-sent while the first copy is still being stored."""

import threading

from otlp_builders import point, sum_request
from prometheus_client import CollectorRegistry

from meterhouse.collector.decode import Limits
from meterhouse.collector.dedup import RecentRequests
from meterhouse.collector.ingest import Ingestor
from meterhouse.collector.model import Backpressure, content_digest
from meterhouse.core.metrics import PipelineMetrics


class SlowSink:
    """Holds the first request until released, then fails it (as a full spool would); stores the rest."""

    def __init__(self, fail_first: bool = True) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_first = fail_first
        self.calls = 0
        self.stored = []
        self._lock = threading.Lock()

    def consume(self, batch):
        with self._lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            self.entered.set()
            self.release.wait(10)
            if self.fail_first:
                raise Backpressure("spool full")
        self.stored.append(batch)


def rig(tmp_path, sink, wait_s):
    recent = RecentRequests(tmp_path / "recent.log", window_s=60)
    recent.load()
    metrics = PipelineMetrics(CollectorRegistry())
    return Ingestor(sink, metrics, Limits(), None, recent, resend_wait_s=wait_s)


def request():
    req = sum_request({"calls": [point(7, {"org.id": "a"})]})
    return req, content_digest(req.SerializeToString())


def export_in_thread(ingestor, req, digest, out):
    t = threading.Thread(target=lambda: out.append(ingestor.export(req, digest)))
    t.start()
    return t


def test_a_resent_copy_is_not_acknowledged_while_the_first_fails(tmp_path):
    sink = SlowSink(fail_first=True)
    ing = rig(tmp_path, sink, wait_s=5)
    req, digest = request()
    first, second = [], []
    t1 = export_in_thread(ing, req, digest, first)
    assert sink.entered.wait(5)
    t2 = export_in_thread(ing, req, digest, second)  # the client re-sends after a timeout
    sink.release.set()
    t1.join(10)
    t2.join(10)
    assert first[0].kind == "backpressure"
    # The re-sent copy waited for the first's outcome and stored itself: acknowledged and stored once.
    assert second[0].kind == "ok"
    assert len(sink.stored) == 1


def test_a_resent_copy_gets_a_retryable_answer_while_the_first_is_unsettled(tmp_path):
    sink = SlowSink(fail_first=True)
    ing = rig(tmp_path, sink, wait_s=0.1)
    req, digest = request()
    first, second = [], []
    t1 = export_in_thread(ing, req, digest, first)
    assert sink.entered.wait(5)
    second.append(ing.export(req, digest))  # the first is still being stored
    sink.release.set()
    t1.join(10)
    assert second[0].kind == "unavailable" and second[0].retry_after_s >= 1
    assert sink.stored == []


def test_a_resent_copy_after_the_first_settled_is_answered_ok_without_storing(tmp_path):
    sink = SlowSink(fail_first=False)
    ing = rig(tmp_path, sink, wait_s=5)
    req, digest = request()
    first, second = [], []
    t1 = export_in_thread(ing, req, digest, first)
    assert sink.entered.wait(5)
    t2 = export_in_thread(ing, req, digest, second)
    sink.release.set()
    t1.join(10)
    t2.join(10)
    assert first[0].kind == "ok" and second[0].kind == "ok"
    assert len(sink.stored) == 1
    assert ing.metrics.requests_deduplicated._value.get() == 1


class BrokenSink:
    """A consumer that fails with an unexpected error the first time (a bug), then stores."""

    def __init__(self) -> None:
        self.calls = 0
        self.stored = []

    def consume(self, batch):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("injected: a bug in the spool")
        self.stored.append(batch)
        return self.calls


def test_an_unexpected_error_releases_the_claim_so_a_resend_is_stored(tmp_path):
    sink = BrokenSink()
    ing = rig(tmp_path, sink, wait_s=0.2)
    req, digest = request()
    try:
        ing.export(req, digest)
    except RuntimeError:
        pass  # the receiver answers 500
    else:
        raise AssertionError("the injected error was swallowed")
    again = ing.export(req, digest)  # the sender's retry of the same bytes
    assert again.kind == "ok" and len(sink.stored) == 1


def test_a_cumulative_point_starting_past_2262_is_rejected_not_a_server_error(tmp_path):
    from otlp_builders import CUMULATIVE

    from meterhouse.collector.cumulative import CumulativeState
    from meterhouse.collector.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.open()
    state = CumulativeState(lambda ids: {}, committed_seq=lambda: 0)
    ing = Ingestor(spool, PipelineMetrics(CollectorRegistry()), Limits(), state)
    req = sum_request({"calls": [point(5, {"org.id": "a"}, start_ns=2**64 - 1), point(3, {"org.id": "b"})]},
                      temporality=CUMULATIVE)  # fmt: skip
    out = ing.export(req, content_digest(req.SerializeToString()))
    assert out.kind == "partial" and "invalid_timestamp" in out.message
    assert spool.pending_points == 1  # the other point is kept
    spool.shutdown(1)
