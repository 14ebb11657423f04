"""`meterhouse up` with faults injected through its constructor seams, for end-to-end tests:
``python tests/fault_up.py CONTROL_FILE up-arguments...``. Endpoint outages go through
``connect_endpoint`` and disk errors (ENOSPC) through the spool's file layer; the control file (JSON,
``{"down": [...], "p_write": 0.02}``) is read by this test harness only, never by the production path."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faulty_files import FaultyFiles  # noqa: E402
from faulty_store import faulty_connect  # noqa: E402

import meterhouse.runtime as runtime  # noqa: E402
from meterhouse.cli import main  # noqa: E402
from meterhouse.core.store import connect  # noqa: E402


def run() -> int:
    control = Path(sys.argv[1])
    real_stack = runtime.Stack

    def stack(config):
        def open_endpoint(url):
            return connect(url, config.data_dir, config.database, config.raw_retention_days)

        return real_stack(
            config, connect_endpoint=faulty_connect(open_endpoint, control), files=FaultyFiles(control)
        )

    runtime.Stack = stack
    return main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(run())
