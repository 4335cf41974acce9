"""A whole mesh on one host: per cluster a Consul server and its nodes, each node its own
network and mount namespace; several clusters are Consul datacenters joined over a "WAN".

Layout (lab "wm", clusters numbered c = 0, 1, ...):
    netns wmlab-wm-hub[-NAME]   cluster c's underlay switch and router: bridge br0 (10.99.c.1/24)
                                and its Consul server (datacenter of the cluster)
    netns wmlab-wm-NODE         eth0 10.99.c.1x/24 on br0, a real agent, its WireGuard device wm0
    netns wmlab-wm-wan          (several clusters) the WAN: a bridge joining the hubs (10.98.0.c+1)
    netns wmlab-wm-hub-sK       (`consul_servers` > 1, one cluster) Consul server K (10.99.0.K+1 on br0);
                                the hub then runs a Consul client agent joined to them, which the
                                agents and the operator talk to, so any server, the leader included,
                                may go without the hub's address changing
    /run/wiremesh-lab/wm/       state.json, Consul's data, each node's agent.toml, key, logs, mount ns
    /sys/fs/cgroup/unified/wiremesh/wm/NODE   the node's cgroup: its pods' processes, where its
                                eBPF service lookup (pinned in /sys/fs/bpf/wiremesh/wm-NODE) applies

Everything `up` makes is written to state.json before it is made, and `down` also sweeps the
namespaces by name, so a crash half-way through `up` is still cleaned by `down`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from wiremesh.clustermesh import (
    ClusterConfig,
    ConsulOptions,
    ConsulStore,
    InvalidRecord,
    check_node_name,
    init_cluster,
    load_cluster_config,
    overlay_address,
    wizard,
)
from wiremesh.agent import AGENT_NICE
from wiremesh.errors import WiremeshError
from wiremesh.tunnels import set_session_nice

from . import consul_server, netns, pods, secure, services, stop, teardown
from .topology import ClusterSpec
from .errors import LabError, LabExists, LabNotFound
from . import signing

T = TypeVar("T")
LAB_ROOT = Path(os.environ.get("WIREMESH_LAB_ROOT", "/run/wiremesh-lab"))
UNDERLAY = ipaddress.ip_network("10.99.0.0/16")  # cluster c: 10.99.c.0/24, its hub at 10.99.c.1
WAN = ipaddress.ip_network("10.98.0.0/24")  # hub of cluster c: 10.98.0.(c+1)
HUB_IP = "10.99.0.1"
HEALTH_PORT = 9477
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _agent_session_priority() -> None:
    """(In the keeper, after setsid.) Its session, which the agent's is, at the agent's nice."""
    set_session_nice(AGENT_NICE)


def _env(*assignments: str) -> list[str]:
    """`env` with PATH led by the directory of the running wiremesh (a venv's bin is not on PATH)."""
    bindir = str(Path(wiremesh_binary()).parent) if os.path.isabs(wiremesh_binary()) else ""
    path = os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if bindir and bindir not in path.split(":"):
        path = f"{bindir}:{path}"
    return ["env", f"PATH={path}", *assignments]


def wiremesh_binary() -> str:
    exe = Path(sys.executable).with_name("wiremesh")
    return str(exe) if exe.exists() else (shutil.which("wiremesh") or "wiremesh")


AGENT_PIDFILE = "agent.pid"  # written by lab/keeper.py: the pid of the agent it runs now


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _pidfile(node: "Node") -> Path:
    """Where the node's keeper writes its agent's pid: in the lab's own directory, not the
    node's state dir (a test may fill that, or mount over it inside the node)."""
    return Path(node.dir).parent.parent / "pids" / f"{node.name}.{AGENT_PIDFILE}"


def _kept_pid(node: "Node") -> int | None:
    """The agent's pid as its keeper last wrote it, if that process lives (in the node)."""
    pid = _read_pid(_pidfile(node))
    return pid if pid and netns.pid_alive(pid) and netns.pid_in_netns(pid, node.netns) else None


@dataclass
class Node:
    name: str
    index: int
    netns: str
    mountns: str
    underlay: str
    dir: str
    pid: int = 0
    keeper_pid: int = 0  # lab/keeper.py, which runs the agent (and starts it again if it fails)
    cluster: str = ""
    cgroup: str = ""  # cgroup v2 group of the node's pods ("": no service lookup)
    pin_dir: str = ""  # where the node's agent pins its eBPF programs and maps

    @property
    def health_url(self) -> str:
        return f"http://{self.underlay}:{HEALTH_PORT}"


class Lab:
    def __init__(self, name: str = "wm", root: Path = LAB_ROOT, signed: bool = True) -> None:
        if not re.fullmatch(r"[a-z0-9]{1,12}", name):
            raise LabError(f"--name: {name!r} must be 1-12 lowercase letters or digits")
        self.name = name
        self.root = root
        self.dir = root / name
        self.state: dict[str, Any] = {}
        self.signed = signed  # a new lab's clusters require signed records (lab.signing)
        self._hub_ex: dict[str, netns.NetnsExecutor] = {}

    # --- state ----------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return f"wmlab-{self.name}-"

    @property
    def hub(self) -> str:
        return self.prefix + "hub"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def exists(self) -> bool:
        return self.state_file.exists() or bool(netns.list_netns(self.prefix))

    def load(self) -> "Lab":
        try:
            self.state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            raise LabNotFound(f"no lab named {self.name!r}") from None
        return self

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1) + "\n")
        os.replace(tmp, self.state_file)

    @property
    def nodes(self) -> dict[str, Node]:
        out = {}
        for n, d in self.state.get("nodes", {}).items():
            node = Node(**d)
            if node.pid:
                node.pid = _kept_pid(node) or node.pid  # the keeper restarted the agent: its new pid
            out[n] = node
        return out

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise LabError(f"lab {self.name}: no node {name!r} (nodes: {', '.join(self.nodes) or 'none'})") from None

    # --- clusters -------------------------------------------------------------------------
    def cluster_state(self, cluster: str | None = None) -> dict[str, Any]:
        clusters = self.state.get("clusters", [])
        if not clusters:
            raise LabError(f"lab {self.name}: no cluster yet")
        if cluster is None:
            return clusters[0]  # type: ignore[no-any-return]
        for c in clusters:
            if c["name"] == cluster:
                return c  # type: ignore[no-any-return]
        raise LabError(f"lab {self.name}: no cluster {cluster!r} ({', '.join(c['name'] for c in clusters)})")

    @property
    def clusters(self) -> list[str]:
        return [c["name"] for c in self.state.get("clusters", [])]

    def cluster_config(self, cluster: str | None = None) -> ClusterConfig:
        c = self.cluster_state(cluster)
        return signing.cluster_config(self, ClusterConfig(
            name=c["name"], id=c["id"], pod_cidr=c["pod_cidr"], node_prefix_len=c["node_prefix_len"],
            routing=c["routing"], mtu=c.get("mtu", 0)))

    @property
    def cluster(self) -> ClusterConfig:
        return self.cluster_config()

    def consul_address(self, cluster: str | None = None) -> str:
        return secure.address(self, self.cluster_state(cluster)["hub_ip"], consul_server.HTTP_PORT)

    def consul_options(self, cluster: str | None = None, timeout: float = 3.0) -> ConsulOptions:
        """The operator's way to a cluster's Consul (with --tls/--acl: the CA, its certificate, the master token)."""
        name = self.cluster_state(cluster)["name"]
        return secure.operator_options(self, name, self.consul_address(name), timeout)

    # --- hubs: underlay switch, router and Consul per cluster -----------------------------
    def hub_executor(self, cluster: str | None = None) -> netns.NetnsExecutor:
        hub = self.cluster_state(cluster)["hub"] if self.state.get("clusters") else self.hub
        if hub not in self._hub_ex:
            self._hub_ex[hub] = netns.NetnsExecutor(hub, workers=8)
        return self._hub_ex[hub]

    def executor(self, ns: str) -> netns.NetnsExecutor:
        """Threads inside network namespace `ns` of the lab (kept until close())."""
        if ns not in self._hub_ex:
            self._hub_ex[ns] = netns.NetnsExecutor(ns, workers=4)
        return self._hub_ex[ns]

    def consul(self, fn: Callable[[ConsulStore], T], cluster: str | None = None) -> T:
        """Run `fn(store)` against a cluster's Consul, from inside that cluster's hub."""
        store = ConsulStore(self.consul_options(cluster))
        return self.hub_executor(cluster).call(fn, store)

    def http_get(self, url: str, timeout: float = 2.0, cluster: str | None = None) -> tuple[int, bytes]:
        def get() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()
        return self.hub_executor(cluster).call(get)

    def start_consul(self, cluster: str | None = None) -> None:
        c = self.cluster_state(cluster)
        for k in range(len(c.get("servers", []))):
            self.start_consul_server(k, c["name"])
        if c.get("consul_pid") and netns.pid_alive(c["consul_pid"]) and netns.pid_in_netns(c["consul_pid"], c["hub"]):
            return
        c["consul_pid"] = consul_server.start(c["hub"], self.dir / f"consul-{c['name']}.json",
                                              self.dir / f"consul-{c['name']}.log")
        self.save()
        consul_server.wait_ready(self.hub_executor(c["name"]), self.consul_address(c["name"]), c["consul_pid"],
                                 options=self.consul_options(c["name"], timeout=2.0))

    def stop_consul(self, cluster: str | None = None) -> None:
        """Stop a cluster's Consul server; returns once it has exited."""
        c = self.cluster_state(cluster)
        proc = stop.find(c.get("consul_pid", 0), f"consul of cluster {c['name']}",
                         belongs=lambda pid: netns.pid_in_netns(pid, c["hub"]))
        if proc:
            stop.stop([proc], timeout=teardown.DAEMON_TIMEOUT, kill_timeout=teardown.KILL_TIMEOUT)

    # --- several Consul servers (one cluster, `up(consul_servers=N)`) ------------------------
    def consul_servers(self, cluster: str | None = None) -> list[dict[str, Any]]:
        """The cluster's Consul servers when it has several (netns, ip, pid); [] with one (the hub's)."""
        return list(self.cluster_state(cluster).get("servers", []))

    def start_consul_server(self, k: int, cluster: str | None = None) -> int:
        """Start server `k` of the cluster (if it is not running); returns its pid."""
        c = self.cluster_state(cluster)
        s = c["servers"][k]
        if s.get("pid") and netns.pid_alive(s["pid"]) and netns.pid_in_netns(s["pid"], s["netns"]):
            return int(s["pid"])
        s["pid"] = consul_server.start(s["netns"], self.dir / f"consul-{c['name']}-s{k}.json",
                                       self.dir / f"consul-{c['name']}-s{k}.log")
        self.save()
        return int(s["pid"])

    def stop_consul_server(self, k: int, cluster: str | None = None, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to server `k` of the cluster; returns once it has exited."""
        c = self.cluster_state(cluster)
        s = c["servers"][k]
        proc = stop.find(s.get("pid", 0), f"Consul server {k} of cluster {c['name']}",
                         belongs=lambda pid: netns.pid_in_netns(pid, s["netns"]))
        if proc:
            stop.stop([proc], sig=sig, timeout=teardown.DAEMON_TIMEOUT, kill_timeout=teardown.KILL_TIMEOUT)
        s["pid"] = 0
        self.save()

    def consul_leader(self, cluster: str | None = None) -> int | None:
        """Which of the cluster's servers leads now (its index), None while there is no leader."""
        servers = self.consul_servers(cluster)
        try:
            leader = self.consul(lambda st: st.leader(), cluster)
        except WiremeshError:
            return None
        ip = leader.rsplit(":", 1)[0]
        return next((k for k, s in enumerate(servers) if s["ip"] == ip), None)

    def _add_servers(self, c: dict[str, Any], n: int) -> None:
        """`n` Consul servers on the cluster's switch, each in a namespace of its own; the hub's
        Consul becomes a client agent joined to them."""
        ips = [f"10.99.{c['index']}.{k + 2}" for k in range(n)]
        c["servers"] = [{"netns": f"{c['hub']}-s{k}", "ip": ip, "pid": 0} for k, ip in enumerate(ips)]
        self.save()
        for k, s in enumerate(c["servers"]):
            netns.netns_add(s["netns"])
            netns.sh("ip", "-n", c["hub"], "link", "add", f"s{k}", "type", "veth", "peer", "name", "eth0",
                     "netns", s["netns"])
            netns.sh("ip", "-n", c["hub"], "link", "set", f"s{k}", "master", "br0", "up")
            netns.sh("ip", "-n", s["netns"], "addr", "add", f"{s['ip']}/24", "dev", "eth0")
            netns.sh("ip", "-n", s["netns"], "link", "set", "eth0", "up")
            # One host, one machine id: each server needs a node id of its own to join the others.
            consul_server.write_config(
                self.dir / f"consul-{c['name']}-s{k}.json", datacenter=c["datacenter"],
                node_name=f"consul-{self.name}-{c['name']}-s{k}", data_dir=self.dir / f"consul-{c['name']}-s{k}-data",
                bind=s["ip"], extra={"bootstrap_expect": n, "retry_join": [i for i in ips if i != s["ip"]],
                                     "retry_interval": "1s", "disable_host_node_id": True})
        consul_server.write_client_config(self.dir / f"consul-{c['name']}.json", datacenter=c["datacenter"],
                                          node_name=f"consul-{self.name}-{c['name']}",
                                          data_dir=self.dir / f"consul-{c['name']}-data", bind=c["hub_ip"],
                                          join=ips, client_addr=f"{c['hub_ip']} 127.0.0.1")

    def cut_consul(self, cluster: str) -> None:
        """Cut every other cluster off from `cluster`'s Consul (its nodes' tunnels stay reachable)."""
        ip = self.cluster_state(cluster)["hub_ip"]
        for c in self.state["clusters"]:
            if c["name"] != cluster:
                netns.sh("ip", "-n", c["hub"], "route", "replace", "blackhole", f"{ip}/32")

    def restore_consul(self, cluster: str) -> None:
        ip = self.cluster_state(cluster)["hub_ip"]
        for c in self.state["clusters"]:
            if c["name"] != cluster:
                netns.sh("ip", "-n", c["hub"], "route", "del", "blackhole", f"{ip}/32", check=False)

    def _add_hub(self, c: dict[str, Any], wan: bool) -> None:
        hub = c["hub"]
        netns.netns_add(hub)
        netns.sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        netns.sh("ip", "-n", hub, "addr", "add", f"{c['hub_ip']}/24", "dev", "br0")
        netns.sh("ip", "-n", hub, "link", "set", "br0", "up")
        if wan:
            i = c["index"]
            netns.sh("ip", "-n", self.prefix + "wan", "link", "add", f"h{i}", "type", "veth", "peer", "name", "wan",
                     "netns", hub)
            netns.sh("ip", "-n", self.prefix + "wan", "link", "set", f"h{i}", "master", "br0", "up")
            netns.sh("ip", "-n", hub, "addr", "add", f"{WAN.network_address + i + 1}/24", "dev", "wan")
            netns.sh("ip", "-n", hub, "link", "set", "wan", "up")
            netns.sh("ip", "netns", "exec", hub, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def _route_hubs(self) -> None:
        for c in self.state["clusters"]:
            for d in self.state["clusters"]:
                if c is not d:
                    netns.sh("ip", "-n", c["hub"], "route", "replace", f"10.99.{d['index']}.0/24",
                             "via", str(WAN.network_address + d["index"] + 1))

    # --- up -------------------------------------------------------------------------------
    def up(self, nodes: int = 3, *, cluster: str = "lab", pod_cidr: str = "10.240.0.0/16",
           node_prefix_len: int = 24, routing: str = "wireguard", session_ttl: int = 10,
           topology: list[ClusterSpec] | None = None, connect: bool = True, progress: Progress = _quiet,
           wait: bool = True, tls: bool = False, acl: bool = False, consul_servers: int = 1) -> None:
        """Start the lab: one cluster from the arguments, or every cluster of `topology`.

        `tls`: Consul serves HTTPS only, with a CA made for the lab; `acl`: ACLs on, a token per
        node (see lab.secure). `consul_servers` > 1 (one cluster, no TLS or ACLs): a Consul
        cluster of that many servers, reached through a client agent in the hub.

        With several clusters, `connect=False` stops after the Consul servers are WAN-joined,
        leaving `wiremesh setup` to the caller (and no nodes are added).
        """
        if self.exists():
            raise LabExists(f"lab {self.name!r} already exists ({self.dir})")
        specs = topology or [ClusterSpec(name=cluster, id=1, datacenter="dc1", pod_cidr=pod_cidr, routing=routing,
                                         nodes=nodes, node_prefix_len=node_prefix_len)]
        if not 0 <= sum(s.nodes for s in specs) <= 200:
            raise LabError("--nodes: a lab holds 0-200 nodes")
        if not 1 <= consul_servers <= 7:
            raise LabError("consul_servers: 1-7")
        if consul_servers > 1 and (len(specs) > 1 or tls or acl):
            raise LabError("several Consul servers: only in a lab of one cluster, without TLS or ACLs")
        consul_server.consul_binary()
        netns.make_private_dir(self.root)
        self.dir.mkdir(parents=True)
        (self.dir / "mnt").mkdir()
        multi = len(specs) > 1
        self.state = {"name": self.name, "created": time.time(), "nodes": {}, "session_ttl": session_ttl,
                      "multi": multi, "tls": tls, "acl": acl, "clusters": [
                          {**dataclasses.asdict(s), "index": i, "hub": self.hub if i == 0 else f"{self.hub}-{s.name}",
                           "hub_ip": f"10.99.{i}.1", "consul_pid": 0} for i, s in enumerate(specs)]}
        self.save()
        secure.prepare(self)
        if multi:
            netns.netns_add(self.prefix + "wan")
            netns.sh("ip", "-n", self.prefix + "wan", "link", "add", "br0", "type", "bridge")
            netns.sh("ip", "-n", self.prefix + "wan", "link", "set", "br0", "up")
        for c in self.state["clusters"]:
            progress(f"cluster {c['name']}: switch {c['hub']} ({c['hub_ip']}/24 on br0)")
            self._add_hub(c, multi)
            if consul_servers > 1:
                self._add_servers(c, consul_servers)
                continue
            others = [d["hub_ip"] for d in self.state["clusters"] if d is not c]
            extra, master = secure.server_config(self, c)
            consul_server.write_config(self.dir / f"consul-{c['name']}.json", datacenter=c["datacenter"],
                                       node_name=f"consul-{self.name}-{c['name']}",
                                       data_dir=self.dir / f"consul-{c['name']}-data", bind=c["hub_ip"], join_wan=others,
                                       acl_master=master, extra=extra)
        if multi:
            self._route_hubs()
        for c in self.state["clusters"]:
            progress(f"cluster {c['name']}: Consul server (datacenter {c['datacenter']})")
            self.start_consul(c["name"])
        if multi and not connect:
            self.wait_federated()
            return
        if multi:
            progress("connecting the clusters with `wiremesh setup` (non-interactive)")
            self.connect_clusters(progress)
        else:
            self.consul(lambda s: init_cluster(s, self.cluster))
            progress(f"cluster {cluster!r}: pod CIDR {pod_cidr}, routing {routing}")
        for c in self.state["clusters"]:
            for _ in range(c["nodes"]):
                self.add_node(cluster=c["name"], progress=progress, wait=False)
        if wait:
            self.wait_converged(progress=progress)

    def setup_answers(self) -> list[wizard.ClusterAnswer]:
        return [wizard.ClusterAnswer(consul=self.consul_address(c["name"]), name=c["name"], id=c["id"], pod_cidr=c["pod_cidr"],
                                     datacenter=c["datacenter"], routing=c["routing"], mtu=c.get("mtu", 0),
                                     node_prefix_len=c["node_prefix_len"], signing_key_file=signing.answer_key_file(self, c["name"]),
                                     unsigned=not signing.signed(self)) for c in self.state["clusters"]]

    def wait_federated(self, timeout: float = 60) -> None:
        """Wait until every cluster's Consul knows every other datacenter (WAN federation)."""
        want = {c["datacenter"] for c in self.state["clusters"]}
        deadline = time.monotonic() + timeout
        for c in self.state["clusters"]:
            while set(self.consul(lambda s: s.datacenters(), c["name"])) < want:
                if time.monotonic() > deadline:
                    raise LabError(f"Consul of {c['name']} is not WAN-joined with all of {sorted(want)}")
                time.sleep(0.2)

    def connect_clusters(self, progress: Progress = _quiet) -> dict[str, str]:
        """WAN federation in place, then the wizard's checks and apply, from the first hub."""
        self.wait_federated()

        def run() -> dict[str, str]:
            plan, stores = wizard.prepare(self.setup_answers(), progress,
                                   store_for=lambda a: ConsulStore(self.consul_options(a.name), retries=False))
            return wizard.apply_setup(plan, stores, progress)
        return self.hub_executor().call(run)

    def add_node(self, name: str | None = None, *, cluster: str | None = None, progress: Progress = _quiet,
                 wait: bool = True, start: bool = True) -> Node:
        """Add a node to a cluster (the first by default): namespaces, underlay, agent.toml, agent."""
        c = self.cluster_state(cluster)
        mine = [n for n in self.nodes.values() if (n.cluster or self.clusters[0]) == c["name"]]
        k = next((i for i in range(1, 240) if f"10.99.{c['index']}.{10 + i}" not in {n.underlay for n in mine}), 0)
        if not k:
            raise LabError(f"cluster {c['name']}: no underlay address left (at most 239 nodes per cluster)")
        name = name or (f"{c['name']}-node{k}" if self.state.get("multi") else f"node{k}")
        try:
            check_node_name(name, "node")
        except InvalidRecord as e:
            raise LabError(f"node name: {e.reason}") from None
        if name in self.nodes or name in self.state.get("pods", {}):
            raise LabError(f"lab {self.name}: {name!r} is already taken")
        index = next(i for i in range(1, 10000) if i not in {n.index for n in self.nodes.values()})
        # Before the node's mount namespace exists: it must see the host's bpffs and cgroup2.
        lookup = services.prepare_lookup(self, name, progress)
        node = Node(name=name, index=index, netns=self.prefix + name, mountns=str(self.dir / "mnt" / name),
                    underlay=f"10.99.{c['index']}.{10 + k}", dir=str(self.dir / "nodes" / name), cluster=c["name"],
                    cgroup=lookup.get("cgroup", ""), pin_dir=lookup.get("pin_dir", ""))
        self.state["nodes"][name] = dataclasses.asdict(node)
        self.save()
        netns.netns_add(node.netns)
        hub_if = f"n{index}"
        if netns.sh("ip", "-n", c["hub"], "link", "show", hub_if, check=False).returncode != 0:
            netns.sh("ip", "-n", c["hub"], "link", "add", hub_if, "type", "veth", "peer", "name", "eth0",
                     "netns", node.netns)
        netns.sh("ip", "-n", c["hub"], "link", "set", hub_if, "master", "br0", "up")
        netns.sh("ip", "-n", node.netns, "addr", "replace", f"{node.underlay}/24", "dev", "eth0")
        netns.sh("ip", "-n", node.netns, "link", "set", "eth0", "up")
        if self.state.get("multi"):
            netns.sh("ip", "-n", node.netns, "route", "replace", str(UNDERLAY), "via", c["hub_ip"])
        netns.mountns_add(Path(node.mountns))
        Path(node.dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        secure.node_files(self, node)
        self._write_agent_config(node)
        signing.enroll_node(self, node)
        progress(f"{name}: cluster {c['name']}, {node.netns}, underlay {node.underlay}")
        if start:
            self.start_agent(name)
        if wait:
            self.wait_converged(progress=progress)
        return self.node(name)

    def _write_agent_config(self, node: Node) -> None:
        c = self.cluster_state(node.cluster or None)
        text = (
            f'node = "{node.name}"\ncluster = "{c["name"]}"\n'
            f'underlay_address = "{node.underlay}"\ninterface = "wm0"\n'
            f'key_file = "{node.dir}/private.key"\nstate_dir = "{node.dir}"\n'
            f'health_address = "{node.underlay}:{HEALTH_PORT}"\nsession_ttl = {self.state["session_ttl"]}\n'
            + (f'service_cgroup = "{node.cgroup}"\nbpf_pin_dir = "{node.pin_dir}"\n' if node.cgroup else "") +
            f'\n[consul]\naddress = "{self.consul_address(c["name"])}"\n' + secure.agent_toml(self, node)
        )
        Path(node.dir, "agent.toml").write_text(text)

    # --- agents ---------------------------------------------------------------------------
    def start_agent(self, name: str, wrapper: list[str] | None = None) -> int:
        """Start a node's agent (if it is not running); `wrapper` goes before its command line
        inside the node and must exec it (`env VAR=...`: the pid stays the agent's)."""
        node = self.node(name)
        if node.pid and netns.pid_alive(node.pid) and netns.pid_in_netns(node.pid, node.netns):
            return node.pid
        keeper = self.state["nodes"][name].get("keeper_pid", 0)
        if keeper and netns.pid_alive(keeper) and netns.pid_in_netns(keeper, node.netns):
            # Its keeper is between two runs of the agent (the restart backoff): the agent comes back.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and netns.pid_alive(keeper):
                pid = _kept_pid(node)
                if pid:
                    self.state["nodes"][name]["pid"] = pid
                    self.save()
                    return pid
                time.sleep(0.05)
        pidfile = _pidfile(node)
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.unlink(missing_ok=True)
        with open(Path(node.dir) / "agent.log", "ab") as out:
            # The keeper (lab/keeper.py) starts the agent again when it exits non-zero, as
            # systemd would on a host; the pid recorded is the agent's own (from its pid file).
            proc = subprocess.Popen(
                netns.enter_cmd(node.netns, Path(node.mountns))
                + [sys.executable, str(Path(__file__).with_name("keeper.py")), str(pidfile), "--"]
                + (wrapper or []) + [wiremesh_binary(), "agent", "--config", f"{node.dir}/agent.toml"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                # The keeper's session is the agent's: at the agent's priority, as a host's
                # systemd unit would be (tunnels.sched: per-process nice counts only within a session).
                preexec_fn=_agent_session_priority,
            )
        deadline = time.monotonic() + 10
        while (pid := _read_pid(pidfile)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"agent of {name} did not start; see {node.dir}/agent.log")
            time.sleep(0.005)
        self.state["nodes"][name].update(pid=pid, keeper_pid=proc.pid)
        self.save()
        return pid

    def agent_pidfile(self, name: str) -> Path:
        """Where the keeper of a node's agent writes the agent's pid (lab/keeper.py)."""
        return _pidfile(self.node(name))

    def stop_agent(self, name: str, sig: int = signal.SIGTERM, wait: bool = True) -> None:
        """Send `sig` to a node's agent; with `wait`, return once it has exited (SIGKILL after
        10 s, and an error if even that fails). Its wireguard-go keeps running, as on a host."""
        node = self.node(name)
        belongs = lambda pid: netns.pid_in_netns(pid, node.netns)  # noqa: E731
        proc = stop.find(node.pid, f"agent of {name}", belongs=belongs)
        # SIGTERM, SIGINT and SIGKILL end the agent for good, and its keeper with it: the keeper
        # gets SIGTERM (it forwards it, and never starts the agent again; after SIGKILL, sent to
        # the agent itself, it would not either, but it may be between two runs). Other signals
        # are the agent's alone.
        ending = sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL)
        keeper = stop.find(self.state["nodes"][name].get("keeper_pid", 0), f"keeper of {name}'s agent",
                           belongs=belongs) if ending else None
        if sig == signal.SIGKILL and proc:  # the agent dies at once, as a crash would
            proc.signal(sig)
        signals = [(p, signal.SIGTERM if p is keeper else sig) for p in (keeper, proc) if p]
        for p, s_ in signals:
            if wait:
                stop.stop([p], sig=s_, timeout=teardown.AGENT_TIMEOUT, kill_timeout=teardown.KILL_TIMEOUT)
            else:
                p.signal(s_)
                p.close()
        if ending or not proc:
            self.state["nodes"][name].update(pid=0, keeper_pid=0)
        self.save()

    def health(self, name: str) -> dict[str, Any]:
        try:
            node = self.node(name)
            code, body = self.http_get(node.health_url + "/healthz", timeout=1.0, cluster=node.cluster or None)
            d: dict[str, Any] = json.loads(body)
            d["http"] = code
            return d
        except (OSError, ValueError) as e:
            return {"status": "down", "error": str(e)}

    def overlay_ip(self, name: str) -> str:
        """The node's overlay address, from the lease its agent recorded."""
        try:
            state = json.loads(Path(self.node(name).dir, "state.json").read_text())
            return overlay_address(state["pod_cidr"])
        except (OSError, ValueError, KeyError) as e:
            raise LabError(f"{name}: its agent has not leased a pod CIDR yet ({e})") from None

    def peers(self, name: str) -> list[dict[str, Any]]:
        node = self.node(name)
        _, body = self.http_get(node.health_url + "/peers", cluster=node.cluster or None)
        return json.loads(body)  # type: ignore[no-any-return]

    def wait_converged(self, timeout: float = 60.0, progress: Progress = _quiet) -> None:
        """Wait until every running agent is healthy and has all other running nodes programmed."""
        deadline = time.monotonic() + timeout
        running = [n for n in self.nodes.values() if n.pid]
        want = len(running) - 1
        last = ""
        while time.monotonic() < deadline:
            states = {n.name: self.health(n.name) for n in running}
            ok = [n for n, h in states.items() if h.get("http") == 200 and h.get("peers_programmed") == want]
            msg = f"{len(ok)}/{len(running)} agents have all {want} peers programmed"
            if msg != last:
                progress(msg)
                last = msg
            if len(ok) == len(running):
                return
            for n in running:
                if not netns.pid_alive(n.pid):
                    raise LabError(f"agent of {n.name} exited; see {n.dir}/agent.log")
            time.sleep(0.1)
        raise LabError(f"lab {self.name}: not converged after {timeout:.0f}s ({last})")

    # --- cluster settings and pods ---------------------------------------------------------
    def set_routing(self, mode: str, cluster: str | None = None) -> str:
        """Switch the running cluster's routing mode (the agents follow it from Consul)."""
        c = self.cluster_state(cluster)
        cfg = self.consul(lambda s: load_cluster_config(s, c["name"]), c["name"])
        result = self.consul(lambda s: init_cluster(s, dataclasses.replace(cfg, routing=mode), force=True), c["name"])
        c["routing"] = mode
        self.save()
        return result

    def add_pod(self, name: str, node: str, labels: dict[str, str] | None = None) -> "pods.Pod":
        return pods.add_pod(self, name, node, labels)

    def del_pod(self, name: str) -> None:
        pods.del_pod(self, name)

    @property
    def pods(self) -> dict[str, "pods.Pod"]:
        return pods.pods(self)

    # --- exec -----------------------------------------------------------------------------
    def exec_argv(self, name: str, argv: list[str]) -> list[str]:
        """The command line that runs ARGV in a node, a pod, or a hub ("hub": the first cluster's,
        "hub-CLUSTER": that cluster's)."""
        if name == "hub":
            return (netns.enter_cmd(self.hub, None)
                    + _env(*secure.env(self, None, self.clusters[0]), *signing.env(self, self.clusters[0])) + argv)
        if name.startswith("hub-") and name[4:] in self.clusters:
            return (netns.enter_cmd(self.cluster_state(name[4:])["hub"], None)
                    + _env(*secure.env(self, None, name[4:]), *signing.env(self, name[4:])) + argv)
        pod = self.state.get("pods", {}).get(name)
        if pod is not None and name not in self.nodes:
            # In the node's cgroup first (the node's eBPF service lookup applies there), then in
            # the pod's network namespace (nsenter leaves /sys alone; `ip netns exec` would not).
            return services.join_cgroup(self.nodes.get(pod["node"])) + netns.enter_cmd(pod["netns"], None) + _env() + argv
        node = self.node(name)
        # Inside a node, `wiremesh` is the caller's own installation, finds the node's agent.toml
        # by itself (WIREMESH_AGENT_CONFIG) and talks to its cluster's Consul, as on a real host.
        config = f"WIREMESH_AGENT_CONFIG={Path(node.dir) / 'agent.toml'}"
        consul = f"CONSUL_HTTP_ADDR={self.consul_address(node.cluster or None)}"
        cluster = node.cluster or self.clusters[0]
        return (netns.enter_cmd(node.netns, Path(node.mountns))
                + _env(config, consul, *secure.env(self, node, cluster), *signing.env(self, cluster)) + argv)

    def run(self, name: str, *argv: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(self.exec_argv(name, list(argv)), capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise LabError(f"{name}: {' '.join(argv)}: exit {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
        return p

    def popen(self, name: str, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.exec_argv(name, list(argv)), **kw)

    # --- down -----------------------------------------------------------------------------
    def down(self, progress: Progress = _quiet) -> list[str]:
        """Remove everything `up` made; safe to run twice and after a crash half-way. Returns
        only once every process of the lab has exited (see teardown)."""
        return teardown.remove_lab(self, progress)

    def close(self) -> None:
        """Stop the threads this object runs inside the hubs' namespaces."""
        for ex in self._hub_ex.values():
            ex.close()
        self._hub_ex = {}


def list_labs(root: Path = LAB_ROOT) -> list[str]:
    found = {p.name for p in root.iterdir() if (p / "state.json").exists()} if root.is_dir() else set()
    for ns in netns.list_netns("wmlab-"):
        found.add(ns.split("-")[1])
    return sorted(found)
