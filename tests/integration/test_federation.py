"""Two clusters (two Consul datacenters, WAN-joined), two nodes each, pods on every node."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wiremesh.lab import Lab
from wiremesh.lab.topology import load_topology

from .conftest import new_lab_name
from .helpers import (ECHO_CLIENT, Pinger, echo_servers, ping_ok, reaches, record_key, tunnel_diagnosis, wait_until,
                      wg_peers)


@pytest.fixture(scope="module")
def fed() -> Iterator[Lab]:
    lab = Lab(new_lab_name())
    try:
        lab.up(topology=load_topology(clusters=2, nodes=2))
        for node in sorted(lab.nodes):
            lab.add_pod("p-" + node, node)
        with echo_servers(lab):
            yield lab
    finally:
        lab.down()


def set_mode(lab: Lab, mode: str) -> None:
    for c in lab.clusters:
        if lab.cluster_config(c).routing != mode:
            lab.set_routing(mode, c)
    for n in lab.nodes:
        wait_until(lambda n=n: (lab.run(n, "ip", "link", "show", "wm-vxlan").returncode == 0) == (mode == "vxlan"),
                   15, what=f"{n} in {mode} mode")
    mtu = 1370 if mode == "vxlan" else 1420
    for p in lab.pods:
        wait_until(lambda p=p: f" mtu {mtu} " in lab.run(p, "ip", "-o", "link", "show", "eth0").stdout, 15,
                   what=f"{p} MTU {mtu}")


def test_clusters_are_members_of_one_mesh(fed: Lab, timing: Callable[[str, float], None]) -> None:
    wm = str(Path(sys.executable).with_name("wiremesh"))
    for n in ("west-node1", "west-node2"):  # a handshake makes a tunnel "up"
        took = reaches(fed, "east-node1", fed.overlay_ip(n))
        assert took is not None, tunnel_diagnosis(fed, "east-node1", n)
        timing(f"first ping east-node1 -> {n} after the lab is up", took)
    p = fed.run("east-node1", wm, "--consul", fed.consul_address("east"), "-o", "json", "cluster", "status", check=True)
    import json

    clusters = {c["cluster"]: c for c in json.loads(p.stdout)["clusters"]}
    assert set(clusters) == {"east", "west"}
    assert clusters["west"]["reachable"] and clusters["west"]["nodes"] == 2 and clusters["west"]["tunnels_up"] == 2
    assert clusters["east"]["id"] == 1 and clusters["west"]["id"] == 2


@pytest.mark.parametrize("mode", ["wireguard", "vxlan"])
def test_every_pod_reaches_every_pod_in_both_clusters(fed: Lab, mode: str) -> None:
    set_mode(fed, mode)
    pods = fed.pods
    for a, b in itertools.permutations(sorted(pods), 2):
        assert reaches(fed, a, pods[b].ip) is not None, \
            f"{mode}: {a} -> {b}\n" + tunnel_diagnosis(fed, pods[a].node, pods[b].node)
        t = fed.run(a, sys.executable, "-c", ECHO_CLIENT, pods[b].ip)
        assert t.returncode == 0, f"{mode}: TCP {a} -> {b}: {t.stderr[-200:]}"


def test_only_wireguard_between_clusters(fed: Lab, tmp_path: Path) -> None:
    pcap = tmp_path / "wan.pcap"
    hubs = " and ".join(f"not host {fed.cluster_state(c)['hub_ip']}" for c in fed.clusters)
    cap = subprocess.Popen(["ip", "netns", "exec", fed.prefix + "wan", "tcpdump", "--immediate-mode", "-i", "br0",
                            "-nn", "-U", "-w", str(pcap), f"ip and {hubs}"],
                           stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        assert cap.stderr is not None and b"listening on" in cap.stderr.readline()
        pods = fed.pods
        for a, b in (("p-east-node1", "p-west-node2"), ("p-west-node1", "p-east-node2")):
            assert fed.run(a, "ping", "-c", "2", "-i", "0.2", "-p", "5769726d65736821", pods[b].ip).returncode == 0
            assert fed.run(a, sys.executable, "-c", ECHO_CLIENT, pods[b].ip).returncode == 0
    finally:
        cap.send_signal(signal.SIGINT)
        cap.wait(timeout=10)
    lines = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True).stdout.splitlines()
    assert lines
    for line in lines:
        assert " UDP" in line and ".51820 > " in line and ".51820: " in line, f"not WireGuard: {line}"
    assert b"wiremesh" not in pcap.read_bytes()


def test_node_added_to_west_is_reached_from_east_pods(fed: Lab, timing) -> None:  # type: ignore[no-untyped-def]
    node = fed.add_node(cluster="west", start=False, wait=False)
    t0 = time.monotonic()
    fed.start_agent(node.name)
    wait_until(lambda: node.name in {n for n in fed.nodes if Path(fed.node(n).dir, "state.json").exists()}, 20,
               what="the new node's lease")
    addr = fed.overlay_ip(node.name)
    for src in ("p-east-node1", "p-east-node2"):
        wait_until(lambda s=src: ping_ok(fed, s, addr, 0.2), 20, interval=0, what=f"{src} to reach {node.name}")
    timing("west node reachable from east pods (from agent start)", time.monotonic() - t0)


def test_cut_link_to_west_consul(fed: Lab, timing) -> None:  # type: ignore[no-untyped-def]
    pods = fed.pods
    west_keys = {record_key(fed, n) for n in fed.nodes if fed.node(n).cluster == "west" and fed.node(n).pid}
    pingers = [Pinger(fed, "p-east-node1", pods["p-west-node1"].ip), Pinger(fed, "p-east-node1", pods["p-east-node2"].ip)]
    try:
        fed.cut_consul("west")
        deadline = time.monotonic() + float(__import__("os").environ.get("WIREMESH_TEST_OUTAGE_S", "30"))
        added = None
        while time.monotonic() < deadline:
            for n in ("east-node1", "east-node2"):
                assert west_keys <= set(wg_peers(fed, n)), f"{n} dropped a tunnel to west while its Consul was cut"
            if added is None and deadline - time.monotonic() < 20:
                added = fed.add_node(cluster="west", wait=False)
            time.sleep(1)
        t0 = time.monotonic()
        fed.restore_consul("west")
        assert added is not None
        wait_until(lambda: record_key(fed, added.name) in wg_peers(fed, "east-node1")
                   and record_key(fed, added.name) in wg_peers(fed, "east-node2"), 20, interval=0.05,
                   what="east to program the node added while cut off")
        timing("node added during the cut: programmed in east after the link returned", time.monotonic() - t0)
    finally:
        fed.restore_consul("west")
        results = [p.stop() for p in pingers]
    for sent, received in results:
        assert sent > 100 and received == sent, f"lost {sent - received} of {sent} pings while west's Consul was cut"
