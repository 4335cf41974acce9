"""Pods across nodes in both routing modes, with the MTU right, on real kernels and agents."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wiremesh.lab import Lab

from .conftest import new_lab_name
from .helpers import ECHO_CLIENT, Pinger, echo_servers, wait_until

@pytest.fixture(scope="module")
def podlab() -> Iterator[Lab]:
    lab = Lab(new_lab_name())
    try:
        lab.up(3)
        for i, node in enumerate(sorted(lab.nodes), 1):
            for suffix in "ab":
                lab.add_pod(f"p{i}{suffix}", node)
        with echo_servers(lab):
            yield lab
    finally:
        lab.down()


def routing(lab: Lab, mode: str) -> None:
    if lab.cluster.routing != mode:
        lab.set_routing(mode)
    want_vxlan = mode == "vxlan"
    for node in lab.nodes:
        wait_until(lambda n=node: (lab.run(n, "ip", "link", "show", "wm-vxlan").returncode == 0) == want_vxlan
                   and len([l for l in lab.run(n, "ip", "route", "show", "proto", "87").stdout.splitlines()
                            if ("wm-vxlan" in l) == want_vxlan and "/24" in l]) == 2,
                   15, what=f"{node} to switch to {mode}")
    mtu = 1370 if want_vxlan else 1420
    for pod in lab.pods:
        wait_until(lambda p=pod: pod_mtu(lab, p) == mtu, 15, what=f"pod {pod} to get MTU {mtu}")


def pod_mtu(lab: Lab, pod: str) -> int:
    line = lab.run(pod, "ip", "-o", "link", "show", "eth0", check=True).stdout
    return int(line.split(" mtu ")[1].split()[0])


@pytest.mark.parametrize("mode", ["wireguard", "vxlan"])
def test_every_pod_reaches_every_pod(podlab: Lab, mode: str) -> None:
    routing(podlab, mode)
    pods = podlab.pods
    for a, b in itertools.permutations(sorted(pods), 2):
        p = podlab.run(a, "ping", "-c", "1", "-W", "2", pods[b].ip)
        assert p.returncode == 0, f"{mode}: {a} cannot ping {b} ({pods[b].ip})"
        t = podlab.run(a, sys.executable, "-c", ECHO_CLIENT, pods[b].ip)
        assert t.returncode == 0, f"{mode}: TCP {a} -> {b}: {t.stderr[-300:]}"


@pytest.mark.parametrize("mode", ["wireguard", "vxlan"])
def test_captures_show_only_wireguard_on_the_underlay(podlab: Lab, mode: str, tmp_path: Path) -> None:
    routing(podlab, mode)
    pods = podlab.pods
    under, inner = tmp_path / "underlay.pcap", tmp_path / "wm0.pcap"
    caps = [podlab.popen("hub", "tcpdump", "--immediate-mode", "-i", "br0", "-nn", "-U", "-w", str(under), "ip and not host 10.99.0.1",
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL),
            podlab.popen("node1", "tcpdump", "--immediate-mode", "-i", "wm0", "-nn", "-U", "-w", str(inner), "ip",
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)]
    try:
        for c in caps:
            assert b"listening on" in c.stderr.readline()  # type: ignore[union-attr]
        for a, b in (("p1a", "p2a"), ("p1b", "p3b"), ("p2b", "p1a")):
            assert podlab.run(a, "ping", "-c", "2", "-i", "0.2", "-p", "5769726d65736821", pods[b].ip).returncode == 0
            assert podlab.run(a, sys.executable, "-c", ECHO_CLIENT, pods[b].ip).returncode == 0
    finally:
        for c in caps:
            c.send_signal(signal.SIGINT)
            c.wait(timeout=10)
    lines = subprocess.run(["tcpdump", "-nn", "-r", str(under)], capture_output=True, text=True).stdout.splitlines()
    assert lines
    for line in lines:
        assert " UDP" in line and ".51820 > " in line and ".51820: " in line, f"{mode}: not WireGuard: {line}"
        assert ".4789" not in line and "ICMP" not in line
    assert bytes.fromhex("5769726d65736821") * 2 not in under.read_bytes()
    assert b"wiremesh" not in under.read_bytes()
    wm0 = subprocess.run(["tcpdump", "-nn", "-r", str(inner)], capture_output=True, text=True).stdout
    vxlan = [l for l in wm0.splitlines() if ".4789: " in l or "VXLAN" in l]
    if mode == "vxlan":
        assert vxlan, "vxlan mode: no VXLAN packets inside WireGuard"
    else:
        assert not vxlan


@pytest.mark.parametrize("mode", ["wireguard", "vxlan"])
def test_df_ping_at_exactly_the_pod_mtu(podlab: Lab, mode: str) -> None:
    routing(podlab, mode)
    pods = podlab.pods
    mtu = pod_mtu(podlab, "p1a")
    assert mtu == (1420 if mode == "wireguard" else 1370)
    for pod in pods:
        assert pod_mtu(podlab, pod) == mtu
    assert podlab.run("node1", "ip", "-o", "link", "show", "wm0").stdout.split(" mtu ")[1].split()[0] == "1420"
    payload = mtu - 28  # IPv4 20 + ICMP 8
    ok = podlab.run("p1a", "ping", "-c", "1", "-W", "2", "-M", "do", "-s", str(payload), pods["p3b"].ip)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    too_big = podlab.run("p1a", "ping", "-c", "1", "-W", "2", "-M", "do", "-s", str(payload + 1), pods["p3b"].ip)
    assert too_big.returncode != 0
    assert "message too long" in too_big.stderr + too_big.stdout


def test_switching_modes_under_a_running_ping(podlab: Lab, counted) -> None:  # type: ignore[no-untyped-def]
    routing(podlab, "wireguard")
    pods = podlab.pods
    pinger = Pinger(podlab, "p1a", pods["p2b"].ip, interval=0.05)
    try:
        time.sleep(1)
        routing(podlab, "vxlan")
        time.sleep(1)
        routing(podlab, "wireguard")
        time.sleep(1)
    finally:
        sent, received = pinger.stop()
    lost = sent - received
    counted("pings lost across wireguard->vxlan->wireguard (20/s)", lost, f"packets of {sent}")
    assert lost <= 20, f"lost {lost} of {sent} pings (more than 1 s at 20/s) across two switches"
