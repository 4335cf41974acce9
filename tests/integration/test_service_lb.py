"""The eBPF socket load balancer on a real kernel: programs on a cgroup v2 group, clients in a
network namespace of the test's own.

Each test gets its own namespace (lo up, holding the VIP itself too, where a "direct" server
answers a connection the programs did not rewrite), one process serving TCP and
UDP on three backends (127.0.0.2-4:8080, each answering its name), its own cgroup and pin dir.
Clients join the cgroup, then enter the namespace (nsenter: `ip netns exec` would remount /sys
and hide the cgroup file system).
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import wait_until
from wiremesh.tunnels.bpf import PROGRAMS, Backend, Frontend, ServiceLB, cgroup_for, mount_bpffs, remove_cgroup
from wiremesh.tunnels.bpf.lb import MAPS

if os.geteuid() != 0:
    pytest.skip("the service LB needs root (BPF, cgroups, network namespaces)", allow_module_level=True)
_missing = [b for b in ("clang", "bpftool", "nsenter", "ip") if not shutil.which(b)]
if _missing:
    pytest.skip(f"missing {', '.join(_missing)}: run scripts/setup.sh", allow_module_level=True)
if not Path("/sys/kernel/btf/vmlinux").exists():
    pytest.skip("the kernel has no BTF (/sys/kernel/btf/vmlinux)", allow_module_level=True)

VIP, VPORT = "10.96.0.10", 80
BACKENDS = {f"b{i}": Backend(f"127.0.0.{i}", 8080, cluster_id=1) for i in (2, 3, 4)}

SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for name, addr, port in [("b2", "127.0.0.2", 8080), ("b3", "127.0.0.3", 8080), ("b4", "127.0.0.4", 8080),
                         ("direct", "10.96.0.10", 80)]:
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind((addr, port)); t.listen(256); sel.register(t, selectors.EVENT_READ, ("tcp", name))
    u = socket.socket(type=socket.SOCK_DGRAM); u.bind((addr, port))
    sel.register(u, selectors.EVENT_READ, ("udp", name))
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        kind, name = key.data
        if kind == "tcp":
            c, _ = key.fileobj.accept(); c.sendall(name.encode()); c.close()
        else:
            _, peer = key.fileobj.recvfrom(64); key.fileobj.sendto(name.encode(), peer)
"""

# Joins the cgroup (argv[1], may be empty), then the network namespace (argv[2]), then runs CLIENT.
WRAPPER = r"""
import os, sys
if sys.argv[1]:
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
os.execvp("nsenter", ["nsenter", "--net=" + sys.argv[2], sys.executable, "-c", sys.argv[3], *sys.argv[4:]])
"""

CLIENT = r"""
import json, socket, sys
mode, vip, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = {}
if mode == "tcp":
    names, peers = [], set()
    for _ in range(n):
        with socket.create_connection((vip, port), timeout=3) as c:
            peers.add("%s:%d" % c.getpeername())
            names.append(c.recv(64).decode())
    out = {"names": names, "peers": sorted(peers)}
else:
    sockets = []
    for _ in range(n):  # unconnected: sendto/recvfrom, three datagrams per socket
        with socket.socket(type=socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            seen = []
            for _ in range(3):
                s.sendto(b"?", (vip, port))
                data, addr = s.recvfrom(64)
                seen.append([data.decode(), "%s:%d" % addr])
            sockets.append(seen)
    with socket.socket(type=socket.SOCK_DGRAM) as c:  # connected
        c.settimeout(3)
        c.connect((vip, port))
        peer = "%s:%d" % c.getpeername()
        c.send(b"?")
        data, addr = c.recvfrom(64)
    out = {"sockets": sockets, "connected": {"peer": peer, "name": data.decode(), "from": "%s:%d" % addr}}
print(json.dumps(out))
"""


