"""Global services: definitions in Consul KV, and which backends a frontend uses (pure).

A service is defined once per cluster under `wiremesh/v1/clusters/<cluster>/services/<name>`:
its virtual IP (from the cluster's service CIDR), ports and protocols, and an affinity. Its
backends are the Consul catalog instances of the same name, in every member cluster, whose
health is passing. Which of them a node's frontend uses:

- `none`: every healthy backend of every cluster (Cilium #46623 dropped the remote ones).
- `local`: the local cluster's healthy backends; only while there is none, every healthy
  remote one, spread over all of them (Cilium #46633 sent everything to the first).
- `remote`: the mirror: remote ones, and the local ones only while no remote one is healthy.
- `prefer: [a, b]` (beyond Cilium, its #29200): the first cluster of the list that has a
  healthy backend gets all the traffic; clusters not listed come last, all together.

A cluster whose Consul cannot be read any more keeps its last known backends for a grace
period; after it they are "stale" and receive new connections only if no other cluster has a
healthy backend (Cilium #19217, #20729, #37333 kept sending to a dead cluster forever).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRecord
from .records import SCHEMA, SCHEMA_FIELD, _dump, _envelope, _int, _load, _shown, _str, check_cluster_name

AFFINITIES = ("none", "local", "remote")
PROTOCOLS = ("tcp", "udp")
MAX_PORTS = 16
MAX_PREFER = 16
# A Consul service name as DNS would carry it: lowercase letters, digits, dashes; at most 63.
_SERVICE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def check_service_name(name: object, field_name: str = "name", key: str | None = None) -> str:
    if not isinstance(name, str) or not _SERVICE_NAME.fullmatch(name):
        raise InvalidRecord(field_name, f"{_shown(name)} is not a service name (lowercase letters, digits, "
                                        "dashes; at most 63)", key)
    return name


@dataclass(frozen=True, slots=True, order=True)
class ServicePort:
    """One frontend port: `port`/`protocol` on the VIP, to `target_port` on each backend (0: the
    port the backend registered in the catalog)."""

    port: int
    protocol: str = "tcp"
    target_port: int = 0

    @classmethod
    def parse(cls, raw: object, where: str, key: str | None) -> "ServicePort":
        if not isinstance(raw, dict):
            raise InvalidRecord(where, "must be an object {port, protocol, target_port}", key)
        unknown = sorted(set(raw) - {"port", "protocol", "target_port"})
        if unknown:
            raise InvalidRecord(f"{where}.{str(unknown[0])[:32]}", "unknown field", key)
        port = _int(raw, "port", 1, 65535, key)
        proto = _str(raw, "protocol", key, default="tcp")
        if proto not in PROTOCOLS:
            raise InvalidRecord(f"{where}.protocol", f"{proto[:16]!r} is not one of {', '.join(PROTOCOLS)}", key)
        target = _int(raw, "target_port", 0, 65535, key, default=0)
        return cls(port, proto, target)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"port": self.port, "protocol": self.protocol}
        if self.target_port:
            d["target_port"] = self.target_port
        return d


_SERVICE_FIELDS = frozenset({"name", "cluster", "vip", "ports", "affinity", "prefer", "signature"})
MAX_SIGNATURE = 128  # base64 of a 64-byte Ed25519 signature is 88 characters


@dataclass(frozen=True, slots=True)
class ServiceDef:
    """A global service as one cluster defines it."""

    name: str
    cluster: str
    vip: str
    ports: tuple[ServicePort, ...]
    affinity: str = "none"
    prefer: tuple[str, ...] = ()
    schema: str = field(default=SCHEMA, compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # The operator's signature over the rest of the record (clustermesh.control); "" unsigned.
    # Not compared: a definition signed again is the same definition.
    signature: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        _envelope(self, _SERVICE_FIELDS)
        self.validate()

    def validate(self, key: str | None = None) -> None:
        check_service_name(self.name, "name", key)
        check_cluster_name(self.cluster, "cluster", key)
        try:
            vip = ipaddress.ip_address(self.vip)
        except ValueError:
            raise InvalidRecord("vip", f"{str(self.vip)[:64]!r} is not an IP address", key) from None
        if vip.version != 4:
            raise InvalidRecord("vip", f"{vip} is not IPv4 (the service lookup is IPv4 only)", key)
        if not self.ports:
            raise InvalidRecord("ports", "at least one port is needed", key)
        if len(self.ports) > MAX_PORTS:
            raise InvalidRecord("ports", f"{len(self.ports)} ports; at most {MAX_PORTS}", key)
        seen = set()
        for p in self.ports:
            if (p.port, p.protocol) in seen:
                raise InvalidRecord("ports", f"{p.port}/{p.protocol} is listed twice", key)
            seen.add((p.port, p.protocol))
        if self.affinity not in AFFINITIES:
            raise InvalidRecord("affinity", f"{str(self.affinity)[:32]!r} is not one of {', '.join(AFFINITIES)}", key)
        if len(self.prefer) > MAX_PREFER or len(set(self.prefer)) != len(self.prefer):
            raise InvalidRecord("prefer", f"at most {MAX_PREFER} clusters, each once", key)
        for c in self.prefer:
            check_cluster_name(c, "prefer", key)

    @classmethod
    def from_json(cls, raw: bytes | str, key: str | None = None) -> "ServiceDef":
        d, schema, extra = _load(raw, key, _SERVICE_FIELDS)
        name = check_service_name(d.get("name"), "name", key)
        cluster = check_cluster_name(d.get("cluster"), "cluster", key)
        vip = _str(d, "vip", key)
        raw_ports = d.get("ports")
        if not isinstance(raw_ports, list) or len(raw_ports) > MAX_PORTS:
            raise InvalidRecord("ports", f"must be a list of at most {MAX_PORTS} ports", key)
        ports = tuple(ServicePort.parse(p, f"ports[{i}]", key) for i, p in enumerate(raw_ports))
        affinity = _str(d, "affinity", key, default="none")
        prefer = d.get("prefer", [])
        if not isinstance(prefer, list) or not all(isinstance(c, str) for c in prefer):
            raise InvalidRecord("prefer", "must be a list of cluster names", key)
        signature = _str(d, "signature", key, default="")
        if len(signature) > MAX_SIGNATURE:
            raise InvalidRecord("signature", f"longer than {MAX_SIGNATURE} characters", key)
        try:
            return cls(name, cluster, vip, ports, affinity, tuple(prefer), schema=schema, extra=extra,
                       signature=signature)
        except InvalidRecord as e:
            raise InvalidRecord(e.field, e.reason, key) from None

    def to_json(self) -> str:
        known = {"name": self.name, "cluster": self.cluster, "vip": self.vip,
                 "ports": [p.as_dict() for p in self.ports], "affinity": self.affinity}
        if self.prefer:
            known["prefer"] = list(self.prefer)
        if self.signature:  # written only when set: an unsigned definition reads as it always did
            known["signature"] = self.signature
        return _dump(known, self.schema, self.extra)


def check_vip(vip: str, service_cidr: str, key: str | None = None) -> None:
    net = ipaddress.ip_network(service_cidr)
    ip = ipaddress.ip_address(vip)
    if ip.version != net.version or ip not in net:
        raise InvalidRecord("vip", f"{ip} is outside the cluster's service CIDR {net}", key)
    if ip in (net.network_address, net.broadcast_address):
        raise InvalidRecord("vip", f"{ip} is the network or broadcast address of {net}", key)


def allocate_vip(service_cidr: str, taken: Sequence[str]) -> str:
    """The lowest free address of the service CIDR (the first ten are left for the operator)."""
    net = ipaddress.ip_network(service_cidr)
    used = {ipaddress.ip_address(t) for t in taken}
    for i, ip in enumerate(net.hosts()):
        if i >= 10 and ip not in used:
            return str(ip)
    raise InvalidRecord("vip", f"no free address left in the service CIDR {net}")


@dataclass(frozen=True, slots=True, order=True)
class Backend:
    """One healthy catalog instance: where a frontend's connections may go."""

    cluster: str
    address: str
    port: int
    node: str = ""  # the Consul node that runs its checks
    service_id: str = ""


