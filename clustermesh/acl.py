"""Consul ACLs for agents: one policy and token per node, allowed to write only its own keys.

A node's agent writes its own record (nodes/<node>), leases a pod CIDR (ipam/, by
check-and-set: the CIDR is not known before, so the prefix), holds a session, and reads the
rest of wiremesh/. Federated reads of another datacenter need the token there too: with ACL
replication from a primary datacenter, tokens are global; otherwise create them in each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import layout
from .consul_values import AclPolicy
from .errors import ConsulError, ConsulReason
from .store import ConsulStore


def agent_rules(cluster: str, node: str) -> dict[str, Any]:
    """The agent's ACL rules, in Consul's JSON rule syntax."""
    return {
        "key": {layout.node_key(cluster, node): {"policy": "write"}},
        "key_prefix": {layout.ipam_prefix(cluster): {"policy": "write"}, f"{layout.ROOT}/": {"policy": "read"}},
        "session_prefix": {"": {"policy": "write"}},
    }


@dataclass(frozen=True)
class AgentToken:
    cluster: str
    node: str
    policy: str
    accessor_id: str
    secret_id: str
    created: bool

    def __repr__(self) -> str:
        return f"AgentToken({self.cluster}/{self.node}, accessor={self.accessor_id[:8]}, created={self.created})"


def _rules_of(policy: AclPolicy) -> Any:
    try:
        return json.loads(policy.rules or "{}")
    except ValueError:  # HCL written by someone else: ours replaces it
        return None


def ensure_agent_token(store: ConsulStore, cluster: str, node: str) -> AgentToken:
    """Create (or find) node's policy and token; idempotent: running it again returns the same token.

    On a Consul without ACLs this raises ConsulError with reason ACL_DISABLED.
    """
    name = f"wiremesh-{cluster}-{node}".replace(".", "-")
    rules = agent_rules(cluster, node)
    description = f"wiremesh agent {cluster}/{node}"
    existing = next((p for p in store.acl_policy_list() if p.name == name), None)
    if existing is None:
        store.acl_policy_create(name, json.dumps(rules), description)
    elif _rules_of(store.acl_policy_read(existing.policy_id)) != rules:
        store.acl_policy_update(existing.policy_id, name, json.dumps(rules), description)
    listed = next((t for t in store.acl_token_list() if t.description == description), None)
    tok = store.acl_token_create(description, [name]) if listed is None else store.acl_token_read(listed.accessor_id)
    if tok.secret_id is None:
        raise ConsulError(f"read ACL token for {node}: Consul did not show its secret (that needs acl:write)",
                          reason=ConsulReason.PERMISSION_DENIED)
    return AgentToken(cluster, node, name, tok.accessor_id, tok.secret_id, listed is None)
