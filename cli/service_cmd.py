"""`wiremesh service`: global services (a VIP whose backends are Consul catalog instances in any cluster)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from wiremesh.clustermesh import ConsulError, ConsulStore, InvalidRecord, default_signing_key_path, layout, load_cluster_config
from wiremesh.clustermesh import (
    AFFINITIES,
    PROTOCOLS,
    ClusterBackends,
    ServiceDef,
    ServicePort,
    allocate_vip,
    check_service_name,
    check_vip,
    select_backends,
    sign_service,
)
from wiremesh.errors import WiremeshError

from wiremesh.agent import admitted, backends_of, certified_places, load_config
from .operator_key import SIGNING_KEY_OPTION, operator_key
from .output import Ctx, emit, info
from .target import CONFIG_OPTION, target
from .view import collect

CLUSTER_OPTION = click.option("--cluster", "cluster_name", default=None,
                              help="The cluster that defines the service (default: the agent.toml's).")


def _port(text: str) -> ServicePort:
    """'80', '80/tcp', '53/udp', '80:8080/tcp' (frontend:target)."""
    spec, _, proto = text.partition("/")
    front, _, target = spec.partition(":")
    try:
        p = ServicePort(int(front), proto or "tcp", int(target) if target else 0)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not PORT[:TARGET][/tcp|udp]", param_hint="--port") from None
    if not 1 <= p.port <= 65535 or not 0 <= p.target_port <= 65535:
        raise click.BadParameter(f"{text!r}: ports are 1-65535", param_hint="--port")
    if p.protocol not in PROTOCOLS:
        raise click.BadParameter(f"{text!r}: protocol must be one of {', '.join(PROTOCOLS)}", param_hint="--port")
    return p


@click.group()
def service() -> None:
    """Global services: a virtual IP whose connections go, chosen in the kernel at connect time, to the
    healthy Consul catalog instances of the same name in any cluster of the mesh.

    \b
    wiremesh service create web --port 80 --affinity local --cluster east
    wiremesh service sign --all --cluster east   (before signatures are required)
    wiremesh service list
    wiremesh service inspect web     (on a node: what its eBPF maps hold)
    """


@service.command("create")
@click.argument("name")
@click.option("--port", "ports", multiple=True, required=True, metavar="PORT[:TARGET][/PROTO]",
              help="A frontend port (repeatable): 80, 53/udp, 80:8080/tcp (TARGET: the backends' port; "
                   "default: the port each instance registered in Consul).")
@click.option("--vip", default=None, help="The virtual IP (default: the lowest free one of the cluster's service CIDR).")
@click.option("--affinity", type=click.Choice(AFFINITIES), default="none", show_default=True,
              help="local: remote backends only while no local one is healthy; remote: the mirror; none: all.")
@click.option("--prefer", default="", metavar="C1,C2", help="Clusters in order of preference (overrides affinity).")
@click.option("--force", is_flag=True, help="Replace an existing definition that differs.")
@CLUSTER_OPTION
@SIGNING_KEY_OPTION
@CONFIG_OPTION
@click.pass_obj
def create(ctx: Ctx, name: str, ports: tuple[str, ...], vip: str | None, affinity: str, prefer: str, force: bool,
           cluster_name: str | None, signing_key_path: Path | None, config_path: Path | None) -> None:
    """Define global service NAME in a cluster (idempotent: the same definition again changes nothing).

    Signed with the cluster's signing key when it is at hand (required where the cluster requires
    signed records: its agents refuse an unsigned definition)."""
    try:
        check_service_name(name, "NAME")
    except InvalidRecord as e:
        raise click.BadParameter(e.reason, param_hint="NAME") from None
    store, cluster_name = target(ctx, cluster_name, config_path)
    config = load_cluster_config(store, cluster_name)
    _, items = store.list(layout.services_prefix(cluster_name))
    key = layout.service_key(cluster_name, name)
    current = items.get(key)
    taken: dict[str, str] = {}
    for k, item in sorted(items.items()):  # a VIP claimed twice is the first name's (as agents decide)
        try:
            if k != key:
                taken.setdefault(ServiceDef.from_json(item.value, k).vip, k.rsplit("/", 1)[1])
        except InvalidRecord:
            continue
    try:
        if vip is None:
            old = ServiceDef.from_json(current.value) if current else None
            vip = old.vip if old and old.vip not in taken else allocate_vip(config.service_cidr, list(taken))
        check_vip(vip, config.service_cidr)
        if vip in taken:
            raise InvalidRecord("vip", f"{vip} is already service {taken[vip]!r}'s")
        svc = ServiceDef(name, cluster_name, vip, tuple(_port(p) for p in ports), affinity,
                         tuple(c.strip() for c in prefer.split(",") if c.strip()))
    except InvalidRecord as e:
        raise click.BadParameter(e.reason, param_hint=f"--{e.field.split('[')[0].replace('_', '-')}") from None
    signer = operator_key(config, signing_key_path, "service definitions")
    if signer is not None:
        svc = sign_service(svc, signer)
    stored = _parsed(current.value) if current is not None else None
    if current is None:
        written = store.put(key, svc.to_json(), cas=0)
        result = "created" if written else "changed meanwhile"
    elif stored == svc and (signer is None or current.value.decode("utf-8", "replace") == svc.to_json()):
        result = "unchanged"
    elif stored == svc:  # the same definition, signed now (Ed25519 signatures are deterministic)
        result = "signed" if store.put(key, svc.to_json(), cas=current.modify_index) else "changed meanwhile"
    elif not force:
        raise WiremeshError(f"service {name!r} exists in cluster {cluster_name} with another definition; "
                            "pass --force to replace it")
    else:
        result = "updated" if store.put(key, svc.to_json(), cas=current.modify_index) else "changed meanwhile"
    if result == "changed meanwhile":
        raise WiremeshError(f"service {name!r}: written by someone else meanwhile; run again")
    info(f"service {name}: {result} in cluster {cluster_name}, VIP {svc.vip}")
    emit(ctx, {"result": result, "service": json.loads(svc.to_json())},
         ["service", "cluster", "vip", "ports", "affinity", "result"],
         [[name, cluster_name, svc.vip, _ports(svc), _policy(svc), result]])


def _parsed(value: bytes) -> ServiceDef | None:
    try:
        return ServiceDef.from_json(value)
    except InvalidRecord:
        return None


@service.command("sign")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--all", "all_names", is_flag=True, help="Every service the cluster defines.")
@CLUSTER_OPTION
@SIGNING_KEY_OPTION
@CONFIG_OPTION
@click.pass_obj
def sign(ctx: Ctx, names: tuple[str, ...], all_names: bool, cluster_name: str | None, signing_key_path: Path | None,
         config_path: Path | None) -> None:
    """Sign service NAMEs as they are defined, with the cluster's signing key: the step before
    `wiremesh cluster require-signed`, which makes agents refuse unsigned definitions."""
    if all_names == bool(names):
        raise click.UsageError("give NAMEs or --all (not both)")
    store, cluster_name = target(ctx, cluster_name, config_path)
    config = load_cluster_config(store, cluster_name)
    if not config.signing_key:
        err = WiremeshError(f"cluster {cluster_name!r} has no signing key to sign with")
        err.hint = f"first: wiremesh cluster signing-key {cluster_name} --create"
        raise err
    signer = operator_key(config, signing_key_path or _default_key(cluster_name), "service definitions")
    if signer is None:  # (operator_key refuses another cluster's key when one is named)
        raise WiremeshError(f"no signing key of cluster {cluster_name!r} to sign with")
    _, items = store.list(layout.services_prefix(cluster_name))
    keys = sorted(items) if all_names else [layout.service_key(cluster_name, n) for n in names]
    rows, out = [], []
    for key in keys:
        name = key.rsplit("/", 1)[1]
        item = items.get(key)
        if item is None:
            raise WiremeshError(f"service {name!r} is not defined in cluster {cluster_name}")
        try:
            svc = ServiceDef.from_json(item.value, key)
        except InvalidRecord as e:
            raise WiremeshError(f"service {name!r}: its definition is invalid ({e}); define it again with "
                                "`wiremesh service create --force`") from None
        signed = sign_service(svc, signer)
        if item.value.decode("utf-8", "replace") == signed.to_json():  # (Ed25519 signatures are deterministic)
            result = "unchanged"
        elif store.put(key, signed.to_json(), cas=item.modify_index):
            result = "signed"
        else:
            raise WiremeshError(f"service {name!r}: written by someone else meanwhile; run again")
        info(f"service {name}: {result} in cluster {cluster_name}")
        rows.append([name, cluster_name, result])
        out.append({"service": name, "cluster": cluster_name, "result": result})
    emit(ctx, {"services": out}, ["service", "cluster", "result"], rows)


def _default_key(cluster: str) -> Path:
    """Signing needs a key: where the operator keeps it when no --signing-key names one."""
    path = default_signing_key_path(cluster)
    if not path.exists():
        raise WiremeshError(f"no signing key at {path}: give the cluster's signing key file with --signing-key FILE "
                            "(or WIREMESH_SIGNING_KEY)")
    return path


@service.command("delete")
@click.argument("name")
@CLUSTER_OPTION
@CONFIG_OPTION
@click.pass_obj
def delete(ctx: Ctx, name: str, cluster_name: str | None, config_path: Path | None) -> None:
    """Remove global service NAME from a cluster (already gone is fine)."""
    store, cluster_name = target(ctx, cluster_name, config_path)
    key = layout.service_key(cluster_name, name)
    existed = store.get(key) is not None
    store.delete(key)
    info(f"service {name}: {'deleted' if existed else 'not defined'} in cluster {cluster_name}")


@service.command("list")
@CLUSTER_OPTION
@click.pass_obj
def list_(ctx: Ctx, cluster_name: str | None) -> None:
    """Every service with its VIP, ports, affinity, and its backends per cluster: health, and in use or not."""
    store = ConsulStore(ctx.consul)
    views, _ = collect(store, only=None)
    dcs = {v.name: v.datacenter for v in views}
    places = certified_places({v.name for v in views if v.snapshot and v.snapshot.config
                               and v.snapshot.config.require_signed},
                              {v.name: v.snapshot.nodes for v in views if v.snapshot})
    out: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    for v in views:
        if v.snapshot is None or (cluster_name and v.name != cluster_name) or v.datacenter is not None:
            continue  # services are defined per cluster, read through the local Consul
        for r in v.snapshot.rejected:
            if "/services/" in r.key:
                info(f"warning: skipped invalid service {r.key}: {r.reason}")
        for name, svc in sorted(v.snapshot.services.items()):
            per_cluster = _backends(store, name, dcs)
            # Signed clusters' backends count only where their certified nodes are (as agents decide).
            healthy = admitted(name, {c: ClusterBackends(tuple(b for b, ok in bs if ok))
                                      for c, bs in per_cluster.items()}, places, [])
            certified = {b for cb in admitted(name, {c: ClusterBackends(tuple(b for b, _ in bs))
                                                     for c, bs in per_cluster.items()}, places, []).values()
                         for b in cb.backends}
            used = set(select_backends(svc, v.name, healthy))
            backends = [{"cluster": c, "address": b.address, "port": b.port, "node": b.node, "healthy": ok,
                         "certified": b in certified, "in_use": b in used}
                        for c, bs in sorted(per_cluster.items()) for b, ok in bs]
            out.append({**json.loads(svc.to_json()), "backends": backends})
            shown = ", ".join(f"{b['cluster']}/{b['address']}:{b['port']}{'*' if b['in_use'] else ''}"
                              f"{'' if b['healthy'] else ' (critical)'}{'' if b['certified'] else ' (not certified)'}"
                              for b in backends) or "-"
            rows.append([name, v.name, svc.vip, _ports(svc), _policy(svc), shown])
    emit(ctx, {"services": out}, ["service", "cluster", "vip", "ports", "affinity", "backends (* in use)"], rows)


def _backends(store: ConsulStore, name: str, dcs: dict[str, str | None]) -> dict[str, list[tuple[Any, bool]]]:
    out: dict[str, list[tuple[Any, bool]]] = {}
    for cluster, dc in dcs.items():
        try:
            healthy = set(backends_of(cluster, store.health_service(name, passing=True, dc=dc)))
            every = backends_of(cluster, store.health_service(name, passing=False, dc=dc))
        except ConsulError as e:
            info(f"warning: health of {name} in cluster {cluster} unreadable: {e}")
            continue
        out[cluster] = [(b, b in healthy) for b in every]
    return out


def _ports(svc: ServiceDef) -> str:
    return ",".join(f"{p.port}{':' + str(p.target_port) if p.target_port else ''}/{p.protocol}" for p in svc.ports)


def _policy(svc: ServiceDef) -> str:
    return f"prefer {','.join(svc.prefer)}" if svc.prefer else svc.affinity


@service.command("inspect")
@click.argument("name")
@CONFIG_OPTION
@click.pass_obj
def inspect(ctx: Ctx, name: str, config_path: Path | None) -> None:
    """On a node: what its eBPF maps hold for service NAME (each frontend's backends, in slot order)."""
    if config_path is None:
        raise click.UsageError("inspect reads this node's maps: give -c agent.toml (or WIREMESH_AGENT_CONFIG)")
    cfg = load_config(config_path)
    from wiremesh.tunnels import read_pinned

    store = ConsulStore(cfg.consul if ctx.consul.address == type(ctx.consul)().address else ctx.consul)
    item = store.get(layout.service_key(cfg.cluster, name))
    if item is None:
        raise WiremeshError(f"service {name!r} is not defined in cluster {cfg.cluster}")
    svc = ServiceDef.from_json(item.value, item.key)
    try:
        held = read_pinned(cfg.pin_dir)
    except WiremeshError as e:
        raise WiremeshError(f"{cfg.pin_dir}: the service lookup's maps cannot be read ({e}); is the agent running "
                            "with service_cgroup set?") from e
    out, rows = [], []
    # Its own frontends only: a definition refused for claiming another service's VIP must not
    # show that service's frontend as its own.
    mine = {(p.port, p.protocol) for p in svc.ports}
    for fe, entry in sorted(held.items()):
        if str(fe.vip) != svc.vip or (fe.port, fe.proto) not in mine:
            continue
        backends = [{"slot": i + 1, "address": str(b.address), "port": b.port, "cluster_id": b.cluster_id}
                    for i, b in enumerate(entry.backends)]
        out.append({"frontend": str(fe), "service_id": entry.service_id, "backends": backends})
        rows.append([str(fe), entry.service_id, len(backends),
                     ", ".join(f"{b['address']}:{b['port']} (cluster {b['cluster_id']})" for b in backends) or "-"])
    if not out:
        info(f"warning: the maps of {cfg.node} hold no frontend of {name} ({svc.vip}) yet")
    emit(ctx, {"service": name, "node": cfg.node, "frontends": out}, ["frontend", "id", "count", "backends"], rows)
