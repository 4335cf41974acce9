"""A whole mesh on one host: a Consul server and N nodes, each its own network and mount namespace.

Layout (lab "wm"):
    netns wmlab-wm-hub      the underlay "switch": bridge br0 (10.99.0.1/24) and the Consul server
    netns wmlab-wm-node1    eth0 10.99.0.11/24 on br0, a real agent, its WireGuard device wm0
    /run/wiremesh-lab/wm/   state.json, Consul's data, each node's agent.toml, key, logs, mount ns

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

from clustermesh import ClusterConfig, ConsulOptions, ConsulStore, init_cluster, load_cluster_config, overlay_address

from . import consul_server, netns, pods
from .errors import LabError, LabExists, LabNotFound

T = TypeVar("T")
LAB_ROOT = Path(os.environ.get("WIREMESH_LAB_ROOT", "/run/wiremesh-lab"))
UNDERLAY = ipaddress.ip_network("10.99.0.0/24")
HUB_IP = "10.99.0.1"
HEALTH_PORT = 9477
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def wiremesh_binary() -> str:
    exe = Path(sys.executable).with_name("wiremesh")
    return str(exe) if exe.exists() else (shutil.which("wiremesh") or "wiremesh")


@dataclass
class Node:
    name: str
    index: int
    netns: str
    mountns: str
    underlay: str
    dir: str
    pid: int = 0

    @property
    def health_url(self) -> str:
        return f"http://{self.underlay}:{HEALTH_PORT}"


class Lab:
    def __init__(self, name: str = "wm", root: Path = LAB_ROOT) -> None:
        if not re.fullmatch(r"[a-z0-9]{1,12}", name):
            raise LabError(f"--name: {name!r} must be 1-12 lowercase letters or digits")
        self.name = name
        self.root = root
        self.dir = root / name
        self.state: dict[str, Any] = {}
        self._hub_ex: netns.NetnsExecutor | None = None

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
        return {n: Node(**d) for n, d in self.state.get("nodes", {}).items()}

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise LabError(f"lab {self.name}: no node {name!r} (nodes: {', '.join(self.nodes) or 'none'})") from None

    @property
    def consul_address(self) -> str:
        return f"http://{HUB_IP}:{consul_server.HTTP_PORT}"

    @property
    def cluster(self) -> ClusterConfig:
        return ClusterConfig(**self.state["cluster"])

    # --- the hub: underlay switch and Consul ----------------------------------------------
    def hub_executor(self) -> netns.NetnsExecutor:
        if self._hub_ex is None:
            self._hub_ex = netns.NetnsExecutor(self.hub, workers=8)
        return self._hub_ex

    def consul(self, fn: Callable[[ConsulStore], T]) -> T:
        """Run `fn(store)` against the lab's Consul, from inside the hub namespace."""
        store = ConsulStore(ConsulOptions(address=self.consul_address, timeout=3.0))
        return self.hub_executor().call(fn, store)

    def http_get(self, url: str, timeout: float = 2.0) -> tuple[int, bytes]:
        def get() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()
        return self.hub_executor().call(get)

    def start_consul(self) -> None:
        pid = self.state.get("consul_pid", 0)
        if pid and netns.pid_alive(pid):
            return
        pid = consul_server.start(self.hub, self.dir / "consul.json", self.dir / "consul.log")
        self.state["consul_pid"] = pid
        self.save()
        consul_server.wait_ready(self.hub_executor(), self.consul_address, pid)

    def stop_consul(self) -> None:
        pid = self.state.get("consul_pid", 0)
        if pid:
            netns.terminate([pid])

    # --- up -------------------------------------------------------------------------------
    def up(self, nodes: int = 3, *, cluster: str = "lab", pod_cidr: str = "10.240.0.0/16",
           node_prefix_len: int = 24, routing: str = "wireguard", session_ttl: int = 10,
           progress: Progress = _quiet, wait: bool = True) -> None:
        if self.exists():
            raise LabExists(f"lab {self.name!r} already exists ({self.dir})")
        if not 0 <= nodes <= 200:
            raise LabError(f"--nodes: {nodes} is outside 0-200")
        consul_server.consul_binary()
        netns.make_private_dir(self.root)
        self.dir.mkdir(parents=True)
        (self.dir / "mnt").mkdir()
        self.state = {"name": self.name, "created": time.time(), "nodes": {}, "consul_pid": 0,
                      "session_ttl": session_ttl,
                      "cluster": json.loads(ClusterConfig(name=cluster, id=1, pod_cidr=pod_cidr,
                                                          node_prefix_len=node_prefix_len,
                                                          routing=routing).to_json())}
        self.save()
        progress(f"underlay switch {self.hub} ({HUB_IP}/24 on br0)")
        netns.netns_add(self.hub)
        netns.sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        netns.sh("ip", "-n", self.hub, "addr", "add", f"{HUB_IP}/{UNDERLAY.prefixlen}", "dev", "br0")
        netns.sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        progress("Consul server (1.8.7) in the hub")
        consul_server.write_config(self.dir / "consul.json", datacenter="dc1", node_name=f"consul-{self.name}",
                                   data_dir=self.dir / "consul-data", bind=HUB_IP)
        self.start_consul()
        self.consul(lambda s: init_cluster(s, self.cluster))
        progress(f"cluster {cluster!r}: pod CIDR {pod_cidr}, routing {routing}")
        for _ in range(nodes):
            self.add_node(progress=progress, wait=False)
        if wait:
            self.wait_converged(progress=progress)

    def add_node(self, name: str | None = None, *, progress: Progress = _quiet, wait: bool = True,
                 start: bool = True) -> Node:
        used = {n.index for n in self.nodes.values()}
        index = next(i for i in range(1, 240) if i not in used)
        name = name or f"node{index}"
        if name in self.nodes:
            raise LabError(f"lab {self.name}: node {name!r} exists")
        node = Node(name=name, index=index, netns=self.prefix + name, mountns=str(self.dir / "mnt" / name),
                    underlay=str(UNDERLAY.network_address + 10 + index), dir=str(self.dir / "nodes" / name))
        self.state["nodes"][name] = node.__dict__
        self.save()
        netns.netns_add(node.netns)
        hub_if = f"n{index}"
        if not netns.sh("ip", "-n", self.hub, "link", "show", hub_if, check=False).returncode == 0:
            netns.sh("ip", "-n", self.hub, "link", "add", hub_if, "type", "veth", "peer", "name", "eth0",
                     "netns", node.netns)
        netns.sh("ip", "-n", self.hub, "link", "set", hub_if, "master", "br0", "up")
        netns.sh("ip", "-n", node.netns, "addr", "replace", f"{node.underlay}/{UNDERLAY.prefixlen}", "dev", "eth0")
        netns.sh("ip", "-n", node.netns, "link", "set", "eth0", "up")
        netns.mountns_add(Path(node.mountns))
        Path(node.dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._write_agent_config(node)
        progress(f"{name}: {node.netns}, underlay {node.underlay}")
        if start:
            self.start_agent(name)
        if wait:
            self.wait_converged(progress=progress)
        return self.node(name)

    def _write_agent_config(self, node: Node) -> None:
        text = (
            f'node = "{node.name}"\ncluster = "{self.state["cluster"]["name"]}"\n'
            f'underlay_address = "{node.underlay}"\ninterface = "wm0"\n'
            f'key_file = "{node.dir}/private.key"\nstate_dir = "{node.dir}"\n'
            f'health_address = "{node.underlay}:{HEALTH_PORT}"\nsession_ttl = {self.state["session_ttl"]}\n'
            f'\n[consul]\naddress = "{self.consul_address}"\n'
        )
        Path(node.dir, "agent.toml").write_text(text)

    # --- agents ---------------------------------------------------------------------------
    def start_agent(self, name: str) -> int:
        node = self.node(name)
        if node.pid and netns.pid_alive(node.pid):
            return node.pid
        with open(Path(node.dir) / "agent.log", "ab") as out:
            proc = subprocess.Popen(
                netns.enter_cmd(node.netns, Path(node.mountns))
                + [wiremesh_binary(), "agent", "--config", f"{node.dir}/agent.toml"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )
        self.state["nodes"][name]["pid"] = proc.pid
        self.save()
        return proc.pid

    def stop_agent(self, name: str, sig: int = signal.SIGTERM, wait: bool = True) -> None:
        node = self.node(name)
        if node.pid and netns.pid_alive(node.pid):
            os.kill(node.pid, sig)
            deadline = time.monotonic() + 10
            while wait and netns.pid_alive(node.pid) and time.monotonic() < deadline:
                netns._reap()
                time.sleep(0.02)
        self.state["nodes"][name]["pid"] = 0
        self.save()

    def health(self, name: str) -> dict[str, Any]:
        try:
            code, body = self.http_get(self.node(name).health_url + "/healthz", timeout=1.0)
            d = json.loads(body)
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
        _, body = self.http_get(self.node(name).health_url + "/peers")
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
    def set_routing(self, mode: str) -> str:
        """Switch the running cluster's routing mode (the agents follow it from Consul)."""
        cfg = self.consul(lambda s: load_cluster_config(s, self.state["cluster"]["name"]))
        result = self.consul(lambda s: init_cluster(s, dataclasses.replace(cfg, routing=mode), force=True))
        self.state["cluster"]["routing"] = mode
        self.save()
        return result

    def add_pod(self, name: str, node: str) -> "pods.Pod":
        return pods.add_pod(self, name, node)

    def del_pod(self, name: str) -> None:
        pods.del_pod(self, name)

    @property
    def pods(self) -> dict[str, "pods.Pod"]:
        return pods.pods(self)

    # --- exec -----------------------------------------------------------------------------
    def exec_argv(self, name: str, argv: list[str]) -> list[str]:
        """The command line that runs ARGV in a node, a pod ("pod NAME" or just its name) or the hub."""
        if name == "hub":
            return netns.enter_cmd(self.hub, None) + argv
        pod = self.state.get("pods", {}).get(name)
        if pod is not None and name not in self.nodes:
            return netns.enter_cmd(pod["netns"], None) + argv
        node = self.node(name)
        return netns.enter_cmd(node.netns, Path(node.mountns)) + argv

    def run(self, name: str, *argv: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(self.exec_argv(name, list(argv)), capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise LabError(f"{name}: {' '.join(argv)}: exit {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
        return p

    def popen(self, name: str, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.exec_argv(name, list(argv)), **kw)

    # --- down -----------------------------------------------------------------------------
    def down(self, progress: Progress = _quiet) -> list[str]:
        """Remove everything `up` made; safe to run twice and after a crash half-way."""
        removed: list[str] = []
        try:
            self.load()
        except (LabNotFound, ValueError):
            self.state = {}
        names = set(netns.list_netns(self.prefix))
        names |= {n["netns"] for n in self.state.get("nodes", {}).values()}
        pids: set[int] = set()
        for ns in names:
            pids.update(netns.pids_in_netns(ns))
        for n in self.state.get("nodes", {}).values():
            if n.get("pid"):
                pids.add(n["pid"])
        if self.state.get("consul_pid"):
            pids.add(self.state["consul_pid"])
        pids.discard(os.getpid())
        if pids:
            progress(f"stopping {len(pids)} processes")
            netns.terminate(sorted(pids))
        if self._hub_ex:
            self._hub_ex.close()
            self._hub_ex = None
        for ns in sorted(names):
            netns.netns_del(ns)
            removed.append(f"netns {ns}")
        mnt = self.dir / "mnt"
        if mnt.is_dir():
            for f in mnt.iterdir():
                netns.umount(f)
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
            removed.append(f"dir {self.dir}")
        if self.root.is_dir() and not any(self.root.iterdir()):
            netns.umount(self.root)
            try:
                self.root.rmdir()
            except OSError:
                pass
        for r in removed:
            progress(f"removed {r}")
        return removed


def list_labs(root: Path = LAB_ROOT) -> list[str]:
    found = {p.name for p in root.iterdir() if (p / "state.json").exists()} if root.is_dir() else set()
    for ns in netns.list_netns("wmlab-"):
        found.add(ns.split("-")[1])
    return sorted(found)
