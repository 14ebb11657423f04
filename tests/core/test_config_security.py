"""Ingest tokens, TLS files and limits in the configuration: every source, every bad key named."""

import pytest
from certs import Authority

from meterhouse.cli import check_bind
from meterhouse.core.config import Config, ConfigError, Token, load_config
from meterhouse.core.tls import load_material

TOKEN_A = "ingest-token-for-org-a-0001"


def test_ingest_tokens_tls_and_limits_from_the_config_file(tmp_path):
    f = tmp_path / "mh.yml"
    f.write_text(f"""
ingest:
  tokens:
    - {{token: "{TOKEN_A}", orgs: ["org-a"]}}
    - {{token: "ingest-token-for-everyone-02", orgs: ["*"]}}
tls: {{cert_file: /c.pem, key_file: /k.pem, client_ca_file: /ca.pem}}
limits: {{ingest_points_per_s: 1000, ingest_burst_points: 5000, series_per_org_metric: 100}}
""")
    c = load_config(env={}, config_file=f)
    assert c.ingest_tokens == (Token(TOKEN_A, ("org-a",)), Token("ingest-token-for-everyone-02", ("*",)))
    assert (c.tls_cert_file, c.tls_key_file, c.tls_client_ca_file) == ("/c.pem", "/k.pem", "/ca.pem")
    assert (c.ingest_points_per_s, c.ingest_burst_points, c.series_per_org_metric) == (1000, 5000, 100)
    assert c.auth_tokens == ()  # API tokens are another list


def test_ingest_tokens_from_a_file_named_by_the_environment(tmp_path):
    tokens = tmp_path / "ingest.yml"
    tokens.write_text(f"tokens:\n  - {{token: {TOKEN_A}, orgs: [org-a, org-b]}}\n")
    c = load_config(env={"MH_INGEST_TOKENS_FILE": str(tokens)})
    assert c.ingest_tokens == (Token(TOKEN_A, ("org-a", "org-b")),)
    tokens.write_text(f"ingest:\n  tokens:\n  - {{token: {TOKEN_A}, orgs: ['*']}}\n")
    assert load_config(env={"MH_INGEST_TOKENS_FILE": str(tokens)}).ingest_tokens[0].all_orgs


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "ingest: {tokens: [{token: short, orgs: [a]}]}",
            "ingest.tokens[0].token: must be a string of at least 16",
        ),
        (
            f"ingest: {{tokens: [{{token: {TOKEN_A}, orgs: []}}]}}",
            "ingest.tokens[0].orgs: must be a non-empty list",
        ),
        (
            f"ingest: {{tokens: [{{token: {TOKEN_A}}}]}}",
            "ingest.tokens[0]: must be {token: ..., orgs: [...]}",
        ),
        (
            f"ingest: {{tokens: [{{token: {TOKEN_A}, orgs: [a]}}, {{token: {TOKEN_A}, orgs: [b]}}]}}",
            "ingest.tokens: a token appears twice",
        ),
        ("ingest: {keys: []}", "ingest: must be a mapping with the key tokens"),
        ("tls: {cert_file: /c.pem}", "tls.cert_file and tls.key_file: give both or neither"),
        ("tls: {client_ca_file: /ca.pem}", "tls.client_ca_file: needs tls.cert_file"),
        ("tls: {cert: /c.pem}", "tls.cert: unknown option; known: cert_file, key_file, client_ca_file"),
        ("tls: /c.pem", "tls: must be a mapping"),
        ("limits: {ingest_points_per_s: -1}", "ingest_points_per_s: must be 0 or more"),
        ("limits: {series_per_org_metric: many}", "series_per_org_metric: must be an integer"),
        ("limits: {points_per_s: 5}", "limits.points_per_s: unknown option"),
    ],
)
def test_bad_security_settings_name_the_key(tmp_path, text, needle):
    f = tmp_path / "mh.yml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(env={}, config_file=f)
    assert needle in str(e.value)
    assert TOKEN_A not in str(e.value)  # a token is never part of a message


def test_unreadable_or_wrong_tls_files_name_the_key(tmp_path):
    ca = Authority(tmp_path / "pki")
    server = ca.issue("server", server=True)
    other = Authority(tmp_path / "pki2", "other").issue("server", server=True)
    ok = Config(
        tls_cert_file=str(server.cert), tls_key_file=str(server.key), tls_client_ca_file=str(ca.ca_file)
    )
    m = load_material(ok)
    assert m is not None and m.mutual
    with pytest.raises(ConfigError, match="tls.cert_file: cannot read"):
        load_material(Config(tls_cert_file=str(tmp_path / "none.pem"), tls_key_file=str(server.key)))
    with pytest.raises(ConfigError, match="tls.key_file: .* is not a PEM file"):
        (tmp_path / "junk").write_text("junk")
        load_material(Config(tls_cert_file=str(server.cert), tls_key_file=str(tmp_path / "junk")))
    with pytest.raises(ConfigError, match="cannot load the pair"):
        load_material(Config(tls_cert_file=str(server.cert), tls_key_file=str(other.key)))
    assert load_material(Config()) is None


