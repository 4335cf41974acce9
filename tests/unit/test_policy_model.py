"""Network policy documents (parsing, errors that name the field) and their verdicts (pure)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from wiremesh.clustermesh import InvalidRecord
from wiremesh.clustermesh.policy import Policy, parse_policy
from wiremesh.clustermesh.verdict import DEFAULT_DENY, NO_POLICY, FlowEnd, decide, flow

ISSUE_EXAMPLE = """
name: api-from-frontend
selector: app == "api"
order: 100
ingress:
  - action: allow
    from: {selector: app == "frontend"}
    ports: [{port: 8080, protocol: tcp}]
  - action: deny
egress: []
"""

FE = FlowEnd("10.240.1.5", "east", {"app": "frontend", "cluster": "east"})
OTHER = FlowEnd("10.240.1.6", "east", {"app": "other", "cluster": "east"})
API = FlowEnd("10.241.1.5", "west", {"app": "api", "cluster": "west"})
WORLD = FlowEnd("192.0.2.1", "", None)


def doc(text: str) -> Any:
    return yaml.safe_load(text)


def test_the_issue_example_parses_and_round_trips() -> None:
    p = parse_policy(doc(ISSUE_EXAMPLE), unknown_ok=False)
    assert p.name == "api-from-frontend" and p.order == 100 and len(p.ingress) == 2 and p.egress == ()
    assert p.applies("ingress") and not p.applies("egress")  # `egress: []` alone: ingress only (Calico)
    again = Policy.from_json(p.to_json())
    assert again == p and again.to_json() == p.to_json()


def test_the_issue_example_decides_as_users_expect() -> None:
    p = parse_policy(doc(ISSUE_EXAMPLE))
    assert flow([p], FE, API, "tcp", 8080).allowed
    v = flow([p], FE, API, "tcp", 8081)
    assert not v.allowed and v.ingress.describe("ingress") == "deny by mesh/api-from-frontend ingress[1]"
    assert not flow([p], OTHER, API, "tcp", 8080).allowed
    assert flow([p], API, FE, "tcp", 80).allowed  # fe is selected by nothing; api's egress by nothing
    assert flow([], OTHER, API, "tcp", 8081).ingress.reason == NO_POLICY


def test_selected_endpoints_are_default_deny_in_that_direction_only() -> None:
    p = parse_policy({"name": "eg", "selector": 'app == "frontend"', "types": ["egress"]})
    assert p.applies("egress") and not p.applies("ingress")
    d = decide([p], FE, API, "egress", "tcp", 8080)
    assert not d.allowed and d.reason == DEFAULT_DENY
    assert decide([p], FE, API, "ingress", "tcp", 8080).allowed


def test_deny_wins_at_equal_order_and_lower_order_goes_first() -> None:
    allow = parse_policy({"name": "a", "selector": "all()", "order": 10, "ingress": [{"action": "allow"}]})
    deny = parse_policy({"name": "b", "selector": "all()", "order": 10,
                         "ingress": [{"action": "deny", "from": {"selector": 'app == "other"'}}]})
    assert not decide([allow, deny], API, OTHER, "ingress", "tcp", 1).allowed
    assert decide([allow, deny], API, FE, "ingress", "tcp", 1).allowed
    early = parse_policy({"name": "z", "selector": "all()", "order": 1, "ingress": [{"action": "allow"}]})
    d = decide([allow, deny, early], API, OTHER, "ingress", "tcp", 1)
    assert d.allowed and d.policy == "mesh/z"


def test_cidrs_clusters_and_unknown_peers() -> None:
    p = parse_policy({"name": "c", "selector": "all()", "ingress": [
        {"action": "allow", "from": {"cidrs": ["192.0.2.0/24"]}},
        {"action": "allow", "from": {"clusters": ["east"]}, "ports": [{"protocol": "udp", "port": 53, "end_port": 60}]},
        {"action": "allow", "from": {"selector": "all()"}, "ports": [{"protocol": "icmp"}]},
    ]})
    assert decide([p], API, WORLD, "ingress", "tcp", 22).allowed  # by CIDR
    stranger = FlowEnd("198.51.100.1", "", None)
    assert not decide([p], API, stranger, "ingress", "icmp", 0).allowed  # a selector never matches an unknown peer
    assert decide([p], API, FE, "ingress", "udp", 60).allowed and not decide([p], API, FE, "ingress", "udp", 61).allowed
    assert decide([p], API, FE, "ingress", "icmp", 0).allowed


def test_a_cluster_policy_selects_only_its_clusters_endpoints() -> None:
    p = parse_policy({"name": "d", "cluster": "west", "selector": "all()", "ingress": [{"action": "deny"}]})
    assert not decide([p], API, FE, "ingress", "tcp", 1).allowed
    assert decide([p], FE, API, "ingress", "tcp", 1).allowed
    assert decide([p], FE, API, "ingress", "tcp", 1).policy == ""


@pytest.mark.parametrize("d, field, words", [
    ({"name": "Bad_Name", "selector": "all()"}, "name", "not a policy name"),
    ({"name": "p", "selector": 'app = "x"'}, "selector", "at character 5"),
    ({"name": "p", "selector": "all()", "order": -1}, "order", "within 0-1000000"),
    ({"name": "p", "selector": "all()", "ingress": [{"action": "permit"}]}, "ingress[0].action", "not one of allow, deny"),
    ({"name": "p", "selector": "all()", "ingress": [{"action": "allow", "ports": [{"port": 70000}]}]},
     "ingress[0].ports[0].port", "not a port"),
    ({"name": "p", "selector": "all()", "ingress": [{"action": "allow", "ports": [{"port": 9, "end_port": 8}]}]},
     "ingress[0].ports[0].end_port", "below port 9"),
    ({"name": "p", "selector": "all()", "ingress": [{"action": "allow", "ports": [{"protocol": "icmp", "port": 1}]}]},
     "ingress[0].ports[0].port", "icmp has no ports"),
    ({"name": "p", "selector": "all()", "egress": [{"action": "allow", "to": {"cidrs": ["10.0.0.1/8"]}}]},
     "egress[0].to.cidrs[0]", "not a CIDR"),
    ({"name": "p", "selector": "all()", "egress": [{"action": "allow", "to": {"cidrs": ["fd00::/8"]}}]},
     "egress[0].to.cidrs[0]", "not an IPv4 CIDR"),
    ({"name": "p", "selector": "all()", "ingress": [{"action": "allow", "to": {"cidrs": []}}]},
     "ingress[0].to", "names its peer with 'from'"),
    ({"name": "p", "selector": "all()", "ingress": [{"action": "allow", "from": {}}]}, "ingress[0].from", "names no peer"),
    ({"name": "p", "selector": "all()", "ingress": [{"action": "allow", "form": {}}]}, "ingress[0].form", "unknown field"),
    ({"name": "p", "selector": "all()", "types": ["sideways"]}, "types", "ingress and egress"),
    ({"name": "p", "selector": "all()", "ingress": {"action": "allow"}}, "ingress", "a list of rules"),
    ({"name": "p", "selector": 'a == "b"', "ingress": [{"action": "allow", "from": {"selector": "has("}}]},
     "ingress[0].from.selector", "expected a label name"),
])
def test_bad_documents_name_the_field_and_the_reason(d: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidRecord) as e:
        parse_policy(d, "policies/p.yaml", unknown_ok=False)
    assert e.value.field == field and words in e.value.reason, (e.value.field, e.value.reason)
    assert str(e.value).startswith(f"policies/p.yaml: {field}: ")
