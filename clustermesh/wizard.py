"""The logic of `wiremesh setup`: answers -> checks against the live Consuls -> an apply plan.

Used alike by the interactive wizard (one question at a time, each checked as it is
answered), by `wiremesh setup --answers FILE --yes`, and by the lab. Nothing is written until
every check has passed; then each datacenter gets one Consul transaction (check-and-set on
every key it writes), and a failure in a later datacenter rolls the earlier ones back, so a
refused or failed setup leaves nothing half-applied.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import layout
from .consul_values import KVOp
from .errors import ClusterMeshError, ConsulError, ConsulReason, ConsulUnavailable, InvalidRecord, IPAMExhausted
from .federation import MeshMember
from .records import ROUTING_MODES, ClusterConfig, check_cluster_name, check_node_name
from .store import ConsulOptions, ConsulStore
from .tokens import InvalidToken, TokenFileError, check_private, check_token, write_token_file

MAX_ANSWERS_BYTES = 1024 * 1024
SUGGEST_FROM = ipaddress.ip_network("10.240.0.0/12")


class SetupError(ClusterMeshError):
    """A setup answer or check failed; `field` names the answer to change."""

    def __init__(self, field: str, reason: str, hint: str | None = None) -> None:
        self.field, self.reason = field, reason
        self.hint = hint
        super().__init__(f"{field}: {reason}")


@dataclass
class ClusterAnswer:
    consul: str
    name: str
    id: int
    pod_cidr: str
    datacenter: str | None = None
    token: str | None = None
    ca_file: str | None = None
    routing: str = "wireguard"
    mtu: int = 0
    node_prefix_len: int = 24
    acl_nodes: list[str] = field(default_factory=list)  # create an ACL token for each of these nodes
    # A new cluster's signing key file (created 0600 if absent; its records must then be signed),
    # unless `unsigned`. An existing cluster keeps the signing settings it has.
    signing_key_file: str | None = None
    unsigned: bool = False

    def options(self) -> ConsulOptions:
        return ConsulOptions(address=self.consul, token=self.token or None, ca_file=self.ca_file or None)

    def config(self) -> ClusterConfig:
        return ClusterConfig(name=self.name, id=self.id, pod_cidr=self.pod_cidr, node_prefix_len=self.node_prefix_len,
                             routing=self.routing, mtu=self.mtu)

    def __repr__(self) -> str:  # never print the token
        return f"ClusterAnswer(name={self.name!r}, consul={self.consul!r}, datacenter={self.datacenter!r})"


_ANSWER_FIELDS = {"consul": str, "name": str, "id": int, "pod_cidr": str, "datacenter": str, "token": str,
                  "ca_file": str, "routing": str, "mtu": int, "node_prefix_len": int, "acl_nodes": list,
                  "signing_key_file": str, "unsigned": bool}


def parse_answers(data: Any, src: str = "answers") -> list[ClusterAnswer]:
    """Validate an answers document: {"clusters": [{consul, name, id, pod_cidr, ...}, ...]}."""
    if not isinstance(data, dict) or set(data) - {"clusters"}:
        raise SetupError(src, "must be a mapping with one key, 'clusters'")
    clusters = data.get("clusters")
    if not isinstance(clusters, list) or not clusters:
        raise SetupError(f"{src}: clusters", "must be a non-empty list")
    out = []
    for i, c in enumerate(clusters):
        where = f"clusters[{i}]"
        if not isinstance(c, dict):
            raise SetupError(where, "must be a mapping")
        for k in c:
            if k not in _ANSWER_FIELDS:
                raise SetupError(f"{where}.{k}", "unknown field")
        for k in ("consul", "name", "id", "pod_cidr"):
            if k not in c:
                raise SetupError(f"{where}.{k}", "is required")
        for k, v in c.items():
            t = _ANSWER_FIELDS[k]
            if v is None and k in ("datacenter", "token", "ca_file", "signing_key_file"):
                continue
            if not isinstance(v, t) or (isinstance(v, bool) and t is not bool):
                raise SetupError(f"{where}.{k}", f"must be {t.__name__}, not {type(v).__name__}")
        if c.get("token"):
            try:
                check_token(c["token"], f"{where}.token")
            except InvalidToken as e:
                raise SetupError(e.source, e.reason, e.hint) from None
        out.append(ClusterAnswer(**c))
    for i, a in enumerate(out):
        check_static(a, out[:i], f"clusters[{i}]")
    return out


def load_answers(path: Path) -> list[ClusterAnswer]:
    """Read an answers file; one that holds a token must be 0600, like a token file."""
    import yaml

    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode  # the file read, not whatever the path names later
            text = f.read(MAX_ANSWERS_BYTES + 1).decode()
        if len(text) > MAX_ANSWERS_BYTES:
            raise SetupError(str(path), f"larger than {MAX_ANSWERS_BYTES // 1024} KiB: not an answers file")
        data = yaml.safe_load(text)
    except OSError as e:
        raise SetupError(str(path), e.strerror or str(e)) from None
    except yaml.YAMLError as e:
        raise SetupError(str(path), f"not YAML/JSON: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise SetupError(str(path), "not UTF-8 text") from None
    except RecursionError:
        raise SetupError(str(path), "not YAML/JSON: nested too deeply") from None
    answers = parse_answers(data, str(path))
    if any(a.token for a in answers):
        try:
            check_private(mode, f"answers file {path}", path)
        except TokenFileError as e:
            raise SetupError(str(path), f"it holds a Consul token and {e.reason.split('; ')[0]}: it must be 0600",
                             e.hint) from None
    return answers


# --- checks that need no Consul ------------------------------------------------------------
def check_name(name: str, earlier: Iterable[ClusterAnswer], field: str = "name") -> str:
    try:
        check_cluster_name(name, field)
    except InvalidRecord as e:
        raise SetupError(field, e.reason, "use lowercase letters, digits and dashes, at most 32") from None
    if any(a.name == name for a in earlier):
        raise SetupError(field, f"cluster {name!r} is already in this setup")
    return name


def check_id(cid: int, earlier: Iterable[ClusterAnswer], taken: dict[int, str] | None = None,
             name: str | None = None, field: str = "id") -> int:
    if not 1 <= cid <= 255:
        raise SetupError(field, f"{cid} is outside 1-255")
    for a in earlier:
        if a.id == cid:
            raise SetupError(field, f"id {cid} is taken by cluster {a.name!r}", _try(suggest_id(earlier, taken)))
    owner = (taken or {}).get(cid)
    if owner and owner != name:
        raise SetupError(field, f"id {cid} is taken by cluster {owner!r} in the mesh", _try(suggest_id(earlier, taken)))
    return cid


def check_pod_cidr(cidr: str, earlier: Iterable[ClusterAnswer], field: str = "pod_cidr") -> str:
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as e:
        raise SetupError(field, f"{cidr!r} is not a network CIDR ({e})") from None
    for a in earlier:
        other = ipaddress.ip_network(a.pod_cidr)
        if other.version == net.version and other.overlaps(net):
            raise SetupError(field, f"{net} overlaps cluster {a.name!r}'s pod CIDR {other}",
                             _try(suggest_pod_cidr(earlier)))
    return str(net)


def _try(suggestion: object) -> str | None:
    return f"try {suggestion}" if suggestion is not None else None


def check_static(a: ClusterAnswer, earlier: list[ClusterAnswer], where: str) -> None:
    check_name(a.name, earlier, f"{where}.name")
    check_id(a.id, earlier, field=f"{where}.id")
    a.pod_cidr = check_pod_cidr(a.pod_cidr, earlier, f"{where}.pod_cidr")
    for j, n in enumerate(a.acl_nodes):
        try:
            check_node_name(n, f"{where}.acl_nodes[{j}]")
        except InvalidRecord as e:
            raise SetupError(e.field, e.reason) from None
    if a.routing not in ROUTING_MODES:
        raise SetupError(f"{where}.routing", f"{a.routing!r} is not one of {', '.join(ROUTING_MODES)}")
    try:
        a.config()
    except InvalidRecord as e:
        raise SetupError(f"{where}.{e.field}", e.reason) from None


def suggest_id(earlier: Iterable[ClusterAnswer], taken: dict[int, str] | None = None) -> int | None:
    used = {a.id for a in earlier} | set(taken or {})
    return next((i for i in range(1, 256) if i not in used), None)


def suggest_pod_cidr(earlier: Iterable[ClusterAnswer], taken: Iterable[str] = ()) -> str | None:
    """The first free /16 of 10.240.0.0/12, else of 10.0.0.0/8; None if every one is used."""
    used = [ipaddress.ip_network(c) for c in [*(a.pod_cidr for a in earlier), *taken]]
    for space in (SUGGEST_FROM, ipaddress.ip_network("10.0.0.0/8")):
        for net in space.subnets(new_prefix=16):
            if not any(u.version == 4 and u.overlaps(net) for u in used):
                return str(net)
    return None


# --- checks against Consul -------------------------------------------------------------------
@dataclass
class ConsulFacts:
    """What one cluster's Consul says: its datacenter, the datacenters it is federated with,
    the mesh records it holds, its cluster config and how many pod-CIDR leases exist."""

    datacenter: str
    datacenters: list[str]
    mesh: dict[str, MeshMember] = field(default_factory=dict)
    config: ClusterConfig | None = None
    config_index: int = 0
    leases: int = 0
    mesh_index: dict[str, int] = field(default_factory=dict)


def probe(a: ClusterAnswer, where: str, store: ConsulStore | None = None) -> ConsulFacts:
    """Reach the cluster's Consul and read what the setup needs; any failure is a SetupError."""
    try:
        store = store or ConsulStore(a.options(), retries=False)
        store.leader()
        dc = store.local_datacenter()
        dcs = store.datacenters()
    except ConsulUnavailable as e:
        raise SetupError(f"{where}.consul", f"cannot reach Consul at {a.consul} ({e})",
                         "check the address (http://HOST:8500), the token and that the server runs") from e
    except ConsulError as e:  # it answered, and refused: the token, most likely
        raise SetupError(f"{where}.consul", f"Consul at {a.consul} refused ({e})",
                         e.hint or "check the token and the address (http://HOST:8500)") from e
    if a.datacenter and a.datacenter != dc:
        raise SetupError(f"{where}.datacenter", f"Consul at {a.consul} is datacenter {dc!r}, not {a.datacenter!r}")
    facts = ConsulFacts(dc, dcs)
    _, items = store.list(layout.mesh_prefix())
    for key, item in items.items():
        try:
            m = MeshMember.from_json(item.value, key)
            facts.mesh[m.name] = m
            facts.mesh_index[m.name] = item.modify_index
        except InvalidRecord:
            facts.mesh_index[key.rsplit("/", 1)[-1]] = item.modify_index
    current = store.get(layout.config_key(a.name))
    if current is not None:
        facts.config_index = current.modify_index
        try:
            facts.config = ClusterConfig.from_json(current.value)
        except InvalidRecord:
            facts.config = None
    _, leases = store.list(layout.ipam_prefix(a.name))
    facts.leases = len(leases)
    return facts


