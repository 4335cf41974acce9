"""The per-object reconcile model on a real lab: a refused route is an error object retried on its
own backoff, a node's key change is an in-place update of its peer, and roaming survives."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wiremesh.keys import PrivateKey, write_key_file
from wiremesh.lab import Lab

from .conftest import new_lab_name
from .helpers import ping_ok, record_key, wait_until, wg_peers


@pytest.fixture(scope="module")
def vxlab() -> Iterator[Lab]:
    lab = Lab(new_lab_name())
    try:
        lab.up(3, routing="vxlan")
        yield lab
    finally:
        lab.down()


def agent_status(lab: Lab, node: str) -> dict[str, Any]:
    n = lab.node(node)
    code, body = lab.http_get(n.health_url + "/status", timeout=2.0, cluster=n.cluster or None)
    assert code == 200, body
    data: dict[str, Any] = json.loads(body)
    return data


def full_pass(lab: Lab, node: str) -> None:
    """SIGHUP the agent and wait until a full pass has run (its count on /healthz grows)."""
    before = lab.health(node).get("full_passes", 0)
    os.kill(lab.node(node).pid, signal.SIGHUP)
    wait_until(lambda: lab.health(node).get("full_passes", 0) > before, 10, what=f"a full pass on {node}")


def pod_cidr(lab: Lab, node: str) -> str:
    return str(json.loads((Path(lab.node(node).dir) / "state.json").read_text())["pod_cidr"])


def routes(lab: Lab, node: str) -> str:
    return lab.run(node, "ip", "route", "show", "proto", "87", check=True).stdout


def test_a_refused_route_is_an_error_object_and_is_retried_alone(vxlab: Lab,
                                                                 timing: Callable[[str, float], None]) -> None:
    cidr3 = pod_cidr(vxlab, "node3")
    gw3 = cidr3.split("/")[0]  # node3's VXLAN gateway: its pod CIDR's network address
    # The obstacle: node3's gateway made a local address of node1, so the kernel refuses the
    # on-link route via it ("Nexthop has invalid gateway"). The route goes, as drift would.
    vxlab.run("node1", "ip", "addr", "add", f"{gw3}/32", "dev", "lo", check=True)
    try:
        vxlab.run("node1", "ip", "route", "del", cidr3, check=True)
        full_pass(vxlab, "node1")
        wait_until(lambda: any(e["kind"] == "route" and e["key"] == cidr3 for e in agent_status(vxlab, "node1")["errors"]),
                   10, what="the refused route to show as an error object")
        st = agent_status(vxlab, "node1")
        (err,) = [e for e in st["errors"] if e["key"] == cidr3]
        assert "invalid argument" in err["message"].lower(), err  # EINVAL: the gateway is local
        # Everything else is programmed: peers, the route to node2, node2's VXLAN entries.
        assert [e for e in st["errors"] if e["key"] != cidr3] == []
        assert st["kinds"]["peer"] == {"pending": 0, "done": 2, "error": 0}
        assert pod_cidr(vxlab, "node2") in routes(vxlab, "node1")
        # `wiremesh status` on the node shows it too (stderr) and in its JSON.
        p = vxlab.run("node1", "wiremesh", "status")
        assert p.returncode == 0, p.stderr
        assert f"error: route {cidr3}: update failed" in p.stderr
        j = json.loads(vxlab.run("node1", "wiremesh", "-o", "json", "status", check=True).stdout)
        assert [e["key"] for e in j["agent"]["errors"]] == [cidr3]
    finally:
        vxlab.run("node1", "ip", "addr", "del", f"{gw3}/32", "dev", "lo")
    t0 = time.monotonic()
    wait_until(lambda: cidr3 in routes(vxlab, "node1"), 10, what="the route once the obstacle is gone")
    timing("refused route programmed after its obstacle went", time.monotonic() - t0)
    wait_until(lambda: not agent_status(vxlab, "node1")["errors"], 5, what="no object in error")
    assert ping_ok(vxlab, "node1", vxlab.overlay_ip("node3"))


def test_a_roamed_endpoint_survives_a_full_pass(vxlab: Lab) -> None:
    key2 = record_key(vxlab, "node2")
    roamed = "10.99.0.99:51820"  # an address on the lab's own underlay switch
    vxlab.run("node1", "wg", "set", "wm0", "peer", key2, "endpoint", roamed, check=True)
    try:
        full_pass(vxlab, "node1")
        full_pass(vxlab, "node1")
        assert wg_peers(vxlab, "node1")[key2]["endpoint"] == roamed
    finally:
        vxlab.run("node1", "wg", "set", "wm0", "peer", key2, "endpoint", vxlab.node("node2").underlay + ":51820")


def test_a_key_change_updates_the_peer_in_place(vxlab: Lab) -> None:
    old = record_key(vxlab, "node2")
    cidr2 = pod_cidr(vxlab, "node2")
    samples: list[dict[str, dict[str, Any]]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            samples.append(wg_peers(vxlab, "node1"))

    t = threading.Thread(target=watch)
    t.start()
    try:
        # node2 restarts with a new key: it publishes its record with the new key (same session).
        vxlab.stop_agent("node2", signal.SIGKILL)
        new_key = PrivateKey.generate()
        write_key_file(Path(vxlab.node("node2").dir) / "private.key", new_key)
        vxlab.start_agent("node2")
        new = new_key.public_key().base64
        wait_until(lambda: new in wg_peers(vxlab, "node1") and new in wg_peers(vxlab, "node3"), 15,
                   what="node1 and node3 to have node2's new key")
    finally:
        done.set()
        t.join()
    assert samples
    for s in samples:
        # The old key may stay a moment (LINGER_S) for what it still holds, but with no allowed IP.
        assert not (old in s and new in s and s[old]["allowed_ips"]), "node2 listed twice with allowed IPs"
        holders = [k for k, p in s.items() if cidr2 in p["allowed_ips"]]
        assert len(holders) == 1, f"node2's allowed IPs held by {holders}"
    wait_until(lambda: old not in wg_peers(vxlab, "node1"), 10, what="node2's old key to go from node1")
    wait_until(lambda: ping_ok(vxlab, "node1", vxlab.overlay_ip("node2")), 10, what="node1 to reach node2")
