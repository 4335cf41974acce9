"""A node's endpoints (its pods: IP and labels) as the node publishes them for network policy.

    wiremesh/v1/clusters/<cluster>/endpoints/<node>
    {"node": "n1", "cluster": "east", "endpoints": [{"ip": "10.240.1.5", "labels": {"app": "api"}}],
     "signature": "<by the node's identity key>"}

Every IP must lie in the node's own pod CIDR (as its accepted record says: a node can never
label another node's pods), every label set passes `check_labels`. In a cluster that requires
signed records the node's certified identity signs it (`sign_endpoints`, `verify_endpoints`);
an unsigned or wrongly signed one is refused, so its pods stay "unknown" to policy (denied where
a policy selects), never labelled by whoever could write the key. Pure: no Consul, no kernel.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from wiremesh.keys import Certificate, CertificateError, NodeIdentity

from .errors import InvalidRecord
from .records import SCHEMA, NodeRecord, _dump, _envelope, _load, _shown, check_cluster_name, check_node_name
from .selector import check_labels

ENDPOINTS_DOMAIN = b"wiremesh-endpoints-v1\n"
MAX_ENDPOINTS = 1024  # per node (a /24 of pods is 254)
_FIELDS = frozenset({"node", "cluster", "endpoints", "signature"})


@dataclass(frozen=True, slots=True)
class EndpointEntry:
    ip: str
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class EndpointsRecord:
    node: str
    cluster: str
    endpoints: tuple[EndpointEntry, ...] = ()
    schema: str = field(default=SCHEMA, compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    signature: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        _envelope(self, _FIELDS)

    def body(self) -> dict[str, Any]:
        return {"node": self.node, "cluster": self.cluster,
                "endpoints": [{"ip": e.ip, "labels": dict(sorted(e.labels.items()))}
                              for e in sorted(self.endpoints, key=lambda e: ipaddress.ip_address(e.ip))]}

    def to_json(self) -> str:
        known = self.body()
        if self.signature:
            known["signature"] = self.signature
        return _dump(known, self.schema, self.extra)

    @classmethod
    def from_json(cls, raw: bytes | str, key: str | None = None) -> EndpointsRecord:
        d, schema, extra = _load(raw, key, _FIELDS)
        node = check_node_name(d.get("node"), "node", key)
        cluster = check_cluster_name(d.get("cluster"), "cluster", key)
        eps = d.get("endpoints", [])
        if not isinstance(eps, list) or len(eps) > MAX_ENDPOINTS:
            raise InvalidRecord("endpoints", f"must be a list of at most {MAX_ENDPOINTS}", key)
        out, seen = [], set()
        for i, e in enumerate(eps):
            where = f"endpoints[{i}]"
            if not isinstance(e, dict):
                raise InvalidRecord(where, "must be an object {ip, labels}", key)
            try:
                ip = ipaddress.IPv4Address(e.get("ip"))
            except (ValueError, TypeError):
                raise InvalidRecord(f"{where}.ip", f"{_shown(e.get('ip'))} is not an IPv4 address", key) from None
            if ip in seen:
                raise InvalidRecord(f"{where}.ip", f"{ip} is listed twice", key)
            seen.add(ip)
            try:
                labels = check_labels(e.get("labels", {}), f"{where}.labels")
            except ValueError as err:
                raise InvalidRecord(f"{where}.labels", str(err).split(": ", 1)[-1], key) from None
            out.append(EndpointEntry(str(ip), labels))
        sig = d.get("signature", "")
        if not isinstance(sig, str) or len(sig) > 128:
            raise InvalidRecord("signature", "must be a string of at most 128 characters", key)
        return cls(node, cluster, tuple(out), schema=schema, extra=extra, signature=sig)


def check_endpoints(rec: EndpointsRecord, node: NodeRecord | None, key: str | None = None) -> None:
    """Raise InvalidRecord unless every endpoint lies in `node`'s (accepted) pod CIDR."""
    if node is None:
        raise InvalidRecord("node", f"{rec.node!r} has no accepted node record", key)
    cidr = ipaddress.ip_network(node.pod_cidr)
    for i, e in enumerate(rec.endpoints):
        if ipaddress.ip_address(e.ip) not in cidr:
            raise InvalidRecord(f"endpoints[{i}].ip", f"{e.ip} is outside node {rec.node}'s pod CIDR {cidr}", key)


def sign_endpoints(rec: EndpointsRecord, identity: NodeIdentity | None) -> EndpointsRecord:
    if identity is None:
        return rec
    return replace(rec, signature=identity.sign(ENDPOINTS_DOMAIN, rec.body()))


def verify_endpoints(rec: EndpointsRecord, node: NodeRecord | None, key: str | None = None) -> None:
    """Raise InvalidRecord unless the node's certified identity (its accepted record's certificate)
    signed `rec`."""
    if node is None or node.certificate is None:
        raise InvalidRecord("signature", f"{rec.node} has no certified record to check its endpoints against", key)
    if not rec.signature:
        raise InvalidRecord("signature", "missing: the cluster requires endpoints signed by their node", key)
    try:
        Certificate.from_dict(node.certificate).verify_signed(ENDPOINTS_DOMAIN, rec.body(), rec.signature)
    except CertificateError as e:
        raise InvalidRecord("signature", f"not made by {rec.node}'s identity key ({e})", key) from None


def parse_endpoints(items: Mapping[str, bytes], cluster: str, prefix: str, nodes: Mapping[str, NodeRecord],
                    signed: bool) -> tuple[dict[str, EndpointsRecord], list[tuple[str, str]]]:
    """Every node's endpoints under `prefix` -> (node -> record, refused (key, reason)). A record
    is taken only for a node with an accepted record (see the module's docstring)."""
    out: dict[str, EndpointsRecord] = {}
    refused: list[tuple[str, str]] = []
    for key, raw in sorted(items.items()):
        name = key[len(prefix):]
        try:
            rec = EndpointsRecord.from_json(raw, key)
            if rec.node != name or rec.cluster != cluster:
                raise InvalidRecord("node", f"{rec.cluster}/{rec.node} does not match the key", key)
            check_endpoints(rec, nodes.get(name), key)
            if signed:
                verify_endpoints(rec, nodes.get(name), key)
        except InvalidRecord as e:
            refused.append((key, str(e).removeprefix(f"{key}: ")))
            continue
        out[name] = rec
    return out, refused

