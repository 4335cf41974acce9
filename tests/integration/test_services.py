"""Global services end to end (issue 9): two clusters x two nodes, a backend pod on every node,
a client pod in east; each backend's health is checked by the Consul client agent of its node,
each node's agent programs its eBPF lookup, the client connects to the VIP.

Pods: e1 on east-node1, e2 on east-node2, w1 on west-node1, w2 on west-node2; `client` on
east-node1. Each test defines its own service (own port) and deletes it at the end.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wiremesh.clustermesh import layout
from wiremesh.clustermesh.services import ServiceDef, ServicePort
from wiremesh.lab import Lab, services
from wiremesh.lab.topology import load_topology
from wiremesh.tunnels.bpf import read_pinned

from .conftest import new_lab_name
from .helpers import wait_until

if not Path("/sys/kernel/btf/vmlinux").exists():
    pytest.skip("the kernel has no BTF (/sys/kernel/btf/vmlinux)", allow_module_level=True)

PODS = {"e1": "east-node1", "e2": "east-node2", "w1": "west-node1", "w2": "west-node2"}
EAST, WEST = {"e1", "e2"}, {"w1", "w2"}
WM = str(Path(sys.executable).with_name("wiremesh"))

# N connections to VIP:PORT from one process: {"counts": {pod: n}, "fails": [errors]}.
CONNECT = r"""
import json, socket, sys
vip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
counts, fails = {}, []
for _ in range(n):
    try:
        with socket.create_connection((vip, port), timeout=2) as c:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while True:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
        pod = data.split(b"\r\n\r\n", 1)[1].decode().split()[0].removeprefix("pod=")
        counts[pod] = counts.get(pod, 0) + 1
    except (OSError, IndexError) as e:
        fails.append(repr(e))
print(json.dumps({"counts": counts, "fails": fails}))
"""

# A connection every INTERVAL seconds, forever: one line each, "<monotonic> ok <pod>" or
# "<monotonic> fail <error>" (CLOCK_MONOTONIC is the machine's: comparable with the test's).
STREAM = r"""
import socket, sys, time
vip, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
due = time.monotonic()
while True:
    t = time.monotonic()
    try:
        with socket.create_connection((vip, port), timeout=2) as c:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while True:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
        print("%.6f ok %s" % (t, data.split(b"\r\n\r\n", 1)[1].decode().split()[0].removeprefix("pod=")), flush=True)
    except (OSError, IndexError) as e:
        print("%.6f fail %r" % (t, e), flush=True)
    due += interval
    time.sleep(max(0.0, due - time.monotonic()))
