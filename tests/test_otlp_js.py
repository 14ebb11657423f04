"""The OpenTelemetry JS SDK (Node's HTTP client: chunked bodies, no Content-Length) as a real client.

Its OTLP/HTTP exporters, JSON and protobuf, plain and gzip, export periodically while new series keep
appearing; what the SDK recorded and saw acknowledged is compared exactly with what meterhouse stores.
The packages are those pinned in tests/js/package-lock.json, installed by scripts/test.sh (or here).
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import drain

from meterhouse.demo import fetch_usage

JS = Path(__file__).parent / "js"
HOUR = 3600


@pytest.fixture(scope="module")
def node_packages() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail(
            "node and npm are needed (Debian: apt-get install nodejs npm); scripts/test.sh installs them"
        )
    if not (JS / "node_modules" / "@opentelemetry" / "sdk-metrics").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=300)
    return JS


@pytest.mark.parametrize(
    ("protocol", "compression"), [("proto", "none"), ("json", "none"), ("proto", "gzip")]
)
def test_js_sdk_exports_are_stored_exactly(stack, node_packages, protocol, compression):
    prefix = f"js-{protocol}-{compression}"
    url = f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics"
    out = subprocess.run(
        ["node", "export.js", url, protocol, compression, prefix, "40"],
        cwd=node_packages, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failures"] == [], result["failures"][:3]
    assert result["exports"] >= 2  # periodic exports happened while series were being created
    drain(stack)
    now = int(time.time())
    api = f"http://127.0.0.1:{stack.http_port}"
    stored = {
        org: fetch_usage(api, org, "js.calls", now // HOUR * HOUR - HOUR, (now // HOUR + 2) * HOUR, "1h")[
            "total"
        ]
        for org in result["totals"]
    }
    assert stored == result["totals"]
