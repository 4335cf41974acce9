"""Service lookup cost: connections per second to a VIP as the number of services grows, through
the eBPF socket load balancer and through an iptables DNAT chain built the kube-proxy way; and
how long the eBPF maps take to program.

Everything runs in one network namespace of the benchmark's own (root needed):
  - one C server (compiled with gcc at run time into a temporary directory) listening on
    0.0.0.0:8080; 10.244.0.0/16 is a `local` route on lo (AnyIP), so every backend address of
    every service is a real, distinct listening address, with no interface per address;
  - VIPs are 10.96.0.10 onwards, port 80, 4 backends each (10.244.x.y:8080, distinct per
    service). 10.96.0.0/16 is routed to lo so that a VIP has a route (iptables' DNAT in OUTPUT
    needs one) but nobody answers it: a connection the lookup did not rewrite times out, and
    counts as an error;
  - the client is the same C program: a single process in a tight loop of socket(), connect()
    (the SYN, SYN-ACK, ACK over lo), close() with SO_LINGER 0 (an RST: no TIME_WAIT, so source
    ports are free again at once and every connection is a new one). Measured here without
    netfilter, the same loop in Python made ~31 000 connections/s and in C ~34 500: Python adds
    ~3 us (10 %) of its own to each ~29 us connection, a share the lookup's cost would be
    diluted by; C leaves the whole time to the kernel. One client keeps the second core free
    for the server and softirqs. It counts successful connects over --seconds, after a 0.2 s
    warm-up.

Configurations, each measured once per round, rounds alternating forward and backward and
medians reported; every ratio is taken within a round first (the machine is shared and noisy):
  - baseline: straight to a backend address, no load balancer;
  - eBPF N: the client in a cgroup v2 group where a ServiceLB with N services is attached (one
    load balancer, pin dir and group per size, all loaded at once, so sizes alternate too);
  - iptables N: the client outside those groups; the nat table holds the kube-proxy layout for
    all N services: KUBE-SERVICES-<N> with one rule per VIP (`-d VIP/32 -p tcp --dport 80 -j
    KUBE-SVC-...`, and the KUBE-NODEPORTS rule at its end), each KUBE-SVC chain picking one of
    4 KUBE-SEP chains with `-m statistic --mode random --probability` 1/4, 1/3, 1/2, each
    KUBE-SEP marking hairpin traffic for masquerade and doing the DNAT. OUTPUT jumps to the
    chain of the size being measured, or to an empty chain for the eBPF and baseline runs (the
    table, and so conntrack, is there in every run: the runs differ by the lookup only). Built
    with iptables-restore; --iptables picks nft (nf_tables, Debian's default `iptables`) or
    legacy (x_tables).
For N > 1 two VIPs are measured: the middle one (index N/2: kube-proxy writes services in no
particular order, so a VIP's rule is on average halfway down KUBE-SERVICES) and the last one
programmed (the whole chain for iptables; for the eBPF hash map order means nothing, measured
in case it does). The aim of 2x over iptables is judged on the middle VIP.

conntrack: only a connection's first packet goes through the nat table. Every connection here
is new (an RST ends each, the namespace's conntrack CLOSE timeout is 1 s), and at the end the
packet counters of the measured services' KUBE-SVC chains are checked against the number of
connection attempts: equal means every first packet walked the chain.

Programming: `--cold-starts` times, a fresh pin dir (empty maps) is loaded and attached, and
update_many() of the largest size (10 000 services x 4 backends by default) is timed; then
--changes single update() calls, each changing one backend of one service, are timed
(median, p99).

    .venv/bin/python bench/service_lookup.py --seconds 2 --rounds 5 --sizes 1 1000 10000
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from _common import figure, finished, netns_command, pct
from wiremesh.tunnels.bpf import (
    Backend,
    Frontend,
    ServiceLB,
    cgroup_for,
    ensure_cgroup2,
    mount_bpffs,
    pin_dir_for,
    remove_cgroup,
)

VIP_BASE = int(ipaddress.IPv4Address("10.96.0.10"))
VIP_ROUTE = "10.96.0.0/16"
BACKEND_BASE = int(ipaddress.IPv4Address("10.244.0.1"))
BACKEND_ROUTE = "10.244.0.0/16"
VPORT, BPORT, SPARE_PORT = 80, 8080, 8081
PER_SERVICE = 4
MAX_SERVICES = 13_000  # wm_lb4_services holds 65 536 entries: 1 + 4 per service
AIM_FLAT, AIM_RATIO, AIM_COLD_S, AIM_CHANGE_S = 0.05, 2.0, 0.5, 0.002

CONN_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

/* Accept and close, as fast as connections come: one listener on 0.0.0.0:PORT. */
static int serve(int port)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	struct epoll_event ev = {.events = EPOLLIN}, evs[8];
	int one = 1, s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), ep = epoll_create1(0), c;

	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4096)) {
		perror("listen");
		return 1;
	}
	ev.data.fd = s;
	epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		if (epoll_wait(ep, evs, 8, -1) < 0 && errno != EINTR)
			return 1;
		while ((c = accept4(s, NULL, NULL, 0)) >= 0)
			close(c);
	}
}

/* connect() + close() with an RST, for SECONDS after a 0.2 s warm-up; prints one JSON line. */
static int client(const char *ip, int port, double seconds)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	struct linger lg = {1, 0};
	struct timeval tv = {1, 0};	/* a connect nobody answers fails after 1 s */
	long ok = 0, err = 0, attempts = 0;
	int first_err = 0;
	double t0 = now(), t1 = t0, end = t0 + 0.2;

	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1)
		return 2;
	for (int counting = 0; counting < 2; counting++) {
		if (counting) {
			t0 = now();
			end = t0 + seconds;
			ok = err = 0;
		}
		do {
			int s = socket(AF_INET, SOCK_STREAM, 0);

			if (s < 0) {
				perror("socket");
				return 1;
			}
			setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
			attempts++;
			if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) {
				ok++;
			} else {
				err++;
				if (!first_err)
					first_err = errno;
			}
			setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
			close(s);
		} while ((t1 = now()) < end);
	}
	printf("{\"connections\": %ld, \"errors\": %ld, \"attempts\": %ld, \"seconds\": %.6f, "
	       "\"first_error\": \"%s\"}\n", ok, err, attempts, t1 - t0, first_err ? strerror(first_err) : "");
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "serve"))
		return serve(atoi(argv[2]));
	if (argc == 5 && !strcmp(argv[1], "connect"))
		return client(argv[2], atoi(argv[3]), atof(argv[4]));
	fprintf(stderr, "usage: wmconn serve PORT | wmconn connect ADDR PORT SECONDS\n");
	return 2;
}
"""


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- services and backends ---------------------------------------------------------------------

