"""The fault suite (issue 12): one lab of 3 nodes on a 3-server Consul cluster, each fault a test.

For every fault: pings between the nodes it does not touch lose nothing (asserted); the nodes it
touches converge within 5 s of the heal (a partition: 2 s; asserted, from the heal); nothing is left half-configured
(every device's peers are exactly the current records' keys, every peer's pod CIDR routed on
wm0). A table of faults, packets lost and time to heal is printed at the end of the module.

node3 is the node the faults touch; node1 <-> node2 is the untouched pair. Pings run at 100/s
(a 2-core host runs the lab, three Consul servers and the pytest process).
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from wiremesh.clustermesh import NodeRecord, layout
from wiremesh.lab import Lab
from wiremesh.lab.netns import pid_alive, sh

from .conftest import new_lab_name
from .helpers import FastPinger, Gap, enlarge_udp_buffers, ping_ok, wait_until, wg_peers
from .test_rotation import _DELAY_RELAY, describe_gaps

HEAL_S = 5.0  # the bound: affected nodes converge within this of the heal
PARTITION_HEAL_S = 2.0  # issue 17: a partitioned node's tunnels are back within this of the heal
SESSION_TTL = 4  # the agents' session_ttl: a node cut off loses its record within ~4 s
PING_INTERVAL = 0.01
NODE = "node3"  # the node each fault touches
UNTOUCHED = ("node1", "node2")
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"

# fault -> (untouched: sent, lost), (touched: sent, lost), seconds to heal
TABLE: list[tuple[str, tuple[int, int], tuple[int, int] | None, float]] = []


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """3 nodes, 3 Consul servers; the fault table written when the module ends."""
    lab = Lab(new_lab_name())
    try:
        lab.up(3, consul_servers=3, session_ttl=SESSION_TTL)
        enlarge_udp_buffers(lab)
        yield lab
    finally:
        keep = tmp_path_factory.mktemp("fault-logs")
        for n in lab.nodes:
            log = Path(lab.node(n).dir) / "agent.log"
            if log.exists():
                (keep / f"{n}.log").write_bytes(log.read_bytes())
        lab.down()
        _print_table(request)


def _print_table(request: pytest.FixtureRequest) -> None:
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is None or not TABLE:
        return
    capture = request.config.pluginmanager.get_plugin("capturemanager")  # a fixture's teardown is captured
    with capture.global_and_fixture_disabled():
        tr.write_line("")
        tr.section("fault suite")
        tr.write_line(f"{'fault':<34} {'untouched lost/sent':>20} {'node3 lost/sent':>16} {'heal (s)':>9}")
        for fault, (us, ul), touched, heal in TABLE:
            t = f"{touched[1]}/{touched[0]}" if touched else "-"
            tr.write_line(f"{fault:<34} {f'{ul}/{us}':>20} {t:>16} {heal:>9.2f}")


# --- reading the lab -------------------------------------------------------------------------


def records(lab: Lab) -> dict[str, NodeRecord]:
    _, items = lab.consul(lambda s: s.list(layout.cluster_prefix("lab") + "nodes/"))
    out = {}
    for item in items.values():
        rec = NodeRecord.from_json(item.value)
        out[rec.name] = rec
    return out


def unclean(lab: Lab) -> str | None:
    """Why the mesh is half-configured, or None: each node's device lists exactly the other
    nodes' current record keys, with their pod CIDRs as allowed IPs and routed on wm0."""
    try:
        recs = records(lab)
    except Exception as e:  # noqa: BLE001 - Consul between leaders: not clean yet
        return f"records: {e}"
    if set(recs) != set(lab.nodes):
        return f"records of {sorted(recs)}, nodes {sorted(lab.nodes)}"
    for n in lab.nodes:
        if recs[n].public_key != lab.run(n, "wg", "show", "wm0", "public-key").stdout.strip():
            return f"{n}: device key is not its record's"
        peers = wg_peers(lab, n)
        want = {r.public_key: r for m, r in recs.items() if m != n}
        if set(peers) != set(want):
            return f"{n}: {len(peers)} peers, not the {len(want)} current keys"
        routes = {line.split()[0] for line in lab.run(n, "ip", "-o", "route", "show", "dev", "wm0").stdout.splitlines()}
        for key, r in want.items():
            if r.pod_cidr not in peers[key]["allowed_ips"]:
                return f"{n}: peer {r.name} lacks allowed IP {r.pod_cidr}"
            if r.pod_cidr not in routes:
                return f"{n}: no route to {r.name}'s {r.pod_cidr} on wm0"
    return None


