"""Turn one raw snapshot of a cluster's keys into validated records (pure).

A record that fails any check is skipped with its key and reason; the rest stand. The
checks that need more than one record live here: a node's pod CIDR must be leased to that
node in IPAM, and a public key may belong to one node only. In a cluster with
`require_signed` (clustermesh.signed), records and leases must also be signed by certified
nodes, and a node's certificate is what entitles it to its pod CIDR: a lease that is missing
or forged does not take the CIDR from it; a valid lease of another node does. A certificate whose
serial the cluster's revocation list (clustermesh.revocation) holds is refused.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from wiremesh.keys import Certificate

from . import layout
from .control import ControlMemo, Trust, verify_policy
from .endpoints import EndpointsRecord, parse_endpoints
from .policy import Policy
from .policy_records import parse_policies
from .anchor import Anchor, apply_settings
from .claims import Seen, check_epoch, seen_of, settle_keys
from .errors import InvalidRecord
from .records import ClusterConfig, NodeRecord
from .revocation import RevocationCache, Revocations, read_revocations
from .rotation import Rotations, parse_rotations
from .services import ServiceDef, parse_services
from .signed import Lease, Verified, check_valid, cluster_key, keys_id, parse_lease, verify_lease, verify_record
from .store import KVItem


@dataclass(frozen=True, slots=True)
class Rejected:
    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    cluster: str
    index: int
    config: ClusterConfig | None
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    leases: dict[str, str] = field(default_factory=dict)
    rejected: tuple[Rejected, ...] = ()
    services: dict[str, ServiceDef] = field(default_factory=dict)
    rotations: Rotations = field(default_factory=Rotations)
    revoked: Revocations = field(default_factory=Revocations)  # the cluster's revocation list (its chunks)
    # With an anchor (clustermesh.anchor): the anchor after this snapshot. `seen`: the newest
    # record accepted of each node (clustermesh.claims), to remember; `kept`: nodes whose record
    # in Consul was refused as an old one written back, their last accepted record kept instead.
    anchor: Anchor | None = None
    seen: Mapping[str, Seen] = field(default_factory=dict)
    kept: frozenset[str] = frozenset()
    # Network policy: the cluster's and the mesh-wide policies (by key), each node's endpoints.
    policies: dict[str, Policy] = field(default_factory=dict)
    endpoints: dict[str, EndpointsRecord] = field(default_factory=dict)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ParseCache:
    """What the checks of one value alone concluded, per key and ModifyIndex, between snapshots.

    A watch gets every record of the cluster on every change; with a cache only the records that
    changed are parsed again (1 000 records took 40 ms to re-validate, one takes 50 us). The
    checks that relate records to each other (leases, duplicate keys, the config) still run on
    every snapshot, on the cached values.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, tuple[int, NodeRecord | InvalidRecord, Network | None]] = {}
        self.leases: dict[str, tuple[int, tuple[str, Lease] | str]] = {}
        self.verified = Verified()
        self.revocations = RevocationCache()
        self.control = ControlMemo()  # service definitions' and rotations' checks (clustermesh.control)
        self.accepted: dict[str, tuple[NodeRecord, Certificate | None]] = {}  # the last accepted record per node
        self.policies: dict[str, Policy] = {}  # the last good policy per key (clustermesh.policy_records)


def _node_alone(key: str, name: str, cluster: str, item: KVItem) -> tuple[NodeRecord, Network]:
    rec = NodeRecord.from_json(item.value, key)
    if rec.name != name:
        raise InvalidRecord("name", f"{rec.name!r} does not match the key's node name {name!r}", key)
    if rec.cluster != cluster:
        raise InvalidRecord("cluster", f"{rec.cluster!r} is not this cluster ({cluster!r})", key)
    return rec, ipaddress.ip_network(rec.pod_cidr)


def _lease_alone(key: str, item: KVItem) -> tuple[str, Lease] | str:
    try:
        cidr = str(ipaddress.ip_network(layout.ipam_cidr(key)))
        return cidr, parse_lease(item.value, key)
    except (ValueError, InvalidRecord) as e:
        return f"bad IPAM lease ({e})"


