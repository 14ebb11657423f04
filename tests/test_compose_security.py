"""The compose stack is safe to run: linted for security by a maintained linter (dclint, from npm), no
unauthenticated per-org data on a published port, secrets out of command lines, monitoring that starts
when meterhouse or ClickHouse is broken, pinned images and plugin, a non-root meterhouse image."""

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SECRET_WORDS = re.compile(r"password|secret|token", re.I)


def dclint_binary() -> str:
    local = ROOT / ".venv" / "npm" / "node_modules" / ".bin" / "dclint"
    found = str(local) if local.exists() else shutil.which("dclint")
    assert found, "dclint is missing: scripts/test.sh installs it from npm into .venv/npm"
    return found


def dclint(path: Path) -> list[dict]:
    # The report goes to a file: node exits before a piped stdout beyond 64 KiB is flushed.
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "dclint.json"
        subprocess.run([dclint_binary(), "-f", "json", "-o", str(report), str(path)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
        return [m for f in json.loads(report.read_text()) for m in f["messages"]]


@pytest.fixture(scope="module")
def compose() -> dict:
    """The default stack: services without a profile (`docker compose up`). The `cluster` profile is
    linted and must publish on loopback too (see the tests on the whole file)."""
    doc = yaml.safe_load(COMPOSE.read_text())
    doc["services"] = {n: s for n, s in doc["services"].items() if not s.get("profiles")}
    return doc


@pytest.fixture(scope="module")
def whole_file() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_dclint_finds_no_error_and_no_security_problem():
    """Errors and every security rule; style warnings (key and service order) are not gated."""
    messages = [m for m in dclint(COMPOSE) if m["type"] == "error" or m["category"] == "security"]
    assert messages == [], "\n".join(f"{m['line']}: {m['rule']}: {m['message']}" for m in messages)


def test_dclint_catches_an_exposed_port_and_a_floating_tag(tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  api:\n    image: 'example/api:latest'\n    ports:\n      - '9464:9464'\n")
    rules = {m["rule"] for m in dclint(bad) if m["type"] == "error"}
    assert {"no-unbound-port-interfaces", "service-image-require-explicit-tag"} <= rules


def test_published_ports_listen_on_loopback_only(whole_file):
    for name, service in whole_file["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"


def test_the_api_requires_tokens(compose):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--allow-unauthenticated" not in dockerfile
    for name, service in compose["services"].items():
        assert "--allow-unauthenticated" not in " ".join(map(str, service.get("command", []))), name
    env = compose["services"]["meterhouse"]["environment"]
    assert env["MH_AUTH_TOKENS_FILE"] == "/run/secrets/meterhouse_tokens"
    assert "meterhouse_tokens" in compose["services"]["meterhouse"]["secrets"]
    assert "meterhouse_tokens" in compose["secrets"]


def test_no_secret_in_a_command_line_or_environment_value(compose):
    for name, service in compose["services"].items():
        for arg in map(str, service.get("command", [])):
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", arg), f"{name}: credentials in {arg}"
        for key in service.get("environment") or {}:
            if SECRET_WORDS.search(key):
                value = service["environment"][key]
                assert key.endswith("_FILE") and value.startswith("/run/secrets/"), f"{name}: {key}"
    sources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/datasources.yml").read_text())
    for ds in sources["datasources"]:
        for value in (ds.get("secureJsonData") or {}).values():
            assert re.fullmatch(r"\$__(file|env)\{[^}]+\}", value), ds["name"]


def test_secrets_are_generated_and_never_committed(compose):
    script = (ROOT / "scripts" / "compose-secrets.sh").read_text()
    files = [Path(s["file"]).name for s in compose["secrets"].values()]
    files += [Path(f).name for s in compose["services"].values() for f in s.get("env_file", [])]
    for f in files:
        assert f in script, f"scripts/compose-secrets.sh does not create {f}"
    assert "deploy/secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    assert (
        not (ROOT / "deploy" / "secrets").exists()
        or not subprocess.run(
            ["git", "ls-files", "deploy/secrets"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    )


def test_grafana_has_no_anonymous_access_and_a_read_only_clickhouse_user(compose, whole_file):
    for name, service in whole_file["services"].items():
        if service.get("image", "").startswith("grafana/"):
            assert service["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false", name
    env = compose["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith("/run/secrets/")
    sources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/datasources.yml").read_text())
    ch = next(d for d in sources["datasources"] if d["type"] == "grafana-clickhouse-datasource")
    user = ch["jsonData"]["username"]
    users = (ROOT / "deploy/clickhouse/users.d/grafana.xml").read_text()
    assert f"<{user}>" in users and re.search(r"<readonly>[12]</readonly>", users)
    grants = re.findall(r"<query>(.*?)</query>", users)
    assert grants == ["GRANT SELECT ON meterhouse.*"]
    assert 'from_env="' in users and "<password>" not in users
    mounts = compose["services"]["clickhouse"]["volumes"]
    assert any(m.startswith("./deploy/clickhouse/users.d/grafana.xml:") for m in mounts)


def test_monitoring_starts_when_meterhouse_or_clickhouse_is_broken(compose):
    for name in ("prometheus", "alertmanager", "grafana"):
        deps = compose["services"][name].get("depends_on") or {}
        assert not {"meterhouse", "clickhouse"} & set(deps), f"{name} waits for {set(deps)}"


def test_restart_policies_and_a_grace_period_above_the_shutdown_timeout(compose):
    for name, service in compose["services"].items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
    mh = compose["services"]["meterhouse"]
    timeout = next(float(c.split("=", 1)[1]) for c in mh["command"] if c.startswith("--shutdown-timeout-s="))
    grace = re.fullmatch(r"(\d+)s", mh["stop_grace_period"])
    assert grace and int(grace.group(1)) > timeout


def test_images_and_the_plugin_are_pinned(compose):
    from meterhouse.dashboards.common import CLICKHOUSE_PLUGIN_VERSION

    for name, service in compose["services"].items():
        if "image" in service:
            assert re.search(r":v?\d+\.\d+\.\d+(\.\d+)?$|@sha256:[0-9a-f]{64}$", service["image"]), name
    base = re.findall(r"^FROM (\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert base and all(re.search(r":\d+\.\d+\.\d+", b) for b in base), base
    plugins = compose["services"]["grafana"]["environment"]["GF_INSTALL_PLUGINS"]
    assert plugins == f"grafana-clickhouse-datasource {CLICKHOUSE_PLUGIN_VERSION}"
    assert compose["services"]["grafana"]["image"] == "grafana/grafana:11.1.0"  # plugin 4.x needs >= 9.5


def test_the_meterhouse_image_runs_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    last_stage = text.rsplit("\nFROM ", 1)[-1]
    users = re.findall(r"^USER (\S+)", last_stage, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users


#: Services of the cluster profile that are meterhouse or ClickHouse (what monitoring must not wait for).
def _pipeline(name: str) -> bool:
    return name in ("meterhouse", "clickhouse", "lb") or name.startswith(
        ("collector-", "ch-", "keeper-", "meterhouse-")
    )


def _monitoring(name: str) -> bool:
    return name.startswith(("prometheus", "grafana", "alertmanager"))


def test_monitoring_of_every_profile_starts_when_meterhouse_or_clickhouse_is_broken(whole_file):
    """The cluster profile's Prometheus and Grafana too: waiting for healthy collectors or ClickHouse
    nodes means no alert and no dashboard exactly when the cluster is broken."""
    for name, service in whole_file["services"].items():
        if _monitoring(name):
            deps = set(service.get("depends_on") or {})
            assert not {d for d in deps if _pipeline(d)}, f"{name} waits for {deps}"


def test_every_service_of_every_profile_restarts_and_flushes_on_stop(whole_file):
    from meterhouse.core.config import Config

    for name, service in whole_file["services"].items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
        if "up" in [str(c) for c in service.get("command", [])]:
            timeout = next((float(c.split("=", 1)[1]) for c in service["command"]
                            if str(c).startswith("--shutdown-timeout-s=")), Config().shutdown_timeout_s)  # fmt: skip
            grace = re.fullmatch(r"(\d+)s", str(service.get("stop_grace_period", "10s")))
            assert grace and int(grace.group(1)) > timeout, f"{name}: stop_grace_period {grace}"


def test_every_grafana_reads_clickhouse_as_the_read_only_user_with_a_secret_password(whole_file):
    services = whole_file["services"]
    users = (ROOT / "deploy/clickhouse/users.d/grafana.xml").read_text()
    for name, service in services.items():
        if not service.get("image", "").startswith("grafana/"):
            continue
        env = service.get("environment") or {}
        assert str(env.get("GF_SECURITY_ADMIN_PASSWORD__FILE", "")).startswith("/run/secrets/"), name
        mount = next(v for v in service["volumes"] if v.split(":")[1] == "/etc/grafana/provisioning")
        sources = yaml.safe_load((ROOT / mount.split(":")[0] / "datasources" / "datasources.yml").read_text())
        for ds in sources["datasources"]:
            for value in (ds.get("secureJsonData") or {}).values():
                assert re.fullmatch(r"\$__(file|env)\{[^}]+\}", value), f"{name}: {ds['name']}"
            if ds["type"] == "grafana-clickhouse-datasource":
                user, host = ds["jsonData"]["username"], ds["jsonData"]["host"]
                if "up" in [str(c) for c in services[host].get("command", [])]:
                    # meterhouse's own read-only SQL endpoint (the `embedded` profile): the password is
                    # the all-orgs API token, from a secret, and the endpoint requires tokens.
                    assert ds["secureJsonData"]["password"] == "$__file{/run/secrets/meterhouse_sql_token}", (
                        name
                    )
                    assert "meterhouse_sql_token" in service["secrets"], name
                    assert services[host]["environment"]["MH_AUTH_TOKENS_FILE"].startswith("/run/secrets/"), (
                        host
                    )
                    assert ds["jsonData"]["port"] == 8123, name
                    continue
                assert f"<{user}>" in users, f"{name}: {user} is not the read-only user"
                mounts = services[host]["volumes"]
                assert any(m.startswith("./deploy/clickhouse/users.d/grafana.xml:") for m in mounts), host