@dataclass(frozen=True, slots=True)
class ClusterBackends:
    """A cluster's passing instances of one service, as last read; `stale` once its Consul could
    not be read for longer than the grace period."""

    backends: tuple[Backend, ...] = ()
    stale: bool = False


def select_backends(svc: ServiceDef, local: str, by_cluster: Mapping[str, ClusterBackends]) -> tuple[Backend, ...]:
    """The backends `svc`'s frontends use on a node of cluster `local` (sorted, deterministic)."""
    fresh = {c: cb.backends for c, cb in by_cluster.items() if not cb.stale and cb.backends}
    chosen = _by_policy(svc, local, fresh)
    if not chosen:  # stale clusters only when nothing else is left
        chosen = _by_policy(svc, local, {c: cb.backends for c, cb in by_cluster.items() if cb.stale and cb.backends})
    return tuple(sorted(chosen))


def _by_policy(svc: ServiceDef, local: str, healthy: Mapping[str, tuple[Backend, ...]]) -> list[Backend]:
    if not healthy:
        return []
    if svc.prefer:
        for c in svc.prefer:
            if healthy.get(c):
                return list(healthy[c])
        rest = [b for c, bs in healthy.items() if c not in svc.prefer for b in bs]
        return rest
    if svc.affinity == "local":
        return list(healthy.get(local, ())) or [b for c, bs in healthy.items() if c != local for b in bs]
    if svc.affinity == "remote":
        remote = [b for c, bs in healthy.items() if c != local for b in bs]
        return remote or list(healthy.get(local, ()))
    return [b for bs in healthy.values() for b in bs]


