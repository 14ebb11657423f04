import subprocess
import sys
from pathlib import Path

import pytest

from meterhouse.core.config import Config, ConfigError, load_config, option_names


def test_defaults_match_the_documented_interface():
    c = load_config(env={})
    assert (c.host, c.otlp_grpc_port, c.otlp_http_port, c.http_port) == ("127.0.0.1", 4317, 4318, 9464)
    assert c.data_dir == Path("meterhouse-data")
    assert c.endpoints == ["embedded"]
    assert c.org_attribute == "org.id"
    assert c.flush_interval_s <= 1.0


def test_precedence_file_then_env_then_flags(tmp_path):
    f = tmp_path / "mh.yml"
    f.write_text("http_port: 1000\notlp_http_port: 1001\nflush_interval_s: 0.5\ndatabase: fromfile\n")
    env = {"MH_HTTP_PORT": "2000", "MH_OTLP_HTTP_PORT": "2001", "UNRELATED": "x"}
    c = load_config({"http_port": 3000, "otlp_http_port": None}, env=env, config_file=f)
    assert c.http_port == 3000  # flag beats env and file
    assert c.otlp_http_port == 2001  # env beats file; a flag left unset does not override
    assert c.flush_interval_s == 0.5  # file beats default
    assert c.database == "fromfile"


