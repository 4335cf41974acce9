"""Pod interfaces: a veth pair from the node into a pod's network namespace.

The pod gets its address as a /32 and a default route via the node's overlay address
(on-link), which the node answers ARP for (Linux replies for any local address). The node
routes the pod's /32 to the host end of the veth. No bridge: pods reach each other only
through the node's routing table, where WireGuard and VXLAN routes live.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import DeviceNotFound, TunnelError
from .links import RTNH_F_ONLINK, delete_link
from .netns import run_in_netns

RTPROT_WIREMESH_CNI = 88  # pod routes, kept apart from the agent's own (87)
RT_SCOPE_LINK = 253


def host_ifname(container_id: str, ifname: str) -> str:
    """The node-side veth name: stable for (container, interface), 15 characters at most."""
    return "wmp" + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


@dataclass(frozen=True, slots=True)
class PodInterface:
    host_ifname: str
    host_mac: str
    ifname: str
    mac: str
    address: str  # a.b.c.d/32
    gateway: str
    mtu: int | None


def _err(what: str, e: NetlinkError) -> TunnelError:
    return TunnelError(f"{what}: {e.args[1] if len(e.args) > 1 else e}", e.code)


def _container_side(ifname: str, address: str, gateway: str, mtu: int | None) -> str:
    ip, _, plen = address.partition("/")
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise DeviceNotFound(f"{ifname}: not in the pod's namespace")
        i = idx[0]
        try:
            if mtu:
                ipr.link("set", index=i, mtu=mtu)
            ipr.link("set", index=i, state="up")
            ipr.addr("replace", index=i, address=ip, prefixlen=int(plen))
            ipr.route("replace", dst=f"{gateway}/32", oif=i, scope=RT_SCOPE_LINK)
            ipr.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=i, flags=RTNH_F_ONLINK)
        except NetlinkError as e:
            raise _err(f"{ifname} in the pod", e) from e
        (link,) = ipr.link("get", index=i)
        return str(link.get_attr("IFLA_ADDRESS"))


def add_pod_interface(netns: str, container_id: str, ifname: str, address: str, gateway: str,
                      mtu: int | None) -> PodInterface:
    """Create the veth pair and configure both ends. On failure, nothing is left behind."""
    host = host_ifname(container_id, ifname)
    ip = address.partition("/")[0]
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=host, kind="veth", peer={"ifname": ifname, "net_ns_fd": netns})
        except NetlinkError as e:
            raise _err(f"create veth {host} <-> {ifname}", e) from e
        try:
            (hidx,) = ipr.link_lookup(ifname=host)
            if mtu:
                ipr.link("set", index=hidx, mtu=mtu)
            ipr.link("set", index=hidx, state="up")
            mac = run_in_netns(netns, _container_side, ifname, address, gateway, mtu)
            ipr.route("replace", dst=f"{ip}/32", oif=hidx, scope=RT_SCOPE_LINK, proto=RTPROT_WIREMESH_CNI)
            (link,) = ipr.link("get", index=hidx)
            return PodInterface(host, str(link.get_attr("IFLA_ADDRESS")), ifname, mac, address, gateway, mtu)
        except BaseException:
            try:
                ipr.link("del", ifname=host)  # takes the pod end with it
            except NetlinkError:
                pass
            raise


def del_pod_interface(container_id: str, ifname: str) -> bool:
    """Delete the pod's veth pair from the node side; already gone is fine."""
    return delete_link(host_ifname(container_id, ifname))


def _inspect_container(ifname: str) -> dict[str, object]:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return {}
        (link,) = ipr.link("get", index=idx[0])
        addrs = [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.addr("dump", index=idx[0])]
        gws = [r.get_attr("RTA_GATEWAY") for r in ipr.route("dump", family=2) if r["dst_len"] == 0 and r.get_attr("RTA_OIF") == idx[0]]
        return {"mtu": link.get_attr("IFLA_MTU"), "up": bool(link["flags"] & 1), "addresses": addrs, "gateways": gws}


def check_pod_interface(netns: str, container_id: str, ifname: str, address: str, gateway: str) -> list[str]:
    """What is wrong with a pod's interface (empty: all as ADD left it)."""
    problems = []
    host = host_ifname(container_id, ifname)
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=host)
        if not idx:
            problems.append(f"node-side veth {host} is missing")
        else:
            ip = address.partition("/")[0]
            if not any(r.get_attr("RTA_OIF") == idx[0] and r.get_attr("RTA_DST") == ip
                       for r in ipr.route("dump", family=2)):
                problems.append(f"no route to {ip} via {host}")
    seen = run_in_netns(netns, _inspect_container, ifname)
    if not seen:
        problems.append(f"{ifname} is missing in {netns}")
    else:
        if address not in seen["addresses"]:  # type: ignore[operator]
            problems.append(f"{ifname} lacks {address}")
        if gateway not in seen["gateways"]:  # type: ignore[operator]
            problems.append(f"{ifname} has no default route via {gateway}")
        if not seen["up"]:
            problems.append(f"{ifname} is down")
    return problems


def set_pod_mtu(netns: str, container_id: str, ifname: str, mtu: int) -> bool:
    """Give both ends of a pod's veth a new MTU (when the cluster's routing mode changes)."""
    host = host_ifname(container_id, ifname)

    def inside() -> bool:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                return False
            try:
                (link,) = ipr.link("get", index=idx[0])
                if link.get_attr("IFLA_MTU") != mtu:
                    ipr.link("set", index=idx[0], mtu=mtu)
            except NetlinkError as e:
                raise _err(f"{ifname} in the pod: set mtu {mtu}", e) from e
            return True

    try:
        return _set_pod_mtu(host, mtu, lambda: run_in_netns(netns, inside))
    except NetlinkError as e:  # the pod went away meanwhile, or the kernel refused
        raise _err(f"{host}: set mtu {mtu}", e) from e


def _set_pod_mtu(host: str, mtu: int, inside: Callable[[], bool]) -> bool:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=host)
        if not idx:
            return False
        (link,) = ipr.link("get", index=idx[0])
        if link.get_attr("IFLA_MTU") == mtu:
            return False
        # The pod end first when lowering, the node end first when raising: neither end ever
        # sends frames larger than the other accepts.
        if mtu < link.get_attr("IFLA_MTU"):
            inside()
            ipr.link("set", index=idx[0], mtu=mtu)
        else:
            ipr.link("set", index=idx[0], mtu=mtu)
            inside()
    return True
