"""Repository-level checks: the compose file, the Quickstart and CI wiring."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def check_compose(path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema with the Compose Specification schema it ships (no file outside the repo)."""
    tool = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_validates_against_the_compose_spec():
    result = check_compose(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_check_can_fail(tmp_path, compose):
    broken = dict(compose, services={"meterhouse": {"image": "x", "ports": {"not": "a list"}}})
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    result = check_compose(tmp_path / "docker-compose.yml")
    assert result.returncode != 0 and "ports" in result.stdout + result.stderr


def test_every_file_the_compose_file_mounts_or_builds_exists(compose):
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).exists(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose.get("volumes", {}), f"{name}: undeclared volume {source}"


def test_the_stack_is_wired_together(compose):
    services = compose["services"]
    assert {"clickhouse", "meterhouse", "prometheus", "alertmanager", "grafana"} <= set(services)
    for name, service in services.items():
        assert "healthcheck" in service, name
    assert services["meterhouse"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/rules/*.rules.yml"]
    assert any(j["job_name"] == "meterhouse" for j in prom["scrape_configs"])  # the rules' job label
    sources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/datasources.yml").read_text())
    assert {d["uid"] for d in sources["datasources"]} == {"prometheus", "clickhouse"}
    assert "grafana-clickhouse-datasource" in services["grafana"]["environment"]["GF_INSTALL_PLUGINS"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(bash scripts/\S+\.sh)\s*$", quickstart, re.M)
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
