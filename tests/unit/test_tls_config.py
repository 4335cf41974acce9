"""TLS and token settings of agent.toml and the CLI, and how a failed TLS handshake is told."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import click
import requests
from click.testing import CliRunner

from wiremesh.agent.config import parse_config
from wiremesh.agent.errors import ConfigError
from wiremesh.clustermesh import ConsulOptions, ConsulReason, ConsulStore
from wiremesh.clustermesh.consul_errors import consul_error

BASE = {"node": "n1", "cluster": "c1", "underlay_address": "192.0.2.1"}
ENV = ("CONSUL_HTTP_ADDR", "WIREMESH_CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_CACERT",
       "CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name in ("ca.pem", "client.pem", "client-key.pem", "token"):
        p = tmp_path / name
        p.write_text("x\n")
        p.chmod(0o600)
        out[name] = str(p)
    return out


def consul(**fields: Any) -> ConsulOptions:
    return parse_config({**BASE, "consul": fields}).consul


def test_tls_fields(tmp_path: Path) -> None:
    f = files(tmp_path)
    o = consul(address="https://10.0.0.1:8501", ca_file=f["ca.pem"], client_cert=f["client.pem"],
               client_key=f["client-key.pem"], token_file=f["token"], session_node="host-1.example")
    assert (o.ca_file, o.client_cert, o.client_key, o.session_node) == (f["ca.pem"], f["client.pem"],
                                                                      f["client-key.pem"], "host-1.example")
    assert o.parsed() == ("https", "10.0.0.1", 8501) and o.token == "x"
    assert "x'" not in repr(o) and "***" in repr(o)


def test_tls_from_consuls_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = files(tmp_path)
    for var, name in (("CONSUL_CACERT", "ca.pem"), ("CONSUL_CLIENT_CERT", "client.pem"),
                      ("CONSUL_CLIENT_KEY", "client-key.pem"), ("CONSUL_HTTP_TOKEN_FILE", "token")):
        monkeypatch.setenv(var, f[name])
    o = consul()
    assert (o.ca_file, o.client_cert, o.client_key, o.token) == (f["ca.pem"], f["client.pem"], f["client-key.pem"], "x")


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ({"ca_file": "/nonexistent/ca.pem"}, "consul.ca_file", "is not a file"),
    ({"client_cert": "/nonexistent/c.pem"}, "consul.client_cert", "is not a file"),
    ({"client_key": "KEY"}, "consul.client_key", "set without client_cert"),
    ({"session_node": "-bad"}, "consul.session_node", "is not a Consul node name"),
    ({"session_node": "a b"}, "consul.session_node", "is not a Consul node name"),
    ({"ca_file": 5}, "consul.ca_file", "must be str"),
])
def test_bad_tls_fields_name_the_field(tmp_path: Path, fields: dict[str, Any], field: str, reason: str) -> None:
    f = files(tmp_path)
    fields = {k: (f["client-key.pem"] if v == "KEY" else v) for k, v in fields.items()}
    with pytest.raises(ConfigError) as e:
        consul(**fields)
    assert e.value.field == field and reason in str(e.value)


def test_client_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    f = files(tmp_path)
    Path(f["client-key.pem"]).chmod(0o644)
    with pytest.raises(ConfigError) as e:
        consul(client_cert=f["client.pem"], client_key=f["client-key.pem"])
    assert e.value.field == "consul.client_key" and "0600" in str(e.value)


def test_store_verifies_with_the_ca_and_sends_the_client_cert(tmp_path: Path) -> None:
    f = files(tmp_path)
    store = ConsulStore(ConsulOptions(address="https://c:8501", ca_file=f["ca.pem"], client_cert=f["client.pem"],
                                      client_key=f["client-key.pem"]))
    http = store._http()
    assert http.verify == f["ca.pem"] and http.cert == (f["client.pem"], f["client-key.pem"])
    assert http.base_uri == "https://c:8501"
    assert ConsulStore(ConsulOptions(address="https://c:8501"))._http().verify is True  # system CAs, never off


def _ssl(msg: str) -> requests.exceptions.SSLError:
    return requests.exceptions.SSLError(
        f"HTTPSConnectionPool(host='10.0.0.1', port=8501): Max retries exceeded with url: /v1/status/leader "
        f"(Caused by SSLError({msg})))")


def test_untrusted_certificate_is_one_clear_line() -> None:
    e = consul_error("status leader", _ssl("SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
                                           "verify failed: unable to get local issuer certificate (_ssl.c:1006)')"),
                     "https://10.0.0.1:8501")
    assert e.reason is ConsulReason.TLS
    assert str(e) == ("status leader: the certificate of Consul at https://10.0.0.1:8501 is not trusted "
                      "(unable to get local issuer certificate)")
    assert e.hint and "--ca-file" in e.hint


def test_other_tls_failures() -> None:
    e = consul_error("x", _ssl("SSLError(1, '[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate "
                               "required')"), "https://h:8501")
    assert "refused this client's certificate" in str(e)
    e = consul_error("x", _ssl("SSLError(1, '[SSL: WRONG_VERSION_NUMBER] wrong version number')"), "https://h:8500")
    assert "does not speak HTTPS" in str(e)


class Recorder:
    def __init__(self) -> None:
        self.bodies: list[Any] = []

    def put(self, callback: Any, path: str, params: Any = None, data: str = "", headers: Any = None) -> Any:
        self.bodies.append((path, json.loads(data)))
        return callback(type("R", (), {"code": 200, "body": '{"ID": "abc"}', "headers": {}})())


def test_session_on_a_named_node_has_no_health_checks() -> None:
    store = ConsulStore(ConsulOptions())
    rec = Recorder()
    store._local.client = type("C", (), {"http": rec})()
    store.session_create("s", 5, node="n1")
    store.session_create("s", 5)
    assert rec.bodies[0][1]["Node"] == "n1" and rec.bodies[0][1]["Checks"] == []
    assert "Node" not in rec.bodies[1][1] and "Checks" not in rec.bodies[1][1]


SEEN: dict[str, ConsulOptions] = {}


@click.command("probe-opts")
@click.pass_obj
def probe_opts(ctx: Any) -> None:
    SEEN["o"] = ctx.consul


def test_cli_takes_consuls_tls_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    main = importlib.import_module("wiremesh.cli.main")

    f = files(tmp_path)
    monkeypatch.setenv("CONSUL_CACERT", f["ca.pem"])
    monkeypatch.setenv("CONSUL_CLIENT_CERT", f["client.pem"])
    monkeypatch.setitem(main.COMMANDS, "probe-opts", f"{__name__}:probe_opts")
    r = CliRunner().invoke(main.cli, ["--client-key", f["client-key.pem"], "probe-opts"])
    assert r.exit_code == 0, r.output
    o = SEEN["o"]
    assert (o.ca_file, o.client_cert, o.client_key) == (f["ca.pem"], f["client.pem"], f["client-key.pem"])
    r = CliRunner().invoke(main.cli, ["--ca-file", "/nonexistent/ca.pem", "status"])
    assert r.exit_code == 2 and "/nonexistent/ca.pem" in r.output