def healthy(lab: Lab, n: str) -> bool:
    return unhealthy(lab, n) is None


def unhealthy(lab: Lab, n: str) -> str | None:
    """Why node n's agent is not healthy (status ok, every other node's peer programmed), or None."""
    h = lab.health(n)
    if h.get("status") == "ok" and h.get("peers_programmed") == len(lab.nodes) - 1:
        return None
    return f"{n}: " + ", ".join(f"{k} {h.get(k)}" for k in ("status", "consul", "peers_programmed", "error") if k in h)


def passes_traffic(lab: Lab) -> bool:
    """node3 and each other node reach each other through the tunnel, both ways (a device
    configured right may still pass nothing until its peers' handshakes are done)."""
    return no_traffic(lab) is None


def no_traffic(lab: Lab) -> str | None:
    for a, b in ((x, y) for n in UNTOUCHED for x, y in ((NODE, n), (n, NODE))):
        if not ping_ok(lab, a, lab.overlay_ip(b), 0.2):
            return f"no ping {a} -> {b}"
    return None


def not_converged(lab: Lab) -> str | None:
    """Why the mesh has not converged yet (the first reason found), or None."""
    for n in lab.nodes:
        if (why := unhealthy(lab, n)) is not None:
            return why
    return unclean(lab) or no_traffic(lab)


# what kept the last wait_converged from converging, and until when: [(seconds since `since`, why)]
TRAIL: list[tuple[float, str]] = []


def wait_converged(lab: Lab, since: float, what: str, timeout: float = 30.0) -> float:
    """Wait until every agent is healthy, the mesh clean and node3's tunnels pass traffic;
    seconds since `since`. What held it, reason by reason, is left in TRAIL (see `trail`)."""
    TRAIL.clear()

    def converged() -> bool:
        why = not_converged(lab)
        if why is not None and (not TRAIL or TRAIL[-1][1] != why):
            TRAIL.append((time.monotonic() - since, why))
        return why is None
    wait_until(converged, timeout, interval=0.05, what=f"{what}: convergence ({trail()})")
    return time.monotonic() - since


def trail() -> str:
    """The reasons the last wait_converged waited for, each from when it was first seen."""
    return "; ".join(f"+{t:.2f} s {why}" for t, why in TRAIL) or "nothing waited for"


class Traffic:
    """Pings both ways between the untouched nodes and, if asked, between node1 and the touched node.

    `mark(what)` notes when a step of the fault happened (wall clock, as ping -D stamps its
    replies): a loss is then told with its gaps, how long each was and when against the marks."""

    def __init__(self, lab: Lab, tmp: Path, touched: bool) -> None:
        self.lab, self.tmp = lab, tmp
        self.marks: dict[str, int] = {}  # step -> unix time in ms
        self.gaps: dict[str, list[Gap]] = {}  # "node1 -> node3" -> its pings' gaps, once stopped
        a, b = UNTOUCHED
        self.untouched = [FastPinger(lab, a, lab.overlay_ip(b), tmp / "ab.txt", PING_INTERVAL),
                          FastPinger(lab, b, lab.overlay_ip(a), tmp / "ba.txt", PING_INTERVAL)]
        self.touched = [FastPinger(lab, a, lab.overlay_ip(NODE), tmp / "a3.txt", PING_INTERVAL),
                        FastPinger(lab, NODE, lab.overlay_ip(a), tmp / "3a.txt", PING_INTERVAL)] if touched else []
        wait_until(lambda: all(p.out.stat().st_size > 0 for p in self.untouched + self.touched), 15,
                   what="pings started")

    def mark(self, what: str) -> None:
        self.marks[what] = int(time.time() * 1000)

    def stop(self) -> tuple[tuple[int, int], tuple[int, int] | None]:
        def total(ps: list[FastPinger]) -> tuple[int, int]:
            res = [p.stop() for p in ps]
            for p, r in zip(ps, res):
                if r[2]:
                    self.gaps[f"{p.node} -> {p.addr}"] = r[2]
            return sum(r[0] for r in res), sum(r[1] for r in res)
        return total(self.untouched), (total(self.touched) if self.touched else None)

    def lost(self, sent_lost: tuple[int, int] | None) -> str:
        """`sent_lost` as an assertion's message, with every gap of every ping (when, how long)."""
        gaps = "; ".join(f"{who}: {describe_gaps(g, self.marks)}" for who, g in self.gaps.items())
        return f"lost {sent_lost and sent_lost[1]} of {sent_lost and sent_lost[0]}" + (f" ({gaps})" if gaps else "")

    def kill(self) -> None:
        for p in self.untouched + self.touched:
            if p.proc.poll() is None:
                p.stop()