@dataclass
class Env:
    netns: str
    cgroup: Path
    pin_dir: Path
    lb: ServiceLB

    def client(self, mode: str, n: int, *, in_cgroup: bool = True, port: int = VPORT) -> Any:
        procs = str(self.cgroup / "cgroup.procs") if in_cgroup else ""
        proc = subprocess.run([sys.executable, "-c", WRAPPER, procs, f"/run/netns/{self.netns}", CLIENT,
                               mode, VIP, str(port), str(n)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


@pytest.fixture
def env() -> Iterator[Env]:
    uniq = secrets.token_hex(3)
    netns, server, lb = f"wmlb-{uniq}", None, None
    mount_bpffs()
    cgroup = cgroup_for(f"wiremesh-test/lb-{uniq}")
    pin_dir = Path(f"/sys/fs/bpf/wiremesh/test-lb-{uniq}")
    try:
        _ip("netns", "add", netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "addr", "add", f"{VIP}/32", "dev", "lo")
        server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", SERVER],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert _read_line(server, 10) == "ready", "backend server did not start"
        lb = ServiceLB(pin_dir, cgroup).load_or_adopt()
        yield Env(netns, cgroup, pin_dir, lb)
    finally:
        if lb is not None:
            lb.unload()
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        remove_cgroup(cgroup)
        try:
            cgroup.parent.rmdir()
        except OSError:
            pass  # another test's group is still in it


def _bpftool(*args: str) -> Any:
    proc = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None


def test_tcp_connections_spread_over_backends(env: Env) -> None:
    fe = Frontend(VIP, VPORT, "tcp")
    env.lb.update(fe, list(BACKENDS.values()))
    out = env.client("tcp", 200)
    counts = Counter(out["names"])
    assert set(counts) == set(BACKENDS), counts
    assert all(c >= 30 for c in counts.values()), f"each backend should get at least 15 %: {counts}"
    assert out["peers"] == [f"{VIP}:{VPORT}"], "getpeername() on a TCP socket shows the VIP"


def test_udp_replies_come_from_the_vip(env: Env) -> None:
    fe = Frontend(VIP, VPORT, "udp")
    env.lb.update(fe, list(BACKENDS.values()))
    out = env.client("udp", 30)
    used: Counter[str] = Counter()
    for seen in out["sockets"]:
        assert {addr for _, addr in seen} == {f"{VIP}:{VPORT}"}, f"replies must come from the VIP: {seen}"
        names = {name for name, _ in seen}
        assert len(names) == 1, f"one backend per socket: {seen}"
        used.update(names)
    assert set(used) <= set(BACKENDS) and len(used) >= 2, used
    assert out["connected"]["peer"] == f"{VIP}:{VPORT}", "getpeername() on a connected UDP socket shows the VIP"
    assert out["connected"]["from"] == f"{VIP}:{VPORT}"
    assert out["connected"]["name"] in BACKENDS


def test_new_connections_follow_updates(env: Env) -> None:
    fe = Frontend(VIP, VPORT, "tcp")
    env.lb.update(fe, list(BACKENDS.values()))
    env.lb.update(fe, [BACKENDS["b4"]])
    assert env.lb.read()[fe].backends == (BACKENDS["b4"],)
    assert set(env.client("tcp", 40)["names"]) == {"b4"}

    env.lb.update(fe, [BACKENDS["b2"], BACKENDS["b3"]])
    assert env.lb.read()[fe].backends == (BACKENDS["b2"], BACKENDS["b3"])
    assert set(env.client("tcp", 80)["names"]) == {"b2", "b3"}

    env.lb.update(fe, [])  # no backend: the VIP is left alone
    assert set(env.client("tcp", 10)["names"]) == {"direct"}
    env.lb.update(fe, [BACKENDS["b3"]])
    assert set(env.client("tcp", 10)["names"]) == {"b3"}
    assert env.lb.delete(fe) and not env.lb.delete(fe)
    assert env.lb.read() == {}
    assert set(env.client("tcp", 10)["names"]) == {"direct"}


def test_process_outside_the_cgroup_is_not_rewritten(env: Env) -> None:
    env.lb.update_many({Frontend(VIP, VPORT, "tcp"): list(BACKENDS.values()),
                        Frontend(VIP, VPORT, "udp"): list(BACKENDS.values())})
    assert set(env.client("tcp", 20, in_cgroup=False)["names"]) == {"direct"}
    out = env.client("udp", 3, in_cgroup=False)
    assert {name for seen in out["sockets"] for name, _ in seen} == {"direct"}
    assert set(env.client("tcp", 20)["names"]) <= set(BACKENDS)  # and the one inside is


def _link_ids(pin_dir: Path) -> dict[str, tuple[int, int]]:
    """program name -> (link id, program id) of the pinned links."""
    out = {}
    for name in PROGRAMS:
        info = _bpftool("link", "show", "pinned", str(pin_dir / "links" / name))
        assert info, f"no link pinned for {name}"
        out[name] = (info["id"], info["prog_id"])
    return out


def test_adopt_reuses_maps_and_swaps_programs(env: Env) -> None:
    fe = Frontend(VIP, VPORT, "tcp")
    env.lb.update(fe, list(BACKENDS.values()))
    before = _link_ids(env.pin_dir)
    held = env.lb.read()
    env.lb.close()  # the agent goes away; programs, maps and links stay

    assert set(env.client("tcp", 30)["names"]) <= set(BACKENDS)
    second = ServiceLB(env.pin_dir, env.cgroup).load_or_adopt()
    try:
        assert second.read() == held and held, "a new loader reads the same maps"
        after = _link_ids(env.pin_dir)
        for name in PROGRAMS:
            assert after[name][0] == before[name][0], f"{name}: the same link is kept"
            assert after[name][1] != before[name][1], f"{name}: the link runs the new program"
        attached = _bpftool("cgroup", "show", str(env.cgroup))
        assert sorted(p["id"] for p in attached) == sorted(p for _, p in after.values()), attached
        assert set(env.client("tcp", 60)["names"]) == set(BACKENDS)
        second.update(fe, [BACKENDS["b2"]])
        assert set(env.client("tcp", 20)["names"]) == {"b2"}
    finally:
        second.close()


def test_unload_leaves_nothing(env: Env) -> None:
    env.lb.update(Frontend(VIP, VPORT, "udp"), list(BACKENDS.values()))
    env.client("udp", 2)  # fills the reverse-NAT map too
    links = _link_ids(env.pin_dir)
    map_ids = [_bpftool("map", "show", "pinned", str(env.pin_dir / m))["id"] for m in MAPS]
    env.lb.unload()
    assert not env.pin_dir.exists()
    assert not _bpftool("cgroup", "show", str(env.cgroup))
    wait_until(lambda: all(_bpftool("link", "show", "id", str(lid)) is None for lid, _ in links.values()),
               5, what="the links to be gone")
    wait_until(lambda: all(_bpftool("prog", "show", "id", str(pid)) is None for _, pid in links.values()),
               5, what="the programs to be gone")
    wait_until(lambda: all(_bpftool("map", "show", "id", str(mid)) is None for mid in map_ids),
               5, what="the maps to be gone")
    assert set(env.client("tcp", 5)["names"]) == {"direct"}


def test_adopt_onto_another_cgroup_moves_the_programs(env: Env) -> None:
    fe = Frontend(VIP, VPORT, "tcp")
    env.lb.update(fe, [BACKENDS["b3"]])
    env.lb.close()
    other = env.cgroup.with_name(env.cgroup.name + "-b")
    other.mkdir()
    moved = ServiceLB(env.pin_dir, other)
    try:
        moved.load_or_adopt()
        assert not _bpftool("cgroup", "show", str(env.cgroup)), "nothing left on the old cgroup"
        assert len(_bpftool("cgroup", "show", str(other))) == len(PROGRAMS)
        assert moved.read()[fe].backends == (BACKENDS["b3"],), "the maps are kept"
        assert set(env.client("tcp", 10)["names"]) == {"direct"}  # the old group: no longer rewritten
        assert set(Env(env.netns, other, env.pin_dir, moved).client("tcp", 10)["names"]) == {"b3"}
    finally:
        moved.unload()
        remove_cgroup(other)
