"""The plan's policy section: compiled maps decide every flow as the reference does."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wiremesh.agent.policy_plan import LocalEndpoint, PolicyInputs, allocate, emulate, plan_policy
from wiremesh.clustermesh import FlowEnd, decide, parse_policy
from wiremesh.clustermesh.verdict import NO_POLICY
from wiremesh.tunnels import policy_model as pm

EAST = {"10.240.1.5": ("east", {"app": "frontend"}), "10.240.1.6": ("east", {"app": "other"}),
        "10.240.2.7": ("east", {"app": "api", "tier": "x"})}
WEST = {"10.241.1.5": ("west", {"app": "api"}), "10.241.1.9": ("west", {"app": "db"})}
LOCAL = [LocalEndpoint(11, "10.241.1.5", {"app": "api"}), LocalEndpoint(12, "10.241.1.9", {"app": "db"})]
ISSUE = {"name": "api-from-frontend", "selector": 'app == "api"', "order": 100, "ingress": [
    {"action": "allow", "from": {"selector": 'app == "frontend"'}, "ports": [{"port": 8080, "protocol": "tcp"}]},
    {"action": "deny"}]}


def inputs(*docs: dict[str, Any]) -> PolicyInputs:
    return PolicyInputs("west", LOCAL, {**EAST, **WEST}, [parse_policy(d) for d in docs],
                        ("10.240.0.0/16", "10.241.0.0/16"))


def test_the_issue_policy_compiles_to_a_few_entries() -> None:
    plan = plan_policy(inputs(ISSUE))
    m = plan.maps
    assert m.endpoints == {11: (11, pm.ENFORCE_INGRESS)}  # db: selected by nothing
    ok, rule = emulate(m, 11, "10.240.1.5", "tcp", 8080, "ingress")
    assert ok and plan.rule_names[rule] == "mesh/api-from-frontend ingress[0]"
    ok, rule = emulate(m, 11, "10.240.1.5", "tcp", 8081, "ingress")
    assert not ok and plan.rule_names[rule] == "mesh/api-from-frontend ingress[1]"
    assert not emulate(m, 11, "10.240.1.6", "tcp", 8080, "ingress")[0]
    assert emulate(m, 12, "10.240.1.6", "tcp", 8080, "ingress") == (True, 0)
    assert emulate(m, 11, "10.240.1.6", "tcp", 8080, "egress") == (True, 0)
    # per protocol: the ANY entry (deny) plus frontend's own for tcp
    assert len(m.rules) == 5


def test_identities_are_stable_and_distinct() -> None:
    a = allocate(["x", "y", "z"])
    b = allocate(["z", "y", "x", "w"])
    assert all(a[k] == b[k] for k in a) and len(set(b.values())) == 4
    assert all(v >= pm.FIRST_IDENTITY and v != pm.ANY_IDENTITY for v in b.values())


LABELS = st.fixed_dictionaries({}, optional={"app": st.sampled_from(["api", "frontend", "db"]),
                                             "tier": st.sampled_from(["x", "y"])})
SELECTORS = st.sampled_from(['app == "api"', 'app != "db"', "has(tier)", "all()", 'app in {"api", "db"}',
                             '!has(app)', 'tier == "x" || app == "frontend"'])
PORTS = st.lists(st.fixed_dictionaries({"protocol": st.sampled_from(["tcp", "udp"]),
                                        "port": st.sampled_from([53, 80, 8080, 8081])},
                                       optional={"end_port": st.sampled_from([8090, 9000])}), max_size=2)
PEER = st.fixed_dictionaries({}, optional={"selector": SELECTORS,
                                           "cidrs": st.sampled_from([["192.0.2.0/24"], ["10.240.0.0/16"], ["10.240.1.0/24"]]),
                                           "clusters": st.sampled_from([["east"], ["west"]])}).filter(bool)
RULE = st.fixed_dictionaries({"action": st.sampled_from(["allow", "deny"])},
                             optional={"peer": PEER, "ports": PORTS})


@st.composite
def policy_docs(draw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": draw(st.sampled_from(["a", "b", "c"])) + str(draw(st.integers(0, 99))),
                           "selector": draw(SELECTORS), "order": draw(st.sampled_from([1, 2, 100]))}
    for dname, peer_field in (("ingress", "from"), ("egress", "to")):
        rules = draw(st.lists(RULE, max_size=3))
        doc[dname] = [{**{k: v for k, v in r.items() if k != "peer"}, **({peer_field: r["peer"]} if "peer" in r else {})}
                      for r in rules]
    if draw(st.booleans()):
        doc["cluster"] = draw(st.sampled_from(["east", "west"]))
    return doc


FLOW_PEERS = ["10.240.1.5", "10.240.1.6", "10.240.2.7", "10.241.1.9", "192.0.2.9", "10.240.1.77", "10.240.9.9",
              "10.241.7.7", "8.8.8.8"]
PODS = ("10.240.0.0/16", "10.241.0.0/16")


def unknown_pod(ip: str, policies: list[Any]) -> bool:
    """No endpoint, and the longest prefix holding it is a pod CIDR (a rule's CIDR more specific
    than its pod CIDR gives it that CIDR's identity; one equal to it does not)."""
    if ip in EAST or ip in WEST or ip == "10.241.1.5":
        return False
    a = ipaddress.ip_address(ip)
    nets = [(n.prefixlen, 1, n) for p in policies for r in (*p.ingress, *p.egress) if r.peer for n in r.peer.cidrs]
    nets += [(ipaddress.ip_network(c).prefixlen, 2, ipaddress.ip_network(c)) for c in PODS]
    hits = sorted((plen, kind) for plen, kind, n in nets if a in n)
    return bool(hits) and hits[-1][1] == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(policy_docs(), max_size=4, unique_by=lambda d: (d["name"], d.get("cluster", ""))),
       local_labels=LABELS)
