"""Record schemas stored in Consul, with strict validation.

Every value read from Consul is untrusted: `from_json` checks size, JSON, every field's type
and range, and raises `InvalidRecord` naming the field and the reason. Unknown fields are
refused too, so a typo never silently becomes a default.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from wiremesh.keys import KeyMaterialError, PublicKey

from .errors import InvalidRecord

MAX_RECORD_BYTES = 16 * 1024
ROUTING_MODES = ("wireguard", "vxlan")

# Cilium's cluster-name rule: lowercase letters, digits and dashes, at most 32.
_CLUSTER_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?")
# Node names: a DNS label, optionally dotted, at most 63.
_NODE_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_PORT = re.compile(r"[0-9]{1,5}")


def check_cluster_name(name: object, field: str = "name", key: str | None = None) -> str:
    if not isinstance(name, str) or not _CLUSTER_NAME.fullmatch(name):
        raise InvalidRecord(
            field, f"{name!r} is not a cluster name (lowercase letters, digits, dashes; at most 32)", key
        )
    return name


def check_node_name(name: object, field: str = "name", key: str | None = None) -> str:
    if not isinstance(name, str) or not _NODE_NAME.fullmatch(name):
        raise InvalidRecord(
            field, f"{name!r} is not a node name (lowercase letters, digits, '-' and '.'; at most 63)", key
        )
    return name


def parse_endpoint(value: object, field: str = "endpoint", key: str | None = None) -> str:
    """'IP:port' (or '[IPv6]:port') -> canonical text."""
    if not isinstance(value, str):
        raise InvalidRecord(field, "must be a string IP:port", key)
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep:
        raise InvalidRecord(field, f"{value[:64]!r} is not IP:port", key)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidRecord(field, f"{host[:64]!r} is not an IP address", key) from None
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise InvalidRecord(field, f"port {port[:16]!r} is not 1-65535", key)
    if ip.is_unspecified or ip.is_multicast:
        raise InvalidRecord(field, f"{ip} cannot be a peer's address", key)
    return f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"


def parse_network(value: object, field: str, key: str | None = None) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise InvalidRecord(field, "must be a CIDR string", key)
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise InvalidRecord(field, f"{value[:64]!r} is not a network CIDR ({e})", key) from None


def overlay_address(pod_cidr: str) -> str:
    """A node's overlay address: the first host address of its pod CIDR (x.y.z.1 of a /24)."""
    net = ipaddress.ip_network(pod_cidr)
    return str(net.network_address + 1) if net.num_addresses > 1 else str(net.network_address)


