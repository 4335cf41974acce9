"""`wiremesh policy`: network policies (who may talk to whom, by labels, CIDRs and clusters)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import yaml

from wiremesh.clustermesh import (
    ConsulStore,
    FlowEnd,
    default_signing_key_path,
    InvalidRecord,
    Policy,
    flow,
    layout,
    load_cluster_config,
    parse_mesh,
    parse_policy,
    sign_policy,
)
from wiremesh.errors import WiremeshError
from wiremesh.keys import read_signing_key

from .operator_key import SIGNING_KEY_OPTION, operator_key
from .output import Ctx, emit, info
from .target import CONFIG_OPTION, target

CLUSTER_OPTION = click.option("--cluster", "cluster_name", default=None,
                              help="The cluster the policy belongs to (default: the agent.toml's).")
MESH_OPTION = click.option("--mesh", is_flag=True,
                           help="Mesh-wide: the policy selects endpoints of every cluster (written into every "
                                "member cluster's Consul).")
MAX_FILE_BYTES = 1 << 20


@click.group()
def policy() -> None:
    """Network policies: which endpoints may talk to which, by labels (Calico's selector syntax),
    CIDRs and clusters, enforced in the kernel on each pod's veth.

    \b
    wiremesh policy apply -f api.yaml --cluster west     (or --mesh)
    wiremesh policy list
    wiremesh policy check --from 'app=frontend,cluster=east' --to 'app=api,cluster=west' --port 8080
    wiremesh policy delete api-from-frontend --cluster west

    \b
    A policy (YAML; several per file, separated by ---):
      name: api-from-frontend
      selector: app == "api"              # the endpoints it applies to
      order: 100                          # lower first
      ingress:
        - action: allow                   # allow | deny; the first matching rule wins
          from: {selector: app == "frontend"}
          ports: [{port: 8080, protocol: tcp}]
        - action: deny
    An endpoint selected by a policy in a direction is default-deny in that direction; replies of
    an allowed connection always pass.
    """


def read_documents(path: Path) -> list[Policy]:
    """The policies of a YAML file; InvalidRecord names the document and the field."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise InvalidRecord("file", f"over {MAX_FILE_BYTES} bytes", str(path))
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRecord("file", f"cannot be read ({getattr(e, 'strerror', None) or e})", str(path)) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise InvalidRecord("file", f"not YAML{at}: {getattr(e, 'problem', None) or e}", str(path)) from None
    if not docs:
        raise InvalidRecord("file", "holds no policy", str(path))
    out, names = [], set()
    for i, d in enumerate(docs):
        where = f"{path}" + (f" (document {i + 1})" if len(docs) > 1 else "")
        p = parse_policy(d, where, unknown_ok=False)
        if p.name in names:
            raise InvalidRecord("name", f"{p.name!r} appears twice in the file", where)
        names.add(p.name)
        out.append(p)
    return out


def _member_dcs(store: ConsulStore, local: str) -> dict[str, str | None]:
    """Every member cluster -> the datacenter to write into (None: the local one)."""
    _, items = store.list(layout.mesh_prefix())
    members = parse_mesh(items, local).members
    return {name: (None if name == local else m.datacenter) for name, m in members.items()} or {local: None}


def _write(store: ConsulStore, key: str, p: Policy, dc: str | None) -> str:
    current = store.get(key, dc=dc)
    value = p.to_json()
    if current is not None and current.value.decode("utf-8", "replace") == value:
        return "unchanged"
    ok = store.put(key, value, cas=current.modify_index if current is not None else 0, dc=dc)
    if not ok:
        raise WiremeshError(f"policy {p.name!r}: written by someone else meanwhile; run again")
    return "created" if current is None else "updated"


@policy.command("apply")
@click.option("-f", "--file", "path", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True,
              help="A YAML file of policies (several documents separated by ---).")
@MESH_OPTION
@CLUSTER_OPTION
@SIGNING_KEY_OPTION
@CONFIG_OPTION
@click.pass_obj
def apply(ctx: Ctx, path: Path, mesh: bool, cluster_name: str | None, signing_key_path: Path | None,
          config_path: Path | None) -> None:
    """Create or update the policies of FILE (idempotent). Every policy of the file is checked
    before anything is written: a mistake writes nothing. With --mesh each member cluster's copy
    is signed with that cluster's key, looked for beside --signing-key's file and in
    ~/.config/wiremesh/signing/ (matched by its public key)."""
    try:
        policies = read_documents(path)
    except InvalidRecord as e:
        raise click.BadParameter(f"{e}", param_hint="-f") from None
    store, cluster_name = target(ctx, cluster_name, config_path)
    places = _member_dcs(store, cluster_name) if mesh else {cluster_name: None}
    rows, out = [], []
    for cluster, dc in sorted(places.items()):
        config = load_cluster_config(store, cluster) if dc is None else _remote_config(store, cluster, dc)
        signer = operator_key(config, _key_for(config, signing_key_path) if cluster != cluster_name else signing_key_path,
                              "policies")
        for p in policies:
            stored = replace(p, cluster="" if mesh else cluster)
            if signer is not None:
                stored = sign_policy(stored, signer)
            key = layout.mesh_policy_key(cluster, p.name) if mesh else layout.policy_key(cluster, p.name)
            result = _write(store, key, stored, dc)
            scope = f"mesh (in {cluster})" if mesh else cluster
            info(f"policy {p.name}: {result} for {scope}")
            rows.append([p.name, "mesh" if mesh else cluster, cluster, result])
            out.append({"policy": p.name, "scope": "mesh" if mesh else cluster, "written_in": cluster,
                        "result": result, "signed": bool(stored.signature)})
    emit(ctx, {"policies": out}, ["policy", "scope", "written in", "result"], rows)


def _key_for(config: Any, given: Path | None) -> Path | None:
    """Another member cluster's signing key for `--mesh`: a key file beside the given one (or in
    the default directory) whose public key is that cluster's; None: none found (operator_key
    then refuses where the cluster requires signatures, or writes unsigned)."""
    if config is None or not config.signing_key:
        return None
    want = config.signing_key
    default = default_signing_key_path(config.name)
    places = ([given, *sorted(given.parent.glob("*.key"))] if given is not None else []) + [default]
    for path in places:
        try:
            if path.is_file() and read_signing_key(path).public_key().base64 == want:
                return path
        except (OSError, ValueError, WiremeshError):
            continue
    return None


def _remote_config(store: ConsulStore, cluster: str, dc: str) -> Any:
    from wiremesh.clustermesh import ClusterConfig
    item = store.get(layout.config_key(cluster), dc=dc)
    if item is None:
        raise WiremeshError(f"cluster {cluster!r} (datacenter {dc}) has no config")
    return ClusterConfig.from_json(item.value, layout.config_key(cluster))


def stored_policies(store: ConsulStore, cluster: str, dc: str | None = None) -> tuple[list[Policy], list[tuple[str, str]]]:
    """The policies an agent of `cluster` follows (its cluster's and the mesh's, as its own Consul
    holds them: `dc`), and the records it skips (key, reason)."""
    good: list[Policy] = []
    bad: list[tuple[str, str]] = []
    for prefix in (layout.policies_prefix(cluster), layout.mesh_policies_prefix(cluster)):
        _, items = store.list(prefix, dc=dc)
        for key, item in sorted(items.items()):
            try:
                p = Policy.from_json(item.value, key)
            except InvalidRecord as e:
                bad.append((key, e.reason if e.field == "value" else f"{e.field}: {e.reason}"))
                continue
            good.append(p)
    return good, bad


@policy.command("list")
@CLUSTER_OPTION
@CONFIG_OPTION
@click.pass_obj
def list_(ctx: Ctx, cluster_name: str | None, config_path: Path | None) -> None:
    """The policies a cluster's agents follow (the cluster's own and the mesh-wide ones), in the
    order they are evaluated."""
    store, cluster_name = target(ctx, cluster_name, config_path)
    good, bad = stored_policies(store, cluster_name)
    for key, reason in bad:
        info(f"warning: skipped invalid policy {key}: {reason}")
    good.sort(key=lambda p: (p.order, p.name, p.cluster))
    rows = [[p.name, p.cluster or "mesh", p.order, str(p.selector),
             ",".join(d for d in ("ingress", "egress") if p.applies(d)), len(p.ingress), len(p.egress),
             "yes" if p.signature else "no"] for p in good]
    emit(ctx, {"policies": [{**p.as_dict(), "signed": bool(p.signature)} for p in good],
               "invalid": [{"key": k, "reason": r} for k, r in bad]},
         ["policy", "scope", "order", "selector", "applies to", "ingress rules", "egress rules", "signed"], rows)


@policy.command("delete")
@click.argument("name")
@MESH_OPTION
@CLUSTER_OPTION
@CONFIG_OPTION
@click.pass_obj
def delete(ctx: Ctx, name: str, mesh: bool, cluster_name: str | None, config_path: Path | None) -> None:
    """Remove policy NAME (already gone is fine)."""
    store, cluster_name = target(ctx, cluster_name, config_path)
    places = _member_dcs(store, cluster_name) if mesh else {cluster_name: None}
    out = []
    for cluster, dc in sorted(places.items()):
        key = layout.mesh_policy_key(cluster, name) if mesh else layout.policy_key(cluster, name)
        existed = store.get(key, dc=dc) is not None
        store.delete(key, dc=dc)
        result = "deleted" if existed else "not defined"
        info(f"policy {name}: {result} {'(mesh) ' if mesh else ''}in cluster {cluster}")
        out.append({"policy": name, "cluster": cluster, "result": result})
    if ctx.json:
        emit(ctx, {"policies": out})


def _labels(text: str, hint: str) -> dict[str, str]:
    out = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        k, eq, v = part.partition("=")
        if not eq or not k.strip():
            raise click.BadParameter(f"{part!r} is not KEY=VALUE", param_hint=hint)
        out[k.strip()] = v.strip()
    return out


def _end(text: str, hint: str, default_cluster: str) -> FlowEnd:
    """'app=api,cluster=west' (labels; `cluster` names its cluster) or an IP (no endpoint)."""
    if text and all(c.isdigit() or c == "." for c in text):
        return FlowEnd(text, "", None)
    labels = _labels(text, hint)
    return FlowEnd("0.0.0.0", labels.get("cluster", default_cluster), labels)


@policy.command("check")
@click.option("--from", "src", required=True, metavar="LABELS|IP", help="The client: KEY=VALUE,... labels "
              "(`cluster=` names its cluster) or the IP of something that is not an endpoint.")
@click.option("--to", "dst", required=True, metavar="LABELS|IP", help="The server, the same way.")
@click.option("--port", type=click.IntRange(0, 65535), required=True)
@click.option("--protocol", type=click.Choice(["tcp", "udp", "icmp"]), default="tcp", show_default=True)
@CLUSTER_OPTION
@CONFIG_OPTION
@click.pass_obj
def check(ctx: Ctx, src: str, dst: str, port: int, protocol: str, cluster_name: str | None,
          config_path: Path | None) -> None:
    """Would a new connection pass? The client's egress and the server's ingress, each with the
    rule that decides it (the policies the two clusters' agents follow). Exits 1 for deny."""
    store, cluster_name = target(ctx, cluster_name, config_path)
    a, b = _end(src, "--from", cluster_name), _end(dst, "--to", cluster_name)
    dcs = _member_dcs(store, cluster_name)
    policies: list[Policy] = []
    for c in sorted({e.cluster for e in (a, b) if e.labels is not None}):
        if c not in dcs:
            raise click.BadParameter(f"cluster {c!r} is not a member of the mesh", param_hint="--from/--to")
        policies.extend(stored_policies(store, c, dcs[c])[0])
    v = flow(_dedupe(policies), a, b, protocol, port)
    verdict = "allow" if v.allowed else "deny"
    lines = {"egress": v.egress.describe("egress"), "ingress": v.ingress.describe("ingress")}
    info(f"{verdict}: client egress: {lines['egress']}; server ingress: {lines['ingress']}")
    emit(ctx, {"verdict": verdict, "egress": lines["egress"], "ingress": lines["ingress"],
               "from": src, "to": dst, "port": port, "protocol": protocol},
         ["verdict", "client egress", "server ingress"], [[verdict, lines["egress"], lines["ingress"]]])
    if not v.allowed:
        raise SystemExit(1)


def _dedupe(policies: Iterable[Policy]) -> list[Policy]:
    seen: dict[tuple[str, str], Policy] = {}
    for p in policies:
        seen.setdefault((p.cluster, p.name), p)
    return list(seen.values())
