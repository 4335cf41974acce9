"""Ten agents started at the same moment lease ten different pod CIDRs."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from wiremesh.clustermesh import ipam
from wiremesh.lab import Lab



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
    leases = lab.consul(lambda s: ipam.leases(s, "lab"))  # plain or signed leases (the lab signs)
    assert len(leases) == 10 and set(leases.values()) == set(lab.nodes)
    assert sorted(leases) == sorted(str(n) for n in nets)


def test_release_gives_a_lease_back_only_when_the_node_is_gone(fresh_lab: Lab) -> None:
    import subprocess
    import sys

    from wiremesh.lab.netns import enter_cmd

    lab = fresh_lab
    lab.up(2)
    wm = [str(Path(sys.executable).with_name("wiremesh")), "--consul", lab.consul_address()]
    pod = json.loads(Path(lab.node("node2").dir, "state.json").read_text())["pod_cidr"]
    live = subprocess.run(enter_cmd(lab.hub, None) + wm + ["cluster", "release", "lab", "node2"],
                          capture_output=True, text=True)
    assert live.returncode == 1 and "still registered" in live.stderr, live.stderr
    lab.stop_agent("node2")  # SIGTERM: its record goes at once
    done = subprocess.run(enter_cmd(lab.hub, None) + wm + ["-o", "json", "cluster", "release", "lab", "node2"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["released"] == [pod]
    assert set(lab.consul(lambda s: ipam.leases(s, "lab")).values()) == {"node1"}
