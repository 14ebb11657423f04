"""The compose profile `cluster`: its ClickHouse and Keeper configs are what generate.py writes, parse as
XML, and name exactly the hosts and ports the compose file runs; the collectors, load balancer,
Prometheus and Grafana point at them. (No Docker engine runs here: this is all that can be checked.)"""

import re
import runpy
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from meterhouse.cli import _config_from, build_parser, check_bind

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / "deploy" / "clickhouse-cluster"


@pytest.fixture(scope="module")
def gen():
    return runpy.run_path(str(DIR / "generate.py"))


@pytest.fixture(scope="module")
def services():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return {n: s for n, s in compose["services"].items() if "cluster" in s.get("profiles", [])}


def xml(name: str) -> ET.Element:
    return ET.parse(DIR / name).getroot()


def mounted(service: dict, target: str) -> str:
    for v in service["volumes"]:
        source, dest = v.split(":")[:2]
        if dest == target:
            return source
    raise AssertionError(f"nothing mounted at {target}")


def test_committed_configs_are_the_generated_ones(gen):
    files = gen["files"]()
    on_disk = {str(p.relative_to(DIR)) for p in DIR.rglob("*.xml")}
    assert on_disk == set(files), "run `python deploy/clickhouse-cluster/generate.py`"
    for name, text in files.items():
        assert (DIR / name).read_text() == text, f"{name} drifted: run generate.py"
        ET.fromstring(text)  # valid XML


def test_topology_two_shards_two_replicas_three_keepers_two_collectors(services):
    nodes = sorted(n for n in services if n.startswith("ch-"))
    assert nodes == ["ch-s1-r1", "ch-s1-r2", "ch-s2-r1", "ch-s2-r2"]
    assert sorted(n for n in services if n.startswith("keeper-")) == ["keeper-1", "keeper-2", "keeper-3"]
    assert sorted(n for n in services if n.startswith("collector-")) == ["collector-1", "collector-2"]
    assert {"lb", "prometheus-cluster", "grafana-cluster"} <= set(services)


def test_remote_servers_macros_and_keeper_match_the_compose_services(services):
    cluster = xml("config.d/cluster.xml")
    native = int(cluster.findtext("tcp_port"))
    (remote,) = list(cluster.find("remote_servers"))
    assert remote.tag == "meterhouse"
    hosts = []
    for shard_num, shard in enumerate(remote.findall("shard"), start=1):
        assert shard.findtext("internal_replication") == "true"
        for replica in shard.findall("replica"):
            host = replica.findtext("host")
            hosts.append(host)
            assert int(replica.findtext("port")) == native
            service = services[host]  # every host is a service of the profile
            macros = ET.parse(ROOT / mounted(service, "/etc/clickhouse-server/config.d/macros.xml")).getroot()
            assert macros.findtext("macros/shard") == str(shard_num)
            assert macros.findtext("macros/replica") == host
            assert macros.findtext("macros/cluster") == remote.tag
            assert mounted(service, "/etc/clickhouse-server/config.d/cluster.xml") == (
                "./deploy/clickhouse-cluster/config.d/cluster.xml"
            )
            # Credentials come from the node's environment, which compose fills from the secrets' env file.
            assert replica.find("user").get("from_env") == "CLICKHOUSE_USER"
            assert replica.find("password").get("from_env") == "CLICKHOUSE_PASSWORD"
            assert "./deploy/secrets/clickhouse.env" in service["env_file"]
            assert "CLICKHOUSE_PASSWORD" not in service.get("environment", {})
    assert sorted(hosts) == sorted(n for n in services if n.startswith("ch-"))
    keepers = {n: services[n] for n in services if n.startswith("keeper-")}
    raft_sets = []
    for name, service in keepers.items():
        conf = ET.parse(ROOT / mounted(service, "/etc/clickhouse-keeper/keeper_config.xml")).getroot()
        ks = conf.find("keeper_server")
        raft = [(int(s.findtext("id")), s.findtext("hostname"), int(s.findtext("port")))
                for s in ks.find("raft_configuration")]  # fmt: skip
        raft_sets.append(raft)
        assert (int(ks.findtext("server_id")), name) in [(i, h) for i, h, _ in raft]
        assert "9181" in " ".join(service["healthcheck"]["test"]) and ks.findtext("tcp_port") == "9181"
        for node in cluster.find("zookeeper"):
            assert int(node.findtext("port")) == int(ks.findtext("tcp_port"))
    assert all(r == raft_sets[0] for r in raft_sets)
    assert sorted(h for _, h, _ in raft_sets[0]) == sorted(keepers)
    assert sorted(n.findtext("host") for n in cluster.find("zookeeper")) == sorted(keepers)
    assert len({i for i, _, _ in raft_sets[0]}) == 3


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    """The secrets scripts/compose-secrets.sh makes, made in a scratch copy (never in the repository)."""
    work = tmp_path_factory.mktemp("compose")
    (work / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "compose-secrets.sh", work / "scripts")
    subprocess.run(["bash", str(work / "scripts" / "compose-secrets.sh")], check=True, capture_output=True,
                   timeout=60)  # fmt: skip
    return work / "deploy" / "secrets"


