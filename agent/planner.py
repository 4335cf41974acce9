"""Records -> desired dataplane state. A pure function: no I/O, no clock, no randomness."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from clustermesh import ClusterConfig, NodeRecord, overlay_address
from tunnels import PeerConfig

WIREGUARD_OVERHEAD = 80  # IPv6 outer header (40) + UDP (8) + WireGuard data header (16) + tag (16)


@dataclass(frozen=True, slots=True)
class DesiredState:
    """What the node's dataplane should hold."""

    peers: dict[str, PeerConfig] = field(default_factory=dict)  # by public key (base64)
    routes: frozenset[str] = frozenset()  # CIDRs routed via the WireGuard device
    peer_names: dict[str, str] = field(default_factory=dict)  # public key -> node name, for logs
    address: str | None = None  # the local overlay address, as CIDR on the device
    mtu: int | None = None


def plan(
    local_node: str,
    local_public_key: str,
    config: ClusterConfig,
    nodes: Mapping[str, NodeRecord],
    *,
    local_pod_cidr: str | None,
    underlay_mtu: int | None = None,
    persistent_keepalive: int = 0,
) -> DesiredState:
    """Every other node of the cluster becomes a peer whose allowed IPs are its pod CIDR.

    A record that carries the local node's own public key under another name is ignored
    (it would hijack our identity on every peer's device).
    """
    peers: dict[str, PeerConfig] = {}
    names: dict[str, str] = {}
    routes: set[str] = set()
    for name in sorted(nodes):
        rec = nodes[name]
        if name == local_node or rec.public_key == local_public_key:
            continue
        peers[rec.public_key] = PeerConfig(
            public_key=rec.public_key,
            endpoint=rec.endpoint,
            allowed_ips=frozenset({rec.pod_cidr}),
            persistent_keepalive=persistent_keepalive,
        )
        names[rec.public_key] = name
        routes.add(rec.pod_cidr)
    address = None
    if local_pod_cidr:
        ip = ipaddress.ip_address(overlay_address(local_pod_cidr))
        address = f"{ip}/{ip.max_prefixlen}"
    return DesiredState(
        peers=peers,
        routes=frozenset(routes),
        peer_names=names,
        address=address,
        mtu=tunnel_mtu(config, underlay_mtu),
    )


def tunnel_mtu(config: ClusterConfig, underlay_mtu: int | None) -> int | None:
    """The cluster's MTU if set, else the underlay's minus WireGuard's worst-case overhead."""
    if config.mtu:
        return config.mtu
    if underlay_mtu:
        return max(1280, underlay_mtu - WIREGUARD_OVERHEAD)
    return None