def check_live(answers: list[ClusterAnswer], facts: list[ConsulFacts]) -> None:
    """Checks that need every cluster's facts: datacenters, WAN federation, ids and CIDRs in use."""
    seen_dc: dict[str, str] = {}
    for i, (a, f) in enumerate(zip(answers, facts)):
        a.datacenter = f.datacenter
        if f.datacenter in seen_dc:
            raise SetupError(f"clusters[{i}].consul", f"datacenter {f.datacenter!r} is taken by cluster "
                             f"{seen_dc[f.datacenter]!r}: each cluster needs its own Consul datacenter")
        seen_dc[f.datacenter] = a.name
    names = {a.name for a in answers}
    for i, (a, f) in enumerate(zip(answers, facts)):
        missing = [b.datacenter for b in answers if b.datacenter not in f.datacenters]
        if missing:
            raise SetupError(f"clusters[{i}].consul", f"datacenter {f.datacenter!r} is not WAN-federated with "
                             f"{', '.join(repr(m) for m in missing)}",
                             "join the servers first: consul join -wan <address of a server in the other datacenter>")
        for m in f.mesh.values():
            if m.name in names:
                continue
            for j, b in enumerate(answers):
                if m.datacenter == b.datacenter:
                    raise SetupError(f"clusters[{j}].consul", f"datacenter {b.datacenter!r} already belongs to cluster "
                                     f"{m.name!r} in the mesh", f"remove the stale record {layout.mesh_key(m.name)} "
                                     "if that cluster was renamed")
                if m.id == b.id:
                    raise SetupError(f"clusters[{j}].id", f"id {b.id} is taken by cluster {m.name!r} in the mesh")
                if ipaddress.ip_network(m.pod_cidr).overlaps(ipaddress.ip_network(b.pod_cidr)):
                    raise SetupError(f"clusters[{j}].pod_cidr",
                                     f"{b.pod_cidr} overlaps cluster {m.name!r}'s {m.pod_cidr} in the mesh")
        if f.config is not None and f.leases and (f.config.pod_cidr, f.config.node_prefix_len) != (
                a.pod_cidr, a.node_prefix_len):
            raise SetupError(f"clusters[{i}].pod_cidr", f"cluster {a.name!r} uses {f.config.pod_cidr} "
                             f"(/{f.config.node_prefix_len} per node) with {f.leases} node lease(s); it cannot change "
                             "while nodes hold them")


