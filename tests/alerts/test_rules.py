"""Alert rules with the real promtool: syntax, unit tests, conventions, and every PromQL expression in
rules and dashboards names only metrics a running `meterhouse up` exposes (or recording rules)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

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
    assert r.stdout.count("SUCCESS") == len(TEST_FILES)


def test_alerts_follow_the_conventions():
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)) >= 14
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    for a in alerts():
        assert re.fullmatch(r"Meterhouse[A-Z][A-Za-z]+", a["alert"]), a["alert"]
        assert a["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description", "runbook_url"} <= set(a["annotations"])
        anchor = a["annotations"]["runbook_url"].split("#")[1]
        assert anchor == a["alert"].lower() and f"## {a['alert']}\n" in runbooks


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


def test_promql_names_only_metrics_meterhouse_exposes(up):
    exposed = exposed_names(requests.get(f"{up.api}/metrics", timeout=10).text)
    recorded = {r["record"] for r in rules() if "record" in r}
    for where, expr in promql_expressions():
        code = re.sub(r'"[^"]*"', '""', expr)  # label values are not metric names
        for name in set(re.findall(r"\b(meterhouse[a-z0-9_:]*)", code)):
            assert name in exposed or name in recorded, f"{where}: {name} is neither exposed nor recorded"
    assert "meterhouse_failovers_total" in exposed and "meterhouse_spool_oldest_age_seconds" in exposed
