#!/usr/bin/env bash
# Quickstart command 2: install everything the tests need, lint, and run the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m soak` for the long crash-loop tests.
MH_EXTRAS=test
source "$(dirname "$0")/_env.sh"
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  echo "==> installing Debian's prometheus package (promtool and prometheus for the alert-rule tests)"
  apt_install --no-install-recommends prometheus
fi
if ! command -v amtool >/dev/null || ! command -v prometheus-alertmanager >/dev/null; then
  echo "==> installing Debian's prometheus-alertmanager package (amtool and Alertmanager for the routing tests)"
  apt_install --no-install-recommends prometheus-alertmanager
fi
if ! command -v strace >/dev/null; then
  echo "==> installing Debian's strace package (its fault injection SIGKILLs a close or a dead-letter redrive at one part's rename)"
  apt_install --no-install-recommends strace
fi
if [ ! -x "$VENV/npm/node_modules/.bin/dclint" ]; then
  echo "==> installing dclint from npm (the Compose file's security linter)"
  command -v npm >/dev/null || apt_install --no-install-recommends npm
  npm install --silent --no-audit --no-fund --prefix "$VENV/npm" dclint@3.1.0 >/dev/null
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "==> installing Debian's nodejs and npm (the OpenTelemetry JS SDK conformance test)"
  apt_install --no-install-recommends nodejs npm
fi
echo "==> npm ci (tests/js: the OpenTelemetry JS SDK, pinned by its package-lock.json)"
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
if ! command -v victoria-metrics >/dev/null; then
  echo "==> installing Debian's victoria-metrics package (the peer in the benchmark's VictoriaMetrics scenarios)"
  apt_install --no-install-recommends victoria-metrics
fi
echo "==> ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "==> mypy (strict on core and collector)"
bash scripts/typecheck.sh
echo "==> pytest"
exec "$PY" -m pytest "$@"
