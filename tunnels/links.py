"""Interfaces, addresses and routes through rtnetlink (pyroute2), applied as diffs.

Routes wiremesh owns carry their own routing protocol number (`RTPROT_WIREMESH`), so the
agent can tell them apart from anything else on the host and prune only its own.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import DeviceNotFound, TunnelError

RTPROT_WIREMESH = 87  # free in /etc/iproute2/rt_protos; ours by convention
MAIN_TABLE = 254
RTNH_F_ONLINK = 4


def _nl_error(what: str, e: NetlinkError) -> TunnelError:
    return TunnelError(f"{what}: {e.args[1] if len(e.args) > 1 else e}", e.code)


def link_index(ifname: str) -> int:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise DeviceNotFound(f"{ifname}: no such interface")
    return int(idx[0])


def link_exists(ifname: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def link_mtu(ifname: str) -> int:
    with IPRoute() as ipr:
        (link,) = ipr.link("get", index=link_index(ifname))
        return int(link.get("mtu"))


def ensure_link_up(ifname: str, mtu: int | None = None) -> None:
    """Bring the link up (and set its MTU) if it is not already so."""
    idx = link_index(ifname)
    with IPRoute() as ipr:
        (link,) = ipr.link("get", index=idx)
        kw: dict[str, object] = {}
        if mtu is not None and link.get("mtu") != mtu:
            kw["mtu"] = mtu
        if not link["flags"] & 1:
            kw["state"] = "up"
        if kw:
            try:
                ipr.link("set", index=idx, **kw)
            except NetlinkError as e:
                raise _nl_error(f"{ifname}: set link {kw}", e) from e


def delete_link(ifname: str) -> bool:
    """Delete an interface (a veth takes its peer along); one already gone is fine.

    Returns whether there was one to delete.
    """
    with IPRoute() as ipr:
        try:
            ipr.link("del", ifname=ifname)
            return True
        except NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.ENOENT):
                raise _nl_error(f"{ifname}: delete", e) from e
            return False


def ensure_address(ifname: str, cidr: str) -> None:
    """Make `cidr` (address/prefix) an address of the interface; keep others as they are."""
    iface = ipaddress.ip_interface(cidr)
    idx = link_index(ifname)
    with IPRoute() as ipr:
        for a in ipr.addr("dump", index=idx):
            if a.get("address") == str(iface.ip) and a["prefixlen"] == iface.network.prefixlen:
                return
        try:
            ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise _nl_error(f"{ifname}: add address {cidr}", e) from e


@dataclass(frozen=True, slots=True)
class Route:
    """A route wiremesh owns: `dst` via device `ifname`, through `via` (on-link) if set."""

    dst: str  # canonical CIDR
    ifname: str
    via: str | None = None


def _owned_routes(ipr: IPRoute, names: dict[int, str]) -> dict[str, Route]:
    out: dict[str, Route] = {}
    for family in (2, 10):
        for r in ipr.route("dump", family=family, table=MAIN_TABLE):
            if r["proto"] != RTPROT_WIREMESH or r.get("oif") not in names:
                continue
            dst = r.get("dst") or ("0.0.0.0" if family == 2 else "::")
            cidr = f"{dst}/{r['dst_len']}"
            out[cidr] = Route(cidr, names[r.get("oif")], r.get("gateway"))
    return out


def _indexes(ipr: IPRoute, ifnames: Iterable[str]) -> dict[int, str]:
    names = {}
    for name in ifnames:
        idx = ipr.link_lookup(ifname=name)
        if idx:
            names[int(idx[0])] = name
    return names


def owned_routes(ifnames: Iterable[str]) -> set[Route]:
    """Routes via these devices in the main table that wiremesh made (by protocol number)."""
    with IPRoute() as ipr:
        return set(_owned_routes(ipr, _indexes(ipr, ifnames)).values())


def set_mtu(ifname: str, mtu: int) -> bool:
    """Set an interface's MTU if it differs; True if it changed."""
    return _set_link(ifname, "mtu", mtu, f"set mtu {mtu}")


def set_txqueuelen(ifname: str, qlen: int) -> bool:
    """Set an interface's transmit queue length if it differs; True if it changed."""
    return _set_link(ifname, "txqlen", qlen, f"set txqueuelen {qlen}")


def _set_link(ifname: str, attr: str, value: int, what: str) -> bool:
    """Set one numeric link attribute if it differs (read first); True if it changed."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise DeviceNotFound(f"{ifname}: no such interface")
        (link,) = ipr.link("get", index=idx[0])
        if link.get(attr) == value:
            return False
        try:
            ipr.link("set", index=idx[0], **{attr: value})
        except NetlinkError as e:
            raise _nl_error(f"{ifname}: {what}", e) from e
        return True


def enable_forwarding() -> None:
    """Let this network namespace route packets between pods and tunnels."""
    for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"):
        try:
            with open(path) as f:
                if f.read().strip() == "1":
                    continue
            with open(path, "w") as f:
                f.write("1\n")
        except OSError as e:
            raise TunnelError(f"{path}: {e.strerror}", e.errno) from e


def mtu_of_address(address: str) -> int | None:
    """MTU of the interface that holds `address`, or None if no interface does."""
    ip = str(ipaddress.ip_address(address))
    with IPRoute() as ipr:
        for a in ipr.addr("dump"):
            if a.get("address") == ip:
                (link,) = ipr.link("get", index=a["index"])
                return int(link.get("mtu"))
    return None


def poke(address: str, port: int = 9) -> None:
    """Send one empty UDP datagram to `address` (discard port): a WireGuard peer without a session
    starts its handshake at once instead of at its next retry (5 s)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.sendto(b"", (address, port))
    except OSError as e:
        raise TunnelError(f"poke {address}: {e.strerror or e}", e.errno) from e
