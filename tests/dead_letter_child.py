"""Child process of tests/test_redrive_kill.py: leave a dead letter in DATA_DIR as `meterhouse up`'s
writer makes one, on the embedded engine under DATA_DIR/clickhouse.

``python tests/dead_letter_child.py DATA_DIR``: one group of 5 (org ``a`` 2, org ``b`` 3) is written; the
next, 7 (``a`` 4, ``b`` 3), is refused for good (a type mismatch) and becomes a dead letter. 12
acknowledged in all; the spool is left with nothing to write. Prints the letter's file name.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from otlp_builders import point, sum_request  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from meterhouse.collector.deadletter import DeadLetters  # noqa: E402
from meterhouse.collector.decode import Limits, decode_request  # noqa: E402
from meterhouse.collector.model import content_digest  # noqa: E402
from meterhouse.collector.spool import Spool  # noqa: E402
from meterhouse.collector.writer import PermanentError, Writer  # noqa: E402
from meterhouse.core.config import Config  # noqa: E402
from meterhouse.core.metrics import PipelineMetrics  # noqa: E402
from meterhouse.core.store import open_store  # noqa: E402


class Refusing:
    refuse = False

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def insert_native(self, *args):
        if self.refuse:
            raise PermanentError("Code: 53. DB::Exception: Type mismatch in a view. (TYPE_MISMATCH)")
        return self._real.insert_native(*args)


def batch(values: dict[str, int], t_ns: int):
    req = sum_request({"calls": [point(v, {"org.id": org}, t_ns=t_ns) for org, v in values.items()]})
    raw = req.SerializeToString()
    return decode_request(req, Limits(), now_ns=time.time_ns(), digest=content_digest(raw)).batch


def main() -> None:
    data = Path(sys.argv[1])
    store = open_store(Config(data_dir=data))
    spool = Spool(data / "spool")
    spool.open()
    refusing = Refusing(store)
    letters = DeadLetters(data / "dead-letter")
    writer = Writer(spool, refusing, PipelineMetrics(CollectorRegistry()), letters)
    now = time.time_ns() - 600 * 10**9
    for i, values in enumerate(({"a": 2, "b": 3}, {"a": 4, "b": 3})):
        refusing.refuse = i == 1
        spool.consume(batch(values, now + i * 10**9))
        assert writer.write(spool.next_group(50_000, 0.0, threading.Event()))
    assert spool.pending_points == 0
    spool.shutdown(1)
    (letter,) = letters.list()
    print(letter.path.name, flush=True)


if __name__ == "__main__":
    main()