def service_config(service: dict, secrets_dir: Path):
    """The Config `meterhouse up` builds inside the container: its command, env_file and environment,
    with the compose secrets' paths pointing at the generated files."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env: dict[str, str] = {}
    for path in service.get("env_file", []):
        for line in (secrets_dir / Path(path).name).read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value
    for key, value in (service.get("environment") or {}).items():
        if str(value).startswith("/run/secrets/"):
            value = str(secrets_dir / Path(compose["secrets"][Path(value).name]["file"]).name)
        env[key] = str(value)
    return _config_from(build_parser().parse_args(service["command"]), env=env)


def test_every_meterhouse_service_starts_with_the_generated_secrets(secrets_dir):
    """`meterhouse up` refuses a public bind without API and ingest tokens: each service must carry both."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    checked = 0
    for name, service in compose["services"].items():
        if not service.get("build"):
            continue
        config = service_config(service, secrets_dir)
        assert config.is_public_bind, name
        check_bind(config)  # raises ConfigError naming what is missing
        assert config.auth_tokens and config.ingest_tokens, name
        assert not config.allow_unauthenticated and not config.allow_unauthenticated_ingest, name
        assert "meterhouse:" not in " ".join(service["command"]), f"{name}: credentials on a command line"
        checked += 1
    assert checked == 4


def test_the_embedded_profile_serves_grafana_through_the_sql_endpoint(secrets_dir):
    """The `embedded` profile: meterhouse on its embedded engine with its SQL endpoint on, and Grafana's
    ClickHouse data source on that endpoint with the generated all-orgs API token as its password."""
    from meterhouse.core.store import is_embedded

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    config = service_config(compose["services"]["meterhouse-embedded"], secrets_dir)
    assert is_embedded(config.endpoints[0]) and config.sql_port == 8123
    token = (secrets_dir / "meterhouse_sql_token").read_text()
    assert any(t.token == token and t.all_orgs for t in config.auth_tokens)
    sources = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning-embedded/datasources/datasources.yml").read_text()
    )
    (ch,) = [d for d in sources["datasources"] if d["type"] == "grafana-clickhouse-datasource"]
    assert (ch["jsonData"]["host"], ch["jsonData"]["port"]) == ("meterhouse-embedded", config.sql_port)


def test_collectors_are_configured_for_the_cluster(services, secrets_dir):
    http_port = int(xml("config.d/cluster.xml").findtext("http_port"))
    nodes = {n for n in services if n.startswith("ch-")}
    volumes = set()
    for name in ("collector-1", "collector-2"):
        service = services[name]
        config = service_config(service, secrets_dir)  # accepted: several nodes of one cluster
        assert config.cluster == "meterhouse"
        assert {urlsplit(u).hostname for u in config.endpoints} == nodes
        assert {urlsplit(u).port for u in config.endpoints} == {http_port}
        assert set(service["depends_on"]) == nodes
        volumes.add(mounted(service, "/var/lib/meterhouse"))
    assert len(volumes) == 2  # each collector has its own spool


