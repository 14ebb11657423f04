#!/usr/bin/env bash
# Type-check the installed package's layout: the planes are mapped into `meterhouse.*` by setuptools'
# package-dir, which mypy cannot follow through an editable install, so a tree of links lays them out
# as they install (.typecheck/ is ignored by git) and mypy reads that, strict on core and collector.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MH_VENV:-.venv}
rm -rf .typecheck && mkdir -p .typecheck/meterhouse
for entry in meterhouse/*; do ln -s "../../$entry" ".typecheck/meterhouse/$(basename "$entry")"; done
for plane in collector exporter dashboards alerts; do ln -s "../../$plane" ".typecheck/meterhouse/$plane"; done
cd .typecheck && exec "../$VENV/bin/mypy" --config-file ../pyproject.toml -p meterhouse "$@"
