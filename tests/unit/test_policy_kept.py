"""The policies last in force outlive an agent restart (agent.trust's policies-good.json): a
record made invalid while the agent was down never opens what its last good version closed."""

from __future__ import annotations

import json
from pathlib import Path

from wiremesh.agent.trust import TrustState
from wiremesh.clustermesh import layout, parse_policies, parse_policy

C = "east"
DOC = {"name": "api-from-frontend", "selector": 'app == "api"', "order": 100,
       "ingress": [{"action": "allow", "from": {"selector": 'app == "frontend"'},
                    "ports": [{"port": 8080, "protocol": "tcp"}]}, {"action": "deny"}],
       "egress": [], "cluster": C}
KEY = layout.policy_key(C, "api-from-frontend")


def test_policies_round_trip_through_the_state_dir(tmp_path: Path) -> None:
    p = parse_policy(DOC, KEY)
    trust = TrustState(tmp_path, C)
    assert trust.load_policies() == {}
    assert trust.save_policies({KEY: p})
    assert TrustState(tmp_path, C).load_policies() == {KEY: p}
    assert TrustState(tmp_path, "west").load_policies() == {}  # (another cluster's file is not ours)


def test_a_record_refused_at_start_is_stood_in_for_by_the_kept_one(tmp_path: Path) -> None:
    good = parse_policy(DOC, KEY)
    TrustState(tmp_path, C).save_policies({KEY: good})
    last = TrustState(tmp_path, C).load_policies()  # (what the agent's watch starts from)
    bad = json.dumps({**DOC, "ingress": [{"action": "allow-all"}]}).encode()
    out, refused = parse_policies({KEY: bad}, C, last=last)
    assert out == {KEY: good} and [k for k, _ in refused] == [KEY]
    assert "ingress[0].action" in refused[0][1]
    # deleted from Consul: gone from what is in force, and from what is kept next
    out, refused = parse_policies({}, C, last=last)
    assert out == {} and last == {}


def test_an_unreadable_or_foreign_file_keeps_nothing(tmp_path: Path) -> None:
    trust = TrustState(tmp_path, C)
    trust.policies_file.write_text("{not json")
    assert trust.load_policies() == {}
    trust.policies_file.write_text(json.dumps({"cluster": C, "policies": {KEY: {"name": 5}}}))
    assert trust.load_policies() == {}  # (the one entry does not parse: dropped, logged)


def test_a_policy_near_the_record_limit_is_kept_too(tmp_path: Path) -> None:
    """Kept as a document, not a record: the record size limit (16 KiB, checked on what Consul
    holds; the policy written back with its defaults can be longer) never drops a policy that was
    accepted."""
    rules = [{"action": "allow", "from": {"cidrs": [f"10.{i}.{j}.0/24" for j in range(60)]}} for i in range(24)]
    p = parse_policy({**DOC, "ingress": rules}, KEY)
    trust = TrustState(tmp_path, C)
    assert trust.save_policies({KEY: p})
    assert trust.policies_file.stat().st_size > 16 * 1024
    assert TrustState(tmp_path, C).load_policies() == {KEY: p}