# --- the plan and its application ------------------------------------------------------------
@dataclass
class Write:
    key: str
    value: str | None  # None: delete
    index: int  # check-and-set index: 0 = must not exist yet
    old: str | None = None  # for rollback


@dataclass
class SetupPlan:
    answers: list[ClusterAnswer]
    facts: list[ConsulFacts]
    writes: dict[str, list[Write]]  # datacenter -> writes (empty: nothing changes there)

    @property
    def changes(self) -> int:
        return sum(len(w) for w in self.writes.values())

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for a, f in zip(self.answers, self.facts):
            out.append({"cluster": a.name, "id": a.id, "datacenter": f.datacenter, "consul": a.consul,
                        "pod_cidr": a.pod_cidr, "routing": a.routing, "mtu": a.mtu or "auto",
                        "changes": len(self.writes.get(f.datacenter, []))})
        return out


def plan_setup(answers: list[ClusterAnswer], facts: list[ConsulFacts], stores: list[ConsulStore]) -> SetupPlan:
    members = [MeshMember(a.name, a.id, f.datacenter, str(ipaddress.ip_network(a.pod_cidr)))
               for a, f in zip(answers, facts)]
    writes: dict[str, list[Write]] = {}
    for a, f, store in zip(answers, facts, stores):
        w: list[Write] = []
        cfg = _signing(a, f.config)
        if f.config != cfg:
            old = store.get(layout.config_key(a.name))
            w.append(Write(layout.config_key(a.name), cfg.to_json(), f.config_index,
                           old.value.decode() if old else None))
        for m in members:
            if f.mesh.get(m.name) != m:
                key = layout.mesh_key(m.name)
                old = store.get(key)
                w.append(Write(key, m.to_json(), f.mesh_index.get(m.name, 0), old.value.decode() if old else None))
        writes[f.datacenter] = w
    return SetupPlan(answers, facts, writes)


