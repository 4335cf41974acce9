"""`wiremesh endpoint`: the mesh's endpoints (pods) as network policy sees them."""

from __future__ import annotations

import click

from wiremesh.agent import identities_of
from wiremesh.clustermesh import ConsulStore

from .output import Ctx, emit, info
from .view import collect


@click.group()
def endpoint() -> None:
    """Endpoints: every node's pods as it publishes them (IP and labels), with the identity network
    policy gives them (one per cluster, node and label set)."""


@endpoint.command("list")
@click.option("--cluster", "cluster_name", default=None, help="Only this cluster's endpoints.")
@click.pass_obj
def list_(ctx: Ctx, cluster_name: str | None) -> None:
    """IP, cluster, node, labels and identity of every endpoint of the mesh (or of --cluster)."""
    views, _ = collect(ConsulStore(ctx.consul), only=cluster_name)
    found: list[tuple[str, str, str, dict[str, str]]] = []
    for v in views:
        if v.snapshot is None:
            info(f"warning: cluster {v.name}: {v.error or 'unreadable'}")
            continue
        for r in v.snapshot.rejected:
            if "/endpoints/" in r.key:
                info(f"warning: skipped {r.key}: {r.reason}")
        for node, rec in sorted(v.snapshot.endpoints.items()):
            for e in rec.endpoints:
                found.append((e.ip, v.name, node, {**e.labels, "cluster": v.name, "node": node}))
    ids = identities_of([(c, labels) for _, c, _, labels in found])
    rows, out = [], []
    for (ip, c, node, labels), ident in zip(found, ids):
        shown = ",".join(f"{k}={val}" for k, val in sorted(labels.items()) if k not in ("cluster", "node"))
        rows.append([ip, c, node, shown or "-", ident])
        out.append({"ip": ip, "cluster": c, "node": node, "labels": labels, "identity": ident})
    emit(ctx, {"endpoints": out}, ["ip", "cluster", "node", "labels", "identity"], rows)
