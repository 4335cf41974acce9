"""Per-node ACL rules: what a node's token may write, judged as Consul 1.8 judges key rules."""

from __future__ import annotations

import json
from typing import Any

import pytest

from wiremesh.clustermesh import ClusterConfig, ConsulError, ConsulReason, KVItem, layout
from wiremesh.clustermesh.acl import agent_rules, ensure_agent_token
from wiremesh.clustermesh.consul_values import AclPolicy, AclToken


def allowed(rules: dict[str, Any], kind: str, name: str) -> str:
    """Consul's rule matching: an exact rule wins, else the longest matching prefix, else deny."""
    if name in rules.get(kind, {}):
        return str(rules[kind][name]["policy"])
    prefixes = [p for p in rules.get(f"{kind}_prefix", {}) if name.startswith(p)]
    return str(rules[f"{kind}_prefix"][max(prefixes, key=len)]["policy"]) if prefixes else "deny"


RULES = agent_rules("c1", "a", "10.240.3.0/24")


@pytest.mark.parametrize("key", [
    layout.node_key("c1", "a"),
    layout.ipam_key("c1", "10.240.3.0/24"),
    layout.rotation_key("c1", "a"),
    layout.rotation_ready_key("c1", "a", "c1", "b"),
    layout.rotation_ready_key("c1", "a", "c2", "x"),
])
def test_a_writes_its_own_keys(key: str) -> None:
    assert allowed(RULES, "key", key) == "write"


@pytest.mark.parametrize("key", [
    layout.node_key("c1", "b"),
    layout.node_key("c1", "ab"),
    layout.node_key("c2", "a"),
    layout.ipam_key("c1", "10.240.4.0/24"),
    layout.ipam_key("c1", "10.240.3.0/25"),
    layout.rotation_key("c1", "b"),
    layout.rotation_key("c1", "ab"),  # `key_prefix rotations/a` would have allowed these two
    layout.rotation_ready_key("c1", "ab", "c1", "b"),
    layout.rotation_ready_key("c1", "b", "c1", "a"),
    layout.config_key("c1"),
    layout.service_key("c1", "web"),
    layout.mesh_key("c1"),
])
def test_a_only_reads_the_rest(key: str) -> None:
    assert allowed(RULES, "key", key) == "read"


def test_outside_wiremesh_is_denied() -> None:
    assert allowed(RULES, "key", "vault/secret") == "deny"
    assert allowed(RULES, "key", "wiremesh/v2/x") == "deny"


def test_sessions_and_catalog_node_only_its_own() -> None:
    assert allowed(RULES, "session", "a") == "write"
    assert allowed(RULES, "session", "b") == "deny"
    assert allowed(RULES, "session", "consul-server") == "deny"
    assert allowed(RULES, "node", "a") == "write"
    assert allowed(RULES, "node", "b") == "read"
    assert allowed(RULES, "service", "web") == "read"  # global services' backends
    assert "session_prefix" not in RULES and "" not in RULES["key_prefix"]


def test_session_node_named_apart() -> None:
    rules = agent_rules("c1", "a", "10.240.3.0/24", session_node="host-a")
    assert allowed(rules, "session", "host-a") == "write" and allowed(rules, "session", "a") == "deny"
    assert allowed(rules, "key", layout.node_key("c1", "a")) == "write"


def test_rules_are_json_consul_accepts() -> None:
    assert json.loads(json.dumps(RULES)) == RULES


class FakeAclStore:
    """The KV and ACL calls ensure_agent_token makes, in memory."""

    def __init__(self, acl: bool = True) -> None:
        cfg = ClusterConfig(name="c1", id=1, pod_cidr="10.240.0.0/16")
        self.kv: dict[str, KVItem] = {layout.config_key("c1"): KVItem(layout.config_key("c1"), cfg.to_json().encode(), 1)}
        self.policies: dict[str, AclPolicy] = {}
        self.tokens: dict[str, AclToken] = {}
        self.acl = acl
        self.index = 1

    def get(self, key: str) -> KVItem | None:
        return self.kv.get(key)

    def list(self, prefix: str) -> tuple[int, dict[str, KVItem]]:
        return self.index, {k: v for k, v in self.kv.items() if k.startswith(prefix)}

    def put(self, key: str, value: str, cas: int | None = None) -> bool:
        if cas == 0 and key in self.kv:
            return False
        self.index += 1
        self.kv[key] = KVItem(key, value.encode(), self.index)
        return True

    def acl_policy_list(self) -> list[AclPolicy]:
        if not self.acl:
            raise ConsulError("list ACL policies: ACLs are not enabled on this Consul", 401, ConsulReason.ACL_DISABLED)
        return [AclPolicy(p.policy_id, p.name) for p in self.policies.values()]

    def acl_policy_read(self, policy_id: str) -> AclPolicy:
        return self.policies[policy_id]

    def acl_policy_create(self, name: str, rules: str, description: str = "") -> AclPolicy:
        self.policies[name] = AclPolicy(name, name, description, rules)
        return self.policies[name]

    def acl_policy_update(self, policy_id: str, name: str, rules: str, description: str = "") -> AclPolicy:
        return self.acl_policy_create(name, rules, description)

    def acl_token_list(self) -> list[AclToken]:
        return [AclToken(t.accessor_id, None, t.description) for t in self.tokens.values()]

    def acl_token_read(self, accessor_id: str) -> AclToken:
        return self.tokens[accessor_id]

    def acl_token_create(self, description: str, policy_names: list[str]) -> AclToken:
        acc = f"acc{len(self.tokens)}"
        self.tokens[acc] = AclToken(acc, f"secret-{len(self.tokens)}", description, tuple(policy_names))
        return self.tokens[acc]


