"""Consul stopped for 30 s: the dataplane stays, agents come back by themselves."""

from __future__ import annotations

import os
import signal
import time


from wiremesh.clustermesh import layout
from wiremesh.lab import Lab

from .helpers import Pinger, ping_ok, wait_until, wg_peers

OUTAGE_S = float(os.environ.get("WIREMESH_TEST_OUTAGE_S", "30"))


def test_consul_outage_keeps_tunnels_and_recovers(lab3: Lab, timing) -> None:  # type: ignore[no-untyped-def]
    lab = lab3
    peers_before = {n: set(wg_peers(lab, n)) for n in lab.nodes}
    pingers = [Pinger(lab, "node1", lab.overlay_ip("node2"), 0.05), Pinger(lab, "node3", lab.overlay_ip("node1"), 0.05)]
    try:
        lab.stop_consul()
        # An agent restarted while Consul is away comes back from its cached lease and config,
        # keeps its device as it is and prunes nothing: it has no snapshot to prune against.
        lab.stop_agent("node2", signal.SIGKILL)
        lab.start_agent("node2")
        wait_until(lambda: lab.health("node2").get("device") is True, 20, what="node2's agent up without Consul")
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:
            for n in lab.nodes:
                assert set(wg_peers(lab, n)) == peers_before[n], f"{n} lost a tunnel while Consul was down"
            time.sleep(1)
        wait_until(lambda: all(lab.health(n).get("consul") is False for n in lab.nodes), 5,
                   what="agents to notice Consul is down")
        t0 = time.monotonic()
        lab.start_consul()
        wait_until(lambda: all(lab.health(n).get("consul") is True for n in lab.nodes), 30,
                   what="agents to watch Consul again")
        wait_until(lambda: all(lab.consul(lambda s, n=n: s.get(layout.node_key("lab", n))) for n in lab.nodes), 30,
                   what="every node's record back in Consul")
        timing("Consul back to all agents re-registered", time.monotonic() - t0)
    finally:
        results = [p.stop() for p in pingers]
    for sent, received in results:
        assert sent >= OUTAGE_S * 15
        assert received == sent, f"lost {sent - received} of {sent} pings during the Consul outage"
    for n in lab.nodes:
        assert set(wg_peers(lab, n)) == peers_before[n]

    lab.add_node("node4", start=False, wait=False)
    t0 = time.monotonic()
    lab.start_agent("node4")
    wait_until(lambda: os.path.exists(os.path.join(lab.node("node4").dir, "state.json")), 20, what="node4's lease")
    addr = lab.overlay_ip("node4")
    for n in ("node1", "node2", "node3"):
        wait_until(lambda n=n: ping_ok(lab, n, addr, 0.2), 20, interval=0, what=f"{n} to reach node4")
    timing("node added after the outage reachable from all", time.monotonic() - t0)
