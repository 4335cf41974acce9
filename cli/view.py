"""What the status commands show: every cluster's nodes, local and federated, read from Consul."""

from __future__ import annotations

from dataclasses import dataclass

from wiremesh.clustermesh import ClusterSnapshot, ConsulError, ConsulStore, MeshMember, Rejected, layout, parse_cluster, parse_mesh
from wiremesh.clustermesh import KVItem


@dataclass
class ClusterView:
    name: str
    datacenter: str | None  # None: the local datacenter
    member: MeshMember | None
    snapshot: ClusterSnapshot | None
    items: dict[str, KVItem]
    error: str | None = None


def collect(store: ConsulStore, only: str | None = None) -> tuple[list[ClusterView], tuple[Rejected, ...]]:
    """Clusters in the local datacenter plus every mesh member, each with its validated snapshot.

    A member whose Consul cannot be reached is listed with the error instead of failing the
    whole command; the local Consul being down is an error (ConsulUnavailable) as usual.
    """
    _, local = store.list(f"{layout.ROOT}/")
    mesh = parse_mesh({k: v for k, v in local.items() if k.startswith(layout.mesh_prefix())})
    names = sorted({k.split("/")[3] for k in local if k.startswith(f"{layout.ROOT}/clusters/") and k.count("/") >= 4})
    views: list[ClusterView] = []
    for name in sorted(set(names) | set(mesh.members)):
        if only and name != only:
            continue
        member = mesh.members.get(name)
        pfx = layout.cluster_prefix(name)
        if name in names:
            items = {k: v for k, v in local.items() if k.startswith(pfx)}
            views.append(ClusterView(name, None, member, parse_cluster(name, 0, items), items))
            continue
        assert member is not None
        try:
            _, items = store.list(pfx, dc=member.datacenter)
            views.append(ClusterView(name, member.datacenter, member, parse_cluster(name, 0, items), items))
        except ConsulError as e:
            views.append(ClusterView(name, member.datacenter, member, None, {}, str(e)))
    return views, mesh.refused
