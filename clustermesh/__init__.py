"""The shared state: record schemas, the Consul store, IPAM and cluster snapshots."""

from . import layout
from .clusters import init_cluster, load_cluster_config
from .errors import (
    CASConflict,
    ClusterMeshError,
    ClusterNotFound,
    ConsulError,
    ConsulUnavailable,
    InvalidRecord,
    IPAMExhausted,
    SessionExpired,
)
from .federation import MeshMember, Membership, check_members, parse_mesh
from .ipam import lease_pod_cidr, leases, release_pod_cidr
from .records import (
    MAX_RECORD_BYTES,
    ROUTING_MODES,
    SCHEMA,
    SCHEMA_MAJOR,
    ClusterConfig,
    NodeRecord,
    check_cluster_name,
    check_node_name,
    keep_unknown,
    overlay_address,
    parse_endpoint,
    parse_schema,
)
from .snapshot import ClusterSnapshot, Rejected, parse_cluster
from .store import DEFAULT_ADDR, ConsulOptions, ConsulStore, KVItem

__all__ = [
    "CASConflict",
    "ClusterConfig",
    "ClusterMeshError",
    "ClusterNotFound",
    "ClusterSnapshot",
    "ConsulError",
    "ConsulOptions",
    "ConsulStore",
    "ConsulUnavailable",
    "DEFAULT_ADDR",
    "IPAMExhausted",
    "InvalidRecord",
    "KVItem",
    "MAX_RECORD_BYTES",
    "MeshMember",
    "Membership",
    "check_members",
    "parse_mesh",
    "NodeRecord",
    "ROUTING_MODES",
    "Rejected",
    "SCHEMA",
    "SCHEMA_MAJOR",
    "SessionExpired",
    "check_cluster_name",
    "check_node_name",
    "init_cluster",
    "keep_unknown",
    "layout",
    "lease_pod_cidr",
    "leases",
    "load_cluster_config",
    "overlay_address",
    "parse_cluster",
    "parse_endpoint",
    "parse_schema",
    "release_pod_cidr",
]