def report(fault: str, traffic: Traffic, heal: float, counted: Callable[[str, float, str], None],
           timing: Callable[[str, float], None]) -> tuple[tuple[int, int], tuple[int, int] | None]:
    untouched, touched = traffic.stop()
    TABLE.append((fault, untouched, touched, heal))
    counted(f"fault {fault}: pings between untouched nodes: lost (of {untouched[0]})", untouched[1], "packets")
    if touched:
        counted(f"fault {fault}: pings to/from {NODE}: lost (of {touched[0]})", touched[1], "packets")
    timing(f"fault {fault}: heal to converged", heal)
    return untouched, touched


@pytest.fixture
def mesh(lab: Lab) -> Iterator[Lab]:
    """The lab, clean before the test and brought back to clean after it, whatever happened."""
    if unclean(lab) is not None or not all(healthy(lab, n) for n in lab.nodes):
        for n in lab.nodes:
            lab.start_agent(n)
    # Traffic flows everywhere before a fault is made (a device configured right may still pass
    # nothing until handshakes are done): every test starts from the same state.
    wait_converged(lab, time.monotonic(), "before the fault")
    a, b = UNTOUCHED
    wait_until(lambda: ping_ok(lab, a, lab.overlay_ip(b), 0.2) and ping_ok(lab, b, lab.overlay_ip(a), 0.2), 30,
               what="the untouched nodes to reach each other before the fault")
    yield lab


# --- 1. a node partitioned ---------------------------------------------------------------------


def test_node_partitioned(mesh: Lab, tmp_path: Path, counted: Any, timing: Any) -> None:
    lab = mesh
    hub_if = f"n{lab.node(NODE).index}"
    hub = lab.cluster_state()["hub"]
    traffic = Traffic(lab, tmp_path, touched=True)
    try:
        traffic.mark("link down")
        sh("ip", "-n", hub, "link", "set", hub_if, "down")
        # Until its record has expired and the others have dropped its tunnel: the full fault.
        wait_until(lambda: NODE not in records(lab), 4 * SESSION_TTL + 5, interval=0.1,
                   what=f"{NODE}'s record to expire")
        wait_until(lambda: all(len(wg_peers(lab, n)) == 1 for n in UNTOUCHED), 10, what="peers to drop node3")
        t_heal = time.monotonic()
        traffic.mark("heal")
        sh("ip", "-n", hub, "link", "set", hub_if, "up")
        heal = wait_converged(lab, t_heal, "partition healed")
        heal_trail = trail()
        traffic.mark("healed")
        wait_until(lambda: all(p.proc.poll() is None for p in traffic.touched), 1, what="pings alive")
    finally:
        sh("ip", "-n", hub, "link", "set", hub_if, "up", check=False)
        traffic.kill()
    untouched, _ = report("node partitioned (link down)", traffic, heal, counted, timing)
    # The nodes the partition does not touch lose nothing, whatever the heal took.
    assert untouched[1] == 0, traffic.lost(untouched)
    log_tail = (Path(lab.node(NODE).dir) / "agent.log").read_text(errors="replace").splitlines()[-25:]
    assert heal <= PARTITION_HEAL_S, f"healed in {heal:.1f} s (waited for: {heal_trail}); {NODE}'s log:\n" + \
        "\n".join(log_tail)


# --- 2. the agent SIGKILLed in a loop -------------------------------------------------------------


