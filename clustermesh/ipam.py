"""Pod-CIDR leases: each node gets one `node_prefix_len` block of the cluster's pod CIDR.

A lease is a KV key per CIDR whose value is the node's name, created with check-and-set
index 0 ("only if absent"), so two nodes can never hold the same CIDR however they race.
Leases are not tied to a session: a node that restarts, or is away for a while, finds its
lease again and gets the same CIDR back. With least-privilege ACL tokens (acl.py) the operator
leases a node's CIDR when it creates the node's token, and the node may write only that key.

A node with a certificate (clustermesh.signed) leases the CIDR its certificate names and signs
the lease: a plain lease of its own (made before it was enrolled, or by the operator) is
replaced by a signed one, and so is a lease of its CIDR that no valid certificate backs
(forged) in a cluster that requires signatures.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator

from . import layout
from wiremesh.keys import NodeIdentity

from .errors import ClusterMeshError, ConsulError, ConsulReason, InvalidRecord, IPAMExhausted
from .records import ClusterConfig
from .signed import Lease, check_valid, cluster_key, lease_value, parse_lease, verify_lease
from .store import ConsulStore

log = logging.getLogger(__name__)


def _subnets(config: ClusterConfig) -> Iterator[str]:
    for net in config.pod_network.subnets(new_prefix=config.node_prefix_len):
        yield str(net)


def leases(store: ConsulStore, cluster: str) -> dict[str, str]:
    """CIDR (canonical) -> node name. A key that is not a CIDR is skipped (and logged): one bad
    write must not stop every node from leasing or finding its own CIDR."""
    _, items = store.list(layout.ipam_prefix(cluster))
    out = {}
    for key, item in items.items():
        try:
            out[str(ipaddress.ip_network(layout.ipam_cidr(key)))] = parse_lease(item.value, key).node
        except ValueError:
            log.warning("skipping IPAM key %s: not a CIDR", key)
        except InvalidRecord as e:
            log.warning("skipping IPAM key %s: %s", key, e.reason)
    return out


class LeaseConflict(ClusterMeshError):
    """The pod CIDR a node's certificate names is validly leased to another node."""

    hint = "enroll the node again for a free CIDR (wiremesh node enroll), or release the other node's lease"


def lease_certified(store: ConsulStore, config: ClusterConfig, identity: NodeIdentity, now: float,
                    max_attempts: int = 16) -> str:
    """Hold a signed lease of the CIDR in `identity`'s certificate; return that CIDR."""
    cert = identity.certificate
    cidr, node = cert.pod_cidr, cert.node
    key = layout.ipam_key(config.name, cidr)
    want = lease_value(cidr, identity)
    for _ in range(max_attempts):
        item = store.get(key)
        if item is None:
            if store.put(key, want, cas=0):
                log.info("leased pod CIDR %s for node %s (signed)", cidr, node)
                return cidr
            continue
        if item.value.decode(errors="replace") == want:
            return cidr
        try:
            held: Lease | None = parse_lease(item.value, key)
        except InvalidRecord:
            held = None
        if held is not None and held.node != node and not _refused(held, cidr, config, now, key):
            raise LeaseConflict(f"pod CIDR {cidr} of {node}'s certificate is leased to node {held.node!r}")
        if held is None or held.node != node:
            log.warning("replacing the lease of %s (%s): no valid certificate backs it", cidr,
                        f"held by {held.node!r}" if held else "not a lease")
        if store.put(key, want, cas=item.modify_index):
            log.info("signed the lease of pod CIDR %s for node %s", cidr, node)
            return cidr
    raise IPAMExhausted(f"cluster {config.name}: gave up writing the lease of {cidr} after {max_attempts} races")


def _refused(held: Lease, cidr: str, config: ClusterConfig, now: float, key: str) -> bool:
    """Whether another node's lease is one this cluster refuses anyway (it requires signatures)."""
    if not config.require_signed:
        return False  # unsigned cluster: a plain lease is as good as any
    try:
        check_valid(verify_lease(held, cidr, config.name, cluster_key(config), key), config, now, key)
    except InvalidRecord:
        return True
    return False


def lease_pod_cidr(store: ConsulStore, config: ClusterConfig, node: str, max_attempts: int = 64) -> str:
    """Return `node`'s pod CIDR, leasing the lowest free one if it has none yet."""
    for _ in range(max_attempts):
        held = leases(store, config.name)
        for cidr, owner in sorted(held.items(), key=lambda kv: ipaddress.ip_network(kv[0])):
            if owner == node and ipaddress.ip_network(cidr).subnet_of(config.pod_network):  # type: ignore[arg-type]
                return cidr
        taken = [ipaddress.ip_network(c) for c in held]
        free = next((c for c in _subnets(config)
                     if c not in held and not any(t.overlaps(ipaddress.ip_network(c)) for t in taken)), None)
        if free is None:
            raise IPAMExhausted(
                f"cluster {config.name}: every /{config.node_prefix_len} of {config.pod_cidr} is leased"
            )
        try:
            written = store.put(layout.ipam_key(config.name, free), node, cas=0)
        except ConsulError as e:
            if e.reason is not ConsulReason.PERMISSION_DENIED:
                raise
            refused = ConsulError(f"cluster {config.name}: node {node} holds no pod-CIDR lease and its Consul "
                                  f"token may not take one ({e})", e.status, e.reason)
            refused.hint = ("with per-node ACL tokens the operator leases each node's CIDR when it creates the "
                            "token: run `wiremesh setup` with the node in acl_nodes")
            raise refused from e
        if written:
            log.info("leased pod CIDR %s for node %s", free, node)
            return free
        # Another node won this CIDR between our read and our write: read again.
    raise IPAMExhausted(f"cluster {config.name}: gave up leasing a pod CIDR after {max_attempts} races")


def release_pod_cidr(store: ConsulStore, cluster: str, node: str) -> list[str]:
    """Give back every CIDR leased to `node` (used when a node is removed for good)."""
    released = []
    _, items = store.list(layout.ipam_prefix(cluster))
    for key, item in items.items():
        try:
            owner = parse_lease(item.value, key).node
        except InvalidRecord:
            continue
        if owner == node and store.delete(key, cas=item.modify_index):
            released.append(layout.ipam_cidr(key))
    return released