def vip(i: int) -> str:
    return str(ipaddress.IPv4Address(VIP_BASE + i))


def backend_address(i: int, j: int) -> str:
    return str(ipaddress.IPv4Address(BACKEND_BASE + PER_SERVICE * i + j))


def frontend(i: int) -> Frontend:
    return Frontend(vip(i), VPORT, "tcp")


def backends(i: int) -> list[Backend]:
    return [Backend(backend_address(i, j), BPORT, cluster_id=1) for j in range(PER_SERVICE)]


def services(n: int) -> dict[Frontend, list[Backend]]:
    return {frontend(i): backends(i) for i in range(n)}


def positions(n: int) -> list[tuple[str, int]]:
    """The VIPs measured among n services: (label, index)."""
    return [("only", 0)] if n == 1 else [("middle", n // 2), ("last", n - 1)]


# ---- kube-proxy's iptables layout --------------------------------------------------------------

def _hash(prefix: str, text: str) -> str:
    """kube-proxy's chain names: a prefix and 16 base32 characters of a SHA-256."""
    return prefix + base64.b32encode(hashlib.sha256(text.encode()).digest())[:16].decode()


def svc_chain(i: int) -> str:
    return _hash("KUBE-SVC-", f"bench/svc-{i}:http/tcp")


def sep_chain(i: int, j: int) -> str:
    return _hash("KUBE-SEP-", f"bench/svc-{i}:http/tcp{backend_address(i, j)}:{BPORT}")


def services_chain(n: int) -> str:
    return f"KUBE-SERVICES-{n}"


OFF_CHAIN = "KUBE-SERVICES-OFF"  # what OUTPUT jumps to when iptables is not the one measured
PORTALS = ["-m", "comment", "--comment", "kubernetes service portals"]


def kube_proxy_table(n: int) -> str:
    """iptables-restore input: the nat table of kube-proxy for services 0..n-1, OUTPUT -> OFF_CHAIN."""
    chains = ["KUBE-MARK-MASQ", "KUBE-NODEPORTS", OFF_CHAIN, services_chain(n)]
    rules = ["-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"]
    for i in range(n):
        name, svc = f"bench/svc-{i}:http", svc_chain(i)
        chains.append(svc)
        for j in range(PER_SERVICE):
            sep, addr, left = sep_chain(i, j), backend_address(i, j), PER_SERVICE - j
            chains.append(sep)
            stat = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
            rules.append(f'-A {svc} -m comment --comment "{name} -> {addr}:{BPORT}" {stat}-j {sep}')
            rules.append(f'-A {sep} -s {addr}/32 -m comment --comment "{name}" -j KUBE-MARK-MASQ')
            rules.append(f'-A {sep} -p tcp -m comment --comment "{name}" -m tcp '
                         f'-j DNAT --to-destination {addr}:{BPORT}')
    rules += _services_rules(n)
    rules.append(f'-A OUTPUT -m comment --comment "kubernetes service portals" -j {OFF_CHAIN}')
    return "*nat\n" + "".join(f":{c} - [0:0]\n" for c in chains) + "\n".join(rules) + "\nCOMMIT\n"


def _services_rules(n: int) -> list[str]:
    chain = services_chain(n)
    rules = [f'-A {chain} -d {vip(i)}/32 -p tcp -m comment --comment "bench/svc-{i}:http cluster IP" '
             f'-m tcp --dport {VPORT} -j {svc_chain(i)}' for i in range(n)]
    rules.append(f'-A {chain} -m comment --comment "kubernetes service nodeports; NOTE: this must be the last '
                 f'rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    return rules


def services_chains(sizes: list[int]) -> str:
    """iptables-restore --noflush input: KUBE-SERVICES-<n> for the smaller sizes (same KUBE-SVC chains)."""
    return ("*nat\n" + "".join(f":{services_chain(n)} - [0:0]\n" for n in sizes)
            + "".join("\n".join(_services_rules(n)) + "\n" for n in sizes) + "COMMIT\n")


# ---- measurements ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    kind: str  # baseline | ebpf | iptables
    size: int
    position: str
    index: int

    @property
    def name(self) -> str:
        return "baseline" if self.kind == "baseline" else f"{self.kind} N={self.size} {self.position}"

    def target(self) -> tuple[str, int]:
        if self.kind == "baseline":
            return backend_address(self.index, 0), BPORT
        return vip(self.index), VPORT


@dataclass
class Run:
    connections: int
    errors: int
    attempts: int
    seconds: float
    first_error: str

    @property
    def rate(self) -> float:
        return self.connections / self.seconds


@dataclass
class Bench:
    sizes: list[int]
    seconds: float
    rounds: int
    changes: int
    cold_starts: int
    iptables: str  # nft | legacy
    uniq: str = field(default_factory=lambda: secrets.token_hex(3))
    netns: str = ""
    tmp: Path | None = None
    conn: Path = Path()
    server: subprocess.Popen[str] | None = None
    cgroup_root: Path | None = None
    lbs: list[ServiceLB] = field(default_factory=list)
    groups: dict[int, Path] = field(default_factory=dict)
    by_size: dict[int, ServiceLB] = field(default_factory=dict)
    output_target: str = OFF_CHAIN
    runs: dict[Config, list[Run]] = field(default_factory=dict)
    programming: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)

    # -- set-up and tear-down --

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.netns, *args], check=True, capture_output=True, text=True)

    def in_netns(self, *argv: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(netns_command(self.netns, argv), input=stdin, capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(argv[:3])} in {self.netns} failed: {p.stderr.strip()[-600:]}")
        return p

    def set_up(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="wm-service-lookup-"))
        self.conn = self.tmp / "wmconn"
        (self.tmp / "wmconn.c").write_text(CONN_C)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(self.conn), str(self.tmp / "wmconn.c")], check=True)
        self.tmp.chmod(0o755)

        mount_bpffs()
        ensure_cgroup2()
        self.cgroup_root = cgroup_for(f"wiremesh-bench/service-lookup-{self.uniq}")
        self.netns = f"wmsl-{self.uniq}"
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
        self.ip("link", "set", "lo", "up")
        self.ip("route", "add", "local", BACKEND_ROUTE, "dev", "lo")  # every backend address answers
        self.ip("route", "add", VIP_ROUTE, "dev", "lo")  # VIPs have a route, nobody answers them
        self.server = subprocess.Popen(netns_command(self.netns, [str(self.conn), "serve", str(BPORT)]),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.server.stdout is not None
        if self.server.stdout.readline().strip() != "ready":
            raise SystemExit(f"the server did not start: {self.server.stderr.read() if self.server.stderr else ''}")

    def tear_down(self) -> list[str]:
        """Undo everything set_up and the runs made; returns what could not be undone."""
        problems = []
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        for lb in self.lbs:
            try:
                lb.unload()
            except Exception as e:  # keep going: the rest must be cleaned all the same
                problems.append(f"unload {lb.pin_dir}: {e}")
        if self.netns:
            p = subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, text=True)
            if p.returncode != 0 and Path(f"/run/netns/{self.netns}").exists():
                problems.append(f"ip netns del {self.netns}: {p.stderr.strip()}")
        if self.cgroup_root is not None:
            _kill_members(self.cgroup_root)  # a client interrupted between fork and exec
            try:
                remove_cgroup(self.cgroup_root)
            except Exception as e:
                problems.append(str(e))
            try:
                self.cgroup_root.parent.rmdir()
            except OSError:
                pass  # another benchmark's group is still in wiremesh-bench
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return problems

    # -- iptables --

    def ipt(self, tool: str) -> str:
        return f"iptables-{self.iptables}{tool}"

    def build_iptables(self) -> None:
        n = max(self.sizes)
        table = kube_proxy_table(n)
        say(f"iptables ({self.iptables}): restoring kube-proxy's nat table for {n} services x {PER_SERVICE} "
            f"backends ({table.count(chr(10))} lines)")
        t0 = time.perf_counter()
        self.in_netns(self.ipt("-restore"), "-w", stdin=table, timeout=600)
        self.programming["iptables_restore_s"] = time.perf_counter() - t0
        smaller = [s for s in self.sizes if s != n]
        if smaller:
            self.in_netns(self.ipt("-restore"), "-w", "--noflush", stdin=services_chains(smaller), timeout=600)
        # Every connection is new: a closed one leaves conntrack after 1 s (the table would fill).
        subprocess.run(["ip", "netns", "exec", self.netns, "sysctl", "-qw",
                        "net.netfilter.nf_conntrack_tcp_timeout_close=1"], check=True, capture_output=True)

    def point_output(self, chain: str) -> None:
        if chain != self.output_target:
            self.in_netns(self.ipt(""), "-w", "-t", "nat", "-R", "OUTPUT", "1", *PORTALS, "-j", chain)
            self.output_target = chain

    def svc_packets(self) -> dict[int, int]:
        """Packets that went through each KUBE-SVC chain (its rules' counters summed), by service."""
        wanted = {svc_chain(c.index): c.index for c in self.runs if c.kind == "iptables"}
        out = dict.fromkeys(wanted.values(), 0)
        dump = self.in_netns(self.ipt("-save"), "-c", "-t", "nat", timeout=600).stdout
        for line in dump.splitlines():
            if line.startswith("[") and " -A KUBE-SVC-" in line:
                counters, _, chain = line.split(" ", 3)[:3]
                if chain in wanted:
                    out[wanted[chain]] += int(counters[1:-1].split(":")[0])
        return out

    # -- eBPF --

    def load_lbs(self) -> None:
        assert self.cgroup_root is not None
        n = max(self.sizes)
        for size in self.sizes:
            self.groups[size] = cgroup_for(f"{self.cgroup_root.relative_to(ensure_cgroup2())}/n{size}")
        table = services(n)
        load_s, write_s = [], []
        for k in range(self.cold_starts):  # a fresh pin dir each time: empty maps
            lb = ServiceLB(pin_dir_for(f"bench-sl-{self.uniq}-n{n}-{k}"), self.groups[n])
            self.lbs.append(lb)
            t0 = time.perf_counter()
            lb.load_or_adopt()
            t1 = time.perf_counter()
            lb.update_many(table)
            t2 = time.perf_counter()
            load_s.append(t1 - t0)
            write_s.append(t2 - t1)
            say(f"eBPF cold start {k + 1}/{self.cold_starts}: load+attach {1e3 * (t1 - t0):.0f} ms, "
                f"update_many {n} x {PER_SERVICE} {1e3 * (t2 - t1):.0f} ms")
            if k + 1 < self.cold_starts:
                lb.unload()
            else:
                self.by_size[n] = lb
        self.programming.update(cold_services=n, cold_update_many_s=write_s, cold_load_s=load_s)
        held = self.by_size[n].read()
        if len(held) != n or any(len(e.backends) != PER_SERVICE for e in held.values()):
            raise SystemExit(f"the maps hold {len(held)} services after update_many of {n}")
        for size in self.sizes:
            if size == n:
                continue
            lb = ServiceLB(pin_dir_for(f"bench-sl-{self.uniq}-n{size}"), self.groups[size])
            self.lbs.append(lb)
            lb.load_or_adopt()
            lb.update_many(services(size))
            self.by_size[size] = lb

    def time_changes(self) -> None:
        n = max(self.sizes)
        lb = self.by_size[n]
        rng = random.Random(1)
        times, i = [], 0
        for k in range(self.changes):
            if k % 2 == 0:  # one backend replaced by another (same address, another port)...
                i, j = rng.randrange(n), rng.randrange(PER_SERVICE)
                new = backends(i)
                new[j] = Backend(backend_address(i, j), SPARE_PORT, cluster_id=1)
            else:  # ... and back: each update() is one backend change of one service
                new = backends(i)
            fe = frontend(i)
            t0 = time.perf_counter()
            lb.update(fe, new)
            times.append(time.perf_counter() - t0)
        held = lb.read()
        bad = [i for i in range(n) if list(held[frontend(i)].backends) != backends(i)]
        if len(held) != n or bad:
            raise SystemExit(f"after {self.changes} changes the maps are wrong: {len(held)} services, {bad[:5]}")
        self.programming["change_s"] = times

    # -- connection runs --

    def configs(self) -> list[Config]:
        out = [Config("baseline", 0, "direct", 0)]
        for kind in ("ebpf", "iptables"):
            out += [Config(kind, n, label, i) for n in self.sizes for label, i in positions(n)]
        return out

    def run(self, c: Config) -> Run:
        if c.kind == "iptables":
            self.point_output(services_chain(c.size))
        else:
            self.point_output(OFF_CHAIN)
        ip, port = c.target()
        argv = [str(self.conn), "connect", ip, str(port), str(self.seconds)]
        cgroup = self.groups[c.size] if c.kind == "ebpf" else None
        p = subprocess.run(netns_command(self.netns, argv, cgroup), capture_output=True, text=True,
                           timeout=self.seconds + 60)
        if p.returncode != 0:
            raise SystemExit(f"client {c.name} failed: {p.stderr.strip()[-600:]}")
        r = Run(**json.loads(p.stdout))
        if r.errors or not r.connections:
            raise SystemExit(f"{c.name}: {r.errors} failed connects of {r.attempts} ({r.first_error}): "
                             "the lookup did not rewrite the VIP")
        return r

    def measure(self) -> None:
        configs = self.configs()
        self.runs = {c: [] for c in configs}
        for r in range(self.rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for c in order:
                run = self.run(c)
                self.runs[c].append(run)
                say(f"round {r + 1}/{self.rounds} {c.name:<26} {run.rate:>9,.0f} conn/s")
        self.point_output(OFF_CHAIN)
        # Did conntrack let every first packet through the chain? (iptables runs only.)
        packets = self.svc_packets()
        for i, seen in sorted(packets.items()):
            attempts = sum(run.attempts for c, runs in self.runs.items() if c.kind == "iptables" and c.index == i
                           for run in runs)
            self.checks.append({"service": i, "vip": vip(i), "connect_attempts": attempts, "svc_chain_packets": seen})


def _kill_members(group: Path) -> None:
    """SIGKILL the processes left in our own cgroup and its children (only ours can be there)."""
    pids = [int(x) for f in group.rglob("cgroup.procs") for x in f.read_text().split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline and any(f.read_text().strip() for f in group.rglob("cgroup.procs")):
        time.sleep(0.05)


# ---- report ------------------------------------------------------------------------------------

def median_ratio(a: list[Run], b: list[Run]) -> float:
    """Median over rounds of a's rate / b's rate (same round)."""
    return statistics.median(x.rate / y.rate for x, y in zip(a, b, strict=True))


def report(b: Bench) -> dict[str, Any]:
    base = next(c for c in b.runs if c.kind == "baseline")
    rows: list[dict[str, Any]] = []
    ebpf1 = b.runs[Config("ebpf", 1, "only", 0)] if 1 in b.sizes else None
    for n in b.sizes:
        for label, i in positions(n):
            e, t = b.runs[Config("ebpf", n, label, i)], b.runs[Config("iptables", n, label, i)]
            rows.append({
                "services": n, "vip": label, "vip_address": vip(i),
                "ebpf_conn_s": statistics.median(r.rate for r in e),
                "iptables_conn_s": statistics.median(r.rate for r in t),
                "ebpf_over_iptables": median_ratio(e, t),
                "ebpf_vs_n1": median_ratio(e, ebpf1) - 1 if ebpf1 is not None else None,
                "ebpf_over_baseline": median_ratio(e, b.runs[base]),
                "iptables_over_baseline": median_ratio(t, b.runs[base]),
            })
    cold = b.programming["cold_update_many_s"]
    change = b.programming["change_s"]
    n = max(b.sizes)
    aims: list[dict[str, Any]] = []
    flat = [r for r in rows if r["ebpf_vs_n1"] is not None and r["services"] > 1]
    if flat:
        worst = max(flat, key=lambda r: abs(r["ebpf_vs_n1"]))
        aims.append({"aim": f"eBPF flat within {AIM_FLAT:.0%} from 1 to {n:,} services",
                     "figure": f"worst {100 * worst['ebpf_vs_n1']:+.1f} % (N={worst['services']:,}, {worst['vip']} VIP)",
                     "met": abs(worst["ebpf_vs_n1"]) <= AIM_FLAT})
    mid = next(r for r in rows if r["services"] == n and r["vip"] in ("middle", "only"))
    last = next(r for r in rows if r["services"] == n and r["vip"] in ("last", "only"))
    aims.append({"aim": f"eBPF at least {AIM_RATIO:.0f}x iptables at {n:,} services (middle VIP)",
                 "figure": f"{mid['ebpf_over_iptables']:.2f}x (last VIP: {last['ebpf_over_iptables']:.2f}x)",
                 "met": mid["ebpf_over_iptables"] >= AIM_RATIO})
    aims.append({"aim": f"{n:,} services x {PER_SERVICE} backends programmed from cold in at most {AIM_COLD_S} s",
                 "figure": f"median {1e3 * statistics.median(cold):.0f} ms, max {1e3 * max(cold):.0f} ms",
                 "met": statistics.median(cold) <= AIM_COLD_S})
    aims.append({"aim": f"one backend change in at most {AIM_CHANGE_S * 1e3:.0f} ms",
                 "figure": f"p50 {1e6 * statistics.median(change):.0f} us, p99 {1e6 * pct(change, 99):.0f} us",
                 "met": pct(change, 99) <= AIM_CHANGE_S})
    return {
        "method": {"client": "C loop, 1 process: socket + connect + close with RST, per connection",
                   "seconds": b.seconds, "rounds": b.rounds, "iptables": f"iptables-{b.iptables}",
                   "cpus": os.cpu_count(), "kernel": os.uname().release},
        "baseline_conn_s": statistics.median(r.rate for r in b.runs[base]),
        "rows": rows,
        "programming": {
            "cold_services": n, "backends_per_service": PER_SERVICE, "cold_starts": len(cold),
            "cold_update_many_s": {"median": statistics.median(cold), "min": min(cold), "max": max(cold)},
            "cold_load_attach_s": {"median": statistics.median(b.programming["cold_load_s"])},
            "change_s": {"count": len(change), "p50": statistics.median(change), "p99": pct(change, 99),
                         "max": max(change)},
            "iptables_restore_s": b.programming["iptables_restore_s"],
        },
        "conntrack_check": b.checks,
        "aims": aims,
    }


def print_table(rep: dict[str, Any]) -> None:
    m = rep["method"]
    print(f"service lookup: connections/s to a VIP (1 C client, connect + RST close, {m['seconds']:g} s x "
          f"{m['rounds']} rounds, medians; ratios are medians of per-round ratios)")
    print(f"iptables: {m['iptables']}, kube-proxy layout; conntrack on in every run; {m['cpus']} CPUs, "
          f"kernel {m['kernel']}")
    print(f"baseline, straight to a backend (no lookup): {rep['baseline_conn_s']:,.0f} conn/s")
    print()
    head = ["services", "VIP", "eBPF conn/s", "iptables conn/s", "eBPF/iptables", "eBPF vs N=1",
            "eBPF/baseline", "iptables/baseline"]
    lines = []
    for r in rep["rows"]:
        vs1 = "-" if r["ebpf_vs_n1"] is None else f"{100 * r['ebpf_vs_n1']:+.1f} %"
        lines.append([f"{r['services']:,}", r["vip"], f"{r['ebpf_conn_s']:,.0f}", f"{r['iptables_conn_s']:,.0f}",
                      f"{r['ebpf_over_iptables']:.2f}x", vs1, f"{r['ebpf_over_baseline']:.2f}",
                      f"{r['iptables_over_baseline']:.2f}"])
    widths = [max(len(h), *(len(x[k]) for x in lines)) for k, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for x in lines:
        print("  ".join(v.rjust(w) for v, w in zip(x, widths, strict=True)))
    p = rep["programming"]
    print()
    print(f"eBPF maps, cold start (fresh pin dir, empty maps), update_many of {p['cold_services']:,} services x "
          f"{p['backends_per_service']} backends: median {1e3 * p['cold_update_many_s']['median']:.0f} ms "
          f"(min {1e3 * p['cold_update_many_s']['min']:.0f}, max {1e3 * p['cold_update_many_s']['max']:.0f}, "
          f"{p['cold_starts']} cold starts); loading + attaching the programs before it: "
          f"{1e3 * p['cold_load_attach_s']['median']:.0f} ms")
    print(f"eBPF maps, one backend of one service changed (update()): p50 {1e6 * p['change_s']['p50']:.0f} us, "
          f"p99 {1e6 * p['change_s']['p99']:.0f} us, max {1e6 * p['change_s']['max']:.0f} us "
          f"({p['change_s']['count']} changes among {p['cold_services']:,} services)")
    print(f"for comparison, iptables-restore of the same {p['cold_services']:,} x {p['backends_per_service']} "
          f"(kube-proxy's full sync): {p['iptables_restore_s']:.2f} s")
    checks = rep["conntrack_check"]
    ok = all(c["connect_attempts"] == c["svc_chain_packets"] for c in checks)
    print("conntrack: " + ("every iptables connection's first packet walked KUBE-SERVICES ("
                           if ok else "MISMATCH, some first packets skipped the chain (") +
          ", ".join(f"{c['vip']}: {c['svc_chain_packets']:,} packets / {c['connect_attempts']:,} connects"
                    for c in checks) + ")")
    print()
    print("aims:")
    for a in rep["aims"]:
        print(f"  {'met    ' if a['met'] else 'NOT met'}  {a['aim']}: {a['figure']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one connection run")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over every configuration")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 1000, 10000], help="services programmed")
    ap.add_argument("--changes", type=int, default=200, help="single backend changes timed")
    ap.add_argument("--cold-starts", type=int, default=5, help="cold starts of the largest size timed")
    ap.add_argument("--iptables", choices=["auto", "nft", "legacy"], default="auto",
                    help="iptables backend (auto: the one `iptables` is)")
    ap.add_argument("--smoke", action="store_true",
                    help="the smallest run that still measures everything "
                         "(--sizes 1 100 --seconds 0.3 --rounds 1 --changes 10 --cold-starts 1)")
    ap.add_argument("--output", choices=["table", "json"], default="table")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.seconds, args.rounds, args.changes, args.cold_starts = [1, 100], 0.3, 1, 10, 1
    sizes = sorted(set(args.sizes))
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespace, cgroups, BPF, iptables)")
    if sizes[0] < 1 or sizes[-1] > MAX_SERVICES:
        raise SystemExit(f"--sizes: 1 to {MAX_SERVICES} services")
    if args.seconds <= 0 or args.rounds < 1 or args.changes < 2 or args.cold_starts < 1:
        raise SystemExit("--seconds > 0, --rounds >= 1, --changes >= 2, --cold-starts >= 1")
    backend = args.iptables
    if backend == "auto":
        v = subprocess.run(["iptables", "-V"], capture_output=True, text=True).stdout if shutil.which("iptables") else ""
        backend = "nft" if "nf_tables" in v else "legacy"
    missing = [t for t in ("gcc", "nsenter", "ip", f"iptables-{backend}-restore") if not shutil.which(t)]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run scripts/setup.sh")

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)

    bench = Bench(sizes, args.seconds, args.rounds, args.changes, args.cold_starts, backend)
    try:
        bench.set_up()
        bench.build_iptables()
        bench.load_lbs()
        bench.measure()
        say(f"timing {args.changes} single backend changes")
        bench.time_changes()
        rep = report(bench)
    except KeyboardInterrupt:
        say("interrupted")
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("cleaning up")
        problems = bench.tear_down()
        for p in problems:
            say(f"clean-up: {p}")
    if args.output == "json":
        print(json.dumps(rep, indent=2))
    else:
        print_table(rep)
    for a in rep["aims"]:
        figure(a["aim"], f"{a['figure']} ({'met' if a['met'] else 'NOT met'})")
    finished("service_lookup")


if __name__ == "__main__":
    main()
