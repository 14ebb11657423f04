#!/usr/bin/env bash
# Create the secrets docker-compose.yml reads, once, with random values (deploy/secrets/, not committed).
# Existing files are kept. deploy/secrets/ itself is readable by its owner only. Prints the API token to use as `Authorization: Bearer ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=deploy/secrets
mkdir -p "$dir"
chmod 700 "$dir"
rand() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
new() { [ ! -e "$dir/$1" ]; }
if new clickhouse.env; then
  ch=$(rand)
  printf 'CLICKHOUSE_USER=meterhouse\nCLICKHOUSE_PASSWORD=%s\nMH_GRAFANA_CLICKHOUSE_PASSWORD=%s\n' "$ch" "$(rand)" \
    >"$dir/clickhouse.env"
  printf 'MH_CLICKHOUSE_URL=http://meterhouse:%s@clickhouse:8123\n' "$ch" >"$dir/meterhouse.env"
fi
if new grafana_clickhouse_password; then
  sed -n 's/^MH_GRAFANA_CLICKHOUSE_PASSWORD=//p' "$dir/clickhouse.env" | tr -d '\n' >"$dir/grafana_clickhouse_password"
fi
if new grafana_admin_password; then rand | tr -d '\n' >"$dir/grafana_admin_password"; fi
if new meterhouse_tokens.yml; then
  printf 'tokens:\n  - token: "%s"\n    orgs: ["*"]\n' "$(rand)" >"$dir/meterhouse_tokens.yml"
fi
# The directory keeps them private on the host; the files are bind-mounted into containers whose users
# (grafana 472, meterhouse 10001) must read them.
chmod 644 "$dir"/*
echo "secrets in $dir; API token: $(sed -n 's/.*token: "\(.*\)"/\1/p' "$dir/meterhouse_tokens.yml")"
