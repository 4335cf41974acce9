"""Network policy records: who may talk to whom, by labels, CIDRs and clusters.

One record per policy, under `wiremesh/v1/clusters/<cluster>/policies/<name>` (it applies to
that cluster's endpoints) or `wiremesh/v1/policies/<name>` (`--mesh`: every cluster's). What
`wiremesh policy apply -f FILE.yaml` reads and what the record holds are the same document:

    name: api-from-frontend
    selector: app == "api"                 # the endpoints it applies to (Calico's selector syntax)
    order: 100                             # lower first; within a policy the first matching rule wins
    ingress:
      - action: allow
        from: {selector: app == "frontend"}    # and/or cidrs: [...] (non-endpoint addresses), clusters: [...]
        ports: [{port: 8080, protocol: tcp}]   # end_port for a range; protocol: tcp, udp, icmp, any
      - action: deny
    egress: []

Semantics (Calico's and Kubernetes' own, see clustermesh.verdict): an endpoint selected by a
policy in a direction is default-deny in that direction; unselected endpoints allow all;
replies of an allowed connection always pass. A policy applies in a direction when it has rules
for it, or when `types` names it (`types: [ingress, egress]`: `egress: []` then denies all
egress); with neither, it applies to ingress. Policies run by `order`, then name; an explicit
`deny` wins over an `allow` of another policy of the same order.

Parsing names the field that is wrong (`ingress[0].ports[1].port: 70000 is outside 1-65535`);
signed like service definitions (clustermesh.control) where the cluster requires it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRecord
from .records import SCHEMA, _dump, _envelope, _load, _shown, check_cluster_name
from .selector import Selector, SelectorError
from .selector import parse as parse_selector

ACTIONS = ("allow", "deny")
PROTOCOLS = ("tcp", "udp", "icmp", "any")
DIRECTIONS = ("ingress", "egress")
MAX_RULES = 64  # per direction
MAX_PORTS = 32  # per rule
MAX_CIDRS = 64  # per rule
MAX_CLUSTERS = 32
MAX_ORDER = 1_000_000
DEFAULT_ORDER = 1000
MAX_SIGNATURE = 128
_POLICY_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")
_FIELDS = frozenset({"name", "cluster", "selector", "order", "types", "ingress", "egress", "signature"})
_RULE_FIELDS = frozenset({"action", "from", "to", "ports"})
_PEER_FIELDS = frozenset({"selector", "cidrs", "clusters"})
_PORT_FIELDS = frozenset({"port", "end_port", "protocol"})


def check_policy_name(name: object, where: str = "name", key: str | None = None) -> str:
    if not isinstance(name, str) or not _POLICY_NAME.fullmatch(name):
        raise InvalidRecord(where, f"{_shown(name)} is not a policy name (lowercase letters, digits, '-' and "
                                   "'.'; at most 63)", key)
    return name


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    """`port`..`end_port` (one port when equal) of `protocol`; port 0: every port (and the only
    choice for icmp and any)."""

    protocol: str = "any"
    port: int = 0
    end_port: int = 0

    def matches(self, protocol: str, port: int) -> bool:
        if self.protocol != "any" and self.protocol != protocol:
            return False
        return self.port == 0 or self.port <= port <= self.end_port

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"protocol": self.protocol}
        if self.port:
            d["port"] = self.port
            if self.end_port != self.port:
                d["end_port"] = self.end_port
        return d


@dataclass(frozen=True, slots=True)
class PeerMatch:
    """The other end of a rule (`from` for ingress, `to` for egress): every field given must
    match (selector on its labels, its IP in one of `cidrs`, its cluster one of `clusters`)."""

    selector: Selector | None = None
    cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    clusters: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.selector is not None:
            d["selector"] = str(self.selector)
        if self.cidrs:
            d["cidrs"] = [str(c) for c in self.cidrs]
        if self.clusters:
            d["clusters"] = list(self.clusters)
        return d


@dataclass(frozen=True, slots=True)
class Rule:
    action: str
    peer: PeerMatch | None = None  # None: any peer
    ports: tuple[PortRange, ...] = ()  # (): any protocol and port

    def as_dict(self, direction: str) -> dict[str, Any]:
        d: dict[str, Any] = {"action": self.action}
        if self.peer is not None:
            d["from" if direction == "ingress" else "to"] = self.peer.as_dict()
        if self.ports:
            d["ports"] = [p.as_dict() for p in self.ports]
        return d


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    selector: Selector
    order: int = DEFAULT_ORDER
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    types: tuple[str, ...] = ()  # the directions it applies to (see the module's docstring)
    cluster: str = ""  # the cluster it belongs to; "" for a mesh-wide policy
    schema: str = field(default=SCHEMA, compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    signature: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        _envelope(self, _FIELDS)

    def applies(self, direction: str) -> bool:
        if self.types:
            return direction in self.types
        if direction == "egress":
            return bool(self.egress)
        return bool(self.ingress) or not self.egress

    def rules(self, direction: str) -> tuple[Rule, ...]:
        return self.ingress if direction == "ingress" else self.egress

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "selector": str(self.selector), "order": self.order,
                             "ingress": [r.as_dict("ingress") for r in self.ingress],
                             "egress": [r.as_dict("egress") for r in self.egress]}
        if self.types:
            d["types"] = list(self.types)
        if self.cluster:
            d["cluster"] = self.cluster
        return d

    def to_json(self) -> str:
        known = self.as_dict()
        if self.signature:
            known["signature"] = self.signature
        return _dump(known, self.schema, self.extra)

    @classmethod
    def from_json(cls, raw: bytes | str, key: str | None = None) -> Policy:
        d, schema, extra = _load(raw, key, _FIELDS)
        return parse_policy(d, key, schema=schema, extra=extra)


# --- parsing ------------------------------------------------------------------------------------

def parse_policy(d: object, key: str | None = None, *, schema: str = SCHEMA,
                 extra: Mapping[str, Any] | None = None, unknown_ok: bool = True) -> Policy:
    """A policy document (a YAML file's or a record's) -> Policy; InvalidRecord names the field.
    `unknown_ok=False` (a file a user wrote) refuses fields it does not know: a typo is an error."""
    if not isinstance(d, dict):
        raise InvalidRecord("policy", "must be a mapping (name, selector, order, ingress, egress)", key)
    if not unknown_ok:
        _no_unknown(d, _FIELDS | {"schema"}, "", key)
    name = check_policy_name(d.get("name"), "name", key)
    cluster = d.get("cluster", "")
    if cluster:
        check_cluster_name(cluster, "cluster", key)
    selector = _selector(d.get("selector", ""), "selector", key)
    order = d.get("order", DEFAULT_ORDER)
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_ORDER:
        raise InvalidRecord("order", f"{_shown(order)} is not an integer within 0-{MAX_ORDER}", key)
    types = d.get("types", [])
    if not isinstance(types, list) or any(t not in DIRECTIONS for t in types) or len(set(types)) != len(types):
        raise InvalidRecord("types", f"must be a list of {' and '.join(DIRECTIONS)}, each once", key)
    rules = {dr: _rules(d.get(dr, []), dr, key, unknown_ok) for dr in DIRECTIONS}
    signature = d.get("signature", "")
    if not isinstance(signature, str) or len(signature) > MAX_SIGNATURE:
        raise InvalidRecord("signature", f"must be a string of at most {MAX_SIGNATURE} characters", key)
    return Policy(name, selector, order, rules["ingress"], rules["egress"], tuple(sorted(types)), cluster,
                  schema=schema, extra=dict(extra or {}), signature=signature)


def _no_unknown(d: Mapping[str, Any], known: frozenset[str], where: str, key: str | None) -> None:
    unknown = sorted(str(k) for k in d if k not in known)
    if unknown:
        raise InvalidRecord(f"{where}{unknown[0][:32]}", f"unknown field (known: {', '.join(sorted(known))})", key)


def _selector(text: object, where: str, key: str | None) -> Selector:
    if not isinstance(text, str):
        raise InvalidRecord(where, f"must be a selector string, not {type(text).__name__}", key)
    try:
        return parse_selector(text)
    except SelectorError as e:
        raise InvalidRecord(where, f"{e} in {text[:80]!r}", key) from None


def _rules(raw: object, direction: str, key: str | None, unknown_ok: bool) -> tuple[Rule, ...]:
    if not isinstance(raw, list):
        raise InvalidRecord(direction, "must be a list of rules", key)
    if len(raw) > MAX_RULES:
        raise InvalidRecord(direction, f"{len(raw)} rules; at most {MAX_RULES}", key)
    return tuple(_rule(r, f"{direction}[{i}]", direction, key, unknown_ok) for i, r in enumerate(raw))


def _rule(raw: object, where: str, direction: str, key: str | None, unknown_ok: bool) -> Rule:
    if not isinstance(raw, dict):
        raise InvalidRecord(where, "must be a mapping (action, from/to, ports)", key)
    peer_field = "from" if direction == "ingress" else "to"
    wrong = "to" if direction == "ingress" else "from"
    if wrong in raw:
        raise InvalidRecord(f"{where}.{wrong}", f"an {direction} rule names its peer with '{peer_field}'", key)
    if not unknown_ok:
        _no_unknown(raw, _RULE_FIELDS, f"{where}.", key)
    action = raw.get("action")
    if action not in ACTIONS:
        raise InvalidRecord(f"{where}.action", f"{_shown(action)} is not one of {', '.join(ACTIONS)}", key)
    peer = _peer(raw[peer_field], f"{where}.{peer_field}", key, unknown_ok) if peer_field in raw else None
    ports_raw = raw.get("ports", [])
    if not isinstance(ports_raw, list) or len(ports_raw) > MAX_PORTS:
        raise InvalidRecord(f"{where}.ports", f"must be a list of at most {MAX_PORTS} ports", key)
    ports = tuple(_port(p, f"{where}.ports[{i}]", key, unknown_ok) for i, p in enumerate(ports_raw))
    return Rule(action, peer, ports)


def _peer(raw: object, where: str, key: str | None, unknown_ok: bool) -> PeerMatch:
    if not isinstance(raw, dict):
        raise InvalidRecord(where, "must be a mapping (selector, cidrs, clusters)", key)
    if not unknown_ok:
        _no_unknown(raw, _PEER_FIELDS, f"{where}.", key)
    sel = _selector(raw["selector"], f"{where}.selector", key) if "selector" in raw else None
    cidrs_raw = raw.get("cidrs", [])
    if not isinstance(cidrs_raw, list) or len(cidrs_raw) > MAX_CIDRS:
        raise InvalidRecord(f"{where}.cidrs", f"must be a list of at most {MAX_CIDRS} CIDRs", key)
    cidrs = []
    for i, c in enumerate(cidrs_raw):
        try:
            net = ipaddress.ip_network(c, strict=True) if isinstance(c, str) else None
        except ValueError as e:
            raise InvalidRecord(f"{where}.cidrs[{i}]", f"{_shown(c)} is not a CIDR ({e})", key) from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise InvalidRecord(f"{where}.cidrs[{i}]", f"{_shown(c)} is not an IPv4 CIDR", key)
        cidrs.append(net)
    clusters_raw = raw.get("clusters", [])
    if not isinstance(clusters_raw, list) or len(clusters_raw) > MAX_CLUSTERS:
        raise InvalidRecord(f"{where}.clusters", f"must be a list of at most {MAX_CLUSTERS} cluster names", key)
    clusters = tuple(check_cluster_name(c, f"{where}.clusters[{i}]", key) for i, c in enumerate(clusters_raw))
    if sel is None and not cidrs and not clusters:
        raise InvalidRecord(where, "names no peer: give a selector, cidrs or clusters (or leave it out: any peer)", key)
    return PeerMatch(sel, tuple(cidrs), clusters)


def _port(raw: object, where: str, key: str | None, unknown_ok: bool) -> PortRange:
    if not isinstance(raw, dict):
        raise InvalidRecord(where, "must be a mapping (port, end_port, protocol)", key)
    if not unknown_ok:
        _no_unknown(raw, _PORT_FIELDS, f"{where}.", key)
    proto = raw.get("protocol", "tcp")
    if proto not in PROTOCOLS:
        raise InvalidRecord(f"{where}.protocol", f"{_shown(proto)} is not one of {', '.join(PROTOCOLS)}", key)
    port: Any = raw.get("port", 0)
    end: Any = raw.get("end_port", port)
    for name, v in (("port", port), ("end_port", end)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
            raise InvalidRecord(f"{where}.{name}", f"{_shown(v)} is not a port (1-65535)", key)
    if proto in ("icmp", "any") and port:
        raise InvalidRecord(f"{where}.port", f"{proto} has no ports", key)
    if end < port:
        raise InvalidRecord(f"{where}.end_port", f"{end} is below port {port}", key)
    return PortRange(proto, port, end)
