"""agent.config: agent.toml is validated strictly; every problem is a ConfigError naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from wiremesh.agent.config import AgentConfig, load_config, parse_config
from wiremesh.agent.errors import ConfigError
from wiremesh.clustermesh import ConsulOptions
from wiremesh.errors import WiremeshError

FULL_TOML = """\
node = "node1"
cluster = "lab"
underlay_address = "192.0.2.11"
listen_port = 51821
interface = "wm1"
key_file = "{dir}/private.key"
backend = "userspace"
state_dir = "{dir}/state"
health_address = "127.0.0.1:9477"
session_ttl = 30
persistent_keepalive = 25
resync_interval = 15

[consul]
address = "https://consul.example:8501"
token_file = "{dir}/token"
ca_file = "{dir}/ca.pem"
datacenter = "dc2"
"""


def minimal(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"node": "node1", "cluster": "lab", "underlay_address": "192.0.2.11"}
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


def error(data: dict[str, Any], src: str = "agent.toml") -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse_config(data, src)
    return ei.value


def assert_config_error(e: ConfigError, field: str, reason: str, src: str = "agent.toml") -> None:
    assert e.field == field
    assert reason in e.reason
    assert e.source == src
    assert str(e) == f"{src}: {field}: {e.reason}"


def test_full_valid_config(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cr3t-token\n")
    (tmp_path / "token").chmod(0o600)
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    path = tmp_path / "agent.toml"
    path.write_text(FULL_TOML.format(dir=tmp_path))

    cfg = load_config(path)

    assert cfg == AgentConfig(
        node="node1",
        cluster="lab",
        underlay_address="192.0.2.11",
        listen_port=51821,
        interface="wm1",
        key_file=tmp_path / "private.key",
        backend="userspace",
        state_dir=tmp_path / "state",
        health_address="127.0.0.1:9477",
        session_ttl=30,
        persistent_keepalive=25,
        resync_interval=15.0,
        consul=ConsulOptions(address="https://consul.example:8501", token="s3cr3t-token",
                             ca_file=str(tmp_path / "ca.pem"), datacenter="dc2"),
    )
    assert isinstance(cfg.key_file, Path) and isinstance(cfg.resync_interval, float)
    assert cfg.health_bind == ("127.0.0.1", 9477)
    assert "s3cr3t-token" not in repr(cfg)


def test_minimal_config_defaults() -> None:
    cfg = parse_config(minimal())
    assert cfg.listen_port is None
    assert cfg.interface == "wm0"
    assert cfg.backend == "auto"
    assert cfg.key_file == Path("/var/lib/wiremesh/private.key")
    assert cfg.consul.address == "http://127.0.0.1:8500"
    assert cfg.consul.token is None and cfg.consul.ca_file is None and cfg.consul.datacenter is None


def test_underlay_address_canonicalised() -> None:
    assert parse_config(minimal(underlay_address="FD00:0::11")).underlay_address == "fd00::11"


def test_empty_health_address_turns_it_off() -> None:
    assert parse_config(minimal(health_address="")).health_bind is None


def test_ipv6_health_address() -> None:
    assert parse_config(minimal(health_address="[::1]:9477")).health_bind == ("::1", 9477)


def test_consul_environment_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "http://10.0.0.5:8500")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-token")
    cfg = parse_config(minimal())
    assert cfg.consul.address == "http://10.0.0.5:8500"
    assert cfg.consul.token == "env-token"
    monkeypatch.setenv("WIREMESH_CONSUL_HTTP_ADDR", "http://10.0.0.6:8500")
    assert parse_config(minimal()).consul.address == "http://10.0.0.6:8500"
    # The file wins over the environment.
    assert parse_config(minimal(consul={"address": "http://10.0.0.7:8500"})).consul.address == "http://10.0.0.7:8500"


def test_token_read_from_token_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("  abc-123 \n")
    (tmp_path / "token").chmod(0o600)
    assert parse_config(minimal(consul={"token_file": str(tmp_path / "token")})).consul.token == "abc-123"


@pytest.mark.parametrize("field", ["node", "cluster", "underlay_address"])
def test_missing_required_field(field: str) -> None:
    d = minimal()
    del d[field]
    assert_config_error(error(d), field, "is required")


def test_unknown_top_level_field() -> None:
    assert_config_error(error(minimal(nodes="node1")), "nodes", "unknown field")


def test_unknown_consul_field() -> None:
    assert_config_error(error(minimal(consul={"adress": "http://x:8500"})), "consul.adress", "unknown field")


def test_consul_must_be_a_table() -> None:
    assert_config_error(error(minimal(consul="http://127.0.0.1:8500")), "consul", "must be a table")


@pytest.mark.parametrize(
    "over, field, reason",
    [
        ({"node": 1}, "node", "must be str, not int"),
        ({"cluster": ["lab"]}, "cluster", "must be str, not list"),
        ({"underlay_address": 3221225995}, "underlay_address", "must be str, not int"),
        ({"listen_port": "51820"}, "listen_port", "must be int, not str"),
        ({"listen_port": 51820.0}, "listen_port", "must be int, not float"),
        ({"listen_port": True}, "listen_port", "must be int, not bool"),
        ({"session_ttl": True}, "session_ttl", "must be int, not bool"),
        ({"persistent_keepalive": "25"}, "persistent_keepalive", "must be int, not str"),
        ({"resync_interval": "30"}, "resync_interval", "must be float, not str"),
        ({"resync_interval": False}, "resync_interval", "must be float, not bool"),
        ({"key_file": 1}, "key_file", "must be str, not int"),
        ({"health_address": 9477}, "health_address", "must be str, not int"),
        ({"consul": {"address": 8500}}, "consul.address", "must be str, not int"),
        ({"consul": {"token": True}}, "consul.token", "must be str, not bool"),
    ],
)
def test_wrong_types(over: dict[str, Any], field: str, reason: str) -> None:
    assert_config_error(error(minimal(**over)), field, reason)


@pytest.mark.parametrize(
    "over, field, reason",
    [
        ({"node": "Node1"}, "node", "is not a node name"),
        ({"cluster": "Lab_1"}, "cluster", "is not a cluster name"),
        ({"underlay_address": "node1.example.com"}, "underlay_address", "'node1.example.com' is not an IP address"),
        ({"underlay_address": "192.0.2.11:51820"}, "underlay_address", "is not an IP address"),
        ({"underlay_address": "0.0.0.0"}, "underlay_address", "0.0.0.0 cannot receive WireGuard traffic"),
        ({"underlay_address": "::"}, "underlay_address", "cannot receive WireGuard traffic"),
        ({"underlay_address": "224.0.0.5"}, "underlay_address", "cannot receive WireGuard traffic"),
        ({"interface": "wiremesh-interface0"}, "interface", "is not an interface name"),
        ({"interface": "wm 0"}, "interface", "is not an interface name"),
        ({"interface": "wm0/1"}, "interface", "is not an interface name"),
        ({"interface": ""}, "interface", "is not an interface name"),
        ({"listen_port": 0}, "listen_port", "0 is outside 1-65535"),
        ({"listen_port": 70000}, "listen_port", "70000 is outside 1-65535"),
        ({"backend": "ebpf"}, "backend", "'ebpf' is not one of auto, kernel, userspace"),
        ({"key_file": ""}, "key_file", "must not be empty"),
        ({"state_dir": ""}, "state_dir", "must not be empty"),
        ({"health_address": "localhost:9477"}, "health_address", "'localhost:9477' is not IP:port"),
        ({"health_address": "127.0.0.1"}, "health_address", "is not IP:port"),
        ({"health_address": "127.0.0.1:"}, "health_address", "is not IP:port"),
        ({"health_address": "127.0.0.1:99999"}, "health_address", "is not IP:port"),
        ({"health_address": "127.0.0.1:metrics"}, "health_address", "is not IP:port"),
        # Below Consul's minimum session TTL whatever the lower bound is set to.
        ({"session_ttl": 0}, "session_ttl", "is outside"),
        ({"session_ttl": 1}, "session_ttl", "is outside"),
        ({"session_ttl": 86401}, "session_ttl", "86401 is outside"),
        ({"persistent_keepalive": -1}, "persistent_keepalive", "-1 is outside 0-65535"),
        ({"persistent_keepalive": 65536}, "persistent_keepalive", "is outside 0-65535"),
        ({"resync_interval": 0.5}, "resync_interval", "0.5 is outside 1-3600"),
        ({"resync_interval": 3601}, "resync_interval", "is outside 1-3600"),
        ({"consul": {"address": "ftp://consul:8500"}}, "consul.address", "is not http(s)://host:port"),
        ({"consul": {"address": "http://consul:port"}}, "consul.address", "has a bad port"),
    ],
)
def test_bad_values(over: dict[str, Any], field: str, reason: str) -> None:
    assert_config_error(error(minimal(**over)), field, reason)


def test_token_and_token_file_both_set(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file")
    (tmp_path / "token").chmod(0o600)
    e = error(minimal(consul={"token": "inline-secret", "token_file": str(tmp_path / "token")}))
    assert_config_error(e, "consul.token_file", "set token or token_file, not both")
    assert "inline-secret" not in str(e) and "from-file" not in str(e)


def test_unreadable_token_file(tmp_path: Path) -> None:
    path = tmp_path / "absent-token"
    e = error(minimal(consul={"token_file": str(path)}))
    assert_config_error(e, "consul.token_file", f"token file {path}: No such file or directory")


def test_a_token_file_others_can_read_is_refused_without_showing_the_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("secret-token-value\n")
    path.chmod(0o644)
    e = error(minimal(consul={"token_file": str(path)}))
    assert_config_error(e, "consul.token_file",
                        f"token file {path}: mode 0644 lets others read it; a file holding a token must be 0600")
    assert e.hint == f"chmod 600 {path}" and "secret-token-value" not in str(e)


def test_missing_ca_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.pem"
    assert_config_error(error(minimal(consul={"ca_file": str(path)})), "consul.ca_file", f"{path} is not a file")


def test_missing_ca_file_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONSUL_CACERT", str(tmp_path / "nope.pem"))
    assert error(minimal()).field == "consul.ca_file"


@pytest.mark.parametrize("over, field", [({"interface": "wm0\n"}, "interface"), ({"node": "node1\n"}, "node")])
def test_trailing_newline_refused(over: dict[str, Any], field: str) -> None:
    assert error(minimal(**over)).field == field


def test_config_error_is_a_wiremesh_error() -> None:
    assert isinstance(error(minimal(nodes="x")), WiremeshError)


# --- load_config ----------------------------------------------------------------------------


def test_load_config_names_the_file_in_field_errors(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('node = "node1"\ncluster = "lab"\nunderlay_address = "192.0.2.11"\nsession_ttl = 0\n')
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert_config_error(ei.value, "session_ttl", "is outside", src=str(path))


def test_load_config_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('node = "node1\ncluster = lab\n')
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert ei.value.field == "syntax"
    assert str(ei.value).startswith(f"{path}: syntax: ")
    assert "line 1" in str(ei.value)


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert_config_error(ei.value, "file", "No such file or directory", src=str(path))


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'node = "\xff"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert_config_error(ei.value, "file", "not UTF-8 text", src=str(path))
