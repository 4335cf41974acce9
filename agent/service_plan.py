"""Global services -> the frontends and backends of this node's eBPF lookup (pure).

Each port of each service the local cluster defines is a frontend (VIP, port, protocol); its
backends are the catalog instances `select_backends` picks for the service's affinity, at the
port the definition names (or each instance's own). A frontend with a cluster whose health
has not been read yet (just after a start) is left exactly as the maps hold it: a restarted
agent must not empty a VIP it is about to fill again.

A cluster that requires signed records vouches for its backends too: one of its catalog
instances counts only if its address lies in the pod CIDR of one of its certified nodes, or is
such a node's own address (clustermesh.control.Certified); any other is left out, and named, so
that a stray catalog registration never captures a VIP. Unsigned clusters' backends all count.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from wiremesh.clustermesh import Certified, ClusterBackends, NodeRecord, ServiceDef, certified, select_backends
from wiremesh.tunnels import Backend as LBBackend
from wiremesh.tunnels import Frontend


@dataclass(frozen=True, slots=True)
class BackendsView:
    """Service backends' health as the pass sees it (agent.services gathers it)."""

    clusters: Mapping[str, Mapping[str, ClusterBackends]] = field(default_factory=dict)  # service -> cluster -> ..
    settled: Mapping[str, bool] = field(default_factory=dict)  # service -> every cluster answered (or stale)


@dataclass(frozen=True, slots=True)
class ServiceState:
    """What the lookup should hold: frontends with their backends, and those to leave alone."""

    frontends: Mapping[Frontend, tuple[LBBackend, ...]] = field(default_factory=dict)
    unsettled: frozenset[Frontend] = frozenset()
    skipped: tuple[str, ...] = ()


def certified_places(signed: Collection[str], nodes: Mapping[str, Mapping[str, NodeRecord]]) -> dict[str, Certified]:
    """Where each signed cluster's backends may be (cluster -> Certified), from its accepted records."""
    return {c: certified(nodes.get(c, {})) for c in signed}


def admitted(name: str, by_cluster: Mapping[str, ClusterBackends], places: Mapping[str, Certified],
             skipped: list[str]) -> dict[str, ClusterBackends]:
    """`by_cluster` without the backends their signed cluster does not vouch for (each named in `skipped`)."""
    out = dict(by_cluster)
    for c, cb in by_cluster.items():
        place = places.get(c)
        if place is None:
            continue
        kept = tuple(b for b in cb.backends if place.admits(b.address))
        if len(kept) != len(cb.backends):
            out[c] = ClusterBackends(kept, cb.stale)
            skipped.extend(f"{name} backend {c}/{b.address}: in no certified node's pod CIDR (nor a node's own "
                           f"address); instance {b.service_id or '?'} on Consul node {b.node or '?'}"
                           for b in cb.backends if b not in kept)
    return out


def plan_services(
    local: str,
    services: Mapping[str, ServiceDef],
    view: BackendsView,
    cluster_ids: Mapping[str, int],
    places: Mapping[str, Certified] | None = None,
) -> ServiceState:
    """Frontends and their backends for `services`, from the backends' health in `view`.

    `places`: signed clusters' certified places (certified_places); their other backends are left out."""
    backends, settled = view.clusters, view.settled
    frontends: dict[Frontend, tuple[LBBackend, ...]] = {}
    unsettled: set[Frontend] = set()
    skipped: list[str] = []
    for name in sorted(services):
        svc = services[name]
        fes = [Frontend(svc.vip, p.port, "udp" if p.protocol == "udp" else "tcp") for p in svc.ports]
        if not settled.get(name, False):
            unsettled.update(fes)
            continue
        chosen = select_backends(svc, local, admitted(name, backends.get(name, {}), places or {}, skipped))
        for fe, port in zip(fes, svc.ports):
            out: dict[tuple[str, int], LBBackend] = {}
            for b in chosen:
                target = port.target_port or b.port
                if target:
                    out.setdefault((b.address, target), LBBackend(b.address, target, cluster_ids.get(b.cluster, 0)))
            frontends[fe] = tuple(out.values())
            if not out and chosen:
                skipped.append(f"{name} {fe}: no backend has a port")
    return ServiceState(frontends, frozenset(unsettled), tuple(skipped))