def parse_cluster(
    cluster: str,
    index: int,
    items: Mapping[str, KVItem],
    last_config: ClusterConfig | None = None,
    cache: ParseCache | None = None,
    now: float | None = None,
    anchor: Anchor | None = None,
    seen: Mapping[str, Seen] | None = None,
) -> ClusterSnapshot:
    """Validate every key under the cluster's prefix.

    A config that fails validation is reported and `last_config` (the last good one) is used
    instead, so a bad write never changes what the agent programs. With `cache` (one per
    watch), records whose ModifyIndex did not change are not parsed again. `now` (unix seconds)
    is when certificates must be valid. `anchor`: the cluster key this agent pinned; the signing
    settings are then taken only signed by it (clustermesh.anchor). `seen`: the newest record
    accepted of each node before (clustermesh.claims).
    """
    cache = cache or ParseCache()
    now = time.time() if now is None else now
    rejected: list[Rejected] = []
    config = last_config
    ckey = layout.config_key(cluster)
    if ckey in items:
        try:
            config = ClusterConfig.from_json(items[ckey].value, ckey)
            if config.name != cluster:
                raise InvalidRecord("name", f"{config.name!r} does not match the key's cluster {cluster!r}", ckey)
        except InvalidRecord as e:
            rejected.append(Rejected(ckey, str(e).removeprefix(f"{ckey}: ")))
            config = last_config
        else:
            config, anchor, why = apply_settings(config, anchor, ckey)
            if why is not None:
                rejected.append(Rejected(ckey, f"{why.field}: {why.reason} (signing settings refused; the last "
                                               "accepted ones stay)"))
    if anchor is not None and config is not None and last_config is config:
        config = anchor.strict(config)  # the last config may come from Consul unchecked (start-up)

    revoked, refused_chunks = read_revocations(cluster, items, cache.revocations)
    rejected.extend(Rejected(k, reason) for k, reason in refused_chunks)
    signed = config is not None and config.require_signed
    signing_key = cluster_key(config) if signed and config is not None else None
    leases: dict[str, str] = {}
    ipfx = layout.ipam_prefix(cluster)
    lease_cache: dict[str, tuple[int, tuple[str, Lease] | str]] = {}
    for key, item in items.items():
        if key.startswith(ipfx):
            hit = cache.leases.get(key)
            lease = hit[1] if hit is not None and hit[0] == item.modify_index else _lease_alone(key, item)
            lease_cache[key] = (item.modify_index, lease)
            if isinstance(lease, str):
                rejected.append(Rejected(key, lease))
                continue
            if signed and config is not None:
                try:
                    cidr, held = lease
                    lease_cert = cache.verified.get(key, item.modify_index, keys_id(config),
                                                    lambda: verify_lease(held, cidr, cluster, signing_key, key))
                    check_valid(lease_cert, config, now, key, revoked)
                except InvalidRecord as e:
                    rejected.append(Rejected(key, f"bad IPAM lease ({e.field}: {e.reason})"))
                    continue
            leases[lease[0]] = lease[1].node
    cache.leases = lease_cache

    npfx = layout.nodes_prefix(cluster)
    seen = dict(seen or {})
    cidrs_seen: dict[str, str] = {}
    node_cache: dict[str, tuple[int, NodeRecord | InvalidRecord, Network | None]] = {}
    candidates: list[tuple[str, NodeRecord]] = []
    certs: dict[str, Certificate | None] = {}
    kept: set[str] = set()
    pod_range = config.pod_network if config is not None else None
    # Oldest records first, so a newcomer that copies a key cannot push out the node holding it.
    for key in sorted((k for k in items if k.startswith(npfx)), key=lambda k: (items[k].modify_index, k)):
        name = key[len(npfx):]
        item = items[key]
        cached = cache.nodes.get(key)
        parsed: NodeRecord | InvalidRecord
        pod: Network | None
        if cached is not None and cached[0] == item.modify_index:
            parsed, pod = cached[1], cached[2]
        else:
            try:
                parsed, pod = _node_alone(key, name, cluster, item)
            except InvalidRecord as e:
                parsed, pod = e, None
            except (ValueError, TypeError, RecursionError) as e:  # a validator bug must not sink the snapshot
                parsed, pod = InvalidRecord("value", f"unexpected validation error: {e.__class__.__name__}", key), None
        node_cache[key] = (item.modify_index, parsed, pod)
        cert: Certificate | None = None
        replayed = False
        try:
            if isinstance(parsed, InvalidRecord):
                raise parsed
            rec = parsed
            if config is None or pod_range is None:
                raise InvalidRecord("pod_cidr", f"cluster {cluster!r} has no valid config to check it against", key)
            _check_pod(rec, name, config, pod_range, leases, signed, key)
            if signed:
                cert = cache.verified.get(key, item.modify_index, keys_id(config),
                                          lambda: verify_record(rec, item.value, signing_key, key))
                check_valid(cert, config, now, key, revoked)
                try:
                    check_epoch(rec, cert.not_before, seen.get(name), key)
                except InvalidRecord as e:
                    rejected.append(Rejected(key, str(e).removeprefix(f"{key}: ")))
                    replayed = True
                    # An old record written back: the node's last accepted record stays (if still valid).
                    rec, cert = cache.accepted.get(name, (None, None))  # type: ignore[assignment]
                    if rec is None or cert is None:
                        continue
                    _check_pod(rec, name, config, pod_range, leases, signed, key)
                    check_valid(cert, config, now, key, revoked)
                    kept.add(name)
            if rec.pod_cidr in cidrs_seen:
                raise InvalidRecord("pod_cidr", f"{rec.pod_cidr} is already node {cidrs_seen[rec.pod_cidr]!r}'s", key)
        except InvalidRecord as e:
            if not replayed:
                rejected.append(Rejected(key, str(e).removeprefix(f"{key}: ")))
            kept.discard(name)
            continue
        cidrs_seen[rec.pod_cidr] = name
        candidates.append((name, rec))
        certs[name] = cert
    nodes, key_refused = settle_keys(candidates, seen)
    for name, why in key_refused:
        if name in kept:
            kept.discard(name)  # (its refusal is in the list already)
        else:
            rejected.append(Rejected(npfx + name, f"{why.field}: {why.reason}"))
    accepted: dict[str, tuple[NodeRecord, Certificate | None]] = {}
    for name, rec in nodes.items():
        its_cert = certs[name]
        accepted[name] = (rec, its_cert)
        if name not in kept:
            seen[name] = seen_of(rec, its_cert.not_before if its_cert is not None else 0)
    present = {k[len(npfx):] for k in items if k.startswith(npfx)}
    cache.accepted = {n: v for n, v in {**cache.accepted, **accepted}.items() if n in present}
    cache.nodes = node_cache
    cache.verified.sweep()

    # Signed clusters: service definitions and rotations signed (clustermesh.control); a refused
    # value leaves its key's last good one in place.
    memo = cache.control
    memo.use(config if signed else None)
    # (either key of a roll-over's announcement vouches; its commit re-signs them with the new key)
    trust = Trust(config, signing_key or None, now) if signed and config is not None else None
    spfx = layout.services_prefix(cluster)
    services, refused = parse_services({k: v.value for k, v in items.items() if k.startswith(spfx)}, cluster,
                                       config.service_cidr if config else None, spfx,
                                       verify=memo.service_check(trust) if trust else None,
                                       last=memo.services if trust else None)
    rejected.extend(Rejected(k, reason) for k, reason in refused)
    rpfx = layout.rotations_prefix(cluster)
    rotations, refused = parse_rotations(cluster, {k: v.value for k, v in items.items() if k.startswith(rpfx)},
                                         verify=memo.rotation_check(trust) if trust else None,
                                         last=memo.rotations if trust else None)
    rejected.extend(Rejected(k, reason) for k, reason in refused)
    memo.sweep(set(items))
    policies, refused = parse_policies({k: v.value for k, v in items.items()
                                        if k.startswith((layout.policies_prefix(cluster), layout.mesh_policies_prefix(cluster)))},
                                       cluster, _policy_check(trust) if trust else None, cache.policies)
    rejected.extend(Rejected(k, reason) for k, reason in refused)
    epfx = layout.endpoints_prefix(cluster)
    endpoints, refused = parse_endpoints({k: v.value for k, v in items.items() if k.startswith(epfx)}, cluster, epfx,
                                         nodes, signed)
    rejected.extend(Rejected(k, reason) for k, reason in refused)

    for key in items:
        if not (key == ckey or key.startswith((ipfx, npfx, layout.cluster_prefix(cluster) + "rotations/",
                                                layout.cluster_prefix(cluster) + "services/",
                                                layout.revoked_prefix(cluster), layout.policies_prefix(cluster),
                                                layout.mesh_policies_prefix(cluster), epfx))):
            rejected.append(Rejected(key, "unknown key in the cluster's prefix"))
    return ClusterSnapshot(cluster, index, config, nodes, leases, tuple(rejected), services, rotations, revoked,
                           anchor, seen, frozenset(kept), policies, endpoints)


