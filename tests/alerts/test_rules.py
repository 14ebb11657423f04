"""Alert rules with the real promtool: syntax, unit tests, conventions, and every PromQL expression in
rules and dashboards names only metrics a running `meterhouse up` exposes (or recording rules)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "alerts"
RULE_FILES = sorted(ALERTS.glob("*.rules.yml"))
TEST_FILES = sorted((ALERTS / "tests").glob("*.test.yml"))
PROMTOOL = shutil.which("promtool")


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool is missing: scripts/test.sh installs Debian's prometheus package"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def rules() -> list[dict]:
    return [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]


def alerts() -> list[dict]:
    return [r for r in rules() if "alert" in r]


def test_promtool_check_rules():
    r = promtool("check", "rules", *map(str, RULE_FILES))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules():
    r = promtool("test", "rules", *map(str, TEST_FILES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == len(TEST_FILES) >= 6


#: Severities beyond warning/critical: events are notified, never paged; the Watchdog feeds a dead man's switch.
OTHER_SEVERITIES = {"MeterhouseFailoverOccurred": "info", "MeterhouseWatchdog": "none"}
RUNBOOK_BASE = "{{ $externalLabels.runbook_base_url }}#"


def test_alerts_follow_the_conventions():
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)) >= 30
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    for a in alerts():
        assert re.fullmatch(r"Meterhouse[A-Z][A-Za-z]+", a["alert"]), a["alert"]
        assert a["labels"]["severity"] == OTHER_SEVERITIES.get(a["alert"], a["labels"]["severity"])
        assert a["labels"]["severity"] in ("warning", "critical") or a["alert"] in OTHER_SEVERITIES
        assert {"summary", "description", "runbook_url"} <= set(a["annotations"])
        url = a["annotations"]["runbook_url"]
        assert url == RUNBOOK_BASE + a["alert"].lower(), a["alert"]
        assert f"## {a['alert']}\n" in runbooks, f"no runbook for {a['alert']}"


def test_runbook_urls_are_absolute_from_a_configurable_base():
    """The base is Prometheus' external label runbook_base_url (one place to change), and what promtool
    renders with it is an absolute URL."""
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    base = prom["global"]["external_labels"]["runbook_base_url"]
    assert re.fullmatch(r"https://[^\s#]+", base), base
    for f in TEST_FILES:
        for test in yaml.safe_load(f.read_text())["tests"]:
            assert re.fullmatch(r"https://[^\s#]+", test["external_labels"]["runbook_base_url"]), f.name
            for case in test.get("alert_rule_test", []):
                for alert in case.get("exp_alerts") or []:
                    url = alert["exp_annotations"]["runbook_url"]
                    assert url.startswith("https://") and url.endswith("#" + case["alertname"].lower())


@pytest.mark.parametrize(
    "config", sorted((ROOT / "deploy" / "prometheus").glob("*.yml")), ids=lambda p: p.name
)
def test_every_prometheus_that_loads_the_rules_renders_absolute_runbook_urls(config):
    """Each Prometheus the deployment runs with the rule files (the single node and the cluster profile)
    has the runbook_base_url external label; without it every runbook_url renders as a bare "#anchor"."""
    prom = yaml.safe_load(config.read_text())
    assert prom.get("rule_files"), config.name
    base = (prom["global"].get("external_labels") or {}).get("runbook_base_url", "")
    assert re.fullmatch(r"https://[^\s#]+", base), f"{config.name}: runbook_base_url is {base!r}"
    r = promtool("check", "config", "--syntax-only", str(config))
    assert r.returncode == 0, r.stdout + r.stderr


def test_recording_rules_are_named_level_metric_operations():
    for r in rules():
        if "record" not in r:
            continue
        level, metric, ops = r["record"].split(":")
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", level) and metric.startswith("meterhouse_"), r["record"]
        assert not metric.endswith("_total") and re.fullmatch(r"[a-z0-9_]+", ops), r["record"]
        kept = re.search(r"^\s*(?:sum|avg|max|min) by \(([^)]*)\)", r["expr"])
        if kept:  # the level names the labels the aggregation keeps (job is implied by instance)
            labels = [x.strip() for x in kept.group(1).split(",")]
            if "instance" in labels:
                labels.remove("job")
            assert level == "_".join(labels), r["record"]


def test_fleet_quantiles_can_be_computed_from_recorded_bucket_rates():
    recorded = {r["record"]: r["expr"] for r in rules() if "record" in r}
    assert "job_le:meterhouse_ingest_lag_seconds_bucket:rate5m" in recorded
    assert (
        "job_le:meterhouse_ingest_lag_seconds_bucket:rate5m"
        in recorded["job:meterhouse_ingest_lag_seconds:p99_rate5m"]
    )


def test_lag_buckets_reach_hours():
    from meterhouse.core.metrics import LAG_BUCKETS

    assert max(LAG_BUCKETS) >= 4 * 3600


def test_every_alert_has_a_for_boundary_test_and_a_silent_case():
    cases: dict[str, list] = {}
    for f in TEST_FILES:
        for test in yaml.safe_load(f.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], []).append(
                    (case["eval_time"], bool(case.get("exp_alerts")))
                )
    for a in alerts():
        seen = cases.get(a["alert"], [])
        assert any(fired for _, fired in seen), f"{a['alert']}: no case where it fires"
        if a["alert"] != "MeterhouseWatchdog":
            assert any(not fired for _, fired in seen), f"{a['alert']}: no case where it stays silent"
        if "for" in a:
            # Silent just before the `for:` boundary and firing just after, within the same scenario.
            assert len(seen) >= 2, a["alert"]


def promql_expressions() -> list[tuple[str, str]]:
    out = [(r.get("alert") or r["record"], r["expr"]) for r in rules()]
    for path in sorted((ROOT / "dashboards" / "json").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for t in panel.get("targets", []):
                if "expr" in t:
                    out.append((f"{path.stem}/{panel['title']}", t["expr"]))
    return out


def test_every_promql_expression_parses_with_promtool(tmp_path):
    exprs = [
        e.replace("$__rate_interval", "1m").replace("$__interval", "1m") for _, e in promql_expressions()
    ]
    assert len(exprs) > 30
    f = tmp_path / "all.rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "all", "rules": [
        {"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]}))  # fmt: skip
    r = promtool("check", "rules", str(f))
    assert r.returncode == 0, r.stdout + r.stderr


def exposed_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            names.add(name)
            if kind == "counter":
                names |= {name + "_total", name.removesuffix("_total") + "_total"}
            if kind == "histogram":
                names |= {name + s for s in ("_bucket", "_sum", "_count")}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def exposed_label_values(text: str) -> dict[str, dict[str, set[str]]]:
    """metric name → label → the values a scrape shows (labelled series are pre-created)."""
    out: dict[str, dict[str, set[str]]] = {}
    for line in text.splitlines():
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ", line)
        if m and not line.startswith("#"):
            for key, value in re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""):
                out.setdefault(m.group(1), {}).setdefault(key, set()).add(value)
    return out


def test_promql_names_only_metrics_meterhouse_exposes(up):
    text = requests.get(f"{up.api}/metrics", timeout=10).text
    exposed = exposed_names(text)
    labels = exposed_label_values(text)
    recorded = {r["record"] for r in rules() if "record" in r}
    for where, expr in promql_expressions():
        code = re.sub(r'"[^"]*"', '""', expr)  # label values are not metric names
        for name in set(re.findall(r"\b((?:[a-z_]+:)?meterhouse[a-z0-9_:]*)", code)):
            assert name in exposed or name in recorded, f"{where}: {name} is neither exposed nor recorded"
        # Every label matcher on an exposed series selects a value it has (a typo in an outcome or a
        # reason would select nothing, and the alert would never fire).
        for name, body in re.findall(r"\b(meterhouse_[a-z0-9_]+)\s*\{([^}]*)\}", expr):
            for key, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', body):
                if key in ("job", "instance") or "$" in value or op.startswith("!"):
                    continue
                values = labels.get(name, {}).get(key)
                assert values, f"{where}: {name} has no label {key}"
                for alternative in value.split("|") if op == "=~" else [re.escape(value)]:
                    assert any(re.fullmatch(alternative, v) for v in values), (
                        f"{where}: {name}{{{key}={value!r}}}"
                    )
    assert "meterhouse_failovers_total" in exposed and "meterhouse_spool_oldest_age_seconds" in exposed
    for name in (
        "meterhouse_dead_letters_pending",
        "meterhouse_data_dir_free_bytes",
        "meterhouse_data_dir_size_bytes",
        "meterhouse_orgs_silent_over_24h",
        "process_start_time_seconds",
    ):
        assert name in exposed, name  # fmt: skip
