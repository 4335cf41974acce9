"""Everything that touches the kernel: WireGuard devices, links, addresses and routes."""

from .device import BACKENDS, UserspaceDevice, WireGuardDevice, kernel_module_available, open_device
from .diff import as_status, peer_changes
from .errors import DeviceNotFound, KernelUnsupported, TunnelError, UAPIError
from .links import (
    RTPROT_WIREMESH,
    Route,
    delete_link,
    enable_forwarding,
    ensure_address,
    ensure_link_up,
    link_exists,
    link_mtu,
    mtu_of_address,
    owned_routes,
    set_mtu,
    sync_routes,
)
from .vxlan import VXLAN_PORT, VxlanSpec, delete_vxlan, ensure_vxlan, read_vxlan, sync_fdb, sync_neighbours, vtep_mac
from .targets import CallbackTarget, FdbTarget, MtuTarget, NeighbourTarget, RouteTarget, Target, VxlanTarget
from .model import DeviceState, PeerChange, PeerConfig, PeerStatus, normalize_cidr, split_endpoint

__all__ = [
    "CallbackTarget",
    "FdbTarget",
    "MtuTarget",
    "NeighbourTarget",
    "RouteTarget",
    "Target",
    "VxlanTarget",
    "as_status",
    "read_vxlan",
    "BACKENDS",
    "DeviceNotFound",
    "DeviceState",
    "KernelUnsupported",
    "PeerChange",
    "PeerConfig",
    "PeerStatus",
    "RTPROT_WIREMESH",
    "Route",
    "VXLAN_PORT",
    "VxlanSpec",
    "delete_vxlan",
    "enable_forwarding",
    "ensure_vxlan",
    "set_mtu",
    "sync_fdb",
    "sync_neighbours",
    "vtep_mac",
    "TunnelError",
    "UAPIError",
    "UserspaceDevice",
    "WireGuardDevice",
    "delete_link",
    "ensure_address",
    "ensure_link_up",
    "kernel_module_available",
    "link_exists",
    "link_mtu",
    "mtu_of_address",
    "normalize_cidr",
    "open_device",
    "owned_routes",
    "peer_changes",
    "split_endpoint",
    "sync_routes",
]
