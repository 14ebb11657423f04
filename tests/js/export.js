// Records usage with the OpenTelemetry JS SDK and exports it to meterhouse over OTLP/HTTP.
// usage: node export.js URL json|proto none|gzip ORG_PREFIX ROUNDS
// Prints one JSON line: the totals recorded per org and the export results the SDK saw.
const { MeterProvider, PeriodicExportingMetricReader } = require("@opentelemetry/sdk-metrics");
const { resourceFromAttributes } = require("@opentelemetry/resources");
const { AggregationTemporalityPreference } = require("@opentelemetry/exporter-metrics-otlp-http");

const [url, protocol, compression, prefix, roundsArg] = process.argv.slice(2);
const { OTLPMetricExporter } =
  protocol === "proto"
    ? require("@opentelemetry/exporter-metrics-otlp-proto")
    : require("@opentelemetry/exporter-metrics-otlp-http");

const exporter = new OTLPMetricExporter({
  url,
  compression,
  temporalityPreference: AggregationTemporalityPreference.DELTA,
});
const results = { exports: 0, failures: [] };
const exportOnce = exporter.export.bind(exporter);
exporter.export = (metrics, done) =>
  exportOnce(metrics, (result) => {
    results.exports += 1;
    if (result.code !== 0) results.failures.push(String(result.error));
    done(result);
  });

const reader = new PeriodicExportingMetricReader({ exporter, exportIntervalMillis: 100 });
const provider = new MeterProvider({
  resource: resourceFromAttributes({ "service.name": "js-conformance" }),
  readers: [reader],
});
const counter = provider.getMeter("conformance").createCounter("js.calls");
const totals = {};

async function main() {
  const rounds = Number(roundsArg);
  for (let round = 0; round < rounds; round++) {
    for (let i = 0; i <= round % 5; i++) {  // new series keep appearing while exports run
      const org = `${prefix}-${i}`;
      const value = round * 10 + i + 1;
      counter.add(value, { "org.id": org, feature: `f${round % 3}` });
      totals[org] = (totals[org] || 0) + value;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  await provider.shutdown();  // the last collection is exported before this resolves
  console.log(JSON.stringify({ totals, ...results }));
}
main().catch((e) => {
  console.error(e);
  process.exit(1);
});
