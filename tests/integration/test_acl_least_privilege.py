"""Per-node ACL tokens on a real Consul 1.8 with ACLs (default deny): node A's token writes its
own record, lease and rotation keys and holds sessions on its own Consul node; Consul refuses
(403) everything of node B's, the cluster's config, the mesh, services, another lease, and
sessions on any other node."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wiremesh.clustermesh import (
    ClusterConfig,
    ConsulError,
    ConsulOptions,
    ConsulReason,
    ConsulStore,
    KVOp,
    init_cluster,
    layout,
    lease_pod_cidr,
)
from wiremesh.clustermesh.acl import AgentToken, ensure_agent_token
from wiremesh.lab import consul_server
from wiremesh.lab.netns import NetnsExecutor, netns_add, netns_del, terminate

from .conftest import new_lab_name

ADDR = "http://127.0.0.1:8500"
C = "sec"


class Consul:
    def __init__(self, ex: NetnsExecutor, master: str) -> None:
        self.ex = ex
        self.admin = ConsulStore(ConsulOptions(address=ADDR, token=master), retries=False)
        self.tokens: dict[str, AgentToken] = {}

    def store(self, node: str) -> ConsulStore:
        return ConsulStore(ConsulOptions(address=ADDR, token=self.tokens[node].secret_id), retries=False)

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return self.ex.call(fn, *args, **kw)


@pytest.fixture(scope="module")
def consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consul]:
    tmp = tmp_path_factory.mktemp("acl-lp")
    ns = "wmtest-aclp-" + new_lab_name()
    master = str(uuid.uuid4())
    netns_add(ns)
    ex = NetnsExecutor(ns)
    pid = 0
    try:
        cfg = tmp / "consul.json"
        consul_server.write_config(cfg, datacenter="aclp", node_name="consul-aclp", data_dir=tmp / "data",
                                   bind="127.0.0.1", acl_master=master)
        assert cfg.stat().st_mode & 0o077 == 0  # it holds the master token
        pid = consul_server.start(ns, cfg, tmp / "consul.log")
        consul_server.wait_ready(ex, ADDR, pid, token=master)
        c = Consul(ex, master)
        c.call(init_cluster, c.admin, ClusterConfig(name=C, id=3, pod_cidr="10.250.0.0/16"))
        for node in ("a", "b"):
            c.tokens[node] = c.call(ensure_agent_token, c.admin, C, node)
        yield c
    finally:
        ex.close()
        if pid:
            terminate([pid])
        netns_del(ns)


def denied(c: Consul, fn: Callable[..., Any], *args: Any, **kw: Any) -> ConsulError:
    with pytest.raises(ConsulError) as e:
        c.call(fn, *args, **kw)
    assert e.value.reason is ConsulReason.PERMISSION_DENIED, e.value
    return e.value


def test_tokens_come_with_their_leases(consul: Consul) -> None:
    a, b = consul.tokens["a"], consul.tokens["b"]
    assert a.pod_cidr == "10.250.0.0/24" and b.pod_cidr == "10.250.1.0/24"
    held = consul.call(consul.admin.list, layout.ipam_prefix(C))[1]
    assert {k: v.value for k, v in held.items()} == {layout.ipam_key(C, a.pod_cidr): b"a",
                                                     layout.ipam_key(C, b.pod_cidr): b"b"}
    again = consul.call(ensure_agent_token, consul.admin, C, "a")  # idempotent: same token, same lease
    assert (again.secret_id, again.pod_cidr, again.created) == (a.secret_id, a.pod_cidr, False)


def test_a_does_what_its_agent_needs(consul: Consul) -> None:
    a = consul.store("a")
    cfg = ClusterConfig.from_json(consul.call(a.get, layout.config_key(C)).value)
    assert consul.call(lease_pod_cidr, a, cfg, "a") == consul.tokens["a"].pod_cidr  # found, nothing written
    assert consul.call(a.put, layout.ipam_key(C, consul.tokens["a"].pod_cidr), "a")  # (a signed lease, later)
    if not consul.call(a.catalog_node_exists, "a"):
        consul.call(a.catalog_register_node, "a", "192.0.2.1")
    session = consul.call(a.session_create, "wiremesh-agent sec/a", 10, node="a")
    try:
        assert consul.call(a.put, layout.node_key(C, "a"), "{}", acquire=session)
        consul.call(a.session_renew, session)
        assert consul.call(a.put, layout.rotation_key(C, "a"), "{}")
        assert consul.call(a.put, layout.rotation_ready_key(C, "a", C, "b"), "{}")
        assert consul.call(a.delete, layout.rotation_ready_key(C, "a", C, "b"))
        assert len(consul.call(a.list, layout.cluster_prefix(C))[1]) >= 4  # reads the whole cluster
        consul.call(a.list, layout.mesh_prefix())
        consul.call(a.catalog_services)
    finally:
        consul.call(a.session_destroy, session)


def test_a_cannot_write_bs_keys_nor_the_clusters(consul: Consul) -> None:
    a = consul.store("a")
    b_lease = layout.ipam_key(C, consul.tokens["b"].pod_cidr)
    for key in (layout.node_key(C, "b"), b_lease, layout.rotation_key(C, "b"),
                layout.rotation_ready_key(C, "b", C, "a"), layout.rotation_key(C, "ab"),
                layout.config_key(C), layout.mesh_key(C), layout.service_key(C, "web"),
                layout.ipam_key(C, "10.250.9.0/24"), layout.config_key("other")):
        e = denied(consul, a.put, key, "x")
        assert e.status == 403, key
    assert denied(consul, a.delete, b_lease).status == 403
    assert denied(consul, a.delete, layout.cluster_prefix(C), recurse=True).status == 403
    e = denied(consul, a.txn, [KVOp.set(layout.node_key(C, "b"), "x")])  # a transaction is no way round
    assert "Permission denied" in str(e)
    assert consul.call(consul.admin.get, b_lease).value == b"b"  # untouched


def test_a_cannot_take_a_lease_of_its_own_choice(consul: Consul) -> None:
    """Its lease gone and its CIDR given to another, a's agent may not lease the next free one."""
    own = layout.ipam_key(C, consul.tokens["a"].pod_cidr)
    assert consul.call(consul.admin.put, own, "zz")
    try:
        cfg = ClusterConfig.from_json(consul.call(consul.admin.get, layout.config_key(C)).value)
        e = denied(consul, lease_pod_cidr, consul.store("a"), cfg, "a")
        assert "holds no pod-CIDR lease" in str(e) and e.hint and "acl_nodes" in e.hint
    finally:
        consul.call(consul.admin.put, own, "a")


