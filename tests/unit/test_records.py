"""clustermesh records: ClusterConfig and NodeRecord validation, field by field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from wiremesh.clustermesh import (
    MAX_RECORD_BYTES,
    ROUTING_MODES,
    SCHEMA,
    ClusterConfig,
    InvalidRecord,
    NodeRecord,
    check_cluster_name,
    check_node_name,
    keep_unknown,
    layout,
    overlay_address,
    parse_endpoint,
)
from wiremesh.keys import PrivateKey
from wiremesh.errors import WiremeshError

PUB = PrivateKey(bytes(range(32))).public_key().base64
KEY = layout.node_key("lab", "node1")
CKEY = layout.config_key("lab")


def node_dict(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "node1",
        "cluster": "lab",
        "endpoint": "192.0.2.11:51820",
        "public_key": PUB,
        "pod_cidr": "10.240.1.0/24",
        "overlay_ip": "10.240.1.1",
        "key_epoch": 3,
        "vtep_mac": "02:00:0a:f0:01:01",
        "agent_version": "0.1.0",
    }
    d.update(over)
    return {k: v for k, v in d.items() if v is not _DROP}


def config_dict(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "lab",
        "id": 7,
        "pod_cidr": "10.240.0.0/16",
        "node_prefix_len": 24,
        "service_cidr": "10.96.0.0/16",
        "routing": "vxlan",
        "vni": 42,
        "wg_port": 51821,
        "mtu": 1420,
    }
    d.update(over)
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()


def node_error(d: dict[str, Any] | str | bytes, key: str | None = KEY) -> InvalidRecord:
    raw = d if isinstance(d, (str, bytes)) else json.dumps(d)
    with pytest.raises(InvalidRecord) as ei:
        NodeRecord.from_json(raw, key)
    return ei.value


def config_error(d: dict[str, Any] | str | bytes, key: str | None = CKEY) -> InvalidRecord:
    raw = d if isinstance(d, (str, bytes)) else json.dumps(d)
    with pytest.raises(InvalidRecord) as ei:
        ClusterConfig.from_json(raw, key)
    return ei.value


def assert_invalid(e: InvalidRecord, field: str, reason: str, key: str | None) -> None:
    assert e.field == field
    assert reason in e.reason
    assert e.key == key
    prefix = f"{key}: " if key else ""
    assert str(e) == f"{prefix}{field}: {e.reason}"


# --- round trips ----------------------------------------------------------------------------


def test_cluster_config_round_trip() -> None:
    cfg = ClusterConfig(**config_dict())
    assert ClusterConfig.from_json(cfg.to_json()) == cfg
    assert ClusterConfig.from_json(cfg.to_json().encode(), CKEY) == cfg
    assert json.loads(cfg.to_json()) == config_dict()


def test_cluster_config_defaults_from_minimal_json() -> None:
    cfg = ClusterConfig.from_json('{"name": "lab", "id": 1, "pod_cidr": "10.240.0.0/16"}')
    assert (cfg.node_prefix_len, cfg.service_cidr, cfg.routing, cfg.vni, cfg.wg_port, cfg.mtu) == (
        24, "10.96.0.0/16", "wireguard", 1, 51820, 0)
    assert str(cfg.pod_network) == "10.240.0.0/16"


def test_cluster_config_ipv6() -> None:
    cfg = ClusterConfig(name="v6", id=2, pod_cidr="fd00:240::/48", node_prefix_len=64, service_cidr="fd00:96::/108")
    assert ClusterConfig.from_json(cfg.to_json()) == cfg


def test_node_record_round_trip() -> None:
    rec = NodeRecord.from_json(json.dumps(node_dict()), KEY)
    assert rec == NodeRecord(**node_dict())
    assert NodeRecord.from_json(rec.to_json().encode()) == rec
    assert json.loads(rec.to_json()) == node_dict()
    assert rec.fingerprint == PrivateKey(bytes(range(32))).public_key().fingerprint


def test_node_record_optional_fields_default() -> None:
    d = node_dict(key_epoch=_DROP, vtep_mac=_DROP, agent_version=_DROP)
    rec = NodeRecord.from_json(json.dumps(d))
    assert (rec.key_epoch, rec.vtep_mac, rec.agent_version) == (0, "", "")


def test_node_record_never_holds_a_private_key_field() -> None:
    assert not any("private" in f for f in NodeRecord.__dataclass_fields__)
    secret = PrivateKey.generate().secret_base64()
    for name in ("private_key", "PrivateKey", "wg-private-key", "privkey"):
        e = node_error(node_dict(**{name: secret}))
        assert_invalid(e, name, "a record never carries a private key", KEY)
        assert secret not in str(e)


# --- envelope: size, JSON, object, unknown fields -------------------------------------------


@pytest.mark.parametrize("parse", [NodeRecord.from_json, ClusterConfig.from_json])
@pytest.mark.parametrize(
    "raw, reason",
    [
        ("{", "not JSON"),
        ("", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('"lab"', "must be a JSON object"),
        ("null", "must be a JSON object"),
        ("42", "must be a JSON object"),
    ],
)
def test_envelope_errors_are_field_value(parse: Any, raw: str | bytes, reason: str) -> None:
    with pytest.raises(InvalidRecord) as ei:
        parse(raw, "some/key")
    assert_invalid(ei.value, "value", reason, "some/key")


@pytest.mark.parametrize("as_bytes", [False, True])
def test_oversized_value_refused_before_parsing(as_bytes: bool) -> None:
    raw = json.dumps(node_dict(agent_version="x" * (1024 * 1024)))
    e = node_error(raw.encode() if as_bytes else raw)
    assert_invalid(e, "value", f"over the {MAX_RECORD_BYTES}-byte limit", KEY)
    assert str(len(raw)) in e.reason
    e = config_error("{" + " " * (1024 * 1024) + "}")
    assert_invalid(e, "value", "byte limit", CKEY)


def test_size_limit_boundary() -> None:
    body = json.dumps(config_dict())
    at_limit = body + " " * (MAX_RECORD_BYTES - len(body))
    assert len(at_limit) == MAX_RECORD_BYTES
    assert ClusterConfig.from_json(at_limit.encode()).name == "lab"
    assert_invalid(config_error((at_limit + " ").encode()), "value", "byte limit", CKEY)


def test_size_limit_counts_bytes_of_str_values() -> None:
    raw = json.dumps(config_dict(), ensure_ascii=False)[:-1] + ', "x": "' + "é" * (MAX_RECORD_BYTES // 2) + '"}'
    assert len(raw) <= MAX_RECORD_BYTES < len(raw.encode())
    assert config_error(raw).field == "value"


def test_error_without_key_has_no_key_prefix() -> None:
    e = node_error(node_dict(vtep_mac="blue"), key=None)
    assert str(e) == "vtep_mac: 'blue' is not a lowercase MAC address"


def test_invalid_record_is_a_wiremesh_error() -> None:
    assert issubclass(InvalidRecord, WiremeshError)


# --- NodeRecord fields ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "over, field, reason",
    [
        ({"public_key": "not base64!!"}, "public_key", "not valid base64"),
        ({"public_key": "AAAA"}, "public_key", "must decode to 32 bytes, got 3"),
        ({"public_key": PUB[:-4]}, "public_key", "must decode to 32 bytes, got 30"),
        ({"public_key": PUB[:-1]}, "public_key", "not valid base64"),
        ({"public_key": "AQEBAQEBAQEBAQEBAQEBAQ=="}, "public_key", "must decode to 32 bytes, got 16"),
        ({"public_key": 12345}, "public_key", "must be a string, not int"),
        ({"public_key": _DROP}, "public_key", "is required"),
        ({"endpoint": "192.0.2.11"}, "endpoint", "is not IP:port"),
        ({"endpoint": "192.0.2.11:"}, "endpoint", "port '' is not 1-65535"),
        ({"endpoint": "192.0.2.11:0"}, "endpoint", "port '0' is not 1-65535"),
        ({"endpoint": "192.0.2.11:70000"}, "endpoint", "port '70000' is not 1-65535"),
        ({"endpoint": "192.0.2.11:-1"}, "endpoint", "is not 1-65535"),
        ({"endpoint": "192.0.2.11:http"}, "endpoint", "is not 1-65535"),
        ({"endpoint": "node2.example.com:51820"}, "endpoint", "'node2.example.com' is not an IP address"),
        ({"endpoint": "0.0.0.0:51820"}, "endpoint", "0.0.0.0 cannot be a peer's address"),
        ({"endpoint": "[::]:51820"}, "endpoint", ":: cannot be a peer's address"),
        ({"endpoint": "224.0.0.1:51820"}, "endpoint", "cannot be a peer's address"),
        ({"endpoint": "[fd00::1]"}, "endpoint", "is not IP:port"),
        ({"endpoint": 51820}, "endpoint", "must be a string IP:port"),
        ({"endpoint": _DROP}, "endpoint", "must be a string IP:port"),
        ({"overlay_ip": "10.240.1.2"}, "overlay_ip", "is not the first address of pod_cidr 10.240.1.0/24"),
        ({"overlay_ip": "10.240.1.0"}, "overlay_ip", "is not the first address"),
        ({"overlay_ip": "10.240.2.1"}, "overlay_ip", "is not the first address"),
        ({"overlay_ip": "node1"}, "overlay_ip", "'node1' is not an IP address"),
        ({"overlay_ip": _DROP}, "overlay_ip", "is required"),
        ({"pod_cidr": "10.240.1.7/24"}, "pod_cidr", "is not a network CIDR"),
        ({"pod_cidr": "10.240.1.0/33"}, "pod_cidr", "is not a network CIDR"),
        ({"pod_cidr": ["10.240.1.0/24"]}, "pod_cidr", "must be a string"),
        ({"name": "Node1"}, "name", "is not a node name"),
        ({"name": "-node1"}, "name", "is not a node name"),
        ({"name": "n" * 64}, "name", "is not a node name"),
        ({"name": "node_1"}, "name", "is not a node name"),
        ({"name": _DROP}, "name", "None is not a node name"),
        ({"cluster": "Lab"}, "cluster", "is not a cluster name"),
        ({"cluster": "l" * 33}, "cluster", "is not a cluster name"),
        ({"key_epoch": -1}, "key_epoch", "is outside 0-"),
        ({"key_epoch": True}, "key_epoch", "must be an integer, not bool"),
        ({"key_epoch": "3"}, "key_epoch", "must be an integer, not str"),
        ({"key_epoch": 1.5}, "key_epoch", "must be an integer, not float"),
        ({"vtep_mac": "02:00:0A:F0:01:01"}, "vtep_mac", "is not a lowercase MAC address"),
        ({"vtep_mac": "02:00:0a:f0:01"}, "vtep_mac", "is not a lowercase MAC address"),
        ({"agent_version": "v" * 65}, "agent_version", "longer than 64 characters"),
        ({"agent_version": 1}, "agent_version", "must be a string"),
    ],
)
def test_node_record_bad_field(over: dict[str, Any], field: str, reason: str) -> None:
    assert_invalid(node_error(node_dict(**over)), field, reason, KEY)


def test_node_record_public_key_error_does_not_echo_long_values() -> None:
    junk = "A" * 5000 + "!"
    e = node_error(node_dict(public_key=junk))
    assert junk[:100] not in str(e)


@pytest.mark.parametrize(
    "endpoint, canonical",
    [
        ("192.0.2.11:51820", "192.0.2.11:51820"),
        ("[FD00:0:0::0:1]:51820", "[fd00::1]:51820"),
        ("[2001:db8::a]:1", "[2001:db8::a]:1"),
        ("[2001:0db8:0000:0000:0000:0000:0000:000a]:65535", "[2001:db8::a]:65535"),
    ],
)
def test_endpoint_canonicalised(endpoint: str, canonical: str) -> None:
    assert parse_endpoint(endpoint) == canonical
    assert NodeRecord.from_json(json.dumps(node_dict(endpoint=endpoint))).endpoint == canonical


def test_node_record_ipv6() -> None:
    d = node_dict(pod_cidr="fd00:240:0:1::/64", overlay_ip="fd00:240:0:1::1", endpoint="[fd00::11]:51820")
    rec = NodeRecord.from_json(json.dumps(d))
    assert rec.overlay_ip == "fd00:240:0:1::1"


def test_node_record_overlay_ip_canonicalised() -> None:
    d = node_dict(pod_cidr="fd00:240:0:1::/64", overlay_ip="FD00:240:0:1:0:0:0:1", endpoint="[fd00::11]:51820")
    assert NodeRecord.from_json(json.dumps(d)).overlay_ip == "fd00:240:0:1::1"


@pytest.mark.parametrize(
    "cidr, first",
    [("10.240.1.0/24", "10.240.1.1"), ("10.0.0.0/8", "10.0.0.1"), ("fd00:1::/64", "fd00:1::1"),
     ("10.9.9.9/32", "10.9.9.9")],
)
def test_overlay_address_is_first_host(cidr: str, first: str) -> None:
    assert overlay_address(cidr) == first


@pytest.mark.parametrize("name", ["a", "lab", "lab-1", "0", "a" * 32, "1-2-3"])
def test_good_cluster_names(name: str) -> None:
    assert check_cluster_name(name) == name


@pytest.mark.parametrize("name", ["", "Lab", "LAB", "a" * 33, "-lab", "lab-", "la_b", "la.b", "lab ", 7, None])
def test_bad_cluster_names(name: object) -> None:
    with pytest.raises(InvalidRecord) as ei:
        check_cluster_name(name, "cluster", "k")
    assert_invalid(ei.value, "cluster", "is not a cluster name (lowercase letters, digits, dashes; at most 32)", "k")


@pytest.mark.parametrize("name", ["n", "node1", "node-1.example", "n" * 63])
def test_good_node_names(name: str) -> None:
    assert check_node_name(name) == name


@pytest.mark.parametrize("check", [check_cluster_name, check_node_name])
def test_names_with_trailing_newline_refused(check: Any) -> None:
    with pytest.raises(InvalidRecord):
        check("lab\n")


def test_vtep_mac_with_trailing_newline_refused() -> None:
    assert node_error(node_dict(vtep_mac="02:00:0a:f0:01:01\n")).field == "vtep_mac"


def test_endpoint_with_non_ascii_digit_port_is_invalid_record() -> None:
    assert_invalid(node_error(node_dict(endpoint="192.0.2.11:²")), "endpoint", "is not 1-65535", KEY)


def test_deeply_nested_json_is_invalid_record() -> None:
    assert_invalid(node_error("[" * 10000), "value", "not JSON", KEY)


# --- ClusterConfig fields -------------------------------------------------------------------


@pytest.mark.parametrize(
    "over, field, reason",
    [
        ({"name": "Lab"}, "name", "is not a cluster name"),
        ({"name": "a" * 33}, "name", "is not a cluster name"),
        ({"name": "-lab"}, "name", "is not a cluster name"),
        ({"name": "lab_1"}, "name", "is not a cluster name"),
        ({"name": 1}, "name", "must be a string, not int"),
        ({"name": _DROP}, "name", "is required"),
        ({"id": 0}, "id", "0 is outside 1-255"),
        ({"id": 256}, "id", "256 is outside 1-255"),
        ({"id": -1}, "id", "is outside 1-255"),
        ({"id": 2**40}, "id", "is outside"),
        ({"id": _DROP}, "id", "is required"),
        ({"id": "1"}, "id", "must be an integer, not str"),
        ({"id": 1.0}, "id", "must be an integer, not float"),
        ({"routing": "bgp"}, "routing", "'bgp' is not one of wireguard, vxlan"),
        ({"routing": "WireGuard"}, "routing", "is not one of"),
        ({"routing": 1}, "routing", "must be a string"),
        ({"vni": 0}, "vni", "0 is outside 1-16777215"),
        ({"vni": 2**24}, "vni", "16777216 is outside 1-16777215"),
        ({"mtu": 1279}, "mtu", "1279 is outside 1280-9000"),
        ({"mtu": 9001}, "mtu", "9001 is outside 1280-9000"),
        ({"mtu": -1}, "mtu", "is outside 1280-9000"),
        ({"wg_port": 0}, "wg_port", "0 is outside 1-65535"),
        ({"wg_port": 65536}, "wg_port", "65536 is outside 1-65535"),
        ({"node_prefix_len": 16}, "node_prefix_len", "16 is outside 17-30"),
        ({"node_prefix_len": 31}, "node_prefix_len", "31 is outside 17-30"),
        ({"pod_cidr": "10.240.0.1/16"}, "pod_cidr", "is not a network CIDR"),
        ({"pod_cidr": "lab"}, "pod_cidr", "is not a network CIDR"),
        ({"pod_cidr": _DROP}, "pod_cidr", "is required"),
        ({"service_cidr": "10.240.128.0/17"}, "service_cidr", "10.240.128.0/17 overlaps pod_cidr 10.240.0.0/16"),
        ({"service_cidr": "10.0.0.0/8"}, "service_cidr", "overlaps pod_cidr"),
        ({"service_cidr": "10.240.0.0/16"}, "service_cidr", "overlaps pod_cidr"),
        ({"service_cidr": "10.96.0.1/16"}, "service_cidr", "is not a network CIDR"),
        ({"id": True}, "id", "must be an integer, not bool"),
        ({"vni": True}, "vni", "must be an integer, not bool"),
        ({"wg_port": True}, "wg_port", "must be an integer, not bool"),
        ({"mtu": False}, "mtu", "must be an integer, not bool"),
        ({"node_prefix_len": True}, "node_prefix_len", "must be an integer, not bool"),
    ],
)
def test_cluster_config_bad_field(over: dict[str, Any], field: str, reason: str) -> None:
    assert_invalid(config_error(config_dict(**over)), field, reason, CKEY)


@pytest.mark.parametrize(
    "over",
    [{"id": 1}, {"id": 255}, {"mtu": 0}, {"mtu": 1280}, {"mtu": 9000}, {"vni": 1}, {"vni": 2**24 - 1},
     {"node_prefix_len": 17}, {"node_prefix_len": 30}, {"name": "a" * 32}, {"service_cidr": "fd00:96::/108"},
     {"routing": "wireguard"}, {"wg_port": 1}, {"wg_port": 65535}],
)
def test_cluster_config_boundaries_accepted(over: dict[str, Any]) -> None:
    assert ClusterConfig.from_json(json.dumps(config_dict(**over))) == ClusterConfig(**config_dict(**over))


def test_cluster_config_constructor_validates_too() -> None:
    with pytest.raises(InvalidRecord) as ei:
        ClusterConfig(name="lab", id=True, pod_cidr="10.240.0.0/16")  # type: ignore[arg-type]
    assert_invalid(ei.value, "id", "must be an integer, not bool", None)
    with pytest.raises(InvalidRecord) as ei:
        ClusterConfig(name="lab", id=1, pod_cidr="10.240.0.0/16", routing="ipip")
    assert ei.value.field == "routing"


def test_routing_modes() -> None:
    assert ROUTING_MODES == ("wireguard", "vxlan")


# --- versions and unknown fields (forward compatibility) ------------------------------------

NEXT = PrivateKey(bytes(range(1, 33))).public_key().base64
FUTURE = {"signature": "c2lnbmF0dXJl", "capabilities": {"lb": [1, 2, {"deep": None}]}, "extra": True}


def test_no_version_is_version_1_0_and_none_is_written() -> None:
    rec = NodeRecord.from_json(json.dumps(node_dict()))
    cfg = ClusterConfig.from_json(json.dumps(config_dict()))
    assert SCHEMA == "1.0"
    assert rec.schema == cfg.schema == "1.0" and rec.extra == cfg.extra == {}
    # Byte for byte what agents released before versioning wrote, so they can still read it.
    assert rec.to_json() == json.dumps(node_dict(), sort_keys=True)
    assert cfg.to_json() == json.dumps(config_dict(), sort_keys=True)


@pytest.mark.parametrize("value, canonical", [("1.0", "1.0"), ("1", "1.0"), (1, "1.0"), ("1.12", "1.12"),
                                              ("01.3", "1.3")])
def test_version_1_spellings_accepted(value: object, canonical: str) -> None:
    assert NodeRecord.from_json(json.dumps(node_dict(schema=value))).schema == canonical
    assert ClusterConfig.from_json(json.dumps(config_dict(schema=value))).schema == canonical


@pytest.mark.parametrize("value", ["2.0", "2", 2, "17.4"])
def test_newer_major_refused_naming_the_version(value: object) -> None:
    major = str(value).split(".")[0]
    for error, d, key in ((node_error, node_dict, KEY), (config_error, config_dict, CKEY)):
        e = error(d(schema=value))
        assert_invalid(e, "schema", f"schema version {major}.", key)
        assert e.reason.endswith(f"is newer than this agent's {SCHEMA}; upgrade the agent")


def test_newer_major_refused_before_its_other_fields_are_read() -> None:
    # A 2.x record may have renamed or retyped everything: the version is the only useful reason.
    e = node_error({"schema": "2.0", "name": "NODE_1", "wg": {"key": 1}})
    assert_invalid(e, "schema", "schema version 2.0 is newer than this agent's 1.0; upgrade the agent", KEY)
    assert str(e) == f"{KEY}: schema: schema version 2.0 is newer than this agent's 1.0; upgrade the agent"


@pytest.mark.parametrize("value", ["", "1.x", "v1", "1.0.0", "1.", " 1.0", "1.0\n", "99999", 1.5, True, None,
                                   [1], {"major": 1}, "0.9", 0, -1])
def test_malformed_version_refused(value: object) -> None:
    assert node_error(node_dict(schema=value)).field == "schema"
    assert config_error(config_dict(schema=value)).field == "schema"


def test_unknown_fields_ignored_and_kept_through_to_json() -> None:
    rec = NodeRecord.from_json(json.dumps(node_dict(**FUTURE)), KEY)
    assert rec == NodeRecord(**node_dict())
    assert rec.extra == FUTURE
    assert json.loads(rec.to_json()) == node_dict(**FUTURE)
    assert NodeRecord.from_json(rec.to_json()).extra == FUTURE

    cfg = ClusterConfig.from_json(json.dumps(config_dict(pod_cdir="10.0.0.0/16", **FUTURE)), CKEY)
    assert cfg == ClusterConfig(**config_dict())
    assert json.loads(cfg.to_json()) == config_dict(pod_cdir="10.0.0.0/16", **FUTURE)


def test_minor_bump_with_new_fields_accepted_and_written_back_at_its_version() -> None:
    d = node_dict(schema="1.4", next_public_key=NEXT, signature="c2ln", cert={"expires": 1767225600})
    rec = NodeRecord.from_json(json.dumps(d), KEY)
    assert (rec.schema, rec.next_public_key) == ("1.4", NEXT)
    assert rec.extra == {"signature": "c2ln", "cert": {"expires": 1767225600}}
    assert json.loads(rec.to_json()) == d


def test_known_fields_stay_strict_beside_unknown_ones() -> None:
    assert_invalid(node_error(node_dict(colour="blue", key_epoch="3")), "key_epoch", "must be an integer", KEY)
    assert_invalid(config_error(config_dict(schema="1.9", later=1, id=0)), "id", "0 is outside 1-255", CKEY)


def test_unknown_fields_count_in_the_size_limit() -> None:
    e = node_error(node_dict(signature="s" * MAX_RECORD_BYTES))
    assert_invalid(e, "value", "byte limit", KEY)


def test_unknown_fields_and_minor_version_do_not_count_in_equality() -> None:
    plain = NodeRecord.from_json(json.dumps(node_dict()))
    newer = NodeRecord.from_json(json.dumps(node_dict(schema="1.3", **FUTURE)))
    other = NodeRecord.from_json(json.dumps(node_dict(schema="1.3", signature="different")))
    assert plain == newer == other and hash(plain) == hash(newer) == hash(other)
    assert len({plain, newer, other}) == 1
    cfg = ClusterConfig(**config_dict())
    assert ClusterConfig.from_json(json.dumps(config_dict(schema="1.1", rotate_jitter="5m"))) == cfg
    # Known fields still do, the new optional one included.
    assert NodeRecord.from_json(json.dumps(node_dict(next_public_key=NEXT))) != plain
    assert NodeRecord.from_json(json.dumps(node_dict(key_epoch=4))) != plain


def test_extra_is_not_in_repr() -> None:
    rec = NodeRecord.from_json(json.dumps(node_dict(signature="s" * 1000)))
    assert "sss" not in repr(rec)


def test_next_public_key_optional_validated_and_canonical() -> None:
    assert NodeRecord.from_json(json.dumps(node_dict(next_public_key=""))).next_public_key == ""
    rec = NodeRecord.from_json(json.dumps(node_dict(next_public_key=NEXT)))
    assert rec.next_public_key == NEXT and json.loads(rec.to_json())["next_public_key"] == NEXT
    assert "next_public_key" not in json.loads(NodeRecord(**node_dict()).to_json())
    assert_invalid(node_error(node_dict(next_public_key="AAAA")), "next_public_key", "must decode to 32 bytes", KEY)
    assert_invalid(node_error(node_dict(next_public_key=7)), "next_public_key", "must be a string, not int", KEY)
    assert_invalid(node_error(node_dict(next_public_key=None)), "next_public_key", "is required", KEY)


def test_constructors_stay_compatible_and_check_extra() -> None:
    rec = NodeRecord(**node_dict())
    assert (rec.schema, rec.extra, rec.next_public_key) == (SCHEMA, {}, "")
    source = {"signature": "x"}
    rec = NodeRecord(**node_dict(), extra=source)
    source["signature"] = "changed"
    assert rec.extra == {"signature": "x"}  # copied: a frozen record never aliases its caller's dict
    with pytest.raises(InvalidRecord) as ei:
        NodeRecord(**node_dict(), extra={"endpoint": "192.0.2.9:1"})
    assert ei.value.field == "extra"
    with pytest.raises(InvalidRecord) as ei:
        ClusterConfig(**config_dict(), extra={"private_key": "x"})
    assert ei.value.field == "private_key"
    with pytest.raises(InvalidRecord) as ei:
        ClusterConfig(**config_dict(), schema="2.0")
    assert ei.value.field == "schema"
    assert ClusterConfig(**config_dict(), schema="1").schema == "1.0"


def test_keep_unknown_carries_what_a_newer_writer_added() -> None:
    stored = NodeRecord.from_json(json.dumps(node_dict(schema="1.2", signature="c2ln")))
    rebuilt = NodeRecord(**node_dict(endpoint="192.0.2.99:51820"))
    kept = keep_unknown(rebuilt, stored)
    assert kept == rebuilt and kept.endpoint == "192.0.2.99:51820"
    assert (kept.schema, kept.extra) == ("1.2", {"signature": "c2ln"})
    assert json.loads(kept.to_json()) == node_dict(endpoint="192.0.2.99:51820", schema="1.2", signature="c2ln")
    assert keep_unknown(rebuilt, None) is rebuilt
    assert keep_unknown(rebuilt, NodeRecord(**node_dict())) is rebuilt
    newer_self = NodeRecord(**node_dict(), schema="1.5")
    assert keep_unknown(newer_self, stored).schema == "1.5"
    cfg = ClusterConfig.from_json(json.dumps(config_dict(audit_level=True)))
    assert keep_unknown(ClusterConfig(**config_dict(mtu=1300)), cfg).extra == {"audit_level": True}


# --- rotate_every (scheduled key rotation) --------------------------------------------------


def test_rotate_every_round_trip_and_written_only_when_set() -> None:
    cfg = ClusterConfig(**config_dict(rotate_every=30 * 86400))
    assert json.loads(cfg.to_json())["rotate_every"] == 2592000
    assert ClusterConfig.from_json(cfg.to_json(), CKEY) == cfg
    # 0 (never) is the default and is not written: agents released before it refuse unknown fields.
    plain = ClusterConfig(**config_dict())
    assert plain.rotate_every == 0 and "rotate_every" not in json.loads(plain.to_json())
    assert json.loads(ClusterConfig(**config_dict(rotate_every=0)).to_json()) == config_dict()
    assert ClusterConfig.from_json(json.dumps(config_dict(rotate_every=0))) == plain
    assert cfg != plain


@pytest.mark.parametrize("seconds", [0, 3600, 86400, 31536000])
def test_rotate_every_accepted(seconds: int) -> None:
    assert ClusterConfig.from_json(json.dumps(config_dict(rotate_every=seconds))).rotate_every == seconds


@pytest.mark.parametrize(
    "value, reason",
    [(1, "1 is outside 3600-31536000 (seconds: an hour to a year; 0: never)"), (3599, "3599 is outside 3600-31536000"),
     (31536001, "31536001 is outside 3600-31536000"), (-3600, "-3600 is outside 3600-31536000"),
     ("30d", "must be an integer, not str"), (True, "must be an integer, not bool"),
     (86400.0, "must be an integer, not float"), (2**40, "is outside")],
)
def test_rotate_every_refused_naming_field_and_reason(value: object, reason: str) -> None:
    assert_invalid(config_error(config_dict(rotate_every=value)), "rotate_every", reason, CKEY)


def test_rotate_every_constructor_validates_too() -> None:
    with pytest.raises(InvalidRecord) as ei:
        ClusterConfig(**config_dict(rotate_every=60))
    assert_invalid(ei.value, "rotate_every", "60 is outside 3600-31536000", None)
    with pytest.raises(InvalidRecord) as ei:
        ClusterConfig(**config_dict(rotate_every=False))
    assert_invalid(ei.value, "rotate_every", "must be an integer, not bool", None)