def test_public_otlp_bind_needs_ingest_tokens_api_tokens_alone_are_not_enough():
    api = (Token("api-token-0123456789", ("*",)),)
    ingest = (Token(TOKEN_A, ("org-a",)),)
    with pytest.raises(ConfigError, match="no ingest tokens.*--allow-unauthenticated-ingest"):
        check_bind(Config(host="0.0.0.0", auth_tokens=api))
    check_bind(Config(host="0.0.0.0", auth_tokens=api, ingest_tokens=ingest))
    check_bind(Config(host="0.0.0.0", auth_tokens=api, allow_unauthenticated_ingest=True))
    check_bind(Config(host="127.0.0.1"))  # loopback: open is fine


def test_up_refuses_a_public_bind_without_ingest_tokens_with_exit_2(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "meterhouse", "up", "--host", "0.0.0.0", "--allow-unauthenticated",
         "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "--allow-unauthenticated-ingest" in r.stderr


def test_config_command_never_prints_ingest_tokens(tmp_path):
    import subprocess
    import sys

    tokens = tmp_path / "ingest.yml"
    tokens.write_text(f"tokens: [{{token: {TOKEN_A}, orgs: [org-a]}}]\n")
    r = subprocess.run([sys.executable, "-m", "meterhouse", "config"], capture_output=True, text=True,
                       timeout=60, env={"MH_INGEST_TOKENS_FILE": str(tokens), "PATH": ""})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "ingest_tokens:" in r.stdout and TOKEN_A not in r.stdout


@pytest.mark.parametrize("source", ["config_file", "ingest_tokens_file", "api_tokens_file"])
@pytest.mark.parametrize(
    "text",
    [
        f'tokens: [{{token: "{TOKEN_A}\\q", orgs: [a]}}]',  # an escape YAML does not know
        f"tokens:\n  - {{token: {TOKEN_A}, orgs: [a]\n  - {{token: other}}",  # an unclosed mapping
        f"tokens: [{{token: {TOKEN_A}, orgs: [a]",  # cut short, as a write in progress leaves it
    ],
)
def test_yaml_errors_name_the_place_but_never_show_a_token(tmp_path, source, text):
    """PyYAML quotes the offending line in its messages; the message of a file holding tokens (logged
    by a refused reload, printed at start) must not."""
    f = tmp_path / "secrets.yml"
    if source == "config_file":
        text = "ingest:\n  " + text.replace("\n", "\n  ")
    f.write_text(text + "\n")
    env = {"ingest_tokens_file": {"MH_INGEST_TOKENS_FILE": str(f)},
           "api_tokens_file": {"MH_AUTH_TOKENS_FILE": str(f)}}.get(source, {})  # fmt: skip
    with pytest.raises(ConfigError) as e:
        load_config(env=env, config_file=f if source == "config_file" else None)
    message = str(e.value)
    assert "not valid YAML" in message and str(f) in message and "line " in message
    assert TOKEN_A[:12] not in message


@pytest.mark.parametrize("text", ["", "\n", "tokens: []", "tokens:", "{section}: {{tokens: []}}"])
def test_a_tokens_file_without_tokens_is_refused(tmp_path, text):
    """A tokens file that names no token (empty, or caught in the middle of a rewrite) would open
    ingest to anyone: refused, like an unreadable one."""
    f = tmp_path / "ingest.yml"
    for var, section in (("MH_INGEST_TOKENS_FILE", "ingest"), ("MH_AUTH_TOKENS_FILE", "auth")):
        f.write_text(text.format(section=section))
        with pytest.raises(ConfigError, match=f"{section} tokens file: .* names no token"):
            load_config(env={var: str(f)})


def test_a_server_certificate_out_of_its_validity_is_refused_naming_the_key(tmp_path):
    """Served, an expired (or not yet valid) certificate fails every new client's handshake: it is
    refused at start and by a reload (which then keeps the old one), with its dates."""
    ca = Authority(tmp_path / "pki")
    for pair, needle in (
        (ca.issue("old", server=True, valid_from_days=-3, valid_days=2), "expired on "),
        (ca.issue("future", server=True, valid_from_days=2), "not valid before "),
    ):
        with pytest.raises(ConfigError, match=f"tls.cert_file: .*{needle}"):
            load_material(Config(tls_cert_file=str(pair.cert), tls_key_file=str(pair.key)))


@pytest.mark.parametrize("section", ["ingest", "auth"])
@pytest.mark.parametrize(
    "bad", [f" {TOKEN_A}", f"{TOKEN_A}\\t", f"{TOKEN_A}\\n", f"{TOKEN_A}é", f"{TOKEN_A}\\x7f"]
)
def test_a_token_no_client_can_present_is_refused(tmp_path, section, bad):
    """Leading or trailing whitespace is stripped from a presented token, and an HTTP header or gRPC
    metadata value carries visible ASCII: such a configured token could never be matched."""
    f = tmp_path / "mh.yml"
    f.write_text(f'{section}:\n  tokens:\n    - {{token: "{bad}", orgs: [a]}}\n')
    with pytest.raises(ConfigError, match=rf"{section}.tokens\[0\].token: .*visible ASCII") as e:
        load_config(env={}, config_file=f)
    assert TOKEN_A not in str(e.value)
    f.write_text(f'{section}:\n  tokens:\n    - {{token: "{TOKEN_A} with spaces inside", orgs: [a]}}\n')
    assert load_config(env={}, config_file=f)  # inner spaces reach the server intact
