#!/usr/bin/env bash
# Quickstart command 2: install everything the tests need, lint, and run the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m soak` for the long crash-loop tests.
MH_EXTRAS=test
source "$(dirname "$0")/_env.sh"
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  echo "==> installing Debian's prometheus package (promtool and prometheus for the alert-rule tests)"
  apt_install --no-install-recommends prometheus
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "==> installing Debian's nodejs and npm (the OpenTelemetry JS SDK conformance test)"
  apt_install --no-install-recommends nodejs npm
fi
echo "==> npm ci (tests/js: the OpenTelemetry JS SDK, pinned by its package-lock.json)"
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
echo "==> ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "==> mypy (strict on core and collector)"
bash scripts/typecheck.sh
echo "==> pytest"
exec "$PY" -m pytest "$@"
