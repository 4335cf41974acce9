"""`wiremesh cluster`: cluster configs in Consul."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import click

from wiremesh.clustermesh import ROUTING_MODES, ClusterConfig, ConsulStore, InvalidRecord, init_cluster, load_cluster_config

from .output import Ctx, emit, info
from .view import collect


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """Seconds, written as a number of seconds or with a unit: 90m, 12h, 30d, 2w."""
    text = value.strip().lower()
    unit = _UNITS.get(text[-1:], 0) if text else 0
    number = text[:-1] if unit else text
    if not re.fullmatch(r"[0-9]{1,12}", number):
        raise click.BadParameter(f"{value!r} is not a duration (seconds, or a number with s, m, h, d or w: 30d)")
    return int(number) * (unit or 1)


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
@click.option("--mtu", type=int, default=0, show_default=True, help="Pod MTU; 0 derives it on each node from its underlay (WireGuard 80 bytes, VXLAN 50 more).")
@click.option("--rotate-every", callback=_duration, default="0", show_default=True, metavar="DURATION",
              help="Rotate each node's WireGuard key this often, e.g. 30d, 12h, 3600 (seconds); 0 never. "
                   "An hour to a year.")
@click.option("--signing-key", "signing_key_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A new cluster's signing key file, created 0600 if absent; its nodes' records must be signed "
                   "[default: ~/.config/wiremesh/signing/NAME.key].")
@click.option("--unsigned", is_flag=True, help="A new cluster that accepts unsigned records (no signing key).")
@click.option("--force", is_flag=True, help="Update an existing cluster whose settings differ.")
@click.pass_obj
def init(ctx: Ctx, name: str, cluster_id: int, pod_cidr: str, node_prefix_len: int, service_cidr: str,
         routing: str, vni: int, wg_port: int, mtu: int, rotate_every: int, signing_key_path: Path | None,
         unsigned: bool, force: bool) -> None:
    """Write cluster NAME's config to Consul (idempotent: the same settings again change nothing).

    A new cluster gets a signing key and refuses unsigned records (enroll its nodes with
    `wiremesh node enroll`); an existing one keeps its signing settings."""
    try:
        cfg = ClusterConfig(name=name, id=cluster_id, pod_cidr=pod_cidr, node_prefix_len=node_prefix_len,
                            service_cidr=service_cidr, routing=routing, vni=vni, wg_port=wg_port, mtu=mtu,
                            rotate_every=rotate_every)
    except InvalidRecord as e:
        raise click.BadParameter(e.reason, param_hint=f"--{e.field.replace('_', '-')}" if e.field != "name" else "NAME") from None
    store = ConsulStore(ctx.consul)
    cfg = _signing(store, cfg, signing_key_path, unsigned)
    result = init_cluster(store, cfg, force=force)
    info(f"cluster {name}: {result}")
    emit(ctx, {"result": result, "config": json.loads(cfg.to_json())},
         ["cluster", "id", "pod cidr", "node prefix", "routing", "result"],
         [[name, cluster_id, pod_cidr, f"/{node_prefix_len}", routing, result]])


def _signing(store: ConsulStore, cfg: ClusterConfig, key_path: Path | None, unsigned: bool) -> ClusterConfig:
    """`cfg` with its signing settings: the stored config's, or for a new cluster a signing key's."""
    from wiremesh.clustermesh import default_signing_key_path, layout, sign_settings
    from wiremesh.keys import load_or_generate_signing_key

    item = store.get(layout.config_key(cfg.name))
    if item is not None:
        try:
            cur = ClusterConfig.from_json(item.value)
        except InvalidRecord:
            return cfg
        return dataclasses.replace(cfg, require_signed=cur.require_signed, signing_key=cur.signing_key,
                                   revoked=cur.revoked, next_signing_key=cur.next_signing_key,
                                   signing_serial=cur.signing_serial, settings_signatures=cur.settings_signatures)
    if unsigned:
        return cfg
    path = key_path or default_signing_key_path(cfg.name)
    key, created = load_or_generate_signing_key(path)
    info(f"{'created' if created else 'using'} signing key {path} (keep it safe: `wiremesh node enroll` needs it)")
    return sign_settings(dataclasses.replace(cfg, require_signed=True, signing_key=key.public_key().base64), [key])


@cluster.command("show")
@click.argument("name")
@click.pass_obj
def show(ctx: Ctx, name: str) -> None:
    """Print cluster NAME's config."""
    cfg = load_cluster_config(ConsulStore(ctx.consul), name)
    d = json.loads(cfg.to_json())  # what Consul holds (unknown fields of newer agents too)
    emit(ctx, d, ["field", "value"], [[k, v] for k, v in d.items()])


