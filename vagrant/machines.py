"""The Vagrant lab's machines, read from a lab topology file by vagrant/Vagrantfile's rules.

vagrant/Vagrantfile (Ruby, so that a laptop needs nothing but Vagrant) and this module (for
vagrant/test-federation.sh and the tests) apply the same rules; tests/unit/test_vagrantfile.py
evaluates the Vagrantfile and checks that both agree.

Rules: cluster c (0-based, in file order) is 10.99.c.0/24 with its router at 10.99.c.1, its
node k (1-based) is the VM CLUSTER-nodeK at 10.99.c.(10+k). Its Consul server runs on the first
node (`vagrant: {consul: node}`, the default) or on a VM of its own, CLUSTER-consul at 10.99.c.2
(`consul: vm`, and always for a cluster without nodes).

    python3 vagrant/machines.py TOPOLOGY          # shell assignments for test-federation.sh
    python3 vagrant/machines.py --json TOPOLOGY   # the machines as JSON
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Machine:
    name: str
    ip: str
    cluster: str
    index: int          # the cluster's position in the file: its network is 10.99.index.0/24
    consul: bool        # runs its cluster's Consul server
    node: bool          # runs a wiremesh agent
    consul_ip: str      # its cluster's Consul server

    @property
    def router(self) -> str:
        return f"10.99.{self.index}.1"


def vagrant_options(topology: dict[str, Any]) -> dict[str, Any]:
    opts = topology.get("vagrant") or {}
    return {"consul": opts.get("consul", "node"), "memory": int(opts.get("memory", 768)),
            "cpus": int(opts.get("cpus", 1))}


def machines(topology: dict[str, Any]) -> list[Machine]:
    """Every VM of the lab, in the order the Vagrantfile defines (and `vagrant up` starts) them."""
    mode = vagrant_options(topology)["consul"]
    if mode not in ("node", "vm"):
        raise ValueError(f"vagrant.consul: {mode!r} is neither 'node' nor 'vm'")
    out: list[Machine] = []
    for c, cl in enumerate(topology["clusters"]):
        name, nodes = cl["name"], int(cl.get("nodes", 2))
        consul_ip = f"10.99.{c}.2" if mode == "vm" or nodes == 0 else f"10.99.{c}.11"
        if consul_ip.endswith(".2"):
            out.append(Machine(f"{name}-consul", consul_ip, name, c, True, False, consul_ip))
        for k in range(1, nodes + 1):
            ip = f"10.99.{c}.{10 + k}"
            out.append(Machine(f"{name}-node{k}", ip, name, c, ip == consul_ip, True, consul_ip))
    return out


def answers(topology: dict[str, Any]) -> dict[str, Any]:
    """`wiremesh setup --answers` for the lab: every cluster with its own Consul server."""
    servers = {m.cluster: m.consul_ip for m in machines(topology)}
    return {"clusters": [{"consul": f"http://{servers[cl['name']]}:8500", "name": cl["name"], "id": cl["id"],
                          "pod_cidr": cl["pod_cidr"], "datacenter": cl.get("datacenter", cl["name"]),
                          "routing": cl.get("routing", "wireguard")} for cl in topology["clusters"]]}


def shell(topology: dict[str, Any]) -> str:
    """Bash assignments: NODES=(cluster:vm:index ...), CLUSTERS=(cluster:server-vm:address ...), ANSWERS."""
    ms = machines(topology)
    nodes = [f"{m.cluster}:{m.name}:{m.index}" for m in ms if m.node]
    clusters = [f"{m.cluster}:{m.name}:{m.ip}" for m in ms if m.consul]
    return "\n".join([
        "NODES=(" + " ".join(map(shlex.quote, nodes)) + ")",
        "CLUSTERS=(" + " ".join(map(shlex.quote, clusters)) + ")",
        "VMS=(" + " ".join(shlex.quote(m.name) for m in ms) + ")",
        "ANSWERS=" + shlex.quote(json.dumps(answers(topology))),
    ])


def load(path: str | Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("clusters"), list):
        raise TypeError("must hold 'clusters', a list")
    return data


def main(argv: list[str]) -> int:
    as_json = "--json" in argv
    args = [a for a in argv if a != "--json"]
    if len(args) != 1:
        print(__doc__.split("\n\n")[-1], file=sys.stderr)
        return 2
    try:
        topology = load(args[0])
        print(json.dumps([asdict(m) for m in machines(topology)], indent=1) if as_json else shell(topology))
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"machines.py: {args[0]}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