def test_file_accepts_kebab_case_keys(tmp_path):
    f = tmp_path / "mh.yml"
    f.write_text("org-attribute: tenant.id\n")
    assert load_config(env={}, config_file=f).org_attribute == "tenant.id"


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ({"flags": {"http_port": 70000}}, "http_port: must be a port number"),
        ({"env": {"MH_OTLP_HTTP_PORT": "abc"}}, "otlp_http_port: must be an integer"),
        ({"env": {"MH_FLUSH_INTERVAL_S": "0"}}, "flush_interval_s: must be greater than 0"),
        ({"flags": {"clickhouse_url": "tcp://x:9000"}}, "clickhouse_url: each endpoint must be"),
        ({"flags": {"database": "bad-name;drop"}}, "database: must be a plain identifier"),
        ({"flags": {"log_level": "loud"}}, "log_level: must be one of"),
        ({"file": "http_prot: 1\n"}, "http_prot: unknown option"),
        ({"file": "http_port: [1, 2]\n"}, "http_port: must be an integer"),
        ({"file": "max_attributes: true\n"}, "max_attributes: must be an integer"),
        ({"file": "- just\n- a list\n"}, "must hold a mapping"),
        ({"file": "http_port: [unclosed\n"}, "is not valid YAML"),
    ],
)
def test_bad_values_name_the_key(tmp_path, source, needle):
    path = None
    if "file" in source:
        path = tmp_path / "mh.yml"
        path.write_text(source["file"])
    with pytest.raises(ConfigError) as e:
        load_config(source.get("flags"), env=source.get("env", {}), config_file=path)
    assert needle in str(e.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(env={}, config_file=tmp_path / "nope.yml")


def test_several_endpoints_in_priority_order():
    c = Config(clickhouse_url="http://a:8123, https://b:8443", cluster="mh")
    assert c.endpoints == ["http://a:8123", "https://b:8443"]


def test_several_servers_without_a_cluster_are_refused():
    # Plain tables on two servers split the data on failover and count a cross-server retry twice.
    with pytest.raises(ConfigError, match="only safe as replicas of one replicated schema") as e:
        Config(clickhouse_url="http://u:secretpw@a:8123,http://b:8123")
    assert "secretpw" not in str(e.value)
    with pytest.raises(ConfigError, match="only safe as replicas"):
        Config(clickhouse_url="http://a:8123,embedded#b")


def test_embedded_handles_share_one_database_and_are_allowed():
    assert Config(clickhouse_url="embedded#a,embedded#b").endpoints == ["embedded#a", "embedded#b"]


def test_the_embedded_engine_is_never_a_cluster_node():
    with pytest.raises(ConfigError, match="cannot be a node of cluster"):
        Config(cluster="mh")
    with pytest.raises(ConfigError, match="cluster: must be a plain identifier"):
        Config(cluster="a-b", clickhouse_url="http://a:8123")


def test_up_refuses_several_servers_without_a_cluster_with_exit_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "meterhouse", "up", "--data-dir", str(tmp_path),
         "--clickhouse-url", "http://127.0.0.1:1,http://127.0.0.1:2"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2
    assert "--cluster NAME" in r.stderr
    assert not (tmp_path / "spool").exists()  # nothing was started


def test_up_refuses_bad_configuration_with_exit_2_naming_the_key(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "meterhouse", "up", "--http-port", "70000", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2
    assert "http_port" in r.stderr and "port number" in r.stderr
    assert not (tmp_path / "clickhouse").exists()  # nothing was started


def test_every_option_is_a_flag_and_documented_in_the_readme():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    help_text = subprocess.run(
        [sys.executable, "-m", "meterhouse", "up", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    for name in option_names():
        flag = "--" + name.replace("_", "-")
        assert flag in help_text, flag
        assert f"`{flag}`" in readme, f"README does not document {flag}"
    from meterhouse.cli import options_table

    assert options_table() in readme, "README's option table drifted: `meterhouse config --options-table`"


def test_every_command_in_the_readme_exists(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    import re

    commands = set(re.findall(r"`meterhouse ([a-z-]+)", readme))
    assert {"up", "demo", "dead-letter", "dashboards", "config"} <= commands
    for command in commands:
        r = subprocess.run(
            [sys.executable, "-m", "meterhouse", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, (command, r.stderr)
    r = subprocess.run([sys.executable, "-m", "meterhouse", "dead-letter", "list", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "0 dead letter(s)" in r.stdout
    # A data directory that is not there is an error, not "0 dead letter(s)" (run from the wrong place).
    for action in ("list", "redrive"):
        missing = tmp_path / "not-here"
        r = subprocess.run([sys.executable, "-m", "meterhouse", "dead-letter", action, "--data-dir", str(missing)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 1 and "no data directory at" in r.stderr and not missing.exists(), r.stderr


def test_every_reject_reason_in_the_code_is_pre_created_and_documented():
    """A reason the decoder uses but the metrics do not pre-create is invisible to `increase()`."""
    import re

    from meterhouse.collector.cumulative import Rejected
    from meterhouse.core.metrics import REJECT_REASONS

    root = Path(__file__).resolve().parents[2]
    code = "\n".join(p.read_text() for p in (root / "collector").rglob("*.py"))
    used = set(re.findall(r'reject\(\s*"([a-z_]+)"', code))
    used |= set(re.findall(r'reject\(\s*"[a-z_]+" if \w+ else "([a-z_]+)"', code))
    used |= {r.value for r in Rejected}  # the cumulative conversion's, passed on by the decoder
    assert used, "no reject reason found in the collector"
    assert len(set(REJECT_REASONS)) == len(REJECT_REASONS), "a reject reason is listed twice"
    assert used <= set(REJECT_REASONS), used - set(REJECT_REASONS)
    readme = (root / "README.md").read_text().split("### Validation", 1)[1].split("\n## ", 1)[0]
    for reason in REJECT_REASONS:
        assert f"`{reason}`" in readme, f"{reason} is counted but not in the README's validation section"


def test_the_readme_documents_only_options_that_exist():
    import re

    from meterhouse.cli import build_parser

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    parser = build_parser()
    known = set()
    for action in parser._subparsers._group_actions[0].choices.values():  # every subcommand's flags
        for a in action._actions:
            known.update(o for o in a.option_strings if o.startswith("--"))
    bench_help = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout  # fmt: skip
    known.update(re.findall(r"(--[a-z][a-z0-9-]*)", bench_help))
    mentioned = set(re.findall(r"`(--[a-z][a-z0-9-]*)", readme))
    assert mentioned - known == set(), f"README names options that do not exist: {sorted(mentioned - known)}"


def test_boolean_options_are_switches():
    from meterhouse.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["up", "--allow-unauthenticated", "--no-spool-fsync"])
    assert args.allow_unauthenticated is True and args.spool_fsync is False
    assert parser.parse_args(["up"]).spool_fsync is None  # unset: the file/env/default decides
    with pytest.raises(SystemExit):  # a switch takes no value
        parser.parse_args(["up", "--allow-unauthenticated", "true", "--no-such"])


def test_config_command_redacts_passwords_in_clickhouse_url(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "meterhouse", "config", "--clickhouse-url",
         "http://u:secretpw@h:8123,https://other:pw2@h2:8443", "--cluster", "mh", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "secretpw" not in r.stdout and "pw2" not in r.stdout
    assert "http://u:***@h:8123" in r.stdout and "https://other:***@h2:8443" in r.stdout


def test_tokens_come_from_a_file_named_by_the_environment(tmp_path):
    tokens = tmp_path / "tokens.yml"
    tokens.write_text(
        "tokens:\n  - {token: aaaaaaaaaaaaaaaaaaaa, orgs: [org-1]}\n  - {token: bbbbbbbbbbbbbbbbbbbb, orgs: ['*']}\n"
    )
    c = load_config(env={"MH_AUTH_TOKENS_FILE": str(tokens)})
    assert [(t.token, t.orgs) for t in c.auth_tokens] == [
        ("aaaaaaaaaaaaaaaaaaaa", ("org-1",)),
        ("bbbbbbbbbbbbbbbbbbbb", ("*",)),
    ]
    with pytest.raises(ConfigError, match="MH_AUTH_TOKENS_FILE"):
        load_config(env={"MH_AUTH_TOKENS_FILE": str(tmp_path / "missing.yml")})
    tokens.write_text("tokens:\n  - {token: short, orgs: [org-1]}\n")
    with pytest.raises(ConfigError, match=r"auth.tokens\[0\].token"):
        load_config(env={"MH_AUTH_TOKENS_FILE": str(tokens)})
    # No flag carries tokens, so they never show in `ps`.
    from meterhouse.cli import build_parser

    assert "--auth-tokens" not in build_parser().format_help()
    assert not any("token" in o for o in option_names())


def test_name_limits_come_from_every_source_and_reach_the_decoder(tmp_path):
    from meterhouse.collector.pipeline import limits_from

    f = tmp_path / "mh.yml"
    f.write_text("max_unit_length: 16\nmax-scope-length: 100\n")
    c = load_config({"max_metric_name_length": 300}, env={"MH_MAX_DESCRIPTION_LENGTH": "500"}, config_file=f)
    limits = limits_from(c)
    assert (limits.max_metric_name_length, limits.max_unit_length, limits.max_scope_length,
            limits.max_description_length) == (300, 16, 100, 500)  # fmt: skip
    defaults = limits_from(load_config(env={}))
    assert (defaults.max_metric_name_length, defaults.max_unit_length, defaults.max_scope_length,
            defaults.max_description_length) == (1024, 255, 1024, 4096)  # fmt: skip
    for name in ("max_metric_name_length", "max_unit_length", "max_scope_length", "max_description_length"):
        with pytest.raises(ConfigError, match=f"{name}: must be greater than 0"):
            load_config(env={f"MH_{name.upper()}": "0"})
