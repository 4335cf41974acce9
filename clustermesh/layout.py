"""The Consul KV layout (v1); the only place that spells key paths."""

from __future__ import annotations

ROOT = "wiremesh/v1"


def cluster_prefix(cluster: str) -> str:
    return f"{ROOT}/clusters/{cluster}/"


def config_key(cluster: str) -> str:
    return f"{ROOT}/clusters/{cluster}/config"


def nodes_prefix(cluster: str) -> str:
    return f"{ROOT}/clusters/{cluster}/nodes/"


def node_key(cluster: str, node: str) -> str:
    return f"{ROOT}/clusters/{cluster}/nodes/{node}"


def ipam_prefix(cluster: str) -> str:
    return f"{ROOT}/clusters/{cluster}/ipam/"


def ipam_key(cluster: str, cidr: str) -> str:
    # A CIDR's "/" would make a sub-folder; Consul keys keep it readable with "_".
    return f"{ROOT}/clusters/{cluster}/ipam/{cidr.replace('/', '_')}"


def ipam_cidr(key: str) -> str:
    return key.rsplit("/", 1)[1].replace("_", "/")


def rotations_prefix(cluster: str) -> str:
    return f"{ROOT}/clusters/{cluster}/rotations/"


def rotation_key(cluster: str, node: str) -> str:
    return f"{ROOT}/clusters/{cluster}/rotations/{node}"


def ready_prefix(cluster: str) -> str:
    """Readiness words of `cluster`'s nodes for rotations. Outside the cluster's prefix on
    purpose: every agent watches that one, and a rotation's readiness (one word per peer) would
    wake each of them for every word; only a node that is rotating watches these."""
    return f"{ROOT}/ready/{cluster}/"


def rotation_ready_key(cluster: str, peer: str, rotating_cluster: str, rotating_node: str) -> str:
    """Peer `peer` (of `cluster`) is ready for the rotation of `rotating_cluster`/`rotating_node`."""
    return f"{ready_prefix(cluster)}{peer}/{rotating_cluster}/{rotating_node}"


def services_prefix(cluster: str) -> str:
    return f"{ROOT}/clusters/{cluster}/services/"


def service_key(cluster: str, name: str) -> str:
    return f"{ROOT}/clusters/{cluster}/services/{name}"


def mesh_prefix() -> str:
    return f"{ROOT}/mesh/"


def mesh_key(cluster: str) -> str:
    return f"{ROOT}/mesh/{cluster}"


def revoked_prefix(cluster: str) -> str:
    """The cluster's revocation list, in chunks (revocation.py): revoked/000, revoked/001, ..."""
    return f"{ROOT}/clusters/{cluster}/revoked/"


def policies_prefix(cluster: str) -> str:
    """Network policies of one cluster (clustermesh.policy): they select that cluster's endpoints."""
    return f"{ROOT}/clusters/{cluster}/policies/"


def policy_key(cluster: str, name: str) -> str:
    return f"{ROOT}/clusters/{cluster}/policies/{name}"


def mesh_policies_prefix(cluster: str) -> str:
    """Mesh-wide network policies as one member cluster holds them: the CLI writes each into every
    member cluster's own Consul (KV is per datacenter), under the cluster's prefix, so an agent
    reads them with the rest of its cluster (one watch)."""
    return f"{ROOT}/clusters/{cluster}/mesh-policies/"


def mesh_policy_key(cluster: str, name: str) -> str:
    return f"{ROOT}/clusters/{cluster}/mesh-policies/{name}"


def endpoints_prefix(cluster: str) -> str:
    """Each node's endpoints (its pods' IPs and labels: clustermesh.endpoints)."""
    return f"{ROOT}/clusters/{cluster}/endpoints/"


def endpoints_key(cluster: str, node: str) -> str:
    return f"{ROOT}/clusters/{cluster}/endpoints/{node}"
