"""Adversary (adv28): a 125 MB budget was accepted at start (the only check was that the budget holds one
request of --max-request-bytes), but the engine's quarter of it (29.8 MiB) could not insert even a
one-point group: MEMORY_LIMIT_EXCEEDED ("would use 31.43 MiB") on every try, every acknowledged point in
the spool for good. A budget below the least is now refused at start, naming the option; the least
budget writes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests
from test_group_over_engine_memory import assert_honest_usage_written


def test_a_budget_below_the_least_is_refused_at_start_naming_the_option(tmp_path):
    cmd = [sys.executable, "-m", "meterhouse", "up", "--data-dir", str(tmp_path / "data"),
           "--memory-budget-bytes", "125000000", "--max-request-bytes", "1000000"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "memory_budget_bytes: 125000000 is below" in done.stderr + done.stdout


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_the_least_budget_writes_a_one_point_request(up_factory):
    up = up_factory("--memory-budget-bytes", str(512 << 20), "--max-request-bytes", "1000000")
    assert requests.get(f"{up.api}/readyz", timeout=10).status_code == 200
    assert_honest_usage_written(up, 30)
