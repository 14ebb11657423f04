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
# The native encoders and the decoder's fast path (setup.py) need a C compiler and the Python headers; without them meterhouse still
# installs and runs on its slower pure-Python paths.
if ! command -v gcc >/dev/null || [ ! -f "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then
  echo "==> installing a C compiler and the Python headers (meterhouse's native encoders and decoder)"
  apt_install --no-install-recommends gcc libc6-dev python3-dev
fi
echo "==> installing meterhouse${MH_EXTRAS:+[$MH_EXTRAS]} and its dependencies"
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip
"$PY" -m pip install -q --disable-pip-version-check -e ".${MH_EXTRAS:+[$MH_EXTRAS]}"