@cluster.command("list")
@click.pass_obj
def list_(ctx: Ctx) -> None:
    """Clusters known to the local Consul: its own and every member of the mesh."""
    views, refused = collect(ConsulStore(ctx.consul))
    rows, data = [], []
    for v in views:
        cfg = v.snapshot.config if v.snapshot else None
        source = v.member or cfg
        d = {"cluster": v.name, "id": source.id if source else None,
             "datacenter": v.member.datacenter if v.member else "local",
             "pod_cidr": source.pod_cidr if source else None, "routing": cfg.routing if cfg else None,
             "member": v.member is not None}
        data.append(d)
        rows.append([d["cluster"], d["id"] or "-", d["datacenter"], d["pod_cidr"] or "-", d["routing"] or "?",
                     "yes" if d["member"] else "no"])
    for r in refused:
        info(f"warning: refused mesh record {r.key}: {r.reason}")
    emit(ctx, {"clusters": data, "refused": [{"key": r.key, "reason": r.reason} for r in refused]},
         ["cluster", "id", "datacenter", "pod cidr", "routing", "mesh member"], rows)


@cluster.command("status")
@click.option("-i", "--interface", default="wm0", show_default=True, help="Local WireGuard device, on a node.")
@click.pass_obj
def status_(ctx: Ctx, interface: str) -> None:
    """Per cluster: id, pod CIDR, nodes, reachability and, on a node, tunnels up to its nodes."""
    import time

    from .status import _local_device

    views, _ = collect(ConsulStore(ctx.consul))
    device = _local_device(interface)
    now = time.time()
    rows, data = [], []
    for v in views:
        nodes = v.snapshot.nodes if v.snapshot else {}
        keys = {r.public_key for r in nodes.values()} - {device.public_key if device else None}
        up = None
        if device is not None:
            up = sum(1 for k, p in device.peers.items() if k in keys and p.latest_handshake and now - p.latest_handshake < 180)
        d = {"cluster": v.name, "datacenter": v.member.datacenter if v.member else "local",
             "id": v.member.id if v.member else (v.snapshot.config.id if v.snapshot and v.snapshot.config else None),
             "pod_cidr": v.member.pod_cidr if v.member else (v.snapshot.config.pod_cidr if v.snapshot and v.snapshot.config else None),
             "reachable": v.snapshot is not None, "error": v.error, "nodes": len(nodes),
             "invalid_records": len(v.snapshot.rejected) if v.snapshot else None, "tunnels_up": up}
        data.append(d)
        rows.append([v.name, d["id"] or "-", d["datacenter"], d["pod_cidr"] or "-", "yes" if d["reachable"] else "NO",
                     d["nodes"], "-" if up is None else f"{up}/{len(keys)}"])
    emit(ctx, {"clusters": data}, ["cluster", "id", "datacenter", "pod cidr", "reachable", "nodes", "tunnels up"], rows)


@cluster.command("release")
@click.argument("name")
@click.argument("node")
@click.option("--force", is_flag=True, help="Release even while the node's record is live (it will be refused).")
@click.pass_obj
def release(ctx: Ctx, name: str, node: str, force: bool) -> None:
    """Give back NODE's pod-CIDR lease in cluster NAME, for a node removed for good.

    A node keeps its lease across restarts and absences; this frees it for another node.
    Refused while NODE still has a live record, unless --force.
    """
    from wiremesh.clustermesh import check_node_name, layout, release_pod_cidr

    try:
        check_node_name(node, "NODE")
    except InvalidRecord as e:
        raise click.BadParameter(e.reason, param_hint="NODE") from None
    store = ConsulStore(ctx.consul)
    live = store.get(layout.node_key(name, node))
    if live is not None and live.session and not force:
        raise InvalidRecord("NODE", f"{node} is still registered in cluster {name} (its agent runs); stop it "
                                    "first, or pass --force")
    released = release_pod_cidr(store, name, node)
    info(f"{node}: {'released ' + ', '.join(released) if released else 'held no lease'}")
    emit(ctx, {"cluster": name, "node": node, "released": released}, ["cluster", "node", "released"],
         [[name, node, ", ".join(released) or "-"]])


def _signing_commands() -> None:
    from .signing_cmd import require_signed, roll_signing_key, signing_key

    cluster.add_command(signing_key)
    cluster.add_command(require_signed)
    cluster.add_command(roll_signing_key)


_signing_commands()