def test_load_balancer_prometheus_and_grafana_point_at_the_collectors_and_nodes(services):
    nginx = (ROOT / mounted(services["lb"], "/etc/nginx/nginx.conf")).read_text()
    upstreams = dict(re.findall(r"upstream (\w+) \{(.*?)\}", nginx, re.S))
    for name, port in (("otlp_grpc", 4317), ("otlp_http", 4318)):
        assert "hash $remote_addr consistent;" in upstreams[name]  # affinity of cumulative series
        assert re.findall(r"server (\S+);", upstreams[name]) == [f"collector-1:{port}", f"collector-2:{port}"]
    listens = {int(p) for p in re.findall(r"listen (\d+);", nginx)}
    assert listens == {int(p.split(":")[-1]) for p in services["lb"]["ports"]} == {4317, 4318, 9464}
    prom = yaml.safe_load(
        (ROOT / mounted(services["prometheus-cluster"], "/etc/prometheus/prometheus.yml")).read_text()
    )
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "meterhouse")
    assert job["static_configs"][0]["targets"] == ["collector-1:9464", "collector-2:9464"]
    provisioning = ROOT / mounted(services["grafana-cluster"], "/etc/grafana/provisioning")
    sources = yaml.safe_load((provisioning / "datasources" / "datasources.yml").read_text())["datasources"]
    ch = next(d for d in sources if d["uid"] == "clickhouse")
    assert ch["jsonData"]["host"] in services and ch["jsonData"]["port"] == 8123
    assert next(d for d in sources if d["uid"] == "prometheus")["url"] == "http://prometheus-cluster:9090"
    assert (provisioning / "dashboards" / "dashboards.yml").exists()


def test_profile_settings_match_the_insert_and_query_settings():
    from meterhouse.core import schema

    profile = xml("users.d/profile.xml").find("profiles/default")
    values = {e.tag: int(e.text) for e in profile}
    assert values == {**schema.CLUSTER_INSERT_SETTINGS, **schema.CLUSTER_QUERY_SETTINGS}


def _replicated_tables_fed_by(ingest: str) -> set[str]:
    """The Replicated tables one insert into ``ingest`` writes a part to, following the cluster
    rendering's materialized views (each reads one ``_local`` table and writes another)."""
    from meterhouse.core import schema

    statements = schema.render("db", "mh")
    views = []
    for s in statements:
        if m := re.match(
            r"CREATE MATERIALIZED VIEW IF NOT EXISTS db\.\w+ ON CLUSTER mh TO db\.(\w+)_local", s
        ):
            views.append((set(re.findall(r"FROM db\.(\w+)_local", s)), m.group(1)))
    replicated = {
        m.group(1)
        for s in statements
        if (
            m := re.match(
                r"CREATE TABLE IF NOT EXISTS db\.(\w+)_local ON CLUSTER mh .*ENGINE = Replicated", s, re.S
            )
        )
    }
    fed, frontier = set(), {ingest}
    while frontier:
        frontier = {target for sources, target in views if sources & frontier} - fed
        fed |= frontier
    return fed & replicated


def test_capacity_keeper_load_counts_the_tables_each_insert_feeds():
    """docs/capacity.md sizes Keeper by the parts one flush commits on each shard: one per Replicated
    table the insert feeds, as the schema has them now."""
    from meterhouse.core import schema

    numbers = _replicated_tables_fed_by(schema.INGEST_TABLE)
    dists = _replicated_tables_fed_by(schema.DIST_INGEST_TABLE)
    assert schema.POINTS_TABLE in numbers and schema.DIST_TABLE in dists
    text = (ROOT / "docs" / "capacity.md").read_text()
    m = re.search(
        r"the insert feeds[^:]*:\s+(\d+)\s+for\s+number\s+points\s+\(([^)]*)\),?\s+and\s+(\d+)\s+for\s+distributions",
        text,
    )
    assert m, "the Keeper section names the tables each insert feeds"
    listed = set(re.findall(r"`(\w+)`", m.group(2)))
    assert (int(m.group(1)), listed, int(m.group(3))) == (len(numbers), numbers, len(dists))
    per_flush = len(numbers) + len(dists)
    assert f"≤ C × {per_flush} per second" in text
    # The worked figures: 2 collectors on the compose profile's 2 shards, and on 8 shards.
    assert (
        f"{2 * per_flush * 2}/s for the compose profile" in text
        and f"{2 * per_flush * 8}/s with 8 shards" in text
    )


def test_each_node_advertises_its_service_name_to_the_other_replicas(services):
    """A replica fetches parts from the host the other one registered in Keeper: ``interserver_http_host``,
    or else the output of ``hostname -f``, which in a container without a set hostname is its id (peers
    then fail with "Host not found: <container id>", ClickHouse/ClickHouse#14018). Each node advertises its
    compose service name, the name the other containers resolve."""
    for name in (n for n in services if n.startswith("ch-")):
        node = ET.parse(
            ROOT / mounted(services[name], "/etc/clickhouse-server/config.d/macros.xml")
        ).getroot()
        assert node.findtext("interserver_http_host") == name, name