def test_agent_killed_in_a_loop(mesh: Lab, tmp_path: Path, counted: Any, timing: Any) -> None:
    lab = mesh
    traffic = Traffic(lab, tmp_path, touched=True)
    worst, worst_trail = 0.0, ""
    try:
        for i in range(5):
            traffic.mark(f"kill {i + 1}")
            lab.stop_agent(NODE, signal.SIGKILL)
            t_heal = time.monotonic()
            lab.start_agent(NODE)
            took = wait_converged(lab, t_heal, "agent restarted after SIGKILL")
            if took > worst:
                worst, worst_trail = took, f"restart {i + 1}: {trail()}"
            time.sleep(0.5)  # running a moment before the next kill
    finally:
        lab.start_agent(NODE)
        traffic.kill()
    untouched, touched = report("agent SIGKILLed x5 under traffic", traffic, worst, counted, timing)
    assert untouched[1] == 0, traffic.lost(untouched)
    # A restart never touches the device: the tunnels to the killed node carry on too.
    assert touched is not None and touched[1] == 0, traffic.lost(touched)
    assert worst <= HEAL_S, f"converged in {worst:.1f} s after a restart (waited for: {worst_trail})"


# --- 3. the state dir full ----------------------------------------------------------------------


def test_state_dir_full(mesh: Lab, tmp_path: Path, counted: Any, timing: Any) -> None:
    lab = mesh
    d = lab.node(NODE).dir
    saved = tmp_path / "state"
    saved.mkdir()
    traffic = Traffic(lab, tmp_path, touched=True)
    with ExitStack() as stack:
        stack.callback(traffic.kill)
        # A 512 KiB tmpfs over the state dir inside the node's mount namespace (the host's view
        # and the agent's log, opened outside, stay as they are), holding a copy of the dir, then
        # filled to the last byte.
        lab.run(NODE, "sh", "-c", f"cp -a {d}/. {saved}/ && mount -t tmpfs -o size=512k wmfull {d} && "
                f"cp -a {saved}/. {d}/ && rm -f {d}/agent.log", check=True)

        def unmount() -> None:  # what the agent wrote meanwhile goes back to the real dir
            lab.run(NODE, "sh", "-c", f"rm -f {d}/fill; cp -a {d}/. {saved}/; umount -l {d}")
            for f in saved.iterdir():
                if f.is_file() and f.name != "agent.log":
                    (Path(d) / f.name).write_bytes(f.read_bytes())
        stack.callback(unmount)
        lab.run(NODE, "sh", "-c", f"dd if=/dev/zero of={d}/fill bs=4k 2>/dev/null; true")
        assert lab.run(NODE, "sh", "-c", f"echo x > {d}/probe").returncode != 0, "the state dir is not full"
        log = Path(d) / "agent.log"
        at = log.stat().st_size
        lab.stop_agent(NODE, signal.SIGKILL)
        lab.start_agent(NODE)
        wait_until(lambda: lab.health(NODE).get("status") in ("ok", "degraded") or not pid_alive(lab.node(NODE).pid), 15,
                   what=f"{NODE}'s agent up or gone")
        time.sleep(2)  # the agent runs on a full disk for a while
        text = log.read_bytes()[at:].decode(errors="replace")
        assert healthy(lab, NODE), f"{NODE}'s agent with a full state dir: {lab.health(NODE)}; log: {text[-1500:]}"
        assert "no space" in text.lower(), f"the agent does not say its state dir is full: {text[-1500:]}"
        t_heal = time.monotonic()
        lab.run(NODE, "rm", "-f", f"{d}/fill")
        heal = wait_converged(lab, t_heal, "space freed")
        heal_trail = trail()
    untouched, touched = report("state dir full", traffic, heal, counted, timing)
    assert untouched[1] == 0, traffic.lost(untouched)
    assert touched is not None and touched[1] == 0, traffic.lost(touched)
    assert heal <= HEAL_S, f"healed in {heal:.1f} s (waited for: {heal_trail})"


# --- 4. Consul slow and lossy -------------------------------------------------------------------

SLOW_MS = 200
LOSS = 0.1
MARK = "0x99"
# The lab's relay (test_rotation) with its own connections to Consul marked, so that they escape
# the redirect that brings the agent's to it.
_MARKED_RELAY = (
    "import socket\n"
    "def _marked(addr, timeout=None):\n"
    "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, %s); s.settimeout(timeout)\n"
    "    s.connect(addr); return s\n"
    "socket.create_connection = _marked\n" % MARK
) + _DELAY_RELAY


