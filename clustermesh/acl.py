"""Consul ACLs for agents: one policy and token per node, allowed to write only its own keys.

A node's token may write exactly (Consul 1.8 refuses the rest with 403):

- its record, `nodes/<node>` (an exact `key` rule);
- its pod-CIDR lease, `ipam/<its cidr>` (an exact `key` rule, see below);
- its rotation keys: `rotations/<node>` (exact) and its readiness for other nodes' rotations,
  everything under `ready/<cluster>/<node>/`. A `key_prefix "ready/<cluster>/<node>"` would also
  match `.../<node>x...`, another node's keys: hence prefixes end with a "/";
- sessions on its own Consul node (`session "<session node>"`, by default the node's name), and
  that catalog node itself (`node "<session node>"`, so an agent without a Consul agent of its
  own can register it: see `consul.session_node` in agent.toml). Another node's sessions can be
  neither created, renewed nor destroyed (destroying one would delete that node's record);

and read the rest of wiremesh/ plus the catalog (nodes and services: global services' backends).

The IPAM lease. Leases are keyed by CIDR and taken with check-and-set (ipam.py), so a node
cannot know its key before it leases, and a prefix rule on ipam/ would let it overwrite any
other node's lease. Instead the operator pre-assigns the lease when it creates the node's
token (`ensure_agent_token`, run by `wiremesh setup` for `acl_nodes` and by the lab): the lease
the node already holds is kept, else the lowest free CIDR is leased to it, with the operator's
token, by the same check-and-set. The policy then names that one key. The agent finds its
lease and never needs to write another (`lease_pod_cidr` writes only when it has none; with
this token it is refused, with a message saying who assigns leases). This is also what signed
records need: a node's certificate binds its pod CIDR, so the operator picks it at enrollment.
Existing clusters keep working: the layout is unchanged, agents with an older, broader token
go on as before, and running the setup again moves their policies to these rules (a node that
holds a lease keeps it).

Federated reads of another datacenter need the token there too: with ACL replication from a
primary datacenter, tokens are global; otherwise create them in each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import layout
from .clusters import load_cluster_config
from .consul_values import AclPolicy
from .errors import ConsulError, ConsulReason
from .ipam import lease_pod_cidr
from .store import ConsulStore

WRITE = {"policy": "write"}
READ = {"policy": "read"}


def agent_rules(cluster: str, node: str, pod_cidr: str, session_node: str | None = None) -> dict[str, Any]:
    """The agent's ACL rules, in Consul's JSON rule syntax (see the module docstring)."""
    consul_node = session_node or node
    own_rotation = layout.rotation_key(cluster, node)
    return {
        "key": {layout.node_key(cluster, node): WRITE, layout.ipam_key(cluster, pod_cidr): WRITE,
                own_rotation: WRITE},
        "key_prefix": {f"{layout.ROOT}/": READ, f"{layout.ready_prefix(cluster)}{node}/": WRITE},
        "session": {consul_node: WRITE},
        "node": {consul_node: WRITE},
        "node_prefix": {"": READ},
        "service_prefix": {"": READ},
    }


@dataclass(frozen=True)
class AgentToken:
    cluster: str
    node: str
    policy: str
    accessor_id: str
    secret_id: str
    created: bool
    pod_cidr: str = ""

    def __repr__(self) -> str:
        return (f"AgentToken({self.cluster}/{self.node}, pod_cidr={self.pod_cidr}, accessor={self.accessor_id[:8]}, "
                f"created={self.created})")


def _rules_of(policy: AclPolicy) -> Any:
    try:
        return json.loads(policy.rules or "{}")
    except ValueError:  # HCL written by someone else: ours replaces it
        return None


def ensure_agent_token(store: ConsulStore, cluster: str, node: str, session_node: str | None = None) -> AgentToken:
    """Lease node's pod CIDR (or find its lease), then create or update its policy and token.

    Idempotent: running it again returns the same token and CIDR. Needs the cluster's config in
    Consul and a token with acl:write and key:write on the cluster's ipam/. On a Consul without
    ACLs this raises ConsulError with reason ACL_DISABLED (before anything is leased).
    """
    name = f"wiremesh-{cluster}-{node}".replace(".", "-")
    description = f"wiremesh agent {cluster}/{node}"
    policies = store.acl_policy_list()  # first: a Consul without ACLs refuses here, before the lease
    pod_cidr = lease_pod_cidr(store, load_cluster_config(store, cluster), node)
    rules = agent_rules(cluster, node, pod_cidr, session_node)
    existing = next((p for p in policies if p.name == name), None)
    if existing is None:
        store.acl_policy_create(name, json.dumps(rules), description)
    elif _rules_of(store.acl_policy_read(existing.policy_id)) != rules:
        store.acl_policy_update(existing.policy_id, name, json.dumps(rules), description)
    listed = next((t for t in store.acl_token_list() if t.description == description), None)
    tok = store.acl_token_create(description, [name]) if listed is None else store.acl_token_read(listed.accessor_id)
    if tok.secret_id is None:
        raise ConsulError(f"read ACL token for {node}: Consul did not show its secret (that needs acl:write)",
                          reason=ConsulReason.PERMISSION_DENIED)
    return AgentToken(cluster, node, name, tok.accessor_id, tok.secret_id, listed is None, pod_cidr)