def _policy_check(trust: Trust) -> Callable[[str, bytes, Policy], None]:
    def check(key: str, raw: bytes, p: Policy) -> None:
        verify_policy(trust, raw, p, key)
    return check


def _check_pod(rec: NodeRecord, name: str, config: ClusterConfig, pod_range: Network, leases: Mapping[str, str],
               signed: bool, key: str) -> None:
    """The record's pod CIDR: inside the cluster's, of its node prefix, leased to it (or certified)."""
    pod = ipaddress.ip_network(rec.pod_cidr)
    if pod.version != pod_range.version or not pod.subnet_of(pod_range):  # type: ignore[arg-type]
        raise InvalidRecord("pod_cidr", f"{pod} is outside the cluster's pod CIDR {config.pod_cidr}", key)
    if pod.prefixlen != config.node_prefix_len:
        raise InvalidRecord("pod_cidr", f"{pod} is not a /{config.node_prefix_len}", key)
    owner = leases.get(rec.pod_cidr)
    if owner is None and not signed:  # signed: the certificate entitles the node to its CIDR
        raise InvalidRecord("pod_cidr", f"{pod} has no IPAM lease", key)
    if owner is not None and owner != name:
        raise InvalidRecord("pod_cidr", f"{pod} is leased to node {owner!r}", key)