def test_consul_slow_and_lossy(mesh: Lab, tmp_path: Path, counted: Any, timing: Any) -> None:
    """No netem here: a relay in node3 delays its Consul traffic SLOW_MS each way (set-up included),
    an iptables redirect brings the agent's connections to it, and the `statistic` match drops
    LOSS of the relay's packets to Consul (TCP retransmits them: lost packets on a real link)."""
    lab = mesh
    hub_ip = lab.cluster_state()["hub_ip"]
    rules = [["-t", "nat", "OUTPUT", "-p", "tcp", "-d", hub_ip, "--dport", "8500", "-m", "mark", "!", "--mark", MARK,
              "-j", "REDIRECT", "--to-ports", "18500"],
             ["-t", "filter", "OUTPUT", "-p", "tcp", "-d", hub_ip, "--dport", "8500", "-m", "statistic", "--mode",
              "random", "--probability", str(LOSS), "-j", "DROP"]]
    traffic = Traffic(lab, tmp_path, touched=True)
    relay = lab.popen(NODE, sys.executable, "-u", "-c", _MARKED_RELAY, "18500", hub_ip, "8500", str(SLOW_MS / 1000),
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    with ExitStack() as outer, ExitStack() as stack:
        outer.callback(traffic.kill)

        def end_relay() -> None:
            relay.kill()
            relay.wait()
        stack.callback(end_relay)
        assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"

        def iptables(op: str, rule: list[str], check: bool = True) -> None:
            table, chain, rest = rule[1], rule[2], rule[3:]
            lab.run(NODE, "iptables", "-w", "-t", table, op, chain, *rest, check=check)
        for rule in rules:
            iptables("-A", rule)
            stack.callback(iptables, "-D", rule, False)
        # The agent's open connections were made before the redirect: a restart (SIGKILL, as
        # a crash: the record stays) makes all of them anew, through the slow link, bootstrap included.
        t0 = time.monotonic()
        traffic.mark("kill")
        lab.stop_agent(NODE, signal.SIGKILL)
        lab.start_agent(NODE)
        traffic.mark("restart")
        timing("fault consul slow: agent restarted through the slow link, converged",
               wait_converged(lab, t0, "agent on a slow Consul"))
        traffic.mark("converged")
        time.sleep(2 * SESSION_TTL)  # sessions renewed through it for longer than their TTL
        assert (why := unclean(lab)) is None, f"on a slow Consul: {why}"
        assert healthy(lab, NODE), lab.health(NODE)
        counters = lab.run(NODE, "iptables", "-w", "-t", "nat", "-L", "OUTPUT", "-n", "-v", "-x", check=True).stdout
        redirected = sum(int(line.split()[0]) for line in counters.splitlines() if "REDIRECT" in line)
        assert redirected > 0, f"the agent's Consul traffic never went through the relay: {counters}"
        t_heal = time.monotonic()
        traffic.mark("heal")
        stack.close()  # rules removed, relay gone: the agent's connections break and are made again
        heal = wait_converged(lab, t_heal, "Consul fast again")
        heal_trail = trail()
        traffic.mark("healed")
    untouched, touched = report("consul slow (200 ms, 10% loss)", traffic, heal, counted, timing)
    assert untouched[1] == 0, traffic.lost(untouched)
    assert touched is not None and touched[1] == 0, traffic.lost(touched)
    assert heal <= HEAL_S, f"healed in {heal:.1f} s (waited for: {heal_trail})"


# --- 5. the clock stepped ---------------------------------------------------------------------


def _log_clock(log: Path, at: int) -> float:
    """The time of the last line written to `log` after byte `at` (the agent's own clock)."""
    lines = log.read_bytes()[at:].decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
    return 0.0


def test_clock_step(mesh: Lab, tmp_path: Path, counted: Any, timing: Any) -> None:
    """node3's agent under libfaketime (Debian's faketime): its offset read from a file every
    second, so that the clock steps +10 minutes under the running agent, and back at the heal.
    CLOCK_REALTIME only (FAKETIME_DONT_FAKE_MONOTONIC): a step moves wall time, never the
    monotonic clock. The agent is Python (dynamically linked): LD_PRELOAD reaches time() and
    clock_gettime(); wireguard-go (Go, static) keeps the true time, as the kernel's WireGuard would."""
    if not os.path.exists(FAKETIME_LIB):
        pytest.skip(f"{FAKETIME_LIB} missing: run scripts/setup.sh (it installs faketime)")
    lab = mesh
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    wrapper = ["env", f"LD_PRELOAD={FAKETIME_LIB}", f"FAKETIME_TIMESTAMP_FILE={offset}",
               "FAKETIME_CACHE_DURATION=1", "FAKETIME_DONT_FAKE_MONOTONIC=1"]
    log = Path(lab.node(NODE).dir) / "agent.log"
    lab.stop_agent(NODE, signal.SIGKILL)
    lab.start_agent(NODE, wrapper=wrapper)
    try:
        wait_converged(lab, time.monotonic(), "agent under faketime +0")
        traffic = Traffic(lab, tmp_path, touched=True)
        try:
            at = log.stat().st_size
            offset.write_text("+600\n")  # +10 minutes
            # Held long enough for the agent to see it, renew its session a few times, and for a
            # full pass; the step shows in its log's timestamps (a restart of its watch logs a line).
            time.sleep(2 * SESSION_TTL)
            # The same preload in the node reads the same file: the step is in place.
            ahead = int(lab.run(NODE, *wrapper, "date", "+%s", check=True).stdout) - time.time()
            assert 590 < ahead < 610, ahead
            # Certificates checked 10 minutes ahead: the agent started again in the shifted time
            # leases its CIDR on its certificate and verifies its peers' (SIGKILL: the record stays).
            lab.stop_agent(NODE, signal.SIGKILL)
            lab.start_agent(NODE, wrapper=wrapper)
            wait_converged(lab, time.monotonic(), "agent restarted 10 minutes ahead")
            logged = _log_clock(log, at)  # the agent's log, by its own clock
            assert logged > time.time() + 500, f"{NODE}'s agent does not run 10 minutes ahead ({logged - time.time():.0f} s)"
            assert (why := unclean(lab)) is None, f"{NODE} 10 minutes ahead: {why}"
            assert all(healthy(lab, n) for n in lab.nodes), {n: lab.health(n) for n in lab.nodes}
            t_heal = time.monotonic()
            offset.write_text("+0\n")
            heal = wait_converged(lab, t_heal, "clock back")
            heal_trail = trail()
        finally:
            traffic.kill()
    finally:
        lab.stop_agent(NODE, signal.SIGKILL)
        lab.start_agent(NODE)
    untouched, touched = report("clock +10 min on one node", traffic, heal, counted, timing)
    assert untouched[1] == 0, traffic.lost(untouched)
    assert touched is not None and touched[1] == 0, traffic.lost(touched)
    assert heal <= HEAL_S, f"healed in {heal:.1f} s (waited for: {heal_trail})"


# --- 6. the Consul leader killed ---------------------------------------------------------------
# Last: in the minutes after a leader is lost, the hub's Consul client agent still sends some
# RPCs to the dead or rejoining server ("failed to get conn"), which slowed the heal of the next
# fault run after it (a partition: 7.5-10 s instead of 0.8 s alone).


def test_consul_leader_lost(mesh: Lab, tmp_path: Path, counted: Any, timing: Any) -> None:
    lab = mesh
    leader = lab.consul_leader()
    assert leader is not None
    traffic = Traffic(lab, tmp_path, touched=True)  # every node is a Consul client here: all count as touched
    try:
        t_kill = time.monotonic()
        lab.stop_consul_server(leader, sig=signal.SIGKILL)
        elected = wait_until(lambda: lab.consul_leader() not in (None, leader), 20, interval=0.1,
                             what="a new Consul leader")
        timing("fault consul leader: SIGKILL to a new leader", elected)
        # Longer than a session's TTL (the agents renew through the new leader) and the agents
        # follow Consul all along: records stay, the mesh stays clean.
        time.sleep(2 * SESSION_TTL)
        wait_until(lambda: all(lab.health(n).get("consul") is True for n in lab.nodes), 10,
                   what="agents watching Consul again without its old leader")
        assert (why := unclean(lab)) is None, f"without the old leader: {why}"
        assert time.monotonic() - t_kill > 2 * SESSION_TTL
        t_heal = time.monotonic()
        lab.start_consul_server(leader)
        heal = wait_converged(lab, t_heal, "leader back")
        heal_trail = trail()
    finally:
        lab.start_consul_server(leader)
        traffic.kill()
    untouched, touched = report("consul leader SIGKILLed", traffic, heal, counted, timing)
    assert untouched[1] == 0, traffic.lost(untouched)
    assert touched is not None and touched[1] == 0, traffic.lost(touched)
    assert heal <= HEAL_S, f"healed in {heal:.1f} s (waited for: {heal_trail})"
