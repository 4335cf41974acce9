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
from .errors import ConsulError
from .store import ConsulStore


def agent_rules(cluster: str, node: str) -> dict[str, Any]:
    """The agent's ACL rules, in Consul's JSON rule syntax (py-consul serialises them)."""
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


def _acl(store: ConsulStore, what: str, fn: Any) -> Any:
    try:
        return store._call(what, fn, retry_it=False)  # noqa: SLF001 - one family of errors
    except ConsulError as e:
        if "ACL support disabled" in str(e):
            raise ConsulError(f"{what}: ACLs are not enabled on this Consul") from None
        raise


def _rules_of(policy: dict[str, Any]) -> Any:
    try:
        return json.loads(policy.get("Rules") or "{}")
    except ValueError:  # HCL written by someone else: ours replaces it
        return None


def ensure_agent_token(store: ConsulStore, cluster: str, node: str) -> AgentToken:
    """Create (or find) node's policy and token; idempotent: running it again returns the same token."""
    name = f"wiremesh-{cluster}-{node}".replace(".", "-")
    rules = agent_rules(cluster, node)
    policies = _acl(store, "list ACL policies", lambda c: c.acl.policy.list())
    existing = next((p for p in policies or [] if p.get("Name") == name), None)
    if existing is None:
        _acl(store, f"create ACL policy {name}", lambda c: c.acl.policy.create(name=name, rules=rules,
                                                                              description=f"wiremesh agent {cluster}/{node}"))
    elif _rules_of(_acl(store, f"read ACL policy {name}", lambda c: c.acl.policy.read(existing["ID"]))) != rules:
        _acl(store, f"update ACL policy {name}",
             lambda c: c.acl.policy.update(existing["ID"], name=name, rules=rules))
    description = f"wiremesh agent {cluster}/{node}"
    tokens = _acl(store, "list ACL tokens", lambda c: c.acl.token.list())
    tok = next((t for t in tokens or [] if t.get("Description") == description), None)
    created = tok is None
    if tok is None:
        tok = _acl(store, f"create ACL token for {node}",
                   lambda c: c.acl.token.create(description=description, policies_name=[name]))
    else:
        tok = _acl(store, f"read ACL token for {node}", lambda c: c.acl.token.read(tok["AccessorID"]))
    return AgentToken(cluster, node, name, tok["AccessorID"], tok["SecretID"], created)