def _int(d: dict[str, Any], name: str, lo: int, hi: int, key: str | None, default: int | None = None) -> int:
    v = d.get(name, default)
    if v is None:
        raise InvalidRecord(name, "is required", key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRecord(name, f"must be an integer, not {type(v).__name__}", key)
    if not lo <= v <= hi:
        raise InvalidRecord(name, f"{v} is outside {lo}-{hi}", key)
    return v


def _str(d: dict[str, Any], name: str, key: str | None, default: str | None = None) -> str:
    v = d.get(name, default)
    if v is None:
        raise InvalidRecord(name, "is required", key)
    if not isinstance(v, str):
        raise InvalidRecord(name, f"must be a string, not {type(v).__name__}", key)
    return v


def _load(raw: bytes | str, key: str | None, allowed: set[str]) -> dict[str, Any]:
    size = len(raw.encode()) if isinstance(raw, str) else len(raw)
    if size > MAX_RECORD_BYTES:
        raise InvalidRecord("value", f"{size} bytes is over the {MAX_RECORD_BYTES}-byte limit", key)
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRecord("value", f"not JSON ({e.__class__.__name__})", key) from None
    except RecursionError:
        raise InvalidRecord("value", "not JSON (nested too deeply)", key) from None
    if not isinstance(d, dict):
        raise InvalidRecord("value", "must be a JSON object", key)
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise InvalidRecord(unknown[0], "unknown field", key)
    return d


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """One cluster's settings, shared by all of its agents."""

    name: str
    id: int
    pod_cidr: str
    node_prefix_len: int = 24
    service_cidr: str = "10.96.0.0/16"
    routing: str = "wireguard"
    vni: int = 1
    wg_port: int = 51820
    mtu: int = 0  # 0: derive from the underlay (WireGuard's 80 bytes off)

    def __post_init__(self) -> None:
        self.validate()
        # One spelling per network ("FD00::/48" and "fd00::/48" are the same cluster range).
        object.__setattr__(self, "pod_cidr", str(ipaddress.ip_network(self.pod_cidr)))
        object.__setattr__(self, "service_cidr", str(ipaddress.ip_network(self.service_cidr)))

    def validate(self, key: str | None = None) -> None:
        check_cluster_name(self.name, "name", key)
        d = asdict(self)
        _int(d, "id", 1, 255, key)
        pod = parse_network(self.pod_cidr, "pod_cidr", key)
        _int(d, "node_prefix_len", pod.prefixlen + 1 if pod.prefixlen < pod.max_prefixlen else pod.max_prefixlen,
             30 if pod.version == 4 else 126, key)
        svc = parse_network(self.service_cidr, "service_cidr", key)
        if svc.version == pod.version and svc.overlaps(pod):  # type: ignore[arg-type]
            raise InvalidRecord("service_cidr", f"{svc} overlaps pod_cidr {pod}", key)
        if self.routing not in ROUTING_MODES:
            raise InvalidRecord("routing", f"{self.routing!r} is not one of {', '.join(ROUTING_MODES)}", key)
        if self.routing == "vxlan" and pod.version != 4:
            raise InvalidRecord("routing", "vxlan needs an IPv4 pod_cidr (its VTEPs are IPv4)", key)
        _int(d, "vni", 1, 2**24 - 1, key)
        _int(d, "wg_port", 1, 65535, key)
        if self.mtu != 0:
            _int(d, "mtu", 1280, 9000, key)

    @property
    def pod_network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.pod_cidr)

    @classmethod
    def from_json(cls, raw: bytes | str, key: str | None = None) -> "ClusterConfig":
        fields = set(cls.__dataclass_fields__)
        d = _load(raw, key, fields)
        for name in ("name", "pod_cidr"):
            _str(d, name, key)
        for name in ("service_cidr", "routing"):
            if name in d:
                _str(d, name, key)
        for name in ("id", "node_prefix_len", "vni", "wg_port", "mtu"):
            if name in d:
                _int(d, name, -(2**31), 2**31, key)
        _int(d, "id", -(2**31), 2**31, key)
        try:
            return cls(**d)
        except InvalidRecord as e:
            raise InvalidRecord(e.field, e.reason, key) from None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What a node publishes about itself: never its private key."""

    name: str
    cluster: str
    endpoint: str
    public_key: str
    pod_cidr: str
    overlay_ip: str
    key_epoch: int = 0
    vtep_mac: str = ""
    agent_version: str = ""

    @classmethod
    def from_json(cls, raw: bytes | str, key: str | None = None) -> "NodeRecord":
        d = _load(raw, key, set(cls.__dataclass_fields__))
        name = check_node_name(d.get("name"), "name", key)
        cluster = check_cluster_name(d.get("cluster"), "cluster", key)
        endpoint = parse_endpoint(d.get("endpoint"), "endpoint", key)
        pk = _str(d, "public_key", key)
        try:
            public_key = PublicKey.from_base64(pk).base64
        except KeyMaterialError as e:
            raise InvalidRecord("public_key", str(e).split(": ", 1)[-1], key) from None
        pod = parse_network(_str(d, "pod_cidr", key), "pod_cidr", key)
        ov = _str(d, "overlay_ip", key)
        try:
            overlay = ipaddress.ip_address(ov)
        except ValueError:
            raise InvalidRecord("overlay_ip", f"{ov[:64]!r} is not an IP address", key) from None
        if str(overlay) != overlay_address(str(pod)):
            raise InvalidRecord("overlay_ip", f"{overlay} is not the first address of pod_cidr {pod}", key)
        epoch = _int(d, "key_epoch", 0, 2**53, key, default=0)
        mac = _str(d, "vtep_mac", key, default="")
        if mac and not _MAC.fullmatch(mac):
            raise InvalidRecord("vtep_mac", f"{mac[:32]!r} is not a lowercase MAC address", key)
        version = _str(d, "agent_version", key, default="")
        if len(version) > 64:
            raise InvalidRecord("agent_version", "longer than 64 characters", key)
        return cls(name, cluster, endpoint, public_key, str(pod), str(overlay), epoch, mac, version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def fingerprint(self) -> str:
        return PublicKey.from_base64(self.public_key).fingerprint