def test_compiled_maps_decide_as_the_reference(docs: list[dict[str, Any]], local_labels: dict[str, str]) -> None:
    policies = [parse_policy(d) for d in docs]
    local = [LocalEndpoint(21, "10.241.1.5", local_labels)]
    everyone = {**EAST, **WEST, "10.241.1.5": ("west", local_labels)}
    plan = plan_policy(PolicyInputs("west", local, everyone, policies, ("10.240.0.0/16", "10.241.0.0/16")))
    me = FlowEnd("10.241.1.5", "west", local_labels)
    for peer_ip in FLOW_PEERS:
        c, labels = everyone.get(peer_ip, ("", None))  # type: ignore[arg-type]
        peer = FlowEnd(peer_ip, c, labels)
        for proto, port in (("tcp", 80), ("tcp", 8080), ("tcp", 8085), ("tcp", 9001), ("udp", 53), ("icmp", 0)):
            for direction in ("ingress", "egress"):
                want = decide(policies, me, peer, direction, proto, port)
                got, rule = emulate(plan.maps, 21, peer_ip, proto, port, direction)
                if unknown_pod(peer_ip, policies):  # a pod not learnt yet: denied wherever a policy selects
                    assert got == (want.reason == NO_POLICY), (peer_ip, proto, port, direction, want)
                    continue
                assert got == want.allowed, (peer_ip, proto, port, direction, want)
                if want.rule >= 0:
                    assert plan.rule_names[rule] == f"{want.policy} {direction}[{want.rule}]"


def test_an_endpoint_whose_rules_are_too_fine_is_skipped_not_half_written() -> None:
    ports = [{"port": p, "protocol": "tcp"} for p in range(1000, 1040, 2)]
    doc = {"name": "fine", "selector": "all()", "ingress": [{"action": "allow", "ports": ports}]}
    plan = plan_policy(inputs(doc))
    assert set(plan.skipped) == {"10.241.1.5", "10.241.1.9"} and "port intervals" in plan.skipped["10.241.1.5"]
    # closed, never open: both enforced, everything denied
    assert set(plan.maps.endpoints) == {11, 12}
    assert not emulate(plan.maps, 11, "10.240.1.5", "tcp", 1000, "ingress")[0]
    assert emulate(plan.maps, 11, "10.240.1.5", "tcp", 1000, "egress")[0]  # (egress is not selected)


@pytest.mark.parametrize("ip, ident", [("10.240.1.77", "unknown"), ("8.8.8.8", "world"), ("10.241.1.9", "endpoint")])
def test_the_ipcache_gives_every_address_an_identity(ip: str, ident: str) -> None:
    plan = plan_policy(inputs(ISSUE))
    import ipaddress
    a = ipaddress.ip_address(ip)
    hits = [n for n in plan.maps.ipcache if a in n]
    if ident == "world":
        assert hits == []
    elif ident == "unknown":
        assert [n.prefixlen for n in hits] == [16]
    else:
        assert max(n.prefixlen for n in hits) == 32


def test_cidrs_that_cover_everything_compile() -> None:
    """0.0.0.0/1 and 128.0.0.0/1 leave no address to WORLD: planning goes on (it once raised)."""
    doc = {"name": "halves", "selector": "all()", "ingress": [
        {"action": "allow", "from": {"cidrs": ["0.0.0.0/1"]}}, {"action": "deny", "from": {"cidrs": ["128.0.0.0/1"]}},
        {"action": "allow", "from": {"cidrs": ["10.0.0.0/8"]}, "ports": [{"port": 22}]}]}
    plan = plan_policy(inputs(doc))
    assert emulate(plan.maps, 11, "8.8.8.8", "tcp", 80, "ingress")[0]
    assert not emulate(plan.maps, 11, "200.1.1.1", "tcp", 80, "ingress")[0]
    assert emulate(plan.maps, 11, "10.9.9.9", "tcp", 22, "ingress")[0]  # (10/8 inside 0/1: its own identity)
