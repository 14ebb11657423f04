// ClickHouse's official JS client (@clickhouse/client) against meterhouse's SQL endpoint.
// Usage: node sql.js URL DATABASE PASSWORD ORG; prints one JSON object of what it read and was refused.
const { createClient } = require("@clickhouse/client");

async function main() {
  const [url, database, password, org] = process.argv.slice(2);
  const client = createClient({ url, database, username: "grafana", password });
  const out = {};
  out.ping = (await client.ping()).success;
  const totals = await client.query({
    query: "SELECT org_id, toString(sum(value_int)) AS total FROM usage_points GROUP BY org_id ORDER BY org_id",
    format: "JSONEachRow",
  });
  out.totals = await totals.json();
  const one = await client.query({
    query: "SELECT toString(sum(value_int)) AS total FROM usage_points WHERE org_id = {org:String}",
    query_params: { org },
    format: "JSON",
  });
  out.one = (await one.json()).data;
  try {
    await client.command({ query: "DROP TABLE usage_points" });
    out.drop = "done";
  } catch (e) {
    out.drop = String(e.code);
  }
  try {
    await client.query({ query: "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')", format: "JSONEachRow" });
    out.url = "done";
  } catch (e) {
    out.url = String(e.code);
  }
  await client.close();
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
