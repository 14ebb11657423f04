#!/usr/bin/env bash
# Quickstart command 1: install meterhouse, start `meterhouse up`, send demo traffic with the
# OpenTelemetry SDK and check the totals read back. The stack keeps running until Ctrl-C
# (or stops right after the demo when there is no terminal, or with MH_DEMO_EXIT=1).
MH_EXTRAS=""
source "$(dirname "$0")/_env.sh"
DATA=${MH_DATA_DIR:-./meterhouse-data}
HTTP_PORT=${MH_HTTP_PORT:-9464}
OTLP_PORT=${MH_OTLP_HTTP_PORT:-4318}
echo "==> starting meterhouse up (data in $DATA)"
UP_LOG=$(mktemp)  # a copy of its log, to say why it stopped if it does
"$VENV/bin/meterhouse" up --data-dir "$DATA" --http-port "$HTTP_PORT" --otlp-http-port "$OTLP_PORT" \
  --log-format text 2> >(tee "$UP_LOG" >&2) &
UP=$!
trap 'kill -TERM $UP 2>/dev/null || true; wait $UP 2>/dev/null || true; rm -f "$UP_LOG"' EXIT
"$PY" - "$HTTP_PORT" "$UP" "$UP_LOG" <<'PY'
import sys, time, urllib.request
url, pid, log = f"http://127.0.0.1:{sys.argv[1]}/readyz", sys.argv[2], sys.argv[3]


def running() -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


for _ in range(600):
    if not running():  # it said why in its last line (a port in use, say): say it again, at once
        time.sleep(0.2)  # the copy of its log catches up
        lines = [line for line in open(log, errors="replace").read().splitlines() if line.strip()]
        sys.exit(f"demo: meterhouse up stopped before it was ready: {lines[-1] if lines else 'no output'}")
    try:
        if urllib.request.urlopen(url, timeout=1).status == 200:
            sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit("demo: meterhouse did not become ready in 60 s (/readyz answers 503 until its store answers)")
PY
"$VENV/bin/meterhouse" demo --orgs "${MH_DEMO_ORGS:-200}" --seconds "${MH_DEMO_SECONDS:-15}" \
  --endpoint "http://127.0.0.1:$OTLP_PORT" --api "http://127.0.0.1:$HTTP_PORT"
cat <<MSG

meterhouse is up:
  usage API   http://127.0.0.1:$HTTP_PORT/api/v1/orgs/org-00001/usage?metric=api.requests&step=1h
  Prometheus  http://127.0.0.1:$HTTP_PORT/metrics
  OTLP/HTTP   http://127.0.0.1:$OTLP_PORT/v1/metrics
  SQL         http://127.0.0.1:${MH_SQL_PORT:-8123} (read-only: $VENV/bin/meterhouse sql "SELECT count() FROM usage_points")
MSG
if [ -t 0 ] && [ -z "${MH_DEMO_EXIT:-}" ] && [ -z "${CI:-}" ]; then
  echo "Press Ctrl-C to stop."
  wait $UP
fi