def _signing(a: ClusterAnswer, current: ClusterConfig | None) -> ClusterConfig:
    """The cluster's config with its signing settings: kept from the stored config if there is one;
    for a new cluster, its signing key's (the key file is created if absent), unless unsigned."""
    import dataclasses

    from wiremesh.keys import KeyMaterialError, load_or_generate_signing_key

    from .anchor import sign_settings, with_settings

    cfg = a.config()
    if current is not None:
        return with_settings(cfg, current)
    if a.unsigned or not a.signing_key_file:
        return cfg
    try:
        key, _ = load_or_generate_signing_key(Path(a.signing_key_file))
    except KeyMaterialError as e:
        raise SetupError(f"{a.name}.signing_key_file", str(e)) from e
    return sign_settings(dataclasses.replace(cfg, require_signed=True, signing_key=key.public_key().base64), [key])


def prepare(answers: list[ClusterAnswer], progress: Callable[[str], None] = lambda _: None,
            store_for: Callable[[ClusterAnswer], ConsulStore] | None = None) -> tuple[SetupPlan, list[ConsulStore]]:
    """Every check, then the plan. Raises SetupError naming the answer to change."""
    for i, a in enumerate(answers):
        check_static(a, answers[:i], f"clusters[{i}]")
    stores = []
    for i, a in enumerate(answers):
        try:
            stores.append(store_for(a) if store_for else ConsulStore(a.options(), retries=False))
        except ConsulError as e:
            raise SetupError(f"clusters[{i}].consul", str(e).split(": ", 1)[-1]) from e
    facts = []
    for i, (a, s) in enumerate(zip(answers, stores)):
        progress(f"checking Consul of cluster {a.name} at {a.consul}")
        facts.append(probe(a, f"clusters[{i}]", s))
    check_live(answers, facts)
    return plan_setup(answers, facts, stores), stores


