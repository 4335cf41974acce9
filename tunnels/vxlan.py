"""The VXLAN overlay that runs inside WireGuard: device, FDB and neighbour entries, as diffs.

The VTEP is the node's overlay address on the WireGuard device, so every VXLAN packet is
routed into WireGuard and encrypted; VXLAN never touches the underlay in the clear. Entries
are static (no learning, no flooding): each remote node has one FDB entry (its VTEP MAC ->
its overlay address) and one permanent neighbour entry (its gateway address -> its MAC).
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import states as nud_states

from .errors import TunnelError
from .links import delete_link

VXLAN_PORT = 4789
NUD_PERMANENT = nud_states["permanent"]
NTF_SELF = 0x02  # the entry belongs to the VXLAN device itself (as `bridge fdb ... self`)


@dataclass(frozen=True, slots=True)
class VxlanSpec:
    name: str
    vni: int
    local: str  # the node's overlay address (on the WireGuard device)
    mac: str
    mtu: int | None
    address: str  # "a.b.c.d/32": the node's VXLAN gateway address (its pod CIDR's network address)
    port: int = VXLAN_PORT


def vtep_mac(overlay_ip: str) -> str:
    """A stable, locally administered MAC for a node's VTEP.

    0a:58 and then the IPv4 overlay address itself (readable in `bridge fdb`); for IPv6, 4
    bytes of a hash of the address, since its last 4 bytes repeat from node to node.
    """
    ip = ipaddress.ip_address(overlay_ip)
    raw = ip.packed if ip.version == 4 else hashlib.sha256(ip.packed).digest()[:4]
    return "0a:58:" + ":".join(f"{o:02x}" for o in raw)


def _err(what: str, e: NetlinkError) -> TunnelError:
    return TunnelError(f"{what}: {e.args[1] if len(e.args) > 1 else e}", e.code)


def _index(ipr: IPRoute, name: str) -> int | None:
    idx = ipr.link_lookup(ifname=name)
    return int(idx[0]) if idx else None


def ensure_vxlan(spec: VxlanSpec) -> bool:
    """Create or fix the VXLAN device; returns True if anything changed.

    VNI, local address and port cannot change in place: a device that differs is replaced.
    The outer UDP checksum is off: WireGuard's Poly1305 tag already protects every byte, and
    the checksum costs CPU on the path that limits throughput.
    """
    changed = False
    with IPRoute() as ipr:
        idx = _index(ipr, spec.name)
        if idx is not None:
            (link,) = ipr.link("get", index=idx)
            info = link.get_attr("IFLA_LINKINFO")
            data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
            same = data is not None and (
                data.get_attr("IFLA_VXLAN_ID") == spec.vni
                and data.get_attr("IFLA_VXLAN_LOCAL") == spec.local
                and data.get_attr("IFLA_VXLAN_PORT") == spec.port
            )
            if not same:
                ipr.link("del", index=idx)
                idx = None
        if idx is None:
            try:
                ipr.link("add", ifname=spec.name, kind="vxlan", vxlan_id=spec.vni, vxlan_local=spec.local,
                         vxlan_port=spec.port, vxlan_learning=0, vxlan_udp_csum=0, address=spec.mac)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise _err(f"{spec.name}: create vxlan (vni {spec.vni})", e) from e
            idx = _index(ipr, spec.name)
            changed = True
        assert idx is not None
        (link,) = ipr.link("get", index=idx)
        kw: dict[str, object] = {}
        if link.get_attr("IFLA_ADDRESS") != spec.mac:
            kw["address"] = spec.mac
        if spec.mtu and link.get_attr("IFLA_MTU") != spec.mtu:
            kw["mtu"] = spec.mtu
        if not link["flags"] & 1:
            kw["state"] = "up"
        if kw:
            try:
                ipr.link("set", index=idx, **kw)
            except NetlinkError as e:
                raise _err(f"{spec.name}: set {sorted(kw)}", e) from e
            changed = True
        ip, _, plen = spec.address.partition("/")
        if not any(a.get_attr("IFA_ADDRESS") == ip for a in ipr.addr("dump", index=idx)):
            try:
                ipr.addr("add", index=idx, address=ip, prefixlen=int(plen or 32))
                changed = True
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise _err(f"{spec.name}: add address {spec.address}", e) from e
    return changed


def read_vxlan(name: str) -> VxlanSpec | None:
    """The VXLAN device `name` as it is (None: absent, or not a VXLAN device).

    Its address is the /32 it holds ("" if none): several are reported as the lowest. A device
    that is down reports MTU 0, so that it never equals what is wanted.
    """
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return None
        (link,) = ipr.link("get", index=idx)
        info = link.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
            return None
        data = info.get_attr("IFLA_INFO_DATA")
        addrs = sorted(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.addr("dump", index=idx)
                       if a.get("family") == 2)
        return VxlanSpec(
            name=name, vni=int(data.get_attr("IFLA_VXLAN_ID") or 0), local=str(data.get_attr("IFLA_VXLAN_LOCAL") or ""),
            mac=str(link.get_attr("IFLA_ADDRESS") or ""), mtu=int(link.get_attr("IFLA_MTU") or 0) if link["flags"] & 1 else 0,
            address=addrs[0] if addrs else "", port=int(data.get_attr("IFLA_VXLAN_PORT") or 0),
        ) if data is not None else None


def delete_vxlan(name: str) -> bool:
    """Remove the VXLAN device (its FDB, neighbours and routes go with it); gone already is fine."""
    return delete_link(name)
