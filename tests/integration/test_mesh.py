"""A 3-node lab on real Consul and wireguard-go: the acceptance of the node mesh.

The tests share one lab and run in file order; the ones at the end change membership.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path


from wiremesh.clustermesh import layout
from wiremesh.keys import read_key_file
from wiremesh.lab import Lab

from .helpers import Pinger, ping_ok, record_key, wait_until, wg_peers

MARK = "5769726d65736821"  # "Wiremesh!" as ping's payload pattern, to look for in captures


def overlays(lab: Lab) -> dict[str, str]:
    return {n: lab.overlay_ip(n) for n in lab.nodes}


def running(lab: Lab) -> list[str]:
    return sorted(n for n, node in lab.nodes.items() if node.pid)


def test_every_node_pings_every_other(lab3: Lab) -> None:
    addrs = overlays(lab3)
    for a, b in itertools.permutations(sorted(addrs), 2):
        assert ping_ok(lab3, a, addrs[b]), f"{a} cannot ping {b} at {addrs[b]}"


def test_underlay_carries_only_wireguard(lab3: Lab, tmp_path: Path) -> None:
    pcap = tmp_path / "underlay.pcap"
    cap = lab3.popen("hub", "tcpdump", "--immediate-mode", "-i", "br0", "-nn", "-U", "-w", str(pcap),
                     "ip and not host 10.99.0.1", stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        assert cap.stderr is not None
        assert b"listening on" in cap.stderr.readline()
        addrs = overlays(lab3)
        for a, b in itertools.permutations(sorted(addrs), 2):
            p = lab3.run(a, "ping", "-c", "2", "-i", "0.2", "-p", MARK, addrs[b])
            assert p.returncode == 0, p.stdout
    finally:
        cap.send_signal(signal.SIGINT)
        cap.wait(timeout=10)
    lines = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True).stdout.splitlines()
    assert len(lines) >= 12, "the capture saw no traffic between the nodes"
    for line in lines:
        assert " UDP" in line and ".51820 > " in line and ".51820: " in line, f"not WireGuard: {line}"
        assert "ICMP" not in line
    assert bytes.fromhex(MARK) * 2 not in pcap.read_bytes(), "plaintext ping payload on the underlay"


def test_wg_show_lists_exactly_the_live_peers(lab3: Lab) -> None:
    nodes = running(lab3)
    keys = {n: record_key(lab3, n) for n in nodes}
    for n in nodes:
        peers = wg_peers(lab3, n)
        others = [m for m in nodes if m != n]
        assert set(peers) == {keys[m] for m in others}
        for m in others:
            assert peers[keys[m]]["endpoint"] == f"{lab3.node(m).underlay}:51820"
            pod = json.loads(Path(lab3.node(m).dir, "state.json").read_text())["pod_cidr"]
            assert peers[keys[m]]["allowed_ips"] == {pod}


def test_key_files_are_private_and_never_in_consul(lab3: Lab) -> None:
    secrets = []
    for n, node in lab3.nodes.items():
        path = Path(node.dir) / "private.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        key = read_key_file(path)
        secrets += [key.secret_base64(), key.secret_hex(), key.secret_hex().upper()]
        log = (Path(node.dir) / "agent.log").read_text()
        assert not any(s in log for s in secrets[-3:]), f"{n}'s private key is in its log"
    dump = lab3.run("hub", "consul", "kv", "export", "-http-addr=http://10.99.0.1:8500", "", check=True).stdout
    assert "wiremesh/v1/clusters/lab/nodes/node1" in dump
    import base64

    values = " ".join(base64.b64decode(e["value"]).decode(errors="replace") for e in json.loads(dump))
    for s in secrets:
        assert s not in dump and s not in values


def test_status_inside_a_node(lab3: Lab) -> None:
    node = lab3.node("node1")
    p = lab3.run("node1", str(Path(lab3_bin())), "-o", "json", "status", "-c", f"{node.dir}/agent.toml", check=True)
    data = json.loads(p.stdout)
    by_name = {d["node"]: d for d in data["nodes"]}
    assert set(by_name) >= {"node1", "node2", "node3"}
    assert by_name["node1"]["local"] is True
    for other in ("node2", "node3"):
        assert by_name[other]["alive"] is True
        assert by_name[other]["latest_handshake"] > 0
        assert by_name[other]["rx_bytes"] > 0 and by_name[other]["tx_bytes"] > 0
    table = lab3.run("node1", lab3_bin(), "status", "-c", f"{node.dir}/agent.toml", check=True).stdout
    assert "node2" in table and "hs " in table


def lab3_bin() -> str:
    from wiremesh.lab.lab import wiremesh_binary

    return wiremesh_binary()


def _metric(lab: Lab, node: str, name: str) -> float:
    _, body = lab.http_get(lab.node(node).health_url + "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_bad_records_are_skipped_logged_and_counted(lab3: Lab) -> None:
    cl = "lab"
    good = json.loads(lab3.consul(lambda s: s.get(layout.node_key(cl, "node1"))).value)  # type: ignore[union-attr]
    node2_pod = json.loads(Path(lab3.node("node2").dir, "state.json").read_text())["pod_cidr"]

    def rec(name: str, **kw: object) -> str:
        d = dict(good, name=name)
        d.update(kw)
        return json.dumps(d)

    bad = {
        "bad-json": ("{not json", "not JSON"),
        "bad-key": (rec("bad-key", public_key="AAAA"), "public_key"),
        "bad-endpoint": (rec("bad-endpoint", endpoint="10.99.0.50"), "endpoint"),
        "bad-range": (rec("bad-range", pod_cidr="192.168.7.0/24", overlay_ip="192.168.7.1"), "outside"),
        "bad-dup": (rec("bad-dup", pod_cidr=node2_pod, overlay_ip=node2_pod.rsplit(".", 1)[0] + ".1",
                        public_key="Wm9uZGVyV2lyZW1lc2hLZXkwMDAwMDAwMDAwMDAwMDA="), "leased to node 'node2'"),
        "bad-huge": ("x" * (1024 * 1024), "over the"),
    }
    before = _metric(lab3, "node3", "wiremesh_invalid_records_total")
    try:
        for name, (value, _) in bad.items():
            assert lab3.consul(lambda s, n=name, v=value: s.put(layout.node_key(cl, n), v))
        for n in running(lab3):
            wait_until(lambda n=n: _metric(lab3, n, "wiremesh_records_invalid") == len(bad), 10,
                       what=f"{n} to count {len(bad)} invalid records")
        assert _metric(lab3, "node3", "wiremesh_invalid_records_total") - before == len(bad)
        for n in running(lab3):
            log = (Path(lab3.node(n).dir) / "agent.log").read_text().splitlines()
            for name, (_, reason) in bad.items():
                lines = [l for l in log if "skipping invalid record" in l and layout.node_key(cl, name) in l]
                assert len(lines) == 1, f"{n}: {name}: {lines}"
                assert reason in lines[0]
            assert len(wg_peers(lab3, n)) == 2
        addrs = overlays(lab3)
        assert ping_ok(lab3, "node1", addrs["node2"]) and ping_ok(lab3, "node3", addrs["node1"])
    finally:
        for name in bad:
            lab3.consul(lambda s, n=name: s.delete(layout.node_key(cl, n)))
    wait_until(lambda: _metric(lab3, "node1", "wiremesh_records_invalid") == 0, 10, what="invalid count back to 0")


def test_drift_is_repaired(lab3: Lab) -> None:
    key2 = record_key(lab3, "node2")

    def removed_by_hand() -> bool:
        # A pass the agent had pending (from the previous test's writes) may put it back at
        # once: remove it again until the removal holds.
        lab3.run("node1", "wg", "set", "wm0", "peer", key2, "remove", check=True)
        return key2 not in wg_peers(lab3, "node1")

    wait_until(removed_by_hand, 10, interval=0.2, what="the peer removed by hand to stay removed")
    os.kill(lab3.node("node1").pid, signal.SIGHUP)
    wait_until(lambda: key2 in wg_peers(lab3, "node1"), 10, what="node1 to restore the peer removed by hand")
    assert ping_ok(lab3, "node1", lab3.overlay_ip("node2"))


def test_device_comes_back_when_wireguard_go_dies(lab3: Lab) -> None:
    node = lab3.node("node3")
    pid = int(Path(node.dir, "wireguard-go-wm0.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: lab3.run("node3", "ip", "link", "show", "wm0").returncode != 0, 10, what="wm0 to vanish")
    os.kill(node.pid, signal.SIGHUP)  # or wait for the next periodic full pass
    wait_until(lambda: ping_ok(lab3, "node1", lab3.overlay_ip("node3"), 0.5), 20, interval=0,
               what="node1 to reach node3 over its new device")
    assert set(wg_peers(lab3, "node3")) == {record_key(lab3, "node1"), record_key(lab3, "node2")}


def test_agent_sigkill_and_restart_loses_no_packet(lab3: Lab, timing) -> None:  # type: ignore[no-untyped-def]
    pinger = Pinger(lab3, "node2", lab3.overlay_ip("node1"), interval=0.05)
    try:
        time.sleep(1)
        lab3.stop_agent("node1", signal.SIGKILL)
        time.sleep(0.5)
        t0 = time.monotonic()
        lab3.start_agent("node1")
        wait_until(lambda: lab3.health("node1").get("http") == 200, 20, what="node1's agent healthy again")
        timing("agent restart to healthy", time.monotonic() - t0)
        time.sleep(1)
    finally:
        sent, received = pinger.stop()
    assert sent >= 40
    assert received == sent, f"lost {sent - received} of {sent} pings across the agent restart"
    assert lab3.consul(lambda s: s.get(layout.node_key("lab", "node1"))) is not None


def test_fourth_node_is_reachable_quickly(lab3: Lab, timing) -> None:  # type: ignore[no-untyped-def]
    lab3.add_node("node4", start=False, wait=False)
    t0 = time.monotonic()
    lab3.start_agent("node4")
    wait_until(lambda: Path(lab3.node("node4").dir, "state.json").exists(), 20, what="node4's lease")
    addr = lab3.overlay_ip("node4")
    import concurrent.futures

    def reach(n: str) -> float:
        while not ping_ok(lab3, n, addr, wait_s=0.2):
            if time.monotonic() - t0 > 20:
                raise AssertionError(f"{n} cannot reach node4")
        return time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        took = list(ex.map(reach, ["node1", "node2", "node3"]))
    timing("new node reachable from all (from agent start)", max(took))
    lab3.wait_converged()


def test_sigterm_leaves_every_peer_list(lab3: Lab, timing) -> None:  # type: ignore[no-untyped-def]
    key4 = record_key(lab3, "node4")
    t0 = time.monotonic()
    lab3.stop_agent("node4", signal.SIGTERM, wait=False)
    took = wait_until(lambda: all(key4 not in wg_peers(lab3, n) for n in ("node1", "node2", "node3")), 15,
                      what="node4 to leave every peer list")
    timing("SIGTERM to gone from all peer lists", time.monotonic() - t0)
    assert took < 15


def test_sigkill_expires_with_the_session(lab3: Lab, timing) -> None:  # type: ignore[no-untyped-def]
    lab3.start_agent("node4")
    lab3.wait_converged()
    key4 = record_key(lab3, "node4")
    ttl = lab3.state["session_ttl"]
    t0 = time.monotonic()
    lab3.stop_agent("node4", signal.SIGKILL)
    wait_until(lambda: all(key4 not in wg_peers(lab3, n) for n in ("node1", "node2", "node3")), ttl + 10,
               interval=0.2, what="node4's record to expire")
    timing(f"SIGKILL to gone from all peer lists (ttl {ttl}s)", time.monotonic() - t0)
    addrs = overlays(lab3)
    assert ping_ok(lab3, "node1", addrs["node2"])
