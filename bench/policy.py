"""Network policy's cost: new connections per second and TCP throughput between two pods, with
the policy programs enforcing and without; the same connection rate as the policy grows, beside
an iptables chain of the same size; how long the agent takes to compile a policy; and the BPF
programs' own time per packet (bpf_stats).

Everything runs in network namespaces of the benchmark's own (root needed), routed as the CNI
plugin does: a "node" namespace forwards between two pods' veths (/32 addresses, proxy ARP on
the host sides). The server pod `sv` (10.77.0.3, app=server) runs the C accept loop of
service_lookup.py's CONN_C on 8080 (and iperf3); the client pod `cl` (10.77.0.2, app=client)
connects and closes with an RST in a tight loop. Configurations, each once per round, rounds
alternating forward and backward, medians and within-round ratios reported:
  - baseline: no program on the veths, no iptables rule;
  - policy N: tc programs on both veths, the server's ingress enforced by policies of N rules
    (50 to a policy):
    N-1 allow TCP 8080 from distinct world /32s (198.18.0.0/15: each its own CIDR identity),
    the last one from `app == "client"` (compiled by the agent's own code, agent.policy_plan;
    the per-packet lookup is one hash lookup per new flow whatever N is);
  - iptables N: no program; the node's FORWARD chain sends new connections through N rules of
    the same meaning (-s 198.18.x.y/32 ... -j ACCEPT, the client's last, then DROP).
Figures: connections/s of each, ratios to baseline (aim for policy: >= 0.95x, flat in N within
5 %), throughput ratio (iperf3, aim >= 0.95x), compile time per N, and the programs'
run_time_ns / run_cnt while the policy runs. --smoke: sizes 1 and 10, 0.3 s runs, one round.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import figure, finished, netns_command, stop_on_sigterm
from service_lookup import CONN_C

from wiremesh.agent.policy_plan import LocalEndpoint, PolicyInputs, plan_policy
from wiremesh.clustermesh import parse_policy
from wiremesh.tunnels import PIN_ROOT, PolicyDatapath, mount_bpffs, remove_policy_pins
from wiremesh.tunnels.bpf import tc
from wiremesh.tunnels.netns import run_in_netns

CL, SV = "10.77.0.2", "10.77.0.3"
PORT = 8080
IPERF_PORT = 5201


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


class Rig:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.node, self.cl, self.sv = f"wmpb-{tag}-node", f"wmpb-{tag}-cl", f"wmpb-{tag}-sv"
        self.pin = PIN_ROOT / f"bench-policy-{tag}"
        self.tmp = Path(tempfile.mkdtemp(prefix="wm-bench-policy-"))
        self.procs: list[subprocess.Popen[str]] = []
        self.dp: PolicyDatapath | None = None
        self.ifindex: dict[str, int] = {}

    def set_up(self) -> None:
        (self.tmp / "wmconn.c").write_text(CONN_C)
        sh("gcc", "-O2", "-Wall", "-o", str(self.tmp / "wmconn"), str(self.tmp / "wmconn.c"))
        self.tmp.chmod(0o755)
        for n in (self.node, self.cl, self.sv):
            sh("ip", "netns", "add", n)
            sh("ip", "-n", n, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "-n", self.node, "addr", "add", "169.254.1.1/32", "dev", "lo")  # the pods' gateway (answered by ARP)
        for pod, addr, host in ((self.cl, CL, "hcl"), (self.sv, SV, "hsv")):
            sh("ip", "-n", self.node, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", pod)
            sh("ip", "-n", self.node, "link", "set", host, "up")
            sh("ip", "netns", "exec", self.node, "sysctl", "-qw", f"net.ipv4.conf.{host}.proxy_arp=1")
            sh("ip", "netns", "exec", self.node, "sysctl", "-qw", f"net.ipv4.neigh.{host}.proxy_delay=0")
            sh("ip", "-n", self.node, "route", "add", f"{addr}/32", "dev", host)
            sh("ip", "-n", pod, "addr", "add", f"{addr}/32", "dev", "eth0")
            sh("ip", "-n", pod, "link", "set", "eth0", "up")
            sh("ip", "-n", pod, "route", "add", "169.254.1.1", "dev", "eth0")
            sh("ip", "-n", pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
            self.ifindex[host] = json.loads(sh("ip", "-n", self.node, "-j", "link", "show", host).stdout)[0]["ifindex"]
        sh("ip", "netns", "exec", self.node, "iptables", "-N", "WMBENCH")
        self.start(self.sv, str(self.tmp / "wmconn"), "serve", str(PORT), ready=True)
        if shutil.which("iperf3"):
            self.start(self.sv, "iperf3", "-s", "-p", str(IPERF_PORT))
        mount_bpffs()
        self.dp = PolicyDatapath(self.pin).load_or_adopt()

    def start(self, ns: str, *argv: str, ready: bool = False) -> None:
        p = subprocess.Popen(netns_command(ns, argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(p)
        if ready:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"{argv[0]} did not start in {ns}")

    def tear_down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.dp is not None:
            self.dp.close()
        for n in (self.cl, self.sv, self.node):
            sh("ip", "netns", "del", n, check=False)
        remove_policy_pins(self.pin)
        shutil.rmtree(self.pin, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- configurations ----

    def bare(self) -> None:
        for host in self.ifindex:
            run_in_netns(f"/run/netns/{self.node}", PolicyDatapath.detach, self.ifindex[host])
        sh("ip", "netns", "exec", self.node, "iptables", "-F", "FORWARD")

    def policy(self, maps: object) -> None:
        self.bare()
        assert self.dp is not None
        self.dp.sync(maps)  # type: ignore[arg-type]
        for host in self.ifindex:
            run_in_netns(f"/run/netns/{self.node}", self.dp.attach, self.ifindex[host])

    def iptables(self, n: int) -> None:
        self.bare()
        rules = ["*filter", ":WMBENCH - [0:0]",
                 "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                 f"-A FORWARD -d {SV}/32 -j WMBENCH"]
        rules += [f"-A WMBENCH -s {world(i)}/32 -p tcp --dport {PORT} -j ACCEPT" for i in range(n - 1)]
        rules += [f"-A WMBENCH -s {CL}/32 -p tcp --dport {PORT} -j ACCEPT", "-A WMBENCH -j DROP", "COMMIT", ""]
        sh("ip", "netns", "exec", self.node, "iptables", "-F", "WMBENCH")
        subprocess.run(["ip", "netns", "exec", self.node, "iptables-restore", "--noflush"], input="\n".join(rules),
                       check=True, capture_output=True, text=True)

    def connections(self, seconds: float) -> float:
        out = sh(*netns_command(self.cl, [str(self.tmp / "wmconn"), "connect", SV, str(PORT), str(seconds)])).stdout
        r = json.loads(out)
        if r["errors"]:
            raise SystemExit(f"{r['errors']} failed connections ({r['first_error']}): the allowed flow was dropped")
        return float(r["connections"]) / float(r["seconds"])

    def throughput(self, seconds: float) -> float | None:
        if not shutil.which("iperf3"):
            return None
        p = sh(*netns_command(self.cl, ["iperf3", "-c", SV, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]),
               check=False)
        try:
            return float(json.loads(p.stdout)["end"]["sum_received"]["bits_per_second"])
        except (ValueError, KeyError) as e:
            raise SystemExit(f"iperf3 failed ({e}): {p.stdout[-400:]}{p.stderr[-400:]}") from None


def world(i: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.0")) + i + 1))


def policies_of(n: int) -> list[object]:
    """N rules of the same meaning (see the module's docstring), 50 to a policy (a policy holds 64)."""
    rules = [{"action": "allow", "from": {"cidrs": [f"{world(i)}/32"]}, "ports": [{"port": PORT}]} for i in range(n - 1)]
    rules.append({"action": "allow", "from": {"selector": 'app == "client"'},
                  "ports": [{"port": PORT}, {"port": IPERF_PORT}]})
    return [parse_policy({"name": f"bench-{n}-{k}", "selector": 'app == "server"', "ingress": rules[k:k + 50]})
            for k in range(0, len(rules), 50)]


def compiled(rig: Rig, n: int) -> tuple[object, float]:
    local = [LocalEndpoint(rig.ifindex["hsv"], SV, {"app": "server"}), LocalEndpoint(rig.ifindex["hcl"], CL, {"app": "client"})]
    t0 = time.perf_counter()
    plan = plan_policy(PolicyInputs("bench", local, {}, policies_of(n), ("10.77.0.0/16",)))  # type: ignore[arg-type]
    return plan.maps, time.perf_counter() - t0


def bpf_ns_per_packet(rig: Rig, seconds: float) -> float | None:
    """The policy programs' run_time_ns / run_cnt over a connection run (kernel.bpf_stats_enabled)."""
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = path.read_text().strip()
    ids = [run_in_netns(f"/run/netns/{rig.node}", tc.attached, rig.ifindex[h], point)
           for h in rig.ifindex for point in (tc.INGRESS, tc.EGRESS)]

    def stats() -> tuple[int, int]:
        t = c = 0
        for i in set(ids):
            info = json.loads(sh("bpftool", "prog", "show", "id", str(i), "-j").stdout)
            t, c = t + info.get("run_time_ns", 0), c + info.get("run_cnt", 0)
        return t, c
    try:
        path.write_text("1")
        t0, c0 = stats()
        rig.connections(seconds)
        t1, c1 = stats()
    finally:
        path.write_text(before)
    return (t1 - t0) / (c1 - c0) if c1 > c0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 1000, 10000], help="rules (50 to a policy)")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each connection run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="sizes 1 and 10, 0.3 s runs, one round")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.seconds, args.rounds = [1, 10], 0.3, 1
    if os.geteuid() != 0:
        raise SystemExit("bench/policy.py needs root (network namespaces, BPF, tc)")
    stop_on_sigterm()
    rig = Rig()
    try:
        rig.set_up()
        maps = {}
        for n in args.sizes:
            maps[n], secs = compiled(rig, n)
            figure(f"policy of {n} rules compiled (agent.policy_plan)", f"{secs * 1000:.1f} ms")
        configs = ["baseline", *(f"policy {n}" for n in args.sizes), *(f"iptables {n}" for n in args.sizes)]
        runs: dict[str, list[float]] = {c: [] for c in configs}
        ratios: dict[str, list[float]] = {c: [] for c in configs}
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else list(reversed(configs))
            got = {}
            for c in order:
                say(f"  {c}...")
                kind, _, size = c.partition(" ")
                if kind == "baseline":
                    rig.bare()
                elif kind == "policy":
                    rig.policy(maps[int(size)])
                else:
                    rig.iptables(int(size))
                got[c] = rig.connections(args.seconds)
            for c in configs:
                runs[c].append(got[c])
                ratios[c].append(got[c] / got["baseline"])
            say(f"round {r + 1}: " + ", ".join(f"{c} {got[c]:.0f}/s" for c in configs))
        for c in configs:
            figure(f"new connections/s, {c}", f"{statistics.median(runs[c]):.0f} ({statistics.median(ratios[c]):.3f}x baseline)")
        big = max(args.sizes)
        figure(f"policy {big} rules vs 1 rule, connections/s", f"{statistics.median(ratios[f'policy {big}']) / statistics.median(ratios['policy 1']):.3f}x")
        figure(f"policy vs iptables at {big} rules, connections/s", f"{statistics.median(runs[f'policy {big}']) / statistics.median(runs[f'iptables {big}']):.2f}x")
        rig.bare()
        base_bw = rig.throughput(max(1.0, args.seconds))
        rig.policy(maps[min(args.sizes)])
        pol_bw = rig.throughput(max(1.0, args.seconds))
        if base_bw and pol_bw:
            figure("TCP throughput with policy vs without (iperf3)", f"{pol_bw / 1e9:.2f} vs {base_bw / 1e9:.2f} Gbit/s "
                   f"({pol_bw / base_bw:.3f}x)")
        ns = bpf_ns_per_packet(rig, args.seconds)
        figure("policy programs' own time per packet (bpf_stats run_time_ns/run_cnt)", f"{ns:.0f} ns" if ns else "n/a")
    finally:
        rig.tear_down()
    finished("policy")


if __name__ == "__main__":
    main()
