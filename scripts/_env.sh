# Sourced by the Quickstart scripts: a project virtualenv with meterhouse installed in it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${MH_VENV:-.venv}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv $VENV"
  python3 -m venv "$VENV" 2>/dev/null || { rm -rf "$VENV"; apt_install python3-venv; python3 -m venv "$VENV"; }
fi
PY="$VENV/bin/python"
# The decoder's native fast path (collector/_otlpfast.c) is compiled by `pip install`: a C compiler and
# Python's headers (the test suite requires the extension).
if ! command -v gcc >/dev/null; then
  echo "==> installing Debian's gcc (the decoder's native fast path is compiled on install)"
  apt_install --no-install-recommends gcc libc6-dev
fi
if ! "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  echo "==> installing Debian's python3-dev (Python.h, for the decoder's native fast path)"
  apt_install --no-install-recommends python3-dev
fi
echo "==> installing meterhouse${MH_EXTRAS:+[$MH_EXTRAS]} and its dependencies"
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip
"$PY" -m pip install -q --disable-pip-version-check -e ".${MH_EXTRAS:+[$MH_EXTRAS]}"
