"""Interfaces, addresses and routes through rtnetlink (pyroute2), applied as diffs.

Routes wiremesh owns carry their own routing protocol number (`RTPROT_WIREMESH`), so the
agent can tell them apart from anything else on the host and prune only its own.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import DeviceNotFound, TunnelError

RTPROT_WIREMESH = 87  # free in /etc/iproute2/rt_protos; ours by convention
MAIN_TABLE = 254


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


def delete_link(ifname: str) -> None:
    """Delete an interface; one that is already gone is fine."""
    with IPRoute() as ipr:
        try:
            ipr.link("del", ifname=ifname)
        except NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.ENOENT):
                raise _nl_error(f"{ifname}: delete", e) from e


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
    dst: str  # canonical CIDR
    ifname: str


def _owned_routes(ipr: IPRoute, ifname: str, idx: int) -> set[Route]:
    out: set[Route] = set()
    for family in (2, 10):
        for r in ipr.route("dump", family=family, table=MAIN_TABLE):
            if r["proto"] != RTPROT_WIREMESH or r.get("oif") != idx:
                continue
            dst = r.get("dst") or ("0.0.0.0" if family == 2 else "::")
            out.add(Route(f"{dst}/{r['dst_len']}", ifname))
    return out


def owned_routes(ifname: str) -> set[Route]:
    """Routes via `ifname` in the main table that wiremesh made (by protocol number)."""
    idx = link_index(ifname)
    with IPRoute() as ipr:
        return _owned_routes(ipr, ifname, idx)


def sync_routes(ifname: str, desired: Iterable[str], *, prune: bool) -> tuple[int, int]:
    """Make the routes via `ifname` that wiremesh owns equal `desired` (CIDRs).

    Returns (added, removed). A route that already exists or is already gone is no error.
    """
    want = {Route(str(ipaddress.ip_network(d, strict=False)), ifname) for d in desired}
    added = removed = 0
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise DeviceNotFound(f"{ifname}: no such interface")
        idx = int(idx[0])
        have = _owned_routes(ipr, ifname, idx)
        for r in sorted(want - have, key=lambda r: r.dst):
            try:
                ipr.route("replace", dst=r.dst, oif=idx, proto=RTPROT_WIREMESH, table=MAIN_TABLE)
                added += 1
            except NetlinkError as e:
                raise _nl_error(f"{ifname}: add route {r.dst}", e) from e
        if prune:
            for r in sorted(have - want, key=lambda r: r.dst):
                try:
                    ipr.route("del", dst=r.dst, oif=idx, proto=RTPROT_WIREMESH, table=MAIN_TABLE)
                    removed += 1
                except NetlinkError as e:
                    if e.code not in (errno.ESRCH, errno.ENOENT, errno.ENODEV):
                        raise _nl_error(f"{ifname}: delete route {r.dst}", e) from e
    return added, removed


def mtu_of_address(address: str) -> int | None:
    """MTU of the interface that holds `address`, or None if no interface does."""
    ip = str(ipaddress.ip_address(address))
    with IPRoute() as ipr:
        for a in ipr.addr("dump"):
            if a.get("address") == ip:
                (link,) = ipr.link("get", index=a["index"])
                return int(link.get("mtu"))
    return None
