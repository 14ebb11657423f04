"""Bearer tokens scoped to orgs: 401, 403, scoped rankings, the wildcard, and public binds."""

import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry
from usage_rows import put

from meterhouse.cli import check_bind
from meterhouse.core.config import Config, ConfigError, Token, load_config
from meterhouse.exporter import OrgHealth, create_app

SCOPED = "scoped-token-0123456789"
WILD = "wildcard-token-0123456789"


@pytest.fixture
def client(store):
    now = time.time_ns()
    put(store, [{"org_id": o, "time": now - i * 10**9, "value_int": v}
                for i, (o, v) in enumerate([("org-1", 10), ("org-2", 20), ("org-3", 30)])])  # fmt: skip
    registry = CollectorRegistry()
    health = OrgHealth(store, registry)
    tokens = (Token(SCOPED, ("org-1", "org-2")), Token(WILD, ("*",)))
    return create_app(store, registry, lambda: True, health, tokens).test_client()


def get(client, path, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.get(path, headers=headers)


def test_no_or_a_wrong_token_is_401(client):
    for token in (None, "nope-nope-nope-nope", SCOPED + "x"):
        r = get(client, "/api/v1/orgs/org-1/usage?metric=api.calls", token)
        assert r.status_code == 401 and r.get_json()["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = client.get("/api/v1/metrics-catalog", headers={"Authorization": f"Basic {SCOPED}"})
    assert r.status_code == 401


def test_an_org_outside_the_scope_is_403(client):
    assert get(client, "/api/v1/orgs/org-1/usage?metric=api.calls", SCOPED).get_json()["total"] == 10
    r = get(client, "/api/v1/orgs/org-3/usage?metric=api.calls", SCOPED)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"


def test_rankings_return_only_orgs_in_scope(client):
    scoped = get(client, "/api/v1/orgs?metric=api.calls", SCOPED).get_json()["orgs"]
    assert [o["org_id"] for o in scoped] == ["org-2", "org-1"]
    wild = get(client, "/api/v1/orgs?metric=api.calls", WILD).get_json()["orgs"]
    assert [o["org_id"] for o in wild] == ["org-3", "org-2", "org-1"]


def test_the_wildcard_token_reads_every_org(client):
    assert get(client, "/api/v1/orgs/org-3/usage?metric=api.calls", WILD).get_json()["total"] == 30
    assert get(client, "/api/v1/orgs/unknown/usage?metric=api.calls", WILD).get_json()["total"] == 0


def test_metrics_health_and_the_spec_stay_open(client):
    for path in ("/metrics", "/healthz", "/readyz", "/api/v1/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_tokens_come_from_the_config_file(tmp_path):
    f = tmp_path / "mh.yml"
    f.write_text(
        f"auth:\n  tokens:\n    - {{token: {SCOPED}, orgs: [org-1]}}\n    - {{token: {WILD}, orgs: ['*']}}\n"
    )
    c = load_config(env={}, config_file=f)
    assert c.auth_tokens == (Token(SCOPED, ("org-1",)), Token(WILD, ("*",)))
    f.write_text("auth:\n  tokens:\n    - {token: short, orgs: [a]}\n")
    with pytest.raises(ConfigError, match=r"auth.tokens\[0\].token"):
        load_config(env={}, config_file=f)
    f.write_text(f"auth:\n  tokens:\n    - {{token: {SCOPED}, orgs: []}}\n")
    with pytest.raises(ConfigError, match=r"auth.tokens\[0\].orgs"):
        load_config(env={}, config_file=f)


def test_a_public_bind_needs_tokens_or_an_explicit_opt_out():
    with pytest.raises(ConfigError, match="not a loopback address"):
        check_bind(Config(host="0.0.0.0"))
    # (OTLP on a public address needs ingest tokens or its own opt-out: tests/core/test_config_security.py)
    check_bind(Config(host="0.0.0.0", auth_tokens=(Token(WILD, ("*",)),), allow_unauthenticated_ingest=True))
    check_bind(Config(host="0.0.0.0", allow_unauthenticated=True, allow_unauthenticated_ingest=True))
    check_bind(Config(host="127.0.0.1"))
    check_bind(Config(host="::1"))


def test_up_refuses_to_bind_publicly_without_tokens(tmp_path):
    r = subprocess.run([sys.executable, "-m", "meterhouse", "up", "--host", "0.0.0.0", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "allow-unauthenticated" in r.stderr
    assert not (tmp_path / "spool").exists()  # refused before anything started


def test_api_token_comparison_leaks_neither_length_nor_which_token(monkeypatch):
    """Like ingest tokens: every configured token is compared, always on equal-length digests, so the
    time of a refusal says nothing about the length of a token (hmac.compare_digest on values of other
    lengths returns at once)."""
    import meterhouse.exporter.auth as auth
    from meterhouse.exporter.auth import Auth, Unauthorized

    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(
        auth.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b)
    )
    a = Auth((Token(SCOPED, ("org-1",)), Token(WILD + "-longer", ("*",))))
    assert a.authenticate(f"Bearer {SCOPED}").orgs == ("org-1",)
    for presented in ("short", "x" * 200):
        with pytest.raises(Unauthorized):
            a.authenticate(f"Bearer {presented}")
    assert len(calls) == 6 and len(set(calls)) == 1 and calls[0][0] == calls[0][1]
