"""Dataplane targets: one kind of kernel object each, read whole, changed one object at a time.

A target is three operations (after cilium/statedb's reconciler): `read()` returns the objects
the kernel holds, by key; `update(key, want)` creates or replaces one (idempotent);
`delete(key, have)` removes one (already gone is fine). The agent's reconciler decides what to
update and delete and keeps a status per object, so one object the kernel refuses never blocks
the others. Each call opens its own netlink socket: cheap next to a route change, and a target
holds no state between passes.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import links, vxlan
from .errors import DeviceNotFound, TunnelError
from .links import MAIN_TABLE, RTNH_F_ONLINK, RTPROT_WIREMESH, Route
from .bpf import Backend as LBBackend
from .bpf import Frontend, ServiceLB
from .pods import set_pod_mtu
from .vxlan import NTF_SELF, NUD_PERMANENT, VxlanSpec

K = TypeVar("K")
V = TypeVar("V")


class Target(Protocol[K, V]):
    kind: str

    def read(self) -> Mapping[K, V]: ...

    def update(self, key: K, want: V) -> None: ...

    def delete(self, key: K, have: V) -> None: ...


def _nl(what: str, e: NetlinkError) -> TunnelError:
    return TunnelError(f"{what}: {e.args[1] if len(e.args) > 1 else e}", e.code)


def _index(ipr: IPRoute, name: str) -> int:
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        raise DeviceNotFound(f"{name}: no such interface")
    return int(idx[0])


class RouteTarget:
    """Routes wiremesh owns (protocol 87, main table) via `devices`, keyed by destination CIDR."""

    kind = "route"

    def __init__(self, devices: Iterable[str]) -> None:
        self.devices = tuple(devices)

    def read(self) -> dict[str, Route]:
        with IPRoute() as ipr:
            return links._owned_routes(ipr, links._indexes(ipr, self.devices))  # noqa: SLF001 - same package

    def update(self, key: str, want: Route) -> None:
        with IPRoute() as ipr:
            kw: dict[str, object] = {"dst": key, "oif": _index(ipr, want.ifname), "proto": RTPROT_WIREMESH,
                                     "table": MAIN_TABLE}
            if want.via:
                kw.update(gateway=want.via, flags=RTNH_F_ONLINK)
            try:
                ipr.route("replace", **kw)  # a destination that moves device or gateway: one step
            except NetlinkError as e:
                raise _nl(f"{want.ifname}: route {key}{' via ' + want.via if want.via else ''}", e) from e

    def delete(self, key: str, have: Route) -> None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=have.ifname)
            if not idx:
                return  # the device went, and its routes with it
            try:
                ipr.route("del", dst=key, oif=idx[0], proto=RTPROT_WIREMESH, table=MAIN_TABLE)
            except NetlinkError as e:
                if e.code not in (errno.ESRCH, errno.ENOENT, errno.ENODEV):
                    raise _nl(f"{have.ifname}: delete route {key}", e) from e


class FdbTarget:
    """A VXLAN device's unicast FDB entries: VTEP MAC -> remote VTEP address."""

    kind = "fdb"

    def __init__(self, device: str) -> None:
        self.device = device

    def read(self) -> dict[str, str]:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.device)
            if not idx:
                return {}
            have: dict[str, str] = {}
            for e in ipr.fdb("dump", ifindex=idx[0]):
                mac, dst = e.get_attr("NDA_LLADDR"), e.get_attr("NDA_DST")
                if e.get("ifindex") == idx[0] and mac and dst:
                    have[mac] = dst
            return have

    def update(self, key: str, want: str) -> None:
        with IPRoute() as ipr:
            try:
                ipr.fdb("replace", ifindex=_index(ipr, self.device), lladdr=key, dst=want, state=NUD_PERMANENT,
                        flags=NTF_SELF)
            except NetlinkError as e:
                raise _nl(f"{self.device}: fdb {key} dst {want}", e) from e

    def delete(self, key: str, have: str) -> None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.device)
            if not idx:
                return
            try:
                ipr.fdb("del", ifindex=idx[0], lladdr=key, dst=have, flags=NTF_SELF)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV):
                    raise _nl(f"{self.device}: delete fdb {key}", e) from e


