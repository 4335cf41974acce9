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


def rotation_ready_key(cluster: str, peer: str, rotating_cluster: str, rotating_node: str) -> str:
    """Peer `peer` (of `cluster`) is ready for the rotation of `rotating_cluster`/`rotating_node`."""
    return f"{ROOT}/clusters/{cluster}/rotations/{peer}/ready/{rotating_cluster}/{rotating_node}"


def services_prefix(cluster: str) -> str:
    return f"{ROOT}/clusters/{cluster}/services/"


def service_key(cluster: str, name: str) -> str:
    return f"{ROOT}/clusters/{cluster}/services/{name}"


def mesh_prefix() -> str:
    return f"{ROOT}/mesh/"


def mesh_key(cluster: str) -> str:
    return f"{ROOT}/mesh/{cluster}"
