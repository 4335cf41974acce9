"""What the benchmarks share: percentiles, a process's CPU and RSS, a bare blocking-query
watcher (the floor Consul itself sets), unique lab names, fake nodes' signed records and leases,
waiting for Consul's leader, clean-up on SIGTERM, and the summary lines every benchmark prints.

Every benchmark has `--smoke`: the smallest size that still runs the real thing (real Consul,
real wireguard-go, real kernel), in seconds; tests/integration/test_bench_smoke.py runs each one
that way, so a benchmark that rots fails the test command. The figures it prints are those of
the full benchmark, one per line as `figure: WHAT: VALUE`, and it ends with `bench: NAME ok`
(`figure()`, `finished()`). Nothing here asserts a time.

Not a benchmark itself; the scripts next to it import it (their own folder is on sys.path).
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType

from wiremesh.clustermesh import ClusterConfig, ConsulOptions, ConsulStore, NodeRecord, overlay_address
from wiremesh.clustermesh.signed import lease_value, sign_record
from wiremesh.errors import WiremeshError
from wiremesh.keys import NodeIdentity, PrivateKey, SigningKey, issue, read_signing_key
from wiremesh.lab import Lab
from wiremesh.lab import signing as lab_signing

CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads, live and exited), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of stat)


def lab_name(prefix: str) -> str:
    """A lab name no concurrent run uses (at most 12 characters)."""
    return prefix + secrets.token_hex(2)


def figure(what: str, value: object) -> None:
    """One headline figure, in the line format the smoke test looks for."""
    print(f"figure: {what}: {value}", flush=True)


def finished(name: str) -> None:
    """The last line of a benchmark that ran to its end."""
    print(f"bench: {name} ok", flush=True)


def stop_on_sigterm() -> None:
    """SIGTERM (a timeout, a test runner) unwinds like Ctrl-C, so every `finally` removes what
    the benchmark made (labs, namespaces, processes by pid, BPF pins)."""
    def interrupted(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)


def wait_leader(lab: Lab, timeout: float = 60.0) -> None:
    """Wait until every cluster of the lab has a Consul leader that answers KV reads (a WAN-joined
    or just restarted Consul may still be electing; its writes then fail with "no cluster leader")."""
    deadline = time.monotonic() + timeout
    for c in lab.clusters:
        last = "no answer"
        while True:
            try:
                if lab.consul(lambda s: s.leader(), c):
                    lab.consul(lambda s: s.list("wiremesh/"), c)
                    break
                last = "no leader yet"
            except WiremeshError as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise SystemExit(f"Consul of cluster {c} has no leader after {timeout:.0f}s: {last}")
            time.sleep(0.1)


class FakeNodes:
    """Nodes that do not exist, enrolled as the lab enrolls its real ones: each has an identity
    key and a certificate for its pod CIDR from the cluster's signing key (the lab keeps it), and
    signs its record and its lease. In an unsigned cluster, records and leases are plain."""

    VALIDITY_S = 86400

    def __init__(self, lab: Lab, cluster: ClusterConfig) -> None:
        self.cluster = cluster.name
        path = lab_signing.key_path(lab, cluster.name)
        self.ca: SigningKey | None = read_signing_key(path) if cluster.signing_key and path.exists() else None
        if cluster.require_signed and self.ca is None:
            raise SystemExit(f"cluster {cluster.name} requires signed records and the lab has no signing key ({path})")
        self.identities: dict[str, NodeIdentity] = {}

    def identity(self, name: str, pod_cidr: str) -> NodeIdentity | None:
        if self.ca is None:
            return None
        ident = self.identities.get(name)
        if ident is None or ident.certificate.pod_cidr != pod_cidr:
            key = SigningKey.generate()
            cert = issue(self.ca, self.cluster, name, key.public_key(), pod_cidr, self.VALIDITY_S, time.time())
            ident = self.identities[name] = NodeIdentity(cert, key)
        return ident

    def record(self, name: str, pod_cidr: str, endpoint: str, public_key: str | None = None) -> NodeRecord:
        """A fake node's record: a valid WireGuard key and the CIDR of its lease, signed."""
        rec = NodeRecord(name=name, cluster=self.cluster, endpoint=endpoint,
                         public_key=public_key or PrivateKey.generate().public_key().base64,
                         pod_cidr=pod_cidr, overlay_ip=overlay_address(pod_cidr))
        return self.sign(rec)

    def sign(self, rec: NodeRecord) -> NodeRecord:
        """`rec` (perhaps changed) signed again by its node."""
        ident = self.identity(rec.name, rec.pod_cidr)
        return rec if ident is None else sign_record(rec, ident)

    def change(self, rec: NodeRecord, **fields: object) -> NodeRecord:
        return self.sign(replace(rec, **fields))  # type: ignore[arg-type]

    def lease(self, name: str, pod_cidr: str) -> str:
        """The value of the node's IPAM lease of `pod_cidr`."""
        ident = self.identity(name, pod_cidr)
        return name if ident is None else lease_value(pod_cidr, ident)


def bare_watcher(lab: Lab, prefix: str, seen: dict[str, tuple[int, float]], stop: threading.Event,
                 dc: str | None = None) -> None:
    """A plain blocking-query loop, no validation: when does Consul tell a watcher at all?

    `seen[key]` is (ModifyIndex, when that version was first delivered). Cross-cluster, it asks
    the first cluster's Consul with dc=, as the agents do. Runs in the hub until `stop`.
    """
    store = ConsulStore(ConsulOptions(address=lab.consul_address(), timeout=5))

    def run() -> None:
        try:
            for _, items in store.watch(prefix, stop, wait_s=5, dc=dc):
                now = time.time()
                for k, item in items.items():
                    if seen.get(k, (None,))[0] != item.modify_index:
                        seen[k] = (item.modify_index, now)
        except WiremeshError:
            if not stop.is_set():  # the lab going down under a watch still waiting is no news
                raise
    threading.Thread(target=lambda: lab.hub_executor().call(run), daemon=True).start()


# Joins a cgroup v2 group (argv[1]: its cgroup.procs, or "" for none), then enters a network
# namespace (argv[2]) with nsenter, which execs the rest of argv in place (no extra process).
# The order matters: `ip netns exec` would remount /sys and hide the cgroup file system.
_NETNS_EXEC = r"""
import os, sys
if sys.argv[1]:
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
os.execvp("nsenter", ["nsenter", "--net=" + sys.argv[2], *sys.argv[3:]])
"""


def netns_command(netns: str, argv: Sequence[str], cgroup: Path | None = None) -> list[str]:
    """A command line that runs `argv` in network namespace `netns` (made by `ip netns add`) and,
    if given, in the cgroup v2 group `cgroup`, so that eBPF programs attached there apply to it.

    The process that ends up running `argv` is the one subprocess starts (nsenter execs it):
    its pid is the one to signal.
    """
    procs = str(cgroup / "cgroup.procs") if cgroup is not None else ""
    return [sys.executable, "-c", _NETNS_EXEC, procs, f"/run/netns/{netns}", *argv]
