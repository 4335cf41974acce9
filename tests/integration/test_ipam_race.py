"""Ten agents started at the same moment lease ten different pod CIDRs."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from clustermesh import layout
from lab import Lab



def test_ten_agents_at_once_lease_ten_cidrs(fresh_lab: Lab) -> None:
    lab = fresh_lab
    lab.up(0)
    for _ in range(10):
        lab.add_node(start=False, wait=False)
    for name in lab.nodes:  # as close to "at once" as one process can
        lab.start_agent(name)
    lab.wait_converged(timeout=120)
    cidrs = [json.loads(Path(n.dir, "state.json").read_text())["pod_cidr"] for n in lab.nodes.values()]
    assert len(set(cidrs)) == 10
    nets = [ipaddress.ip_network(c) for c in cidrs]
    assert not any(a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:])
    _, leases = lab.consul(lambda s: s.list(layout.ipam_prefix("lab")))
    owners = {item.value.decode() for item in leases.values()}
    assert len(leases) == 10 and owners == set(lab.nodes)