def _txn(store: ConsulStore, writes: list[Write], *, undo: bool = False) -> None:
    ops: list[KVOp] = []
    for w in writes:
        value = w.old if undo else w.value
        if value is None:
            ops.append(KVOp.delete(w.key))
        elif undo:
            ops.append(KVOp.set(w.key, value))
        else:
            ops.append(KVOp.cas(w.key, value, w.index))
    store.txn(ops)


_APPLY_HINTS = {
    ConsulReason.PERMISSION_DENIED: "the token lacks key:write on wiremesh/v1/",
    ConsulReason.ACL_NOT_FOUND: "this Consul does not know the token: check --token / CONSUL_HTTP_TOKEN",
    ConsulReason.CONFLICT: "someone changed the same keys meanwhile: run setup again",
}


def apply_setup(plan: SetupPlan, stores: list[ConsulStore], progress: Callable[[str], None] = lambda _: None) -> dict[str, str]:
    """Write the plan, one transaction per datacenter; undo the earlier ones if a later one fails."""
    done: list[tuple[ConsulStore, list[Write]]] = []
    result = {}
    try:
        for a, f, store in zip(plan.answers, plan.facts, stores):
            w = plan.writes.get(f.datacenter, [])
            if not w:
                result[a.name] = "unchanged"
                continue
            progress(f"writing {len(w)} key(s) to datacenter {f.datacenter}")
            _txn(store, w)
            done.append((store, w))
            result[a.name] = f"{len(w)} change(s)"
    except ConsulError as e:
        for store, w in reversed(done):
            try:
                _txn(store, w, undo=True)
            except ConsulError:
                pass
        hint = _APPLY_HINTS.get(e.reason, "Consul went away, or someone changed the same keys meanwhile: "
                                          "run setup again")
        raise SetupError("apply", f"{e}; the datacenters written before were rolled back", hint) from e
    return result


def create_agent_tokens(answers: list[ClusterAnswer], stores: list[ConsulStore], out_dir: Path,
                        progress: Callable[[str], None] = lambda _: None) -> list[Path]:
    """One ACL policy and token per listed node; each token's secret goes to a 0600 file, never stdout."""
    from .acl import ensure_agent_token

    written = []
    for i, (a, store) in enumerate(zip(answers, stores)):
        for node in a.acl_nodes:
            try:
                tok = ensure_agent_token(store, a.name, node)
            except IPAMExhausted as e:
                raise SetupError(f"clusters[{i}].acl_nodes", f"{node}: {e}", "widen the pod CIDR, or list fewer nodes") from e
            except ConsulError as e:
                hint = {ConsulReason.ACL_DISABLED: "enable ACLs on the Consul servers, or leave acl_nodes out",
                        ConsulReason.PERMISSION_DENIED: "the token needs acl:write to create agent tokens",
                        }.get(e.reason, e.hint)
                raise SetupError(f"clusters[{i}].acl_nodes", str(e), hint) from e
            path = out_dir / a.name / f"{node}.token"
            write_token_file(path, tok.secret_id)
            progress(f"{'created' if tok.created else 'kept'} ACL token for {a.name}/{node} "
                     f"(pod CIDR {tok.pod_cidr} leased to it) -> {path}")
            written.append(path)
    return written


def agent_toml(a: ClusterAnswer, datacenter: str) -> str:
    """What each node's agent.toml needs for cluster `a` (node-specific fields as placeholders)."""
    return (
        f'# agent.toml for a node of cluster {a.name} (datacenter {datacenter})\n'
        f'node = "NODE-NAME"\ncluster = "{a.name}"\nunderlay_address = "NODE-IP"\n'
        f'\n[consul]\naddress = "{a.consul}"\n'
        + ('token_file = "/etc/wiremesh/consul-token"   # the node\'s token from --acl-out\n'
           if a.token or a.acl_nodes else "")
        + ('session_node = "NODE-NAME"   # its token holds sessions only on this Consul node\n' if a.acl_nodes else "")
        + (f'ca_file = "{a.ca_file}"\n' if a.ca_file else "")
    )


__all__ = ["ClusterAnswer", "SetupError", "SetupPlan", "apply_setup", "agent_toml", "load_answers",
           "parse_answers", "prepare"]