class NeighbourTarget:
    """A VXLAN device's permanent neighbour entries: remote gateway address -> VTEP MAC."""

    kind = "neighbour"

    def __init__(self, device: str) -> None:
        self.device = device

    def read(self) -> dict[str, str]:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.device)
            if not idx:
                return {}
            return {n.get_attr("NDA_DST"): n.get_attr("NDA_LLADDR") for n in ipr.neigh("dump", ifindex=idx[0])
                    if n.get("ifindex") == idx[0] and n["state"] & NUD_PERMANENT}

    def update(self, key: str, want: str) -> None:
        with IPRoute() as ipr:
            try:
                ipr.neigh("replace", ifindex=_index(ipr, self.device), dst=key, lladdr=want, state=NUD_PERMANENT)
            except NetlinkError as e:
                raise _nl(f"{self.device}: neighbour {key} lladdr {want}", e) from e

    def delete(self, key: str, have: str) -> None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.device)
            if not idx:
                return
            try:
                ipr.neigh("del", ifindex=idx[0], dst=key)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV):
                    raise _nl(f"{self.device}: delete neighbour {key}", e) from e


class VxlanTarget:
    """The VXLAN device itself, keyed by name; `read` reports it as its spec, exactly as it is."""

    kind = "vxlan"

    def __init__(self, name: str) -> None:
        self.name = name

    def read(self) -> dict[str, VxlanSpec]:
        spec = vxlan.read_vxlan(self.name)
        return {self.name: spec} if spec is not None else {}

    def update(self, key: str, want: VxlanSpec) -> None:
        vxlan.ensure_vxlan(want)

    def delete(self, key: str, have: VxlanSpec) -> None:
        vxlan.delete_vxlan(key)


class MtuTarget:
    """Interface MTUs, keyed by interface name; interfaces that do not exist are not read."""

    kind = "mtu"

    def __init__(self, ifnames: Iterable[str]) -> None:
        self.ifnames = tuple(ifnames)

    def read(self) -> dict[str, int]:
        return {n: links.link_mtu(n) for n in self.ifnames if links.link_exists(n)}

    def update(self, key: str, want: int) -> None:
        links.set_mtu(key, want)

    def delete(self, key: str, have: int) -> None:
        pass  # an MTU is never removed; an interface nobody wants goes with its own target


class ServiceTarget:
    """The service load balancer's frontends (eBPF maps), keyed by Frontend.

    `read` reports the maps as they are on a fresh read (`fresh`, set by the caller on full
    passes and the first one) and as last written otherwise: reading 10 000 frontends back
    costs a third of a second, writing one costs microseconds.
    """

    kind = "service"

    def __init__(self, lb: ServiceLB) -> None:
        self.lb = lb
        self.fresh = True

    def read(self) -> dict[Frontend, tuple[LBBackend, ...]]:
        entries = self.lb.read() if self.fresh else self.lb.table.snapshot()
        self.fresh = False
        return {fe: tuple(e.backends) for fe, e in entries.items()}

    def update(self, key: Frontend, want: tuple[LBBackend, ...]) -> None:
        self.lb.update(key, want)

    def delete(self, key: Frontend, have: tuple[LBBackend, ...]) -> None:
        self.lb.delete(key)


class PodMtuTarget:
    """The MTU of every pod's veth (both ends), keyed "pods": one value for all of them.

    Pods come and go between passes, so `read` reports nothing and every update hands the MTU to
    every pod `pods()` lists (netns, container id, ifname); each end is changed only if it
    differs. A pod that went away meanwhile is skipped; one the kernel refuses fails the update.
    """

    kind = "pod-mtu"

    def __init__(self, pods: Callable[[], Iterable[tuple[str, str, str]]]) -> None:
        self.pods = pods
        self.changed = 0  # pod interfaces changed by the last update

    def read(self) -> dict[str, int]:
        return {}

    def update(self, key: str, want: int) -> None:
        self.changed = 0
        failed: list[str] = []
        for netns, container_id, ifname in self.pods():
            try:
                self.changed += set_pod_mtu(netns, container_id, ifname, want)
            except TunnelError as e:
                failed.append(f"{container_id[:12]}/{ifname}: {e}")
            except OSError as e:  # its network namespace went with the pod meanwhile: nothing to set
                if e.errno not in (errno.ENOENT, errno.EINVAL):
                    failed.append(f"{container_id[:12]}/{ifname}: {e.strerror or e}")
        if failed:
            raise TunnelError(f"pod MTU {want} not set on {len(failed)} pod(s): {'; '.join(failed[:3])}")

    def delete(self, key: str, have: int) -> None:
        pass  # an MTU is never removed