def test_sessions_only_on_its_own_node(consul: Consul) -> None:
    a = consul.store("a")
    consul.call(consul.admin.catalog_register_node, "b", "192.0.2.2")
    assert denied(consul, a.session_create, "x", 10, node="b").status == 403
    assert denied(consul, a.session_create, "x", 10).status == 403  # the server's node: shared, so refused
    assert denied(consul, a.catalog_register_node, "b", "192.0.2.66").status == 403
    b_session = consul.call(consul.store("b").session_create, "wiremesh-agent sec/b", 10, node="b")
    try:
        assert consul.call(consul.store("b").put, layout.node_key(C, "b"), "{}", acquire=b_session)
        denied(consul, a.session_destroy, b_session)  # would delete b's record (behavior=delete)
        denied(consul, a.session_renew, b_session)
        assert consul.call(consul.admin.get, layout.node_key(C, "b")).session == b_session
    finally:
        consul.call(consul.admin.session_destroy, b_session)


def test_setup_wizard_writes_the_same_policies(consul: Consul, tmp_path: Path) -> None:
    """The wizard's acl_nodes give a third node its lease and token, and report the CIDR."""
    from wiremesh.clustermesh.wizard import ClusterAnswer, create_agent_tokens

    answer = ClusterAnswer(consul=ADDR, name=C, id=3, pod_cidr="10.250.0.0/16", acl_nodes=["c"])
    said: list[str] = []
    [path] = consul.call(create_agent_tokens, [answer], [consul.admin], tmp_path / "t", said.append)
    secret = path.read_text().strip()
    assert path.stat().st_mode & 0o777 == 0o600 and all(secret not in m for m in said)
    assert "pod CIDR 10.250.2.0/24 leased to it" in said[0]
    policy = next(p for p in consul.call(consul.admin.acl_policy_list) if p.name == "wiremesh-sec-c")
    rules = json.loads(consul.call(consul.admin.acl_policy_read, policy.policy_id).rules)
    assert layout.ipam_key(C, "10.250.2.0/24") in rules["key"] and "session_prefix" not in rules