def parse_services(items: Mapping[str, bytes], cluster: str, service_cidr: str | None, prefix: str,
                   verify: Callable[[str, bytes, ServiceDef], None] | None = None,
                   last: dict[str, ServiceDef] | None = None) -> tuple[dict[str, ServiceDef], list[tuple[str, str]]]:
    """Every service definition under `prefix` -> (valid ones by name, [(key, reason)] refused).

    A VIP is one service's: when two claim it, the one whose name sorts first keeps it (every
    agent decides alike); the other is refused. `verify(key, raw, svc)` raises InvalidRecord for
    a definition its cluster does not vouch for (clustermesh.control). `last` (key -> the last
    definition accepted there, kept by the caller between snapshots and updated here): a key
    whose value is refused keeps its last good definition, so a bad write changes nothing.
    """
    good: dict[str, ServiceDef] = {}
    rejected: list[tuple[str, str]] = []
    vips: dict[str, str] = {}
    kept: dict[str, ServiceDef] = {}
    for key in sorted(items):
        name = key[len(prefix):]
        try:
            svc = _service_alone(key, name, items[key], cluster, service_cidr, verify)
        except InvalidRecord as e:
            reason = str(e).removeprefix(f"{key}: ")
            before = _still_good((last or {}).get(key), service_cidr)
            rejected.append((key, reason + ("; its last good definition stays" if before else "")))
            if before is None or before.vip in vips:
                continue
            svc = before
        except (ValueError, TypeError, RecursionError) as e:  # a validator bug must not sink the rest
            rejected.append((key, f"unexpected validation error: {e.__class__.__name__}"))
            continue
        holder = vips.get(svc.vip)
        if holder is not None:
            rejected.append((key, f"vip: {svc.vip} is already service {holder!r}'s"))
            continue
        vips[svc.vip] = name
        good[name] = kept[key] = svc
    if last is not None:
        last.clear()
        last.update(kept)
    return good, rejected


def _still_good(svc: ServiceDef | None, service_cidr: str | None) -> ServiceDef | None:
    """A last good definition, if the cluster's (maybe changed) service CIDR still holds its VIP."""
    if svc is None or service_cidr is None:
        return None
    try:
        check_vip(svc.vip, service_cidr)
    except (InvalidRecord, ValueError):
        return None
    return svc


def _service_alone(key: str, name: str, raw: bytes, cluster: str, service_cidr: str | None,
                   verify: Callable[[str, bytes, ServiceDef], None] | None) -> ServiceDef:
    svc = ServiceDef.from_json(raw, key)
    if svc.name != name:
        raise InvalidRecord("name", f"{svc.name!r} does not match the key's service name {name!r}", key)
    if svc.cluster != cluster:
        raise InvalidRecord("cluster", f"{svc.cluster!r} is not this cluster ({cluster!r})", key)
    if service_cidr is None:
        raise InvalidRecord("vip", f"cluster {cluster!r} has no valid config to check it against", key)
    check_vip(svc.vip, service_cidr, key)
    if verify is not None:  # last: the cheap checks first
        verify(key, raw, svc)
    return svc


__all__ = ["AFFINITIES", "PROTOCOLS", "SCHEMA_FIELD", "Backend", "ClusterBackends", "ServiceDef", "ServicePort",
           "allocate_vip", "check_service_name", "check_vip", "parse_services", "select_backends"]