"""

UDP_CLIENT = r"""
import json, socket, sys
vip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {"unconnected": [], "connected": []}
for _ in range(n):
    with socket.socket(type=socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(b"?", (vip, port))
        data, src = s.recvfrom(2048)
        out["unconnected"].append([data.decode().strip(), "%s:%d" % src])
    with socket.socket(type=socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.connect((vip, port))
        peer = "%s:%d" % s.getpeername()
        s.send(b"?")
        data, src = s.recvfrom(2048)
        out["connected"].append([data.decode().strip(), peer, "%s:%d" % src])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(new_lab_name())
    try:
        lab.up(topology=load_topology(clusters=2, nodes=2))
        for pod, node in PODS.items():
            lab.add_pod(pod, node)
        lab.add_pod("client", "east-node1")
        yield lab
    finally:
        lab.down()


@pytest.fixture
def cleanup(lab: Lab) -> Iterator[list[str]]:
    """Services a test adds; deleted (and their pods' checks passing again) however it ends."""
    names: list[str] = []
    yield names
    lab.load()  # the CLI, in another process, may have changed the state
    for pod in PODS:
        services.flag_file(lab, pod).unlink(missing_ok=True)
    for n in names:
        if n in lab.state.get("services", {}):
            services.delete(lab, n)


def connect(lab: Lab, vip: str, port: int, n: int, pod: str = "client") -> dict[str, int]:
    p = lab.run(pod, sys.executable, "-c", CONNECT, vip, str(port), str(n), timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert not out["fails"], f"failed connections: {out['fails'][:5]}"
    return out["counts"]  # type: ignore[no-any-return]


class Stream:
    """STREAM in a pod, its lines collected by a thread: (time, ok, pod or error)."""

    def __init__(self, lab: Lab, vip: str, port: int, interval: float, pod: str = "client") -> None:
        self.proc = lab.popen(pod, sys.executable, "-c", STREAM, vip, str(port), str(interval),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, bool, str]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t, status, rest = line.rstrip("\n").split(" ", 2)
            self.lines.append((float(t), status == "ok", rest))

    def since(self, t0: float) -> list[tuple[float, bool, str]]:
        return [x for x in list(self.lines) if x[0] >= t0]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.thread.join(5)


def vip_of(lab: Lab, name: str, cluster: str = "east") -> str:
    return services.service_state(lab, name)["vips"][cluster]  # type: ignore[no-any-return]


def wait_status(lab: Lab, name: str, pods: set[str], status: str, cluster: str) -> float:
    """Poll `cluster`'s Consul without pause (one request takes a few ms) until every pod's
    instance has `status`; returns the monotonic time it was first seen so."""
    def seen() -> bool:
        h = lab.consul(lambda s: s.health_service(name, passing=False), cluster)
        have = {i.meta.get("pod"): i.status for i in h.instances}
        return all(have.get(p) == status for p in pods)

    wait_until(seen, 15, interval=0, what=f"Consul to mark {sorted(pods)} {status}")
    return time.monotonic()


def moved(stream: Stream, since: float, to: set[str], settled: int = 30) -> float | None:
    """The time of the first connection after `since` from which every later one went to `to`
    (once `settled` have in a row), or None yet."""
    lines = stream.since(since)
    run = 0
    for t, ok, pod in reversed(lines):
        if not ok or pod not in to:
            break
        run += 1
    if run < settled:
        return None
    return lines[len(lines) - run][0]


def lab_cli(lab: Lab, *args: str, json_out: bool = False) -> subprocess.CompletedProcess[str]:
    """`wiremesh [-o json] lab service ARGS -n LAB` (the test's Lab object reloads its state after)."""
    argv = [WM, *(["-o", "json"] if json_out else []), "lab", "service", *args, "-n", lab.name]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_pods_and_their_backends_run_in_their_nodes_cgroup(lab: Lab, cleanup: list[str]) -> None:
    cleanup.append("cg")
    services.add(lab, "cg", 8079, ["e2", "w1"])
    for pod, node in (("client", "east-node1"), ("e2", "east-node2")):
        line = lab.run(pod, "cat", "/proc/self/cgroup", check=True).stdout.splitlines()[-1]
        assert line == f"0::/wiremesh/{lab.name}/{node}", line
    for pod, b in services.service_state(lab, "cg")["backends"].items():
        procs = Path(lab.node(PODS[pod]).cgroup, "cgroup.procs").read_text().split()
        assert str(b["pid"]) in procs, f"the backend in {pod} is in {PODS[pod]}'s cgroup"
    toml = Path(lab.node("west-node1").dir, "agent.toml").read_text()
    assert f'service_cgroup = "/sys/fs/cgroup/unified/wiremesh/{lab.name}/west-node1"' in toml
    assert f'bpf_pin_dir = "/sys/fs/bpf/wiremesh/{lab.name}-west-node1"' in toml


def test_lab_service_cli_is_idempotent_and_refuses_clearly(lab: Lab, cleanup: list[str]) -> None:
    cleanup.extend(["cli", "cli2", "cli3"])
    p = lab_cli(lab, "add", "cli", "--port", "8085", "--pods", "e1,w1", "--affinity", "remote", json_out=True)
    assert p.returncode == 0, p.stderr
    first = json.loads(p.stdout)["services"][0]
    assert first["policy"] == "affinity remote" and first["backends"] == ["e1", "w1"]
    pids = {pod: b["pid"] for pod, b in Lab(lab.name).load().state["services"]["cli"]["backends"].items()}
    p = lab_cli(lab, "add", "cli", "--port", "8085", "--pods", "e1,w1", "--affinity", "remote")
    assert p.returncode == 0 and "(unchanged)" in p.stderr, p.stderr
    again = {pod: b["pid"] for pod, b in Lab(lab.name).load().state["services"]["cli"]["backends"].items()}
    assert again == pids, "adding the same service again starts nothing new"
    assert set(connect(lab, first["vips"]["east"], 8085, 20)) == {"w1"}, "affinity remote from east"

    refused = {
        ("add", "cli2", "--port", "8085", "--pods", "e1"): "port 8085/tcp in pod e1 is already used by service 'cli'",
        ("add", "cli2", "--port", "8086", "--pods", "e1,nope"): "no pod 'nope'",
        ("add", "cli2", "--port", "8086", "--pods", "e1", "--prefer", "north"): "no cluster 'north'",
        ("add", "Bad_Name", "--port", "8086", "--pods", "e1"): "is not a service name",
        ("add", "cli2", "--port", "0", "--pods", "e1"): "0 is not in the range",
        ("fail", "nope"): "no pod 'nope'",
        ("fail", "client"): "pod client runs no service backend",
        ("del", "nope"): "no service 'nope'",
    }
    for args, message in refused.items():
        p = lab_cli(lab, *args)
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, (args, p.stderr[-400:])
    # A port some other process of the pod holds: the backend says so.
    other = lab.popen("e2", sys.executable, "-m", "http.server", "8087", stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: "8087" in lab.run("e2", "ss", "-Htln", "sport", "= :8087").stdout, 10,
                   what="a process to listen on 8087 in e2")
        p = lab_cli(lab, "add", "cli3", "--port", "8087", "--pods", "e2")
        assert p.returncode != 0 and "port 8087/tcp is already in use in pod e2" in p.stderr, p.stderr[-400:]
    finally:
        other.kill()
        other.wait()
    lab.load()
    listing = json.loads(lab_cli(lab, "list", json_out=True).stdout)["services"]
    cli = next(s for s in listing if s["service"] == "cli")
    assert [(b["pod"], b["cluster"], b["status"]) for b in cli["backends"]] == [("e1", "east", "passing"),
                                                                                ("w1", "west", "passing")]
    p = lab_cli(lab, "del", "cli")
    assert p.returncode == 0, p.stderr
    lab.load()
    assert "cli" not in lab.state.get("services", {})
    assert lab.consul(lambda s: s.get(layout.service_key("west", "cli")), "west") is None


def test_affinity_local_fails_over_to_the_other_cluster_and_back(lab: Lab, cleanup: list[str],
                                                                 timing: Callable[[str, float], None]) -> None:
    cleanup.append("web")
    services.add(lab, "web", 8080, sorted(PODS), affinity="local")
    vip = vip_of(lab, "web")
    assert vip == vip_of(lab, "web", "west"), "one VIP in both clusters (same service CIDR)"
    counts = connect(lab, vip, 8080, 50)
    assert set(counts) <= EAST and sum(counts.values()) == 50, f"affinity local from east: {counts}"

    stream = Stream(lab, vip, 8080, 0.005)
    try:
        wait_until(lambda: len(stream.lines) >= 20, 10, what="the connection loop to run")
        t_flag = time.monotonic()
        for pod in sorted(EAST):
            services.set_failing(lab, pod, True, wait=False)
        t_critical = wait_status(lab, "web", EAST, "critical", "east")
        wait_until(lambda: moved(stream, t_flag, WEST) is not None, 10, what="connections to move to west")
        t_moved = moved(stream, t_flag, WEST)
        assert t_moved is not None
        timing("health flag -> Consul marks the east backends critical (1 s check interval)", t_critical - t_flag)
        timing("affinity local: Consul critical -> new connections go to west", max(0.0, t_moved - t_critical))
        timing("affinity local: health flag -> new connections go to west (includes Consul's check)", t_moved - t_flag)
        after = [pod for t, ok, pod in stream.since(t_moved)]
        assert set(after) <= WEST
        counts = connect(lab, vip, 8080, 50)
        assert set(counts) == WEST, f"spread over all of west's backends (Cilium #46633): {counts}"

        t_flag = time.monotonic()
        for pod in sorted(EAST):
            services.set_failing(lab, pod, False, wait=False)
        t_passing = wait_status(lab, "web", EAST, "passing", "east")
        wait_until(lambda: moved(stream, t_flag, EAST) is not None, 10, what="connections to move back to east")
        t_back = moved(stream, t_flag, EAST)
        assert t_back is not None
        timing("affinity local: Consul passing again -> new connections back in east", max(0.0, t_back - t_passing))
        assert not [x for x in stream.lines if not x[1]], "no connection failed during the fail-over"
    finally:
        stream.stop()
    counts = connect(lab, vip, 8080, 50)
    assert set(counts) <= EAST, counts


def test_affinity_none_spreads_over_every_cluster(lab: Lab, cleanup: list[str],
                                                  counted: Callable[[str, float, str], None]) -> None:
    cleanup.append("spread")
    services.add(lab, "spread", 8081, sorted(PODS), affinity="none")
    t0 = time.monotonic()
    counts = connect(lab, vip_of(lab, "spread"), 8081, 1000)
    counted("affinity none: connections per second through the VIP (one client, HTTP/1.0)",
            1000 / (time.monotonic() - t0), "conn/s")
    assert set(counts) == set(PODS), counts
    for pod, n in counts.items():
        counted(f"affinity none: share of 1 000 connections to {pod}", n / 10, "%")
        assert n >= 150, f"every backend of both clusters gets at least 15 %: {counts}"


def test_prefer_orders_clusters(lab: Lab, cleanup: list[str]) -> None:
    cleanup.append("pref")
    services.add(lab, "pref", 8082, sorted(PODS), prefer=["west", "east"])
    vip = vip_of(lab, "pref")
    counts = connect(lab, vip, 8082, 50)
    assert set(counts) == WEST, f"prefer west,east from east: everything to west: {counts}"
    services.set_failing(lab, "w1", True)
    assert set(connect(lab, vip, 8082, 30)) == {"w2"}, "west has a healthy backend left: still west"
    services.set_failing(lab, "w2", True)
    assert set(connect(lab, vip, 8082, 50)) == EAST, "no healthy backend in west: the next cluster, east"
    services.set_failing(lab, "w1", False)
    services.set_failing(lab, "w2", False)
    assert set(connect(lab, vip, 8082, 50)) == WEST


def test_udp_replies_come_from_the_vip(lab: Lab, cleanup: list[str]) -> None:
    cleanup.append("echo")
    services.add(lab, "echo", 5353, ["e2", "w1"], affinity="none", udp=True)
    vip = vip_of(lab, "echo")
    p = lab.run("client", sys.executable, "-c", UDP_CLIENT, vip, "5353", "20", timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    answered = set()
    for text, src in out["unconnected"]:
        assert src == f"{vip}:5353", f"recvfrom() must show the VIP as the reply's source: {src}"
        answered.add(text)
    for text, peer, src in out["connected"]:
        assert peer == f"{vip}:5353", f"getpeername() of a connected UDP socket must show the VIP: {peer}"
        assert src == f"{vip}:5353"
        answered.add(text)
    assert answered <= {"pod=e2 cluster=east", "pod=w1 cluster=west"} and answered, answered


# --- bad definitions --------------------------------------------------------------------------
BAD_VIPS = {"bad-vip": "10.200.0.5", "bad-port": "10.96.0.201", "bad-proto": "10.96.0.202",
            "bad-affinity": "10.96.0.203", "huge": "10.96.0.204"}


def _metric(lab: Lab, node: str) -> dict[str, float]:
    n = lab.node(node)
    code, body = lab.http_get(n.health_url + "/metrics", cluster=n.cluster)
    assert code == 200
    out = {}
    for m in re.finditer(r'^wiremesh_invalid_records_total\{reason="([^"]+)"\} (\S+)$', body.decode(), re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def _bad_values(anchor_vip: str) -> dict[str, bytes]:
    base = json.loads(ServiceDef("x", "east", "10.96.0.200", (ServicePort(80),)).to_json())

    def value(name: str, **changes: Any) -> bytes:
        return json.dumps({**base, "name": name, **changes}).encode()

    return {
        "bad-vip": value("bad-vip", vip=BAD_VIPS["bad-vip"]),
        "zz-dup-vip": value("zz-dup-vip", vip=anchor_vip, ports=[{"port": 81, "protocol": "tcp"}]),
        "bad-port": value("bad-port", vip=BAD_VIPS["bad-port"], ports=[{"port": 70000, "protocol": "tcp"}]),
        "bad-proto": value("bad-proto", vip=BAD_VIPS["bad-proto"], ports=[{"port": 80, "protocol": "sctp"}]),
        "bad-affinity": value("bad-affinity", vip=BAD_VIPS["bad-affinity"], affinity="nearest"),
        "huge": value("huge", vip=BAD_VIPS["huge"], note="x" * (1024 * 1024)),
    }


def test_bad_definitions_are_refused(lab: Lab) -> None:
    east = [n for n in sorted(lab.nodes) if lab.node(n).cluster == "east"]
    create = lab.run("east-node1", WM, "-o", "json", "service", "create", "anchor", "--port", "80", check=True)
    anchor_vip = json.loads(create.stdout)["service"]["vip"]
    before = {n: _metric(lab, n) for n in east}
    bad = _bad_values(anchor_vip)
    keys = {name: layout.service_key("east", name) for name in bad}
    try:
        for name, value in bad.items():
            assert lab.consul(lambda s, k=keys[name], v=value: s.put(k, v), "east")

        def logged(node: str) -> dict[str, int]:
            text = Path(lab.node(node).dir, "agent.log").read_text(errors="replace")
            return {name: text.count(f"skipping invalid record {k}:") for name, k in keys.items()}

        for n in east:
            wait_until(lambda n=n: all(logged(n).values()), 15, what=f"{n} to log every bad definition")
        # One more change in Consul (a new snapshot for every agent): nothing is logged again.
        lab.run("east-node1", WM, "service", "create", "anchor2", "--port", "80", check=True)
        for n in east:
            wait_until(lambda n=n: any(fe.port == 80 and str(fe.vip) != anchor_vip
                                       for fe in read_pinned(lab.node(n).pin_dir)), 15, what=f"{n} to program anchor2")
            assert logged(n) == {name: 1 for name in bad}, f"{n}: each bad definition logged once"
            after = _metric(lab, n)
            grew = {r: after.get(r, 0) - before[n].get(r, 0) for r in after if after.get(r, 0) != before[n].get(r, 0)}
            assert sum(grew.values()) == len(bad), f"{n}: wiremesh_invalid_records_total grew by {grew}"
            assert {"vip", "value"} <= set(grew), grew
        for n in sorted(lab.nodes):
            held = read_pinned(lab.node(n).pin_dir)
            vips = {str(fe.vip) for fe in held}
            assert not vips & set(BAD_VIPS.values()), f"{n} programmed a bad definition: {sorted(vips)}"
            assert not [fe for fe in held if str(fe.vip) == anchor_vip and fe.port == 81], \
                f"{n} programmed the definition whose VIP is taken"
        for name in ("bad-vip", "zz-dup-vip"):  # valid JSON: inspect reads them, the maps hold nothing
            p = lab.run("east-node1", WM, "-o", "json", "service", "inspect", name, check=True)
            assert json.loads(p.stdout)["frontends"] == [], p.stdout
        for name in ("bad-port", "bad-proto", "bad-affinity", "huge"):
            p = lab.run("east-node1", WM, "service", "inspect", name)
            assert p.returncode == 1 and "error:" in p.stderr and "Traceback" not in p.stderr, p.stderr

        # The CLI refuses the same inputs, with one clear line and exit code != 0, writing nothing.
        refusals = {
            ("--port", "80", "--vip", BAD_VIPS["bad-vip"]): "outside the cluster's service CIDR",
            ("--port", "81", "--vip", anchor_vip): "already service 'anchor'",
            ("--port", "70000"): "ports are 1-65535",
            ("--port", "80/sctp"): "protocol must be one of tcp, udp",
            ("--port", "80", "--affinity", "nearest"): "'nearest' is not one of",
            # The largest value one argument can carry (MAX_ARG_STRLEN is 128 KiB; 1 MB cannot
            # reach the CLI through argv at all).
            ("--port", "80", "--prefer", ",".join(f"c{i}" for i in range(20000))): "at most 16 clusters",
        }
        for args, message in refusals.items():
            p = lab.run("east-node1", WM, "service", "create", "refused", *args)
            assert p.returncode != 0 and message in p.stderr, (args[:4], p.returncode, p.stderr[-500:])
            assert "Traceback" not in p.stderr
        p = lab.run("east-node1", WM, "service", "create", "x" * 120_000, "--port", "80")
        assert p.returncode != 0 and "is not a service name" in p.stderr, p.stderr[-300:]
        assert lab.consul(lambda s: s.get(layout.service_key("east", "refused")), "east") is None
    finally:
        for k in [*keys.values(), layout.service_key("east", "anchor"), layout.service_key("east", "anchor2")]:
            lab.consul(lambda s, k=k: s.delete(k), "east")


# --- agent restart ------------------------------------------------------------------------------
def test_sigkill_and_restart_of_the_agent_loses_no_connection(lab: Lab, cleanup: list[str],
                                                              counted: Callable[[str, float, str], None]) -> None:
    cleanup.append("steady")
    services.add(lab, "steady", 8083, sorted(PODS), affinity="local")
    vip = vip_of(lab, "steady")
    node = lab.node("east-node1")
    log = Path(node.dir, "agent.log")
    before = {str(fe): e.service_id for fe, e in read_pinned(node.pin_dir).items()}
    assert f"{vip}:8083/tcp" in before
    def adopted() -> list[str]:
        return re.findall(r"adopted (\d+) frontend\(s\)", log.read_text(errors="replace"))

    adopted_before = len(adopted())
    stream = Stream(lab, vip, 8083, 0.05)  # 20 connections a second
    try:
        wait_until(lambda: len(stream.lines) >= 10, 10, what="the connection loop to run")
        lab.stop_agent("east-node1", signal.SIGKILL)
        t_kill = time.monotonic()
        wait_until(lambda: len(stream.since(t_kill)) >= 10, 10, what="connections while the agent is down")
        lab.start_agent("east-node1")
        t_start = time.monotonic()
        wait_until(lambda: len(adopted()) > adopted_before, 20, what="the restarted agent to adopt its maps")
        wait_until(lambda: lab.health("east-node1").get("status") == "ok", 20, what="the restarted agent to be ok")
        wait_until(lambda: len(stream.since(t_start)) >= 40, 20, interval=0.05, what="40 connections after the restart")
    finally:
        stream.stop()
    fails = [x for x in stream.lines if not x[1]]
    counted("connections during the agent's SIGKILL and restart", len(stream.lines), "connections")
    assert not fails, f"{len(fails)} of {len(stream.lines)} connections failed: {fails[:3]}"
    assert {pod for _, _, pod in stream.lines} <= EAST
    assert int(adopted()[-1]) >= 1, "the restarted agent logged: adopted N frontend(s)"
    after = {str(fe): e.service_id for fe, e in read_pinned(node.pin_dir).items()}
    assert after == before, "the restarted agent kept every frontend and its service id (adopted, not rebuilt)"


# --- lab down -----------------------------------------------------------------------------------
def _bpftool(*args: str) -> Any:
    p = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True)
    return json.loads(p.stdout) if p.returncode == 0 and p.stdout.strip() else None


OUR_PROGRAMS = {"wm_connect4", "wm_sendmsg4", "wm_recvmsg4", "wm_getpeername4"}


def test_lab_down_leaves_no_bpf_object(lab: Lab) -> None:
    services.add(lab, "last", 8084, ["e1", "w2"])
    services.ensure_client(lab, "east-node2")
    pins = [Path(lab.node(n).pin_dir) for n in sorted(lab.nodes)]
    maps, links, progs = set(), set(), set()
    for pin in pins:
        for m in ("wm_lb4_services", "wm_lb4_backends", "wm_lb4_reverse_sk"):
            maps.add(_bpftool("map", "show", "pinned", str(pin / m))["id"])
        for p in OUR_PROGRAMS:
            link = _bpftool("link", "show", "pinned", str(pin / "links" / p))
            links.add(link["id"])
            progs.add(link["prog_id"])
    assert len(maps) == 3 * len(pins) and len(progs) == 4 * len(pins)
    cgroups = services.cgroup_root(lab)
    pids = [*lab.state["consul_clients"].values(), *(b["pid"] for s in lab.state["services"].values()
                                                     for b in s["backends"].values())]
    lab.down()

    def gone() -> bool:
        return (not {m["id"] for m in _bpftool("map", "show") or []} & maps
                and not {p["id"] for p in _bpftool("prog", "show") or []} & progs
                and not {x["id"] for x in _bpftool("link", "show") or []} & links)

    wait_until(gone, 10, interval=0.05, what="the lab's programs, links and maps to be freed")
    assert not [p for p in pins if p.exists()] and not cgroups.exists()
    from wiremesh.lab.netns import pid_alive

    assert not [p for p in pids if pid_alive(p)], "Consul client agents and backends stopped"
    if not Path("/sys/fs/bpf/wiremesh").exists():  # no other wiremesh lookup on this machine: none at all
        assert not [m for m in _bpftool("map", "show") or [] if m.get("name", "").startswith("wm_lb4_")]
        assert not [p for p in _bpftool("prog", "show") or [] if p.get("name") in OUR_PROGRAMS]
        assert not [x for x in _bpftool("link", "show") or [] if x.get("prog_id") in progs]
