"""The network policy datapath on a real kernel: tc programs on pod veths, pinned maps.

A "node" namespace holds a bridge and the host sides of two pods' veths; pod `fe` (10.77.0.2)
connects to pod `api` (10.77.0.3), which listens on 8080 and 8081. Each test has its own
namespaces and pin directory and removes them, whatever happens.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.integration.helpers import wait_until
from wiremesh.tunnels.bpf import PIN_ROOT, mount_bpffs
from wiremesh.tunnels.bpf.policy import SIZES, PolicyDatapath
from wiremesh.tunnels.bpf.policy_model import (
    ALLOW,
    ANY_IDENTITY,
    DENY,
    ENFORCE_INGRESS,
    INGRESS,
    PROTOCOLS,
    Interval,
    PolicyMaps,
    RuleEntry,
    RuleKey,
)
from wiremesh.tunnels.netns import run_in_netns

if os.geteuid() != 0:
    pytest.skip("the policy datapath needs root (BPF, tc, network namespaces)", allow_module_level=True)

FE, API = "10.77.0.2", "10.77.0.3"
FE_ID = 300


@dataclass
class Rig:
    node: str
    fe: str
    api: str
    api_ifindex: int
    dp: PolicyDatapath

    def ns(self, name: str) -> str:
        return f"/run/netns/{name}"


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((API, port))
    s.listen(64)
    return s


def serve(s: socket.socket, stop: threading.Event) -> None:
    s.settimeout(0.2)
    while not stop.is_set():
        try:
            c, _ = s.accept()
        except OSError:
            continue
        c.sendall(b"ok")
        c.close()


def connects(rig: Rig, port: int, timeout: float = 1.0) -> bool:
    """fe -> api:port: the answer came back (SYN, SYN-ACK and data through both hooks)."""
    def go() -> bool:
        try:
            with socket.create_connection((API, port), timeout=timeout) as c:
                return c.recv(2) == b"ok"
        except OSError:
            return False
    return run_in_netns(rig.ns(rig.fe), go)


@pytest.fixture
def rig() -> Iterator[Rig]:
    tag = secrets.token_hex(3)
    node, fe, api = f"wmpol-{tag}-node", f"wmpol-{tag}-fe", f"wmpol-{tag}-api"
    pin = PIN_ROOT / f"test-policy-{tag}"
    stop = threading.Event()
    servers: list[threading.Thread] = []
    dp = PolicyDatapath(pin)
    try:
        for n in (node, fe, api):
            ip("netns", "add", n)
        ip("-n", node, "link", "add", "br0", "type", "bridge")
        for pod, addr in ((fe, FE), (api, API)):
            host = f"h{pod[-3:].replace('-', '')}"
            ip("-n", node, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", pod)
            ip("-n", node, "link", "set", host, "master", "br0", "up")
            ip("-n", pod, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", pod, "link", "set", "eth0", "up")
            ip("-n", pod, "link", "set", "lo", "up")
        ip("-n", node, "link", "set", "br0", "up")
        ifindex = json.loads(ip("-n", node, "-j", "link", "show", "hapi"))[0]["ifindex"]
        socks = [run_in_netns(f"/run/netns/{api}", listen, p) for p in (8080, 8081)]
        for s in socks:
            t = threading.Thread(target=serve, args=(s, stop), daemon=True)
            t.start()
            servers.append(t)
        mount_bpffs()
        dp.load_or_adopt()
        yield Rig(node, fe, api, ifindex, dp)
    finally:
        stop.set()
        for t in servers:
            t.join(2)
        dp.close()
        for n in (fe, api, node):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        shutil.rmtree(pin, ignore_errors=True)


def only_fe_to_8080(rig: Rig) -> PolicyMaps:
    tcp = PROTOCOLS["tcp"]
    return PolicyMaps(
        ipcache={__import__("ipaddress").ip_network(f"{FE}/32"): FE_ID},
        endpoints={rig.api_ifindex: (rig.api_ifindex, ENFORCE_INGRESS)},
        rules={RuleKey(rig.api_ifindex, FE_ID, tcp, INGRESS): RuleEntry((Interval(8080, 8080, ALLOW, 1),), DENY, 2),
               RuleKey(rig.api_ifindex, ANY_IDENTITY, tcp, INGRESS): RuleEntry((), DENY, 3)})


def test_map_layouts_match_the_compiled_object(rig: Rig) -> None:
    for name, (k, v) in SIZES.items():
        m = rig.dp._maps[name]
        assert (m.key_size, m.value_size) == (k, v), name


def test_an_enforced_pod_takes_only_what_its_rules_allow_and_replies_pass(rig: Rig) -> None:
    run_in_netns(rig.ns(rig.node), rig.dp.attach, rig.api_ifindex)
    assert connects(rig, 8080) and connects(rig, 8081)  # attached, nothing enforced yet
    report = rig.dp.sync(only_fe_to_8080(rig))
    assert report.written == 4 and rig.dp.read() == only_fe_to_8080(rig)
    assert connects(rig, 8080)  # allowed: SYN in, SYN-ACK and data back (conntrack)
    assert not connects(rig, 8081, timeout=0.5)  # denied
    assert rig.dp.sync(only_fe_to_8080(rig)).written == 0  # idempotent
    rig.dp.sync(PolicyMaps())
    assert rig.dp.read() == PolicyMaps()
    assert connects(rig, 8081)


def test_a_pod_under_an_ingress_policy_still_gets_the_replies_to_what_it_opens(rig: Rig) -> None:
    """Its egress is not enforced, but the answers come in through its enforced ingress: the
    flow it opened is in conntrack, so they pass."""
    def listen_fe() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((FE, 9000))
        s.listen(8)
        return s
    srv = run_in_netns(rig.ns(rig.fe), listen_fe)
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(srv, stop), daemon=True)
    t.start()
    try:
        run_in_netns(rig.ns(rig.node), rig.dp.attach, rig.api_ifindex)
        rig.dp.sync(only_fe_to_8080(rig))

        def api_to_fe() -> bool:
            try:
                with socket.create_connection((FE, 9000), timeout=1.0) as c:
                    return c.recv(2) == b"ok"
            except OSError:
                return False
        assert run_in_netns(rig.ns(rig.api), api_to_fe)
        assert not connects(rig, 8081, timeout=0.5)  # (and its ingress is still enforced)
    finally:
        stop.set()
        t.join(2)
        srv.close()


def test_a_restarted_agent_keeps_enforcing_without_a_gap(rig: Rig) -> None:
    run_in_netns(rig.ns(rig.node), rig.dp.attach, rig.api_ifindex)
    rig.dp.sync(only_fe_to_8080(rig))
    rig.dp.close()  # the agent goes away: programs stay on the veth, maps stay pinned
    assert run_in_netns(rig.ns(rig.node), PolicyDatapath.attached, rig.api_ifindex)
    assert not connects(rig, 8081, timeout=0.5) and connects(rig, 8080)
    again = PolicyDatapath(rig.dp.pin_dir).load_or_adopt()  # a new agent adopts them
    try:
        assert again.read() == only_fe_to_8080(rig)
        run_in_netns(rig.ns(rig.node), again.attach, rig.api_ifindex)  # replaced in place
        assert not connects(rig, 8081, timeout=0.5) and connects(rig, 8080)
    finally:
        again.close()
    run_in_netns(rig.ns(rig.node), PolicyDatapath.detach, rig.api_ifindex)
    wait_until(lambda: connects(rig, 8081), 5, what="8081 open again once detached")
