"""`wiremesh cluster`: cluster configs in Consul."""

from __future__ import annotations

import click

from clustermesh import ROUTING_MODES, ClusterConfig, ConsulStore, InvalidRecord, init_cluster, load_cluster_config

from .output import Ctx, emit, info


@click.group()
def cluster() -> None:
    """Create and inspect cluster configs stored in Consul."""


@cluster.command("init")
@click.argument("name")
@click.option("--id", "cluster_id", type=int, required=True, help="Cluster id, 1-255, unique in a mesh.")
@click.option("--pod-cidr", required=True, help="The cluster's pod range, e.g. 10.240.0.0/16.")
@click.option("--node-prefix-len", type=int, default=24, show_default=True, help="Size of each node's pod CIDR.")
@click.option("--service-cidr", default="10.96.0.0/16", show_default=True, help="Virtual IPs of services.")
@click.option("--routing", type=click.Choice(ROUTING_MODES), default="wireguard", show_default=True)
@click.option("--vni", type=int, default=1, show_default=True, help="VXLAN network id (vxlan routing).")
@click.option("--wg-port", type=int, default=51820, show_default=True, help="WireGuard UDP port of the nodes.")
@click.option("--mtu", type=int, default=0, show_default=True, help="Tunnel MTU; 0 derives it from the underlay.")
@click.option("--force", is_flag=True, help="Update an existing cluster whose settings differ.")
@click.pass_obj
def init(ctx: Ctx, name: str, cluster_id: int, pod_cidr: str, node_prefix_len: int, service_cidr: str,
         routing: str, vni: int, wg_port: int, mtu: int, force: bool) -> None:
    """Write cluster NAME's config to Consul (idempotent: the same settings again change nothing)."""
    try:
        cfg = ClusterConfig(name=name, id=cluster_id, pod_cidr=pod_cidr, node_prefix_len=node_prefix_len,
                            service_cidr=service_cidr, routing=routing, vni=vni, wg_port=wg_port, mtu=mtu)
    except InvalidRecord as e:
        raise click.BadParameter(e.reason, param_hint=f"--{e.field.replace('_', '-')}" if e.field != "name" else "NAME") from None
    result = init_cluster(ConsulStore(ctx.consul), cfg, force=force)
    info(f"cluster {name}: {result}")
    emit(ctx, {"result": result, "config": _asdict(cfg)},
         ["cluster", "id", "pod cidr", "node prefix", "routing", "result"],
         [[name, cluster_id, pod_cidr, f"/{node_prefix_len}", routing, result]])


def _asdict(cfg: ClusterConfig) -> dict[str, object]:
    import json

    return json.loads(cfg.to_json())  # type: ignore[no-any-return]


@cluster.command("show")
@click.argument("name")
@click.pass_obj
def show(ctx: Ctx, name: str) -> None:
    """Print cluster NAME's config."""
    cfg = load_cluster_config(ConsulStore(ctx.consul), name)
    d = _asdict(cfg)
    emit(ctx, d, ["field", "value"], [[k, v] for k, v in d.items()])
