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
# The cluster profile's collectors: the four replicas, each collector preferring its own shard first.
ch=$(sed -n 's/^CLICKHOUSE_PASSWORD=//p' "$dir/clickhouse.env")
for i in 1 2; do
  if new "meterhouse-cluster-$i.env"; then
    if [ "$i" = 1 ]; then order="ch-s1-r1 ch-s1-r2 ch-s2-r1 ch-s2-r2"; else order="ch-s2-r1 ch-s2-r2 ch-s1-r1 ch-s1-r2"; fi
    urls=""
    for node in $order; do urls="$urls${urls:+,}http://meterhouse:$ch@$node:8123"; done
    printf 'MH_CLICKHOUSE_URL=%s\n' "$urls" >"$dir/meterhouse-cluster-$i.env"
  fi
done
if new grafana_clickhouse_password; then
  sed -n 's/^MH_GRAFANA_CLICKHOUSE_PASSWORD=//p' "$dir/clickhouse.env" | tr -d '\n' >"$dir/grafana_clickhouse_password"
fi
if new grafana_admin_password; then rand | tr -d '\n' >"$dir/grafana_admin_password"; fi
if new meterhouse_ingest_tokens.yml; then  # who may send usage (OTLP), for all orgs
  printf 'tokens:\n  - token: "%s"\n    orgs: ["*"]\n' "$(rand)" >"$dir/meterhouse_ingest_tokens.yml"
fi
if new meterhouse_tokens.yml; then
  printf 'tokens:\n  - token: "%s"\n    orgs: ["*"]\n' "$(rand)" >"$dir/meterhouse_tokens.yml"
fi
if new meterhouse_sql_token; then  # the `embedded` profile's Grafana: the all-orgs API token, as the SQL endpoint's password
  sed -n 's/.*token: "\(.*\)"/\1/p' "$dir/meterhouse_tokens.yml" | head -1 | tr -d '\n' >"$dir/meterhouse_sql_token"
fi
# The directory keeps them private on the host; the files are bind-mounted into containers whose users
# (grafana 472, meterhouse 10001) must read them.
chmod 644 "$dir"/*
echo "secrets in $dir; API token: $(sed -n 's/.*token: "\(.*\)"/\1/p' "$dir/meterhouse_tokens.yml")"
echo "OTLP ingest token (Authorization: Bearer ...): $(sed -n 's/.*token: "\(.*\)"/\1/p' "$dir/meterhouse_ingest_tokens.yml")"