def test_token_comes_with_a_preassigned_lease_named_in_its_policy() -> None:
    s = FakeAclStore()
    s.put(layout.ipam_key("c1", "10.240.0.0/24"), "other", cas=0)
    tok = ensure_agent_token(s, "c1", "a")  # type: ignore[arg-type]
    assert tok.pod_cidr == "10.240.1.0/24" and tok.created
    assert s.kv[layout.ipam_key("c1", "10.240.1.0/24")].value == b"a"
    assert json.loads(s.policies["wiremesh-c1-a"].rules or "") == agent_rules("c1", "a", "10.240.1.0/24")
    again = ensure_agent_token(s, "c1", "a")  # type: ignore[arg-type]
    assert (again.pod_cidr, again.secret_id, again.created) == (tok.pod_cidr, tok.secret_id, False)
    assert "secret" not in repr(again)


def test_existing_lease_is_kept_and_broad_policy_narrowed() -> None:
    s = FakeAclStore()
    s.put(layout.ipam_key("c1", "10.240.7.0/24"), "a", cas=0)  # leased by the agent under an older token
    s.acl_policy_create("wiremesh-c1-a", json.dumps({"session_prefix": {"": {"policy": "write"}}}))
    tok = ensure_agent_token(s, "c1", "a")  # type: ignore[arg-type]
    assert tok.pod_cidr == "10.240.7.0/24"
    assert json.loads(s.policies["wiremesh-c1-a"].rules or "") == agent_rules("c1", "a", "10.240.7.0/24")


def test_no_acls_refused_before_anything_is_leased() -> None:
    s = FakeAclStore(acl=False)
    with pytest.raises(ConsulError) as e:
        ensure_agent_token(s, "c1", "a")  # type: ignore[arg-type]
    assert e.value.reason is ConsulReason.ACL_DISABLED
    assert not [k for k in s.kv if k.startswith(layout.ipam_prefix("c1"))]


def test_lease_refused_by_acls_says_who_assigns_leases() -> None:
    from wiremesh.clustermesh import lease_pod_cidr

    class Denied(FakeAclStore):
        def put(self, key: str, value: str, cas: int | None = None) -> bool:
            raise ConsulError(f"put {key}: permission denied by Consul ACLs", 403, ConsulReason.PERMISSION_DENIED)

    s = Denied()
    cfg = ClusterConfig(name="c1", id=1, pod_cidr="10.240.0.0/16")
    with pytest.raises(ConsulError) as e:
        lease_pod_cidr(s, cfg, "a")  # type: ignore[arg-type]
    assert e.value.reason is ConsulReason.PERMISSION_DENIED and "node a holds no pod-CIDR lease" in str(e.value)
    assert e.value.hint and "acl_nodes" in e.value.hint
    s.kv[layout.ipam_key("c1", "10.240.5.0/24")] = KVItem(layout.ipam_key("c1", "10.240.5.0/24"), b"a", 3)
    assert lease_pod_cidr(s, cfg, "a") == "10.240.5.0/24"  # type: ignore[arg-type]  # pre-assigned: no write


def test_wizard_agent_toml_names_the_token_file_session_node_and_ca() -> None:
    from wiremesh.clustermesh.wizard import ClusterAnswer, agent_toml

    a = ClusterAnswer(consul="https://10.0.0.1:8501", name="c1", id=1, pod_cidr="10.240.0.0/16", acl_nodes=["n1"],
                      ca_file="/etc/wiremesh/ca.pem")
    text = agent_toml(a, "dc1")
    assert 'token_file = "/etc/wiremesh/consul-token"' in text and 'session_node = "NODE-NAME"' in text
    assert 'ca_file = "/etc/wiremesh/ca.pem"' in text and "token =" not in text
    plain = agent_toml(ClusterAnswer(consul="http://10.0.0.1:8500", name="c1", id=1, pod_cidr="10.240.0.0/16"), "dc1")
    assert "session_node" not in plain and "ca_file" not in plain
